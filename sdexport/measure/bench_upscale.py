"""``sdexport bench`` on an x4 upscaler export: the upscale step against diffusers'
``StableDiffusionUpscalePipeline`` (same low-resolution input, noise level, prompt, seed and scheduler).

The input is a deterministic gradient at the bench size divided by the VAE factor (4): a 512x512
bench upscales 128x128 to 512x512, as the x4 upscaler is usually run. Per run: wall time of both
pipelines, the median time of one upscale step (U-Net on 7 channels with the noise level, guidance,
scheduler step), the latents after every step and the image, compared as the bench compares txt2img.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from PIL import Image

from runtime.metrics import finite, max_abs_error, psnr, ssim
from runtime.upscale import DEFAULT_NOISE_LEVEL


def low_res_input(height: int, width: int) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) * 255 // max(height + width - 2, 1)], -1)
    return Image.fromarray(rgb.astype(np.uint8))


def unet_torch_call(ref):
    """The reference U-Net called as the upscaler calls it (the noise level as class labels)."""
    return lambda x: ref.unet(torch.from_numpy(x["sample"]), torch.from_numpy(x["timestep"]),
                              torch.from_numpy(x["encoder_hidden_states"]),
                              class_labels=torch.from_numpy(x["class_labels"]))


def end_to_end(pipe, ref, info, config, height: int, width: int, bar) -> list[dict]:
    f = info.vae_scale_factor
    image = low_res_input(height // f, width // f)
    runs = []
    for prompt in config.prompts:
        for seed in config.seeds:
            runs.append(_one_run(pipe, ref, image, prompt, seed, config))
            bar.update()
    return runs


def _one_run(pipe, ref, image: Image.Image, prompt: str, seed: int, config) -> dict:
    ours_steps, ours_times, ref_steps, ref_times = [], [], [], []

    def on_step(i, t, latents):
        ours_steps.append(latents.copy())
        ours_times.append(time.perf_counter())

    def on_step_ref(i, t, latents):
        ref_steps.append(latents.numpy().copy())
        ref_times.append(time.perf_counter())

    start = time.perf_counter()
    result = pipe.generate(prompt, steps=config.steps, guidance_scale=config.guidance_scale, scheduler=config.scheduler,
                           seed=seed, rng="torch", image=image, noise_level=DEFAULT_NOISE_LEVEL, callback=on_step,
                           return_latents=True)
    ours_total = time.perf_counter() - start
    start = time.perf_counter()
    with torch.no_grad():
        ref_image = ref(prompt, image=image, num_inference_steps=config.steps, guidance_scale=config.guidance_scale,
                        noise_level=DEFAULT_NOISE_LEVEL, generator=torch.Generator().manual_seed(seed),
                        callback=on_step_ref, callback_steps=1).images[0]
    ref_total = time.perf_counter() - start
    a, b = np.asarray(ref_image, np.float64), np.asarray(result.image, np.float64)
    return {
        "prompt": prompt, "seed": seed, "task": f"x4 upscale {image.width}x{image.height} -> {result.image.width}x"
                                                f"{result.image.height}, noise level {DEFAULT_NOISE_LEVEL}",
        "runtime_seconds": ours_total, "pytorch_seconds": ref_total,
        "runtime_step_ms": _median_step_ms(ours_times), "pytorch_step_ms": _median_step_ms(ref_times),
        "runtime_overhead_share": result.overhead_seconds / result.timings["total"],
        "loop": result.settings.get("loop"), "loop_reason": result.loop_reason,
        "latent_max_abs_err": max_abs_error(ref_steps[-1], result.latents),
        "image_psnr_db": finite(psnr(a, b, peak=255.0)),
        "image_ssim": ssim(a, b),
        "latent_psnr_per_step_db": [finite(psnr(r, o)) for r, o in zip(ref_steps, ours_steps)],
        "_images": (a, b),
    }


def _median_step_ms(times: list[float]) -> float | None:
    return float(np.median(np.diff(times)) * 1e3) if len(times) > 1 else None


def markdown_line(runs: list[dict]) -> list[str]:
    """The upscale step, said as such in bench.md."""
    tasks = sorted({r["task"] for r in runs if r.get("task")})
    if not tasks:
        return []
    step_rt = np.median([r["runtime_step_ms"] for r in runs if r["runtime_step_ms"]] or [0])
    step_pt = np.median([r["pytorch_step_ms"] for r in runs if r["pytorch_step_ms"]] or [0])
    return ["", f"Upscale step ({'; '.join(tasks)}): runtime {step_rt:.1f} ms, PyTorch {step_pt:.1f} ms per denoising step "
                "(U-Net on latents + noised low-resolution image, guidance, scheduler)."]
