"""Which Stable Diffusion model a single-file checkpoint holds, read from its tensor names and shapes.

A single file holds the U-Net, the VAE and the text encoder under the original LDM names
(``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.*``) or, less often, under
diffusers names with a component prefix (``unet.*``, ``vae.*``, ``text_encoder.*``). Nothing in it says
which architecture it is, so :func:`detect` reads the tensor names and shapes:

- text encoder: ``cond_stage_model.transformer.*`` is OpenAI CLIP (SD 1.x), ``cond_stage_model.model.*``
  is OpenCLIP (SD 2.x), the U-Net's cross-attention width (768 or 1024) must agree;
- SDXL: ``conditioner.embedders.0.transformer.*`` (CLIP ViT-L) and ``conditioner.embedders.1.model.*``
  (OpenCLIP bigG) is the base model; the refiner has only ``conditioner.embedders.0.model.*`` (bigG);
- inpainting: the U-Net's ``conv_in`` takes 9 channels (latents + mask + masked-image latents);
- the prediction type (epsilon or v) is not in the weights: an explicit hint, then an A1111-style
  ``<checkpoint>.yaml`` beside the file (``parameterization: "v"``, :func:`sidecar_prediction_type`),
  then the family default (v for SD 2.x at 768 px, as diffusers and A1111 assume).

Files that are recognisably something else (a LoRA, a ControlNet, a bare VAE ...) are named as such.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Mapping

from sdexport.errors import SourceError
from sdexport.sources.base import sample_names
from sdexport.sources.checkpoint import TensorInfo

LDM_PREFIX = {"unet": "model.diffusion_model.", "vae": "first_stage_model.", "text_encoder": "cond_stage_model."}
CLIP_PREFIX = "cond_stage_model.transformer."
OPENCLIP_PREFIX = "cond_stage_model.model."
DIFFUSERS_PREFIX = {"unet": "unet.", "vae": "vae.", "text_encoder": "text_encoder."}
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."
SDXL_REFINER_OPENCLIP_PREFIX = "conditioner.embedders.0.model."

# Per kind of text conditioning: (diffusers component, encoder kind, prefix in the original layout).
TEXT_ENCODERS = {
    "clip": (("text_encoder", "clip", CLIP_PREFIX),),
    "openclip": (("text_encoder", "openclip", OPENCLIP_PREFIX),),
    "sdxl": (("text_encoder", "clip", SDXL_CLIP_PREFIX), ("text_encoder_2", "openclip", SDXL_OPENCLIP_PREFIX)),
    "sdxl-refiner": (("text_encoder_2", "openclip", SDXL_REFINER_OPENCLIP_PREFIX),),
}

FAMILY_DESCRIPTIONS = {
    "sd1": "SD 1.x",
    "sd1-inpainting": "SD 1.x inpainting",
    "sd2-base": "SD 2.x base (epsilon)",
    "sd2-v": "SD 2.x v-prediction",
    "sd2-inpainting": "SD 2.x inpainting",
    "sdxl-base": "SDXL base",
    "sdxl-refiner": "SDXL refiner",
    "sdxl-inpainting": "SDXL inpainting",
}
PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclasses.dataclass(frozen=True)
class Detected:
    layout: str  # "ldm" (A1111 / CompVis names) or "diffusers" (unet./vae./text_encoder. prefixes)
    text_encoder: str  # "clip" (SD 1.x), "openclip" (SD 2.x), "sdxl" (CLIP-L + bigG), "sdxl-refiner" (bigG)
    in_channels: int  # U-Net input channels: 4, or 9 for inpainting
    cross_attention_dim: int | None

    @property
    def parts(self) -> tuple[str, ...]:
        """The diffusers components the checkpoint holds."""
        return ("unet", "vae") + tuple(part for part, _, _ in TEXT_ENCODERS[self.text_encoder])

    def family(self, prediction_type: str | None) -> str:
        if self.text_encoder.startswith("sdxl"):
            return "sdxl-inpainting" if self.in_channels == 9 else ("sdxl-refiner" if self.text_encoder == "sdxl-refiner"
                                                                   else "sdxl-base")
        sd = "sd1" if self.text_encoder == "clip" else "sd2"
        if self.in_channels == 9:
            return f"{sd}-inpainting"
        if sd == "sd1":
            return "sd1"
        return "sd2-base" if prediction_type == "epsilon" else "sd2-v"


def _not_a_model(tensors: Mapping[str, TensorInfo]) -> str | None:
    """Why this file is something else than an SD 1.x/2.x model, if it is recognisably something else."""
    keys = list(tensors)
    if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) or ".lora_A." in k or ".lora_down." in k
           or ".lora.down." in k or "lora_linear_layer" in k for k in keys):
        return "this is a LoRA, not a model: pass it to export with --lora FILE[:SCALE]"
    if any(k.startswith("control_model.") for k in keys) or "controlnet_cond_embedding.conv_in.weight" in tensors:
        return "a ControlNet checkpoint, not a full model: pass a diffusers ControlNet folder with --controlnet"
    if any("joint_blocks." in k or "double_blocks." in k for k in keys):
        return "an SD3 / Flux checkpoint: sdexport exports SD 1.x, SD 2.x and SDXL models"
    if "encoder.down.0.block.0.conv1.weight" in tensors or "encoder.down_blocks.0.resnets.0.conv1.weight" in tensors:
        return "a standalone VAE, not a full model"
    if "conv_in.weight" in tensors and "time_embedding.linear_1.weight" in tensors:
        return "a bare U-Net, not a full model (no VAE or text encoder)"
    return None


def detect(tensors: Mapping[str, TensorInfo], path: Path | str = "checkpoint") -> Detected:
    """The layout, text encoder kind and U-Net input channels of a single-file SD 1.x/2.x/XL model."""
    if "model.diffusion_model.input_blocks.0.0.weight" in tensors:
        layout, conv_in = "ldm", "model.diffusion_model.input_blocks.0.0.weight"
        text = _ldm_text_kind(tensors)
        if text is None and any(k.startswith("conditioner.embedders.") for k in tensors):
            raise SourceError(f"{path}: an SDXL checkpoint without its text encoders (SDXL base: "
                              f"{SDXL_CLIP_PREFIX}* and {SDXL_OPENCLIP_PREFIX}*; refiner: {SDXL_REFINER_OPENCLIP_PREFIX}*)")
        if text is None:
            reason = _not_a_model(tensors)
            raise SourceError(f"{path}: {reason}" if reason else
                              f"{path}: a U-Net without a known text encoder (no cond_stage_model.transformer.*, "
                              f"cond_stage_model.model.* or conditioner.embedders.* tensors)")
        if not any(k.startswith(LDM_PREFIX["vae"]) for k in tensors):
            raise SourceError(f"{path}: the checkpoint has no VAE (first_stage_model.* tensors)")
        unet_prefix = LDM_PREFIX["unet"]
    elif "unet.conv_in.weight" in tensors and any(k.startswith("vae.") for k in tensors) and any(
            k.startswith("text_encoder.") for k in tensors):
        layout, conv_in, unet_prefix = "diffusers", "unet.conv_in.weight", "unet."
        if "unet.add_embedding.linear_1.weight" in tensors or any(k.startswith("text_encoder_2.") for k in tensors):
            raise SourceError(f"{path}: an SDXL checkpoint under diffusers names (unet./text_encoder_2. prefixes): "
                              f"export its diffusers folder, or an A1111/ComfyUI single file")
        # Names do not tell CLIP from OpenCLIP here; SD 2.x's cross-attention is 1024 wide.
        text = "openclip" if _cross_dim(tensors, unet_prefix) == 1024 else "clip"
    else:
        reason = _not_a_model(tensors)
        if reason:
            raise SourceError(f"{path}: {reason}")
        raise SourceError(
            f"{path}: unknown checkpoint layout: no Stable Diffusion U-Net (model.diffusion_model.* or unet.*) in "
            f"its {len(tensors)} tensors, e.g. {sample_names(sorted(tensors))}"
        )
    in_channels = tensors[conv_in].shape[1]
    if in_channels == 5:
        raise SourceError(f"{path}: a depth-conditioned SD 2 model (5-channel U-Net input): not supported")
    if in_channels == 8:
        raise SourceError(f"{path}: an InstructPix2Pix-style model (8-channel U-Net input): not supported")
    if in_channels not in (4, 9):
        raise SourceError(f"{path}: U-Net with {in_channels} input channels: not an SD 1.x/2.x/XL model this version knows")
    if text.startswith("sdxl") and f"{unet_prefix}label_emb.0.0.weight" not in tensors:
        raise SourceError(f"{path}: SDXL text encoders but the U-Net has no added conditioning (label_emb.*)")
    return Detected(layout, text, in_channels, _cross_dim(tensors, unet_prefix))


def _ldm_text_kind(tensors: Mapping[str, TensorInfo]) -> str | None:
    """Which text conditioning an original-layout file holds (see TEXT_ENCODERS), from its prefixes."""
    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in tensors)

    if has(SDXL_CLIP_PREFIX) and has(SDXL_OPENCLIP_PREFIX):
        return "sdxl"
    if has(SDXL_REFINER_OPENCLIP_PREFIX) and not has("conditioner.embedders.1."):
        return "sdxl-refiner"
    if has("conditioner.embedders."):
        return None
    if has(CLIP_PREFIX):
        return "clip"
    if has(OPENCLIP_PREFIX):
        return "openclip"
    return None


def _cross_dim(tensors: Mapping[str, TensorInfo], unet_prefix: str) -> int | None:
    for k, info in tensors.items():
        if k.startswith(unet_prefix) and k.endswith("attn2.to_k.weight"):
            return info.shape[1]
    return None


def sidecar_prediction_type(path: Path) -> str | None:
    """``parameterization`` from an A1111-style ``<name>.yaml`` beside the checkpoint (LDM config)."""
    yaml_path = path.with_suffix(".yaml")
    if not yaml_path.is_file():
        return None
    import yaml

    try:
        config = yaml.safe_load(yaml_path.read_text(encoding="utf-8")) or {}
        params = config.get("model", {}).get("params", {}) or {}
    except (yaml.YAMLError, AttributeError, UnicodeDecodeError) as e:
        raise SourceError(f"{yaml_path}: cannot read this LDM config ({type(e).__name__})") from None
    return "v_prediction" if params.get("parameterization") == "v" else "epsilon"

