"""Which model family a source is (for device profiles' per-family sizes) and whether a ControlNet is
of the same family as the model it is to condition.

The families are those a profile names in ``[shapes] sizes`` (``sdexport.options.MODEL_FAMILIES``):
SD 1.x, SD 2.x base (epsilon), SD 2.x v-prediction and SDXL (base, refiner and inpainting alike: they
sample at the same size). A model's own size is its U-Net's ``sample_size`` times the VAE's down-sampling
(SD 1.x 512, SD 2.x-v 768, SDXL 1024), as diffusers' pipelines default to.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Mapping

from sdexport.errors import SourceError


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    name: str  # sd1 | sd2 | sd2-v | sdxl
    height: int  # the model's own size in pixels
    width: int


def _cross_dim(unet_config: Mapping) -> int:
    cross = unet_config.get("cross_attention_dim", 768)
    return int(cross[0] if isinstance(cross, (list, tuple)) else cross)


def is_sdxl(unet_config: Mapping) -> bool:
    """SDXL U-Nets (and ControlNets) take added text/time conditioning; SD 1.x/2.x ones do not."""
    return unet_config.get("addition_embed_type") == "text_time"


def family_name(unet_config: Mapping, scheduler_config: Mapping) -> str:
    if is_sdxl(unet_config):
        return "sdxl"
    if _cross_dim(unet_config) >= 1024 or unet_config.get("use_linear_projection"):
        return "sd2-v" if scheduler_config.get("prediction_type") == "v_prediction" else "sd2"
    return "sd1"


def family_of_configs(unet_config: Mapping, vae_config: Mapping, scheduler_config: Mapping) -> ModelFamily:
    vae_scale = 2 ** (len(vae_config.get("block_out_channels", (1, 1, 1, 1))) - 1)
    size = int(unet_config.get("sample_size", 64)) * vae_scale
    return ModelFamily(family_name(unet_config, scheduler_config), size, size)


def family_of_source(source) -> ModelFamily:
    return family_of_configs(source.unet_config, source.vae_config, source.scheduler_config)


def family_of_folder(folder: Path) -> ModelFamily | None:
    """A diffusers folder's family from its own configs (no weights; an SDXL refiner's folder has no
    tokenizer/ or text_encoder/), or None if it is not such a folder."""
    parts = {"unet": "config.json", "vae": "config.json", "scheduler": "scheduler_config.json"}
    if not (folder.is_dir() and all((folder / p / n).is_file() for p, n in parts.items())):
        return None
    configs = {p: _read_json(folder / p / n) for p, n in parts.items()}
    return family_of_configs(configs["unet"], configs["vae"], configs["scheduler"])


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SourceError(f"{path}: not valid JSON ({e})") from None


def describe(unet_config: Mapping) -> str:
    kind = "SDXL" if is_sdxl(unet_config) else "SD 1.x/2.x"
    return f"{kind} (cross-attention width {_cross_dim(unet_config)})"


def check_controlnet_family(name: str, path: str | Path, controlnet_config: Mapping, unet_config: Mapping) -> None:
    """A ControlNet conditions only the family it was trained for: SDXL ControlNets take the added
    text/time conditioning and SDXL's text width, SD 1.x/2.x ones neither. One line when they differ."""
    ours, theirs = is_sdxl(controlnet_config), is_sdxl(unet_config)
    if ours != theirs or _cross_dim(controlnet_config) != _cross_dim(unet_config):
        raise SourceError(f"ControlNet {name!r} ({path}) is an {describe(controlnet_config)} ControlNet but the model "
                          f"is {describe(unet_config)}: use a ControlNet trained for the model's family")
