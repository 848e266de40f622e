"""The exportable components: torch modules with clean signatures, described as data.

Each :class:`ComponentSpec` says what a component is called, which torch module it wraps, its input
and output names with symbolic axes, how to make example inputs of a given size, and how close the
converted model must stay to torch. Every target converts from these specs, so a target never needs
to know the inside of a U-Net, and the ControlNet residual layout lives here and in the manifest only.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from runtime.manifest import ModelInfo, TensorSpec
from sdexport.sources.base import Source
from sdexport.sources.diffusers import ControlNetSource
from sdexport.export.upscaler import SCALING_FACTOR, upscaler_noise_level

# --- torch wrappers: positional tensors in, a tuple of tensors out ------------------------------


class TextEncoder(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        out = self.model(input_ids, return_dict=True)
        return out.last_hidden_state, out.pooler_output


class UNet(torch.nn.Module):
    """The U-Net; with ``n_residuals`` it also takes ControlNet residuals (K down + 1 mid) as inputs."""

    def __init__(self, unet, n_residuals: int = 0, with_timestep_cond: bool = False, with_class_labels: bool = False):
        super().__init__()
        self.unet = unet
        self.n_residuals = n_residuals
        self.with_timestep_cond = with_timestep_cond
        self.with_class_labels = with_class_labels  # the x4 upscaler: the noise level as class labels

    def forward(self, sample, timestep, encoder_hidden_states, *extra):
        extra = list(extra)
        timestep_cond = extra.pop(0) if self.with_timestep_cond else None
        class_labels = extra.pop(0) if self.with_class_labels else None
        down = mid = None
        if self.n_residuals:
            down, mid = extra[:-1], extra[-1]
        return self.unet(
            sample,
            timestep,
            encoder_hidden_states,
            timestep_cond=timestep_cond,
            class_labels=class_labels,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
            return_dict=False,
        )[0]


class VaeEncoder(torch.nn.Module):
    """Image in [-1, 1] -> latent mean and (clamped) log-variance; the runtime samples with its own RNG."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, sample):
        moments = self.vae.encoder(sample)
        if self.vae.quant_conv is not None:
            moments = self.vae.quant_conv(moments)
        mean, logvar = torch.chunk(moments, 2, dim=1)
        return mean, torch.clamp(logvar, -30.0, 20.0)  # DiagonalGaussianDistribution's clamp


class VaeDecoder(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


class ControlNet(torch.nn.Module):
    """A ControlNet with one conditioning scale per residual (guess mode scales them differently)."""

    def __init__(self, controlnet):
        super().__init__()
        self.controlnet = controlnet

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale):
        down, mid = self.controlnet(
            sample,
            timestep,
            encoder_hidden_states,
            controlnet_cond=controlnet_cond,
            conditioning_scale=1.0,
            guess_mode=False,
            return_dict=False,
        )
        # diffusers multiplies each residual by its scale after the zero convolutions.
        scaled = [d * conditioning_scale[i] for i, d in enumerate(down)]
        return (*scaled, mid * conditioning_scale[len(down)])


# --- the model description the runtime needs -------------------------------------------------


def residual_layout(unet_config: dict) -> tuple[tuple[int, int], ...]:
    """(channels, downsampling) of each ControlNet residual: the U-Net's down-block outputs, then mid."""
    channels = list(unet_config["block_out_channels"])
    layers = unet_config.get("layers_per_block", 2)
    layers = [layers] * len(channels) if isinstance(layers, int) else list(layers)
    out = [(channels[0], 1)]  # conv_in
    for i, (ch, n) in enumerate(zip(channels, layers)):
        out += [(ch, 2**i)] * n
        if i < len(channels) - 1:  # every block but the last ends with a downsampler
            out.append((ch, 2 ** (i + 1)))
    out.append((channels[-1], 2 ** (len(channels) - 1)))  # mid block
    return tuple(out)


