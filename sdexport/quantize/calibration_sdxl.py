"""Calibration runs for the SDXL family (base, refiner, inpainting), for :mod:`sdexport.quantize.calibration`.

The recording machinery is calibration.py's (the forward pre-hook, the cache, the batching); SDXL
differs in what it runs and what the U-Net is given:

- the pipeline: diffusers' ``StableDiffusionXLPipeline``; a refiner (time ids ending in an aesthetic
  score) runs ``StableDiffusionXLImg2ImgPipeline`` at strength ``REFINER_STRENGTH`` from an image, since
  it only ever denoises the low-noise end of a trajectory (over ``steps`` U-Net calls, as the base);
  a 9-channel U-Net runs ``StableDiffusionXLInpaintPipeline``;
- the U-Net's added conditioning (``added_cond_kwargs``: ``text_embeds``, ``time_ids``) is recorded
  with the names the exported SDXL U-Net gives those inputs (``sdexport.export.sdxl.SdxlUNet``);
- an empty negative prompt is run as no negative prompt (``None``): zeros under
  ``force_zeros_for_empty_prompt``, which is what the runtime does when a user gives none;
- the cache key names the family and fingerprints text_encoder_2 and tokenizer_2 as well.

This module imports nothing of calibration.py (calibration.py calls it), so there is no import cycle.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sdexport.errors import OptionError
from sdexport.export.sdxl_info import is_sdxl

__all__ = ["ADDED_INPUTS", "EXTRA_FOLDERS", "REFINER_STRENGTH", "family", "pipeline_class", "run_kwargs",
           "refiner_schedule", "check_components", "needs_image"]

ADDED_INPUTS = ("text_embeds", "time_ids")  # added_cond_kwargs keys = the exported U-Net's input names
EXTRA_FOLDERS = ("text_encoder_2", "tokenizer_2")  # fingerprinted into the cache key besides SD's folders
# diffusers' StableDiffusionXLImg2ImgPipeline default strength: the refiner's range (the last ~30 % of
# the noise levels, as with denoising_start 0.7-0.8 behind a base)
REFINER_STRENGTH = 0.3


def family(source_path: Path) -> str | None:
    """"sdxl" for a diffusers folder whose U-Net has SDXL's added conditioning, else None."""
    try:
        config = json.loads((Path(source_path) / "unet" / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # calibration then fails on loading the pipeline, with its own message
    return "sdxl" if isinstance(config, dict) and is_sdxl(config) else None


def is_refiner(info) -> bool:
    return bool(info.requires_aesthetics_score)


def check_components(info, components) -> None:
    """A refiner has no first text encoder, so there are no ``text_encoder`` token ids to record."""
    if is_refiner(info) and "text_encoder" in components:
        raise OptionError("calibration cannot record text_encoder for an SDXL refiner: it has only text_encoder_2")


def pipeline_class(info):
    import diffusers

    if info.is_inpainting:
        return diffusers.StableDiffusionXLInpaintPipeline
    if is_refiner(info):
        return diffusers.StableDiffusionXLImg2ImgPipeline
    return diffusers.StableDiffusionXLPipeline


def needs_image(info) -> bool:
    """Whether each run starts from an image (the refiner's img2img input)."""
    return is_refiner(info)


def run_kwargs(info, negative: str, image, steps: int) -> dict[str, Any]:
    """The SDXL pipeline arguments besides calibration.py's common ones. A refiner's run is given as many
    scheduler steps as make ``steps`` U-Net calls at ``REFINER_STRENGTH`` (diffusers runs
    ``int(steps * strength)`` of them), so ``--calibration-steps`` counts U-Net calls for every model."""
    kwargs: dict[str, Any] = {"negative_prompt": negative or None}
    if is_refiner(info) and not info.is_inpainting:
        kwargs.update(image=image, strength=REFINER_STRENGTH, num_inference_steps=refiner_schedule(steps))
    return kwargs


def refiner_schedule(steps: int) -> int:
    """The fewest scheduler steps whose last ``REFINER_STRENGTH`` are ``steps`` steps (as diffusers'
    ``get_timesteps`` counts them, flooring a float product: hence the search, not a division)."""
    total = steps
    while int(total * REFINER_STRENGTH) < steps:
        total += 1
    return total
