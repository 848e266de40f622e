"""The x4 upscaler (diffusers' ``StableDiffusionUpscalePipeline``) on an exported artifact.

The U-Net takes 7 channels: the 4 latent channels and the low-resolution RGB image, noised first by
the model's own DDPM schedule (``low_res_scheduler``) to ``noise_level``, which the U-Net also gets as
its class label. The latents have the low-resolution image's size; the VAE (scaling factor 0.08333,
three blocks) decodes them at four times that size. Random draws follow diffusers' order: the noise
added to the low-resolution image first, then the initial latents, then whatever the scheduler draws.

Large inputs run in tiles (:class:`Tiling`). Seams: the grid of tiles overlaps, and the tiles are
blended with linear feathering, in latent space for the U-Net and in pixel space for the VAE:

- U-Net: at every step each tile of the latents (with the same crop of the noised low-resolution
  image) goes through the U-Net; the predictions (guidance applied) are averaged into one full-size
  prediction with weights that ramp linearly across each overlap (``(i + 1) / (overlap + 1)`` from
  a tile's inner edge, 1 elsewhere and along the image's border), divided by the sum of the weights.
  The scheduler then steps once on the full latents, so all random draws keep the untiled shape
  and order (the same seed draws the same noise tiled or not).
- VAE: the final latents are decoded tile by tile on the same grid and blended in pixel space with
  the same ramps scaled by four.

A tiled image differs from the untiled one where a tile's U-Net or VAE would have seen past its edge
(both have global attention); the difference measured on a small model is in the README. A run whose
input fits in one tile is not tiled unless asked (``Tiling.always``), and then gives the untiled image.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from runtime import image as imgproc
from runtime.numerics import check_finite
from runtime.rng import make_rng
from runtime.schedulers import scheduler_from_config

__all__ = ["Tiling", "UpscaleRequest", "UpscaleInputError", "Upscaled", "upscale", "tile_starts", "feather", "LOW_RES_SCHEDULER", "DEFAULT_NOISE_LEVEL"]

F32 = np.float32
LOW_RES_SCHEDULER = "low_res_scheduler/scheduler_config.json"  # where an upscaler export keeps its DDPM config
DEFAULT_NOISE_LEVEL = 20  # diffusers' default
MIN_TILE = 8  # input pixels: smaller tiles leave the U-Net's deepest level under one cell


class UpscaleInputError(ValueError):
    """An upscale argument is invalid (runtime.pipeline raises it as a PipelineInputError)."""


@dataclasses.dataclass
class Upscaled:
    """What :func:`upscale` returns; ``Pipeline.generate`` wraps it in a ``runtime.pipeline.Result``."""

    images: list[Image.Image]
    latents: np.ndarray
    settings: dict


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Tiles of the low-resolution input (sizes in input pixels, which are latent cells)."""

    size: int = 256  # tile side; 0: never tile. Inputs within size x size run whole.
    overlap: int = 32  # cells shared by neighbouring tiles
    always: bool = False  # tile even an input that fits in one tile (tests: one tile == untiled)

    def check(self) -> None:
        if self.size < 0 or self.overlap < 0:
            raise UpscaleInputError(f"tile size {self.size} and overlap {self.overlap} must not be negative")
        if 0 < self.size < MIN_TILE:
            raise UpscaleInputError(f"tile size {self.size}: use 0 (no tiling) or at least {MIN_TILE} input pixels")
        if self.size and self.overlap >= self.size:
            raise UpscaleInputError(f"tile overlap {self.overlap} must be smaller than the tile size {self.size}")

    def grid(self, height: int, width: int) -> list[tuple[slice, slice]] | None:
        """The tiles (row and column slices of the latents), or None to run whole."""
        if self.size == 0 or (height <= self.size and width <= self.size and not self.always):
            return None
        rows, cols = tile_starts(height, self.size, self.overlap), tile_starts(width, self.size, self.overlap)
        return [(slice(y, min(y + self.size, height)), slice(x, min(x + self.size, width))) for y in rows for x in cols]


def tile_starts(length: int, size: int, overlap: int) -> list[int]:
    """Tile offsets along one axis: every ``size - overlap`` cells, the last one flush with the end."""
    if length <= size:
        return [0]
    starts = list(range(0, length - size, size - overlap))
    return starts + [length - size]


def feather(length: int, start: int, stop: int, ramp: int) -> np.ndarray:
    """1-d blending weights of the tile [start, stop) on an axis of ``length``: linear ramps of
    ``ramp`` cells on its inner edges, 1 elsewhere (an image border needs no blending)."""
    n = stop - start
    i = np.arange(n, dtype=np.float64)
    w = np.ones(n)
    if ramp > 0 and start > 0:
        w = np.minimum(w, (i + 1) / (ramp + 1))
    if ramp > 0 and stop < length:
        w = np.minimum(w, (n - i) / (ramp + 1))
    return w.astype(F32)


def _weights(tile: tuple[slice, slice], height: int, width: int, ramp: int) -> np.ndarray:
    rows, cols = tile
    return np.outer(feather(height, rows.start, rows.stop, ramp), feather(width, cols.start, cols.stop, ramp))