def model_info(source: Source) -> ModelInfo:
    if source.unet_config.get("addition_embed_type") == "text_time":
        from sdexport.export.sdxl_info import sdxl_model_info

        return dataclasses.replace(sdxl_model_info(source), control_residuals=residual_layout(source.unet_config))
    unet, vae, text = source.unet_config, source.vae_config, source.text_encoder_config
    sched = source.scheduler_config
    prediction = sched.get("prediction_type", "epsilon")
    latent_channels = int(vae.get("latent_channels", 4))
    in_channels = int(unet.get("in_channels", 4))
    vae_scale = 2 ** (len(vae.get("block_out_channels", [1, 1, 1, 1])) - 1)
    cross_dim = unet.get("cross_attention_dim", 768)
    cross_dim = cross_dim[0] if isinstance(cross_dim, (list, tuple)) else cross_dim
    if in_channels == 2 * latent_channels + 1:
        family = "inpainting"
    elif in_channels == latent_channels + 3 and unet.get("num_class_embeds"):
        family = "upscaler"  # latents + the low-resolution RGB image, the noise level as class labels
    elif in_channels == latent_channels + 1:
        family = "depth"
    elif int(cross_dim) >= 1024 or unet.get("use_linear_projection"):
        family = "sd2-v" if prediction == "v_prediction" else "sd2"
    else:
        family = "sd1"
    size = int(unet.get("sample_size", 64)) * vae_scale
    shift = vae.get("shift_factor")
    return ModelInfo(
        family=family,
        prediction_type=prediction,
        latent_channels=latent_channels,
        unet_in_channels=in_channels,
        vae_scale_factor=vae_scale,
        vae_scaling_factor=SCALING_FACTOR if family == "upscaler" else float(vae.get("scaling_factor", 0.18215)),
        vae_shift_factor=float(shift) if shift is not None else None,
        text_hidden_size=int(text["hidden_size"]),
        max_length=int(text.get("max_position_embeddings", 77)),
        default_height=size,
        default_width=size,
        time_cond_proj_dim=unet.get("time_cond_proj_dim"),
        control_residuals=residual_layout(unet),
        max_noise_level=upscaler_noise_level(source) if family == "upscaler" else None,
    )


# --- declarative specs -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Shape:
    """Concrete sizes an export or a validation run uses."""

    batch: int  # prompts (B); the U-Net and ControlNet see 2B under batched CFG
    height: int  # pixels
    width: int
    cfg_batch: int = 2  # N = cfg_batch * B: 2 under batched CFG, 1 when the two branches run one after the other
    prompt_chunks: int = 1  # the U-Net's text length S = 77 * chunks (runtime.prompts: 75-token chunks)


@dataclasses.dataclass(frozen=True)
class ComponentSpec:
    name: str
    role: str
    module: Callable[[], torch.nn.Module]
    inputs: tuple[TensorSpec, ...]  # dims: int (fixed) or str (symbolic)
    outputs: tuple[TensorSpec, ...]
    example: Callable[[Shape, torch.Generator], tuple[torch.Tensor, ...]]
    sizes: Callable[[Shape], dict[str, int]]  # values of the symbolic dims for a Shape
    min_psnr_fp32: float = 60.0
    min_psnr_reduced: float = 30.0  # fp16 / int8: the manifest records what was measured
    fp16_block_ops: tuple[str, ...] = ()  # op types kept in fp32 when converting to fp16
    # Pixels added to the traced height. diffusers' U-Net upsamples by 2 when the latent divides by
    # 2**levels and to the skip connection's size otherwise; a trace at an odd latent size records
    # the second branch, which is right for every size (the first only for even ones).
    trace_pad: int = 0
    keep_fp32: str | None = None  # why this component stays fp32 whatever precision is asked (SDXL's VAE)

    def static(self, shape: Shape, keep_batch_dynamic: bool = True) -> "ComponentSpec":
        """The same spec with spatial (and optionally batch) axes fixed to ``shape``."""
        sizes = self.sizes(shape)

        def fix(spec: TensorSpec) -> TensorSpec:
            dims = tuple(
                d if isinstance(d, int) or (keep_batch_dynamic and d in ("B", "N")) else sizes[d]
                for d in spec.shape
            )
            return dataclasses.replace(spec, shape=dims)

        return dataclasses.replace(self, inputs=tuple(map(fix, self.inputs)), outputs=tuple(map(fix, self.outputs)))


def _f32(name: str, *shape) -> TensorSpec:
    return TensorSpec(name, "float32", tuple(shape))


