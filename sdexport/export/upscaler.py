"""What an x4 upscaler export (diffusers' ``StableDiffusionUpscalePipeline``) needs besides the
components: its highest noise level, its VAE scaling factor and the DDPM config that noises the
low-resolution input (copied into the artifact at ``runtime.upscale.LOW_RES_SCHEDULER``)."""

from __future__ import annotations

import shutil
from pathlib import Path

from runtime.upscale import LOW_RES_SCHEDULER
from sdexport.errors import SourceError
from sdexport.sources.base import model_index

DEFAULT_MAX_NOISE_LEVEL = 350  # StableDiffusionUpscalePipeline.__init__'s default
SCALING_FACTOR = 0.08333  # the pipeline sets this on any VAE config that says otherwise


def upscaler_noise_level(source) -> int:
    """``max_noise_level`` from model_index.json (the pipeline's config), 350 when absent as in diffusers."""
    value = model_index(source).get("max_noise_level", DEFAULT_MAX_NOISE_LEVEL)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SourceError(f"{source.path}/model_index.json: max_noise_level {value!r} is not an integer >= 0")
    return value


def low_res_scheduler_path(source) -> Path:
    path = Path(source.path) / "low_res_scheduler" / "scheduler_config.json"
    if not path.is_file():
        raise SourceError(f"{source.path}: an x4 upscaler needs low_res_scheduler/scheduler_config.json (not found)")
    return path


def write_low_res_scheduler(source, stage: Path) -> None:
    target = stage / LOW_RES_SCHEDULER
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(low_res_scheduler_path(source), target)
