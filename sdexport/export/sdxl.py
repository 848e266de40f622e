"""The SDXL family (base, refiner, Turbo): its model description and exportable components.

SDXL conditions its U-Net on two text encoders and on "added" conditioning:

- ``text_encoder`` (CLIP ViT-L) and ``text_encoder_2`` (OpenCLIP bigG with a projection) both give
  their penultimate hidden states (``hidden_states[-2]``, diffusers' ``encode_prompt`` with
  ``clip_skip=None``), concatenated along the width; a refiner has only ``text_encoder_2``;
- ``text_embeds``: text_encoder_2's pooled, projected output;
- ``time_ids``: original size, crop top-left and target size (the refiner: an aesthetic score in
  place of the target size), which the U-Net embeds with ``addition_time_embed_dim`` each.
"""

from __future__ import annotations

from pathlib import Path

import torch

from runtime.manifest import ModelInfo, TensorSpec
from sdexport.errors import OptionError, SourceError
from sdexport.export.sdxl_info import has_text_encoder
from sdexport.export.components import ComponentSpec, Shape, _f32, _residual_dims, _residual_sizes, _spatial, \
    controlnet_output_names, examples_by_name, residual_names, vae_decoder_spec, vae_encoder_spec


# --- torch wrappers ----------------------------------------------------------------------------


class PenultimateTextEncoder(torch.nn.Module):
    """CLIP ViT-L as SDXL uses it: the hidden states before the last layer (no final layer norm)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids, output_hidden_states=True, return_dict=True).hidden_states[-2]


class ProjectedTextEncoder(torch.nn.Module):
    """OpenCLIP bigG with projection: penultimate hidden states and the pooled, projected text_embeds."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        out = self.model(input_ids, output_hidden_states=True, return_dict=True)
        return out.hidden_states[-2], out.text_embeds


class SdxlUNet(torch.nn.Module):
    """The U-Net with its added conditioning as two more positional inputs; with ``n_residuals``,
    ControlNet residuals (K down + 1 mid) after them."""

    def __init__(self, unet, n_residuals: int = 0):
        super().__init__()
        self.unet = unet
        self.n_residuals = n_residuals

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids, *residuals):
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        down = mid = None
        if self.n_residuals:
            down, mid = list(residuals[:-1]), residuals[-1]
        return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added,
                         down_block_additional_residuals=down, mid_block_additional_residual=mid, return_dict=False)[0]


class SdxlControlNet(torch.nn.Module):
    """An SDXL ControlNet (added conditioning too), one conditioning scale per residual as for SD."""

    def __init__(self, controlnet):
        super().__init__()
        self.controlnet = controlnet

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids, controlnet_cond,
                conditioning_scale):
        down, mid = self.controlnet(
            sample, timestep, encoder_hidden_states, controlnet_cond=controlnet_cond, conditioning_scale=1.0,
            added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}, guess_mode=False, return_dict=False)
        scaled = [d * conditioning_scale[i] for i, d in enumerate(down)]
        return (*scaled, mid * conditioning_scale[len(down)])


# --- component specs ---------------------------------------------------------------------------


def _token_example(vocab: int, seq: int):
    def example(shape: Shape, gen: torch.Generator):
        ids = torch.randint(1, vocab - 2, (shape.batch, seq), generator=gen)
        ids[:, 0] = vocab - 2  # BOS
        ends = torch.randint(1, seq, (shape.batch,), generator=gen)
        for row, end in enumerate(ends.tolist()):
            ids[row, end] = vocab - 1  # EOS, then "!" (id 0) padding as tokenizer_2 writes
            ids[row, end + 1:] = 0
        return (ids,)

    return example


def text_encoder_specs(source, info: ModelInfo) -> list[ComponentSpec]:
    seq = info.max_length
    specs = []
    if has_text_encoder(source):
        config = source.text_encoder_config
        specs.append(ComponentSpec(
            name="text_encoder", role="text_encoder",
            module=lambda: PenultimateTextEncoder(source.load_text_encoder()),
            inputs=(TensorSpec("input_ids", "int64", ("B", seq)),),
            outputs=(_f32("penultimate_hidden_state", "B", seq, int(config["hidden_size"])),),
            example=_token_example(int(config.get("vocab_size", 49408)), seq),
            sizes=lambda shape: {"B": shape.batch},
        ))
    config_2 = source.text_encoder_2_config
    specs.append(ComponentSpec(
        name="text_encoder_2", role="text_encoder",
        module=lambda: ProjectedTextEncoder(source.load_text_encoder_2()),
        inputs=(TensorSpec("input_ids", "int64", ("B", seq)),),
        outputs=(_f32("penultimate_hidden_state", "B", seq, info.text_encoder_2_hidden_size),
                 _f32("text_embeds", "B", info.projection_dim)),
        example=_token_example(int(config_2.get("vocab_size", 49408)), seq),
        sizes=lambda shape: {"B": shape.batch},
    ))
    return specs


