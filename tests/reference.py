"""diffusers as the oracle: the same generation through a torch pipeline, for parity tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# Our short scheduler names -> diffusers classes: the runtime's one table (runtime.schedulers.SHORT_NAMES);
# test_schedulers checks each name's class against a list written out in the test.
from sdexport.measure.reference_schedulers import use_scheduler  # noqa: E402


def sample_image(size: int = 64, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([x, y, 1 - x * y], -1) * 255
    img = Image.fromarray(base.astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x0, y0 = rng.integers(0, size - 16, 2)
        w, h = rng.integers(8, 24, 2)
        draw.ellipse([x0, y0, x0 + w, y0 + h], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    return img


def sample_mask(size: int = 64) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).rectangle([size // 4, size // 4, 3 * size // 4 - 1, 3 * size // 4 - 1], fill=255)
    return mask


def load_pipeline(model_dir: Path, kind: str, scheduler: str | None, controlnets=None):
    import diffusers

    cls = {
        "txt2img": diffusers.StableDiffusionPipeline,
        "img2img": diffusers.StableDiffusionImg2ImgPipeline,
        "inpaint": diffusers.StableDiffusionInpaintPipeline,
        "control": diffusers.StableDiffusionControlNetPipeline,
        "control-img2img": diffusers.StableDiffusionControlNetImg2ImgPipeline,
        "control-inpaint": diffusers.StableDiffusionControlNetInpaintPipeline,
    }[kind]
    extra = {}
    if controlnets is not None:
        extra["controlnet"] = controlnets if len(controlnets) > 1 else controlnets[0]
    pipe = cls.from_pretrained(str(model_dir), safety_checker=None, requires_safety_checker=False, **extra)
    pipe.set_progress_bar_config(disable=True)
    if scheduler is not None:
        use_scheduler(pipe, scheduler)
    return pipe


def diffusers_image(model_dir: Path, kind: str, scheduler: str | None, seed: int, controlnets=None, **kwargs) -> Image.Image:
    import torch

    pipe = load_pipeline(model_dir, kind, scheduler, controlnets)
    with torch.no_grad():
        return pipe(generator=torch.Generator().manual_seed(seed), **kwargs).images[0]