def _blend(tiles, height: int, width: int, ramp: int, run_tile: Callable[[tuple[slice, slice]], np.ndarray]) -> np.ndarray:
    """sum(w * f(tile)) / sum(w) over the grid (one tile with unit weights is f(tile) exactly)."""
    total = weight = None
    for tile in tiles:
        out = run_tile(tile)
        w = _weights(tile, height, width, ramp)
        if total is None:
            total = np.zeros(out.shape[:2] + (height, width), F32)
            weight = np.zeros((height, width), F32)
        total[..., tile[0], tile[1]] += w * out
        weight[tile[0], tile[1]] += w
    return (total / weight).astype(F32)


@dataclasses.dataclass(frozen=True)
class UpscaleRequest:
    """One upscale call's arguments (checked by :func:`check_request`)."""

    image: Image.Image
    noise_level: int
    steps: int
    guidance_scale: float
    tiling: Tiling


def load_input(image, what: str = "upscaler input") -> Image.Image:
    """The low-resolution image, refused unless it is 3-channel RGB. diffusers' image processor
    does not convert either (an RGBA or grayscale image reaches its U-Net with 4 or 1 channels and
    fails there); converting would silently choose how to drop alpha or colour for the user."""
    img = imgproc.load_image(image, what)
    if img.mode != "RGB":
        channels = len(img.getbands())
        raise UpscaleInputError(f"{what} is {img.mode} ({channels} channel{'s' * (channels != 1)}); the x4 upscaler "
                                 "takes a 3-channel RGB image: convert it first (e.g. drop the alpha channel)")
    return img


def check_request(pipe, image, noise_level, steps, guidance_scale, tiling) -> UpscaleRequest:
    max_level = pipe.info.max_noise_level
    if max_level is None:
        raise UpscaleInputError("this export has no max_noise_level; re-export the upscaler with this sdexport")
    noise_level = DEFAULT_NOISE_LEVEL if noise_level is None else noise_level
    if isinstance(noise_level, bool) or not isinstance(noise_level, (int, np.integer)) or not 0 <= noise_level <= max_level:
        raise UpscaleInputError(f"noise level {noise_level}: must be an integer in [0, {max_level}] for this upscaler")
    if image is None:
        raise UpscaleInputError("the x4 upscaler needs an input image (--image LOW.png)")
    recommended = pipe.info.recommended or {}
    steps = int(steps if steps is not None else recommended.get("steps", 75))
    if steps < 1:
        raise UpscaleInputError(f"steps {steps}: must be at least 1")
    guidance_scale = float(guidance_scale if guidance_scale is not None else recommended.get("guidance_scale", 9.0))
    if not np.isfinite(guidance_scale):
        raise UpscaleInputError(f"guidance scale {guidance_scale}: expected a finite number")
    tiling = tiling or Tiling()
    tiling.check()
    img = load_input(image)
    if min(img.size) < pipe.info.vae_scale_factor:
        raise UpscaleInputError(f"upscaler input is {img.width}x{img.height}; it needs at least "
                                 f"{pipe.info.vae_scale_factor} pixels a side")
    return UpscaleRequest(img, int(noise_level), steps, guidance_scale, tiling)


def preprocess(image: Image.Image, multiple: int) -> np.ndarray:
    """diffusers' VaeImageProcessor(resample="bicubic"): sizes rounded down to the VAE factor
    (a bicubic resize when that changes them), then [0, 255] -> [-1, 1], float32 [1, 3, h, w]."""
    w, h = image.width - image.width % multiple, image.height - image.height % multiple
    if (w, h) != image.size:
        image = image.resize((w, h), resample=Image.BICUBIC)
    array = np.asarray(image).astype(F32) / F32(255.0)
    return (F32(2.0) * array.transpose(2, 0, 1)[None] - F32(1.0)).astype(F32)


def low_res_scheduler(pipe):
    path = pipe.manifest.path(LOW_RES_SCHEDULER, "low-resolution scheduler config")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        from runtime.manifest import ManifestError

        raise ManifestError(f"{path}: cannot read the upscaler's low-resolution scheduler ({e})") from None
    return scheduler_from_config(config, path=str(path))


