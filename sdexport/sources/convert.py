"""Tensor names of single-file checkpoints (original LDM layout) <-> diffusers names.

The forward direction uses diffusers' own conversion functions, which only move, slice and reshape
tensors, so a converted model is bitwise equal to its diffusers folder; the reverse (for writing
single files) is written out here and checked against the forward one in the tests. Both work on meta
tensors, so a checkpoint's shapes are checked before any weight is read.
"""

from __future__ import annotations

import re
from typing import Mapping

import torch

from sdexport.sources.detect import DIFFUSERS_PREFIX, LDM_PREFIX, OPENCLIP_PREFIX, TEXT_ENCODERS
from sdexport.sources.models import TEXT_PARTS, empty_model

def _has_text_model_wrapper(model) -> bool:
    return hasattr(model, "text_model")


def text_encoder_layout(text_kind: str, part: str) -> tuple[str, str]:
    """(encoder kind "clip" | "openclip", prefix in the original layout) of a text component."""
    for name, kind, prefix in TEXT_ENCODERS[text_kind]:
        if name == part:
            return kind, prefix
    raise KeyError(f"{part} is not part of a {text_kind} model")


def model_parts(text_kind: str) -> tuple[str, ...]:
    return ("unet", "vae") + tuple(name for name, _, _ in TEXT_ENCODERS[text_kind])


def to_diffusers(part: str, tensors: dict[str, torch.Tensor], layout: str, text_kind: str, config: dict,
                 text_model=None) -> dict[str, torch.Tensor]:
    """Rename one component's tensors (full checkpoint names in, diffusers names out). Works on meta tensors.

    ``text_kind``: the model's text conditioning (detect.TEXT_ENCODERS: clip, openclip, sdxl, sdxl-refiner),
    which says how and under which prefix each text encoder is stored."""
    if layout == "diffusers":
        prefix = DIFFUSERS_PREFIX[part]
        out = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    else:
        from diffusers.loaders import single_file_utils as sfu

        if part == "unet":
            out = sfu.convert_ldm_unet_checkpoint(tensors, config)
        elif part == "vae":
            out = sfu.convert_ldm_vae_checkpoint(tensors, config)
        elif text_encoder_layout(text_kind, part)[0] == "clip":
            out = sfu.convert_ldm_clip_checkpoint(tensors, remove_prefix=text_encoder_layout(text_kind, part)[1])
        else:
            out = _openclip_to_diffusers(tensors, config, text_model, text_encoder_layout(text_kind, part)[1])
    if part in TEXT_PARTS:
        flat = text_model is None or not _has_text_model_wrapper(text_model)
        if flat:
            out = {k.removeprefix("text_model."): v for k, v in out.items()}
        out.pop("embeddings.position_ids", None)
        out.pop("text_model.embeddings.position_ids", None)
        # SD 2.x uses OpenCLIP's penultimate layer: diffusers keeps the first num_hidden_layers layers.
        n = int(config.get("num_hidden_layers", 0))
        layer = re.compile(r"^(?:text_model\.)?encoder\.layers\.(\d+)\.")
        out = {k: v for k, v in out.items() if not ((m := layer.match(k)) and int(m.group(1)) >= n)}
    return out


def _openclip_to_diffusers(tensors: dict[str, torch.Tensor], config: dict, text_model,
                           prefix: str = OPENCLIP_PREFIX) -> dict[str, torch.Tensor]:
    from diffusers.loaders import single_file_utils as sfu

    # diffusers drops the 24th layer of OpenCLIP-H by name; layers past num_hidden_layers are dropped
    # by to_diffusers for any depth. The q/k/v split width is the hidden size (text_projection's rows:
    # OpenCLIP stores it [width, embed], diffusers transposes it into SDXL's text_projection.weight).
    hidden = int(config["hidden_size"])
    proj = prefix + "text_projection"
    tensors = dict(tensors)
    if proj not in tensors or tensors[proj].shape[0] != hidden:
        if prefix != OPENCLIP_PREFIX:  # SDXL's pooled embedding goes through it: never made up
            raise ValueError(f"{proj}: missing, or not {hidden} rows")
        tensors[proj] = torch.empty((hidden, hidden), device="meta")
    return sfu.convert_open_clip_checkpoint(text_model, tensors, prefix=prefix)