def _conditioning(info: ModelInfo, channels: int) -> list[TensorSpec]:
    return [_f32("sample", "N", channels, "h", "w"), _f32("timestep", "N"),
            _f32("encoder_hidden_states", "N", info.max_length, info.text_hidden_size),
            _f32("text_embeds", "N", info.projection_dim), _f32("time_ids", "N", info.time_ids_length)]


def _example(inputs, info: ModelInfo, shape: Shape, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Example tensors by name, with real time ids (sizes, crop 0, the refiner's aesthetic score)."""
    time_ids = torch.tensor([float(shape.height), float(shape.width), 0.0, 0.0, float(shape.height),
                             float(shape.width)][:info.time_ids_length])
    if info.requires_aesthetics_score:
        time_ids[-1] = 6.0
    return examples_by_name(inputs, info, shape, gen, time_ids=lambda dims: time_ids.repeat(dims[0], 1))


def unet_spec(source, info: ModelInfo, control: bool = False) -> ComponentSpec:
    if info.time_cond_proj_dim:
        raise OptionError("SDXL U-Nets with a guidance embedding (time_cond_proj_dim) are not supported yet")
    inputs = _conditioning(info, info.unet_in_channels)
    if control:
        inputs += [_f32(n, "N", ch, hs, ws) for n, (ch, hs, ws) in zip(residual_names(info), _residual_dims(info))]
    n_res = len(info.control_residuals) if control else 0
    return ComponentSpec(
        name="unet_control" if control else "unet", role="unet",
        module=lambda: SdxlUNet(source.load_unet(), n_res),
        inputs=tuple(inputs),
        outputs=(_f32("out_sample", "N", info.latent_channels, "h", "w"),),
        example=lambda shape, gen: _example(inputs, info, shape, gen),
        sizes=lambda shape: _residual_sizes(shape, info),
        trace_pad=info.vae_scale_factor,
    )


def controlnet_spec(cn_source, info: ModelInfo) -> ComponentSpec:
    n_res = len(info.control_residuals)
    inputs = _conditioning(info, info.latent_channels) + [_f32("controlnet_cond", "N", 3, "H", "W"),
                                                         _f32("conditioning_scale", n_res)]
    outputs = tuple(_f32(n, "N", ch, hs, ws) for n, (ch, hs, ws) in zip(controlnet_output_names(info), _residual_dims(info)))
    return ComponentSpec(
        name=f"controlnet/{cn_source.name}", role="controlnet",
        module=lambda: SdxlControlNet(cn_source.load()),
        inputs=tuple(inputs), outputs=outputs,
        example=lambda shape, gen: _example(inputs, info, shape, gen),
        sizes=lambda shape: _residual_sizes(shape, info),
    )


FORCE_UPCAST = "the VAE's config says force_upcast (it overflows in fp16): kept in fp32"


def component_specs(source, info: ModelInfo, controlnets) -> list[ComponentSpec]:
    for cn in controlnets:
        if cn.config.get("addition_embed_type") != "text_time":
            raise SourceError(f"ControlNet {cn.name!r} ({cn.path}) is an SD 1.x/2.x ControlNet; an SDXL model needs "
                              f"an SDXL ControlNet (addition_embed_type text_time)")
    vae = [vae_encoder_spec(source, info), vae_decoder_spec(source, info)]
    if info.vae_force_upcast:
        vae = [_keep_fp32(spec) for spec in vae]
    unets = [unet_spec(source, info)] + ([unet_spec(source, info, control=True)] if controlnets else [])
    return [*text_encoder_specs(source, info), *unets, *vae, *(controlnet_spec(cn, info) for cn in controlnets)]


def _keep_fp32(spec: ComponentSpec) -> ComponentSpec:
    import dataclasses

    return dataclasses.replace(spec, keep_fp32=FORCE_UPCAST)


def write_tokenizers(source, stage: Path, write_tokenizer) -> tuple[dict, dict]:
    """Both tokenizers (a refiner: the second only), each checked against transformers';
    returns (parity record, the manifest's tokenizer folder names)."""
    checks, dirs = {}, {}
    if has_text_encoder(source):
        checks["tokenizer"] = write_tokenizer(source, stage / "tokenizer")
    tokenizer_2 = getattr(source, "tokenizer_2_dir", None)
    if tokenizer_2 is None:
        raise SourceError(f"{source.path}: an SDXL model needs tokenizer_2; this one has none")
    checks["tokenizer_2"] = write_tokenizer(source, stage / "tokenizer_2", tokenizer_2)
    dirs["tokenizer_2_dir"] = "tokenizer_2"
    dirs["tokenizer_dir"] = "tokenizer" if "tokenizer" in checks else "tokenizer_2"
    return checks, dirs