def upscale(pipe, prompts: Sequence[str], negatives: Sequence[str], *, image, noise_level=None, steps=None,
            guidance_scale=None, scheduler=None, seed: int = 0, rng: str = "numpy", tiling: Tiling | None = None,
            callback=None, progress: bool = False) -> Upscaled:
    """The upscaled image(s) of ``image`` (see the module doc); ``pipe`` is a runtime.pipeline.Pipeline
    (its sessions, tokenizer, scheduler and timings), the prompt lists already checked."""
    req = check_request(pipe, image, noise_level, steps, guidance_scale, tiling)
    noise_rng = make_rng(seed, rng)
    sched = pipe.make_scheduler(scheduler)
    do_cfg = req.guidance_scale > 1.0
    embeddings = pipe.encode_prompts(prompts)
    if do_cfg:
        embeddings = np.concatenate([pipe.encode_prompts(negatives), embeddings])
    low_res = preprocess(req.image, pipe.info.vae_scale_factor)
    try:
        sched.set_timesteps(req.steps)
        sched.check_step_count(req.steps)
    except ValueError as e:  # a count the schedule cannot give: refused before the loop
        raise UpscaleInputError(f"{type(sched).__name__}: {e}") from None
    timesteps = np.asarray(sched.timesteps)
    # diffusers' order of draws: the low-resolution image's noise, then the latents.
    noise = noise_rng.randn(low_res.shape)
    low_res = low_res_scheduler(pipe).add_noise(low_res, noise, np.asarray([req.noise_level])).astype(F32)
    batch = len(prompts)
    cond = np.concatenate([low_res] * (2 if do_cfg else 1) * batch)
    labels = np.full((cond.shape[0],), req.noise_level, np.int64)
    shape = (batch, pipe.info.latent_channels) + low_res.shape[2:]
    latents = (noise_rng.randn(shape) * F32(sched.init_noise_sigma)).astype(F32)
    tiles = req.tiling.grid(*low_res.shape[2:])
    latents = _denoise(pipe, sched, timesteps, latents, cond, labels, embeddings, req, do_cfg, tiles, noise_rng,
                       callback, progress)
    check_finite("unet", latents, pipe.manifest.component("unet").precision)
    images = _decode(pipe, latents, tiles, req.tiling.overlap)
    return Upscaled(images, latents, _settings(pipe, prompts, negatives, req, seed, rng, scheduler, latents.shape, tiles))


def _denoise(pipe, sched, timesteps, latents, cond, labels, embeddings, req: UpscaleRequest, do_cfg, tiles, rng,
             callback, progress) -> np.ndarray:
    session = pipe.session("unet")
    height, width = latents.shape[2:]

    def predict(t, x: np.ndarray, rows=slice(None), cols=slice(None)) -> np.ndarray:
        model_input = np.concatenate([x, x]) if do_cfg else x
        sample = np.concatenate([model_input, cond[..., rows, cols]], axis=1).astype(F32)
        feeds = {"sample": sample, "timestep": np.full((sample.shape[0],), t, F32),
                 "encoder_hidden_states": embeddings, "class_labels": labels}
        out = session.run(feeds)["out_sample"].astype(F32, copy=False)
        if do_cfg:
            uncond, text = np.split(out, 2)
            out = uncond + F32(req.guidance_scale) * (text - uncond)
        return out

    iterator = enumerate(timesteps)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, total=len(timesteps), desc="upscale", unit="step")
    for i, t in iterator:
        scaled = sched.scale_model_input(latents, t).astype(F32, copy=False)
        if tiles is None:
            noise_pred = predict(t, scaled)
        else:
            noise_pred = _blend(tiles, height, width, req.tiling.overlap,
                                lambda tile: predict(t, scaled[..., tile[0], tile[1]], *tile))
        latents = np.asarray(sched.step(noise_pred, t, latents, rng=rng), dtype=F32)
        if callback is not None:
            callback(i, float(t), latents)
    return latents


def _decode(pipe, latents: np.ndarray, tiles, overlap: int) -> list[Image.Image]:
    if tiles is None:
        return pipe.decode(latents)
    session = pipe.session("vae_decoder")
    f = pipe.info.vae_scale_factor
    z = (latents / F32(pipe.info.vae_scaling_factor)).astype(F32)
    height, width = latents.shape[2] * f, latents.shape[3] * f
    pixel_tiles = [(slice(r.start * f, r.stop * f), slice(c.start * f, c.stop * f)) for r, c in tiles]

    def run_tile(tile):
        rows, cols = slice(tile[0].start // f, tile[0].stop // f), slice(tile[1].start // f, tile[1].stop // f)
        return session.run({"latent_sample": np.ascontiguousarray(z[..., rows, cols])})["sample"].astype(F32)

    sample = _blend(pixel_tiles, height, width, overlap * f, run_tile)
    check_finite("vae_decoder", sample, pipe.manifest.component("vae_decoder").precision)
    return imgproc.decode_to_images(sample)


def _settings(pipe, prompts, negatives, req: UpscaleRequest, seed, rng, scheduler, shape, tiles) -> dict:
    one = len(prompts) == 1
    f = pipe.info.vae_scale_factor
    return {
        "prompt": prompts[0] if one else prompts,
        "negative_prompt": negatives[0] if one else negatives,
        "seed": seed,
        "rng": rng,
        "scheduler": scheduler or pipe.scheduler_config.get("_class_name"),
        "steps": req.steps,
        "guidance_scale": req.guidance_scale,
        "height": shape[2] * f,
        "width": shape[3] * f,
        "noise_level": req.noise_level,
        "tiles": len(tiles) if tiles is not None else None,
        "tile_size": req.tiling.size if tiles is not None else None,
        "tile_overlap": req.tiling.overlap if tiles is not None else None,
        "model_hash": pipe.manifest.exporter.get("artifact_hash"),
        "cfg": "batched" if req.guidance_scale > 1.0 else "off",
        "loop": "numpy",
    }