_RESNET_TO_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                  "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_UNET_TOP_TO_LDM = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
                    "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
                    "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _resnet_rest(rest: str, table: Mapping[str, str]) -> str:
    head, _, tail = rest.partition(".")
    return f"{table.get(head, head)}.{tail}"


def unet_name_to_ldm(name: str, config: Mapping) -> str:
    """A diffusers U-Net parameter (or module) name -> its name under ``model.diffusion_model.``."""
    per_block = config["layers_per_block"]
    if not isinstance(per_block, int):
        raise ValueError("per-block layer counts are not an SD 1.x/2.x/XL U-Net")
    step = per_block + 1
    for src, dst in _UNET_TOP_TO_LDM.items():
        if name == src or name.startswith(src + "."):
            return dst + name[len(src):]
    m = re.match(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)$", name)
    if m:
        kind, b, sub, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        if kind == "down_blocks":
            if sub == "resnets":
                return f"input_blocks.{1 + b * step + j}.0.{_resnet_rest(rest, _RESNET_TO_LDM)}"
            if sub == "attentions":
                return f"input_blocks.{1 + b * step + j}.1.{rest}"
            return f"input_blocks.{1 + b * step + per_block}.0.op.{rest.removeprefix('conv.')}"
        if sub == "resnets":
            return f"output_blocks.{b * step + j}.0.{_resnet_rest(rest, _RESNET_TO_LDM)}"
        if sub == "attentions":
            return f"output_blocks.{b * step + j}.1.{rest}"
        has_attention = str(config["up_block_types"][b]).startswith("CrossAttn")
        return f"output_blocks.{b * step + per_block}.{2 if has_attention else 1}.conv.{rest.removeprefix('conv.')}"
    m = re.match(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.+)$", name)
    if m:
        sub, j, rest = m.group(1), int(m.group(2)), m.group(3)
        if sub == "resnets":
            return f"middle_block.{2 * j}.{_resnet_rest(rest, _RESNET_TO_LDM)}"
        return f"middle_block.1.{rest}"
    raise KeyError(name)


_VAE_RESNET_TO_LDM = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION_TO_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}


def vae_name_to_ldm(name: str, config: Mapping) -> str:
    """A diffusers VAE parameter name -> its name under ``first_stage_model.``."""
    n_blocks = len(config["block_out_channels"])
    side, _, rest = name.partition(".")
    if side in ("quant_conv", "post_quant_conv"):
        return name
    if rest.startswith("conv_norm_out."):
        return f"{side}.norm_out.{rest.removeprefix('conv_norm_out.')}"
    if rest.startswith(("conv_in.", "conv_out.")):
        return name
    m = re.match(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)$", rest)
    if m:
        kind, i, sub, j, tail = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        if kind == "down_blocks":
            if sub == "resnets":
                return f"{side}.down.{i}.block.{j}.{_resnet_rest(tail, _VAE_RESNET_TO_LDM)}"
            return f"{side}.down.{i}.downsample.{tail}"
        level = n_blocks - 1 - i
        if sub == "resnets":
            return f"{side}.up.{level}.block.{j}.{_resnet_rest(tail, _VAE_RESNET_TO_LDM)}"
        return f"{side}.up.{level}.upsample.{tail}"
    m = re.match(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.+)$", rest)
    if m:
        sub, j, tail = m.group(1), int(m.group(2)), m.group(3)
        if sub == "resnets":
            return f"{side}.mid.block_{j + 1}.{_resnet_rest(tail, _VAE_RESNET_TO_LDM)}"
        head, _, end = tail.partition(".")
        if head == "to_out":
            end = end.removeprefix("0.")
        return f"{side}.mid.attn_1.{_VAE_ATTENTION_TO_LDM[head]}.{end}"
    raise KeyError(name)


_OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                   "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def to_original(part: str, state: Mapping[str, torch.Tensor], config: Mapping, text_kind: str = "clip",
                extra_openclip_layer: bool = True) -> dict[str, torch.Tensor]:
    """One component's diffusers state dict -> original (LDM) names and shapes. Works on meta tensors.

    OpenCLIP: q/k/v are stacked into ``in_proj``, and (like a real SD 2.x file) one more layer follows
    the ones diffusers keeps (here a copy of the last one: SD 2.x uses the penultimate layer, so it is
    never used), plus ``text_projection`` and ``logit_scale``. SDXL's bigG keeps every layer, and its
    ``text_projection`` is the model's, transposed ([width, embed] as OpenCLIP stores it).
    """
    out: dict[str, torch.Tensor] = {}
    if part == "unet":
        for k, v in state.items():
            out[LDM_PREFIX["unet"] + unet_name_to_ldm(k, config)] = v
        return out
    if part == "vae":
        for k, v in state.items():
            name = vae_name_to_ldm(k, config)
            if ".mid.attn_1." in name and name.endswith(".weight") and v.ndim == 2:
                v = v.reshape(*v.shape, 1, 1)  # LDM's attention uses 1x1 convolutions
            out[LDM_PREFIX["vae"] + name] = v
        return out
    kind, p = text_encoder_layout(text_kind, part)
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    if kind == "clip":
        for k, v in state.items():
            out[p + "text_model." + k] = v
        n = state["embeddings.position_embedding.weight"].shape[0]
        device = state["embeddings.position_embedding.weight"].device
        out[p + "text_model.embeddings.position_ids"] = torch.arange(n, device=device).unsqueeze(0)
        return out
    return _openclip_to_original(state, p, extra_openclip_layer and text_kind == "openclip")


def _openclip_to_original(state: Mapping[str, torch.Tensor], p: str, extra_layer: bool) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    hidden = state["final_layer_norm.weight"].shape[0]
    device = state["final_layer_norm.weight"].device
    out[p + "positional_embedding"] = state["embeddings.position_embedding.weight"]
    out[p + "token_embedding.weight"] = state["embeddings.token_embedding.weight"]
    layers = sorted({int(m.group(1)) for k in state if (m := re.match(r"^encoder\.layers\.(\d+)\.", k))})
    sources = [(i, i) for i in layers] + ([(len(layers), layers[-1])] if extra_layer and layers else [])
    for i, src in sources:
        s, d = f"encoder.layers.{src}.", f"transformer.resblocks.{i}."
        for suffix in ("weight", "bias"):
            out[p + d + f"attn.in_proj_{suffix}"] = torch.cat(
                [state[s + f"self_attn.{q}_proj.{suffix}"] for q in ("q", "k", "v")], 0)
            for dn, ln in _OPENCLIP_LAYER.items():
                out[p + d + f"{ln}.{suffix}"] = state[s + f"{dn}.{suffix}"]
    out[p + "ln_final.weight"] = state["final_layer_norm.weight"]
    out[p + "ln_final.bias"] = state["final_layer_norm.bias"]
    projection = state.get("text_projection.weight")
    out[p + "text_projection"] = projection.T.contiguous() if projection is not None else torch.eye(hidden, device=device)
    out[p + "logit_scale"] = torch.tensor(4.6052, device=device)
    return out


def text_kind_of(text_encoder_config: Mapping | None, unet_config: Mapping) -> str:
    """The text conditioning (detect.TEXT_ENCODERS) a model's configs describe: SDXL for U-Nets with
    added text/time conditioning (its refiner has no first text encoder), OpenCLIP (SD 2.x) for gelu
    text encoders under linear-projection U-Nets, else CLIP (SD 1.x)."""
    if unet_config.get("addition_embed_type") == "text_time":
        return "sdxl" if text_encoder_config else "sdxl-refiner"
    if text_encoder_config.get("hidden_act") == "gelu" and unet_config.get("use_linear_projection"):
        return "openclip"
    return "clip"


def original_plan(configs: Mapping[str, dict], text_kind: str | None = None, layout: str = "ldm"
                  ) -> dict[str, torch.Tensor]:
    """Names and shapes (meta tensors) of a checkpoint file for these configs, without any weights."""
    text_kind = text_kind or text_kind_of(configs.get("text_encoder"), configs["unet"])
    out: dict[str, torch.Tensor] = {}
    for part in model_parts(text_kind):
        state = {k: torch.empty(v.shape, dtype=v.dtype, device="meta")
                 for k, v in empty_model(part, configs[part]).state_dict().items()}
        if layout == "ldm":
            out.update(to_original(part, state, configs[part], text_kind))
        else:
            out.update({DIFFUSERS_PREFIX[part] + k: v for k, v in state.items()})
    return out