def _spatial(shape: Shape, info: ModelInfo) -> dict[str, int]:
    f = info.vae_scale_factor
    return {"B": shape.batch, "N": shape.cfg_batch * shape.batch, "H": shape.height, "W": shape.width,
            "h": shape.height // f, "w": shape.width // f, "S": shape.prompt_chunks * info.max_length}


def _residual_dims(info: ModelInfo) -> list[tuple[int, str, str]]:
    """(channels, height symbol, width symbol) per residual; symbols h, h_2, h_4 ... per downsampling."""
    return [(ch, "h" if s == 1 else f"h_{s}", "w" if s == 1 else f"w_{s}") for ch, s in info.control_residuals]


def _residual_sizes(shape: Shape, info: ModelInfo) -> dict[str, int]:
    sizes = _spatial(shape, info)
    for _, s in info.control_residuals:
        if s > 1:
            # a stride-2 convolution with padding 1 rounds up
            h, w = sizes["h"], sizes["w"]
            for _ in range(s.bit_length() - 1):
                h, w = (h + 1) // 2, (w + 1) // 2
            sizes[f"h_{s}"], sizes[f"w_{s}"] = h, w
    return sizes


def residual_names(info: ModelInfo) -> list[str]:
    k = len(info.control_residuals) - 1
    return [f"down_block_additional_residual_{i}" for i in range(k)] + ["mid_block_additional_residual"]


def controlnet_output_names(info: ModelInfo) -> list[str]:
    k = len(info.control_residuals) - 1
    return [f"down_block_res_sample_{i}" for i in range(k)] + ["mid_block_res_sample"]


def text_encoder_spec(source: Source, info: ModelInfo) -> ComponentSpec:
    seq, hidden = info.max_length, info.text_hidden_size
    vocab = int(source.text_encoder_config.get("vocab_size", 49408))

    def example(shape: Shape, gen: torch.Generator):
        ids = torch.randint(0, vocab - 2, (shape.batch, seq), generator=gen)
        ids[:, 0] = vocab - 2  # BOS
        ends = torch.randint(1, seq, (shape.batch,), generator=gen)
        for row, end in enumerate(ends.tolist()):
            ids[row, end:] = vocab - 1  # EOS then EOS padding, as the tokenizer writes
        return (ids,)

    return ComponentSpec(
        name="text_encoder",
        role="text_encoder",
        module=lambda: TextEncoder(source.load_text_encoder()),
        inputs=(TensorSpec("input_ids", "int64", ("B", seq)),),
        outputs=(_f32("last_hidden_state", "B", seq, hidden), _f32("pooler_output", "B", hidden)),
        example=example,
        sizes=lambda shape: {"B": shape.batch},
    )


def examples_by_name(inputs, info: ModelInfo, shape: Shape, gen: torch.Generator,
                     **special: Callable[[list[int]], torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Example tensors for a U-Net's ``inputs``, in order, sized for ``shape``: timesteps as integers in
    [1, 1000), a ControlNet image in [0, 1), scales in [0.5, 1.5), noise for the rest; ``special`` maps
    an input a model family adds (class labels, SDXL's time ids) to a function of its dims."""
    sizes = _residual_sizes(shape, info)
    tensors = []
    for spec in inputs:
        dims = [d if isinstance(d, int) else sizes[d] for d in spec.shape]
        if spec.name in special:
            tensors.append(special[spec.name](dims))
        elif spec.name == "timestep":
            tensors.append(torch.randint(1, 1000, dims, generator=gen).float())
        elif spec.name == "controlnet_cond":
            tensors.append(torch.rand(dims, generator=gen))
        elif spec.name == "conditioning_scale":
            tensors.append(torch.rand(dims, generator=gen) + 0.5)
        else:
            tensors.append(torch.randn(dims, generator=gen))
    return tuple(tensors)


def unet_spec(source: Source, info: ModelInfo, control: bool = False) -> ComponentSpec:
    seq, hidden = "S", info.text_hidden_size  # long prompts: 77 positions per chunk
    inputs = [
        _f32("sample", "N", info.unet_in_channels, "h", "w"),
        _f32("timestep", "N"),
        _f32("encoder_hidden_states", "N", seq, hidden),
    ]
    if info.time_cond_proj_dim:
        inputs.append(_f32("timestep_cond", "N", info.time_cond_proj_dim))
    if info.family == "upscaler":
        inputs.append(TensorSpec("class_labels", "int64", ("N",)))
    if control:
        inputs += [_f32(n, "N", ch, hs, ws) for n, (ch, hs, ws) in zip(residual_names(info), _residual_dims(info))]
    n_res = len(info.control_residuals) if control else 0

    def example(shape: Shape, gen: torch.Generator):
        labels = lambda dims: torch.randint(0, (info.max_noise_level or 0) + 1, dims, generator=gen)  # noqa: E731
        return examples_by_name(inputs, info, shape, gen, class_labels=labels)

    return ComponentSpec(
        name="unet_control" if control else "unet",
        role="unet",
        module=lambda: UNet(source.load_unet(), n_res, bool(info.time_cond_proj_dim), info.family == "upscaler"),
        inputs=tuple(inputs),
        outputs=(_f32("out_sample", "N", info.latent_channels, "h", "w"),),
        example=example,
        sizes=lambda shape: _residual_sizes(shape, info),
        trace_pad=info.vae_scale_factor,
    )


def vae_encoder_spec(source: Source, info: ModelInfo) -> ComponentSpec:
    c = info.latent_channels

    def example(shape: Shape, gen: torch.Generator):
        return (torch.rand((shape.batch, 3, shape.height, shape.width), generator=gen) * 2 - 1,)

    return ComponentSpec(
        name="vae_encoder",
        role="vae_encoder",
        module=lambda: VaeEncoder(source.load_vae()),
        inputs=(_f32("sample", "B", 3, "H", "W"),),
        outputs=(_f32("latent_mean", "B", c, "h", "w"), _f32("latent_logvar", "B", c, "h", "w")),
        example=example,
        sizes=lambda shape: _spatial(shape, info),
    )


def vae_decoder_spec(source: Source, info: ModelInfo) -> ComponentSpec:
    c = info.latent_channels
    f = info.vae_scale_factor

    def example(shape: Shape, gen: torch.Generator):
        return (torch.randn((shape.batch, c, shape.height // f, shape.width // f), generator=gen),)

    return ComponentSpec(
        name="vae_decoder",
        role="vae_decoder",
        module=lambda: VaeDecoder(source.load_vae()),
        inputs=(_f32("latent_sample", "B", c, "h", "w"),),
        outputs=(_f32("sample", "B", 3, "H", "W"),),
        example=example,
        sizes=lambda shape: _spatial(shape, info),
        # GroupNorm statistics over 512-channel maps overflow fp16 in SD VAEs.
        fp16_block_ops=("InstanceNormalization", "GroupNormalization"),
    )


def controlnet_spec(cn_source: ControlNetSource, info: ModelInfo) -> ComponentSpec:
    seq, hidden = "S", info.text_hidden_size  # long prompts: 77 positions per chunk
    n_res = len(info.control_residuals)
    outputs = tuple(
        _f32(n, "N", ch, hs, ws) for n, (ch, hs, ws) in zip(controlnet_output_names(info), _residual_dims(info))
    )

    def example(shape: Shape, gen: torch.Generator):
        sizes = _spatial(shape, info)
        n = sizes["N"]
        return (
            torch.randn((n, info.latent_channels, sizes["h"], sizes["w"]), generator=gen),
            torch.randint(1, 1000, (n,), generator=gen).float(),
            torch.randn((n, sizes["S"], hidden), generator=gen),
            torch.rand((n, 3, shape.height, shape.width), generator=gen),
            torch.rand((n_res,), generator=gen) + 0.5,
        )

    return ComponentSpec(
        name=f"controlnet/{cn_source.name}",
        role="controlnet",
        module=lambda: ControlNet(cn_source.load()),
        inputs=(
            _f32("sample", "N", info.latent_channels, "h", "w"),
            _f32("timestep", "N"),
            _f32("encoder_hidden_states", "N", seq, hidden),
            _f32("controlnet_cond", "N", 3, "H", "W"),
            _f32("conditioning_scale", n_res),
        ),
        outputs=outputs,
        example=example,
        sizes=lambda shape: _residual_sizes(shape, info),
    )
