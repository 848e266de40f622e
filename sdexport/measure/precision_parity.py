"""The parity protocol for reduced precision (issue 17): three image PSNRs, same prompts and seeds.

An fp16 export cannot be judged against diffusers fp32 alone: diffusers' own fp16 pipeline drifts from
its fp32 one (on random weights the 50-step trajectory amplifies rounding a great deal), so a low PSNR
may be fp16 itself rather than the export. Reported, per prompt and seed, and as medians:

* diffusers fp16 vs diffusers fp32 -- what PyTorch's own fp16 costs;
* ours vs diffusers fp32;
* ours vs diffusers fp16.

The export is as good as PyTorch's fp16 when "ours vs fp32" is at least "diffusers fp16 vs fp32" minus
1 dB (the issue's criterion), whatever "ours vs fp16" is: two fp16 runs that drift apart from fp32
independently need not be close to each other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from runtime.metrics import finite, psnr

__all__ = ["MARGIN_DB", "diffusers_images", "protocol"]

MARGIN_DB = 1.0


def diffusers_images(source: str | Path, dtype: str, prompts: Sequence[str], seeds: Sequence[int], *, steps: int,
                     guidance_scale: float, height: int, width: int, device: str = "cpu",
                     negative_prompt: str | None = None, scheduler: str | None = None,
                     sdxl: bool = False) -> list[np.ndarray]:
    """diffusers' images (uint8 HxWx3) for every prompt x seed, at ``dtype`` ("fp32" / "fp16") on
    ``device``; the seed drives a CPU torch.Generator, as the runtime's "torch" RNG reproduces.
    ``sdxl``: the source is an SDXL base, run by StableDiffusionXLPipeline (no watermark)."""
    import diffusers
    import torch

    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16}[dtype]
    if sdxl:
        pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(str(source), dtype=torch_dtype,
                                                                   add_watermarker=False).to(device)
    else:
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(
            str(source), dtype=torch_dtype, safety_checker=None, requires_safety_checker=False).to(device)
    pipe.set_progress_bar_config(disable=True)
    if scheduler is not None:
        from sdexport.measure.reference_schedulers import use_scheduler

        use_scheduler(pipe, scheduler)
    images = []
    with torch.inference_mode():
        for prompt in prompts:
            for seed in seeds:
                image = pipe(prompt, negative_prompt=negative_prompt, num_inference_steps=steps,
                             guidance_scale=guidance_scale, height=height, width=width,
                             generator=torch.Generator().manual_seed(seed)).images[0]
                images.append(np.asarray(image))
    del pipe
    return images


def _psnrs(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> list[float | None]:
    return [finite(psnr(np.asarray(x, np.float64), np.asarray(y, np.float64), peak=255.0)) for x, y in zip(a, b)]


def _median(values: list[float | None]) -> float | None:
    # identical images (inf dB, reported as None) count as the best value
    return float(np.median([v if v is not None else np.inf for v in values])) if values else None


def protocol(ours: Sequence[np.ndarray] | None, ref_fp32: Sequence[np.ndarray], ref_fp16: Sequence[np.ndarray]) -> dict:
    """The three PSNRs (dB, per image and median) and whether ours is within 1 dB of PyTorch's fp16."""
    runs = {"diffusers fp16 vs diffusers fp32": _psnrs(ref_fp16, ref_fp32)}
    if ours is not None:
        runs["ours vs diffusers fp32"] = _psnrs(ours, ref_fp32)
        runs["ours vs diffusers fp16"] = _psnrs(ours, ref_fp16)
    medians = {k: _median(v) for k, v in runs.items()}
    result: dict = {"per_image_db": runs, "median_db": medians, "margin_db": MARGIN_DB}
    if ours is not None:
        torch16, ours32 = medians["diffusers fp16 vs diffusers fp32"], medians["ours vs diffusers fp32"]
        result["ours_as_close_as_torch_fp16"] = bool(ours32 >= torch16 - MARGIN_DB)
    return result
