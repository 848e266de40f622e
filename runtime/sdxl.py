"""SDXL conditioning and the two-expert hand-over, as diffusers' SDXL pipelines do them.

Follows ``StableDiffusionXLPipeline`` and ``StableDiffusionXLImg2ImgPipeline`` (diffusers 0.3x-0.4x):

- ``encode_prompt``: each tokenizer/encoder pair gives its penultimate hidden states; they are
  concatenated along the width; the pooled ``text_embeds`` come from the last encoder
  (``text_encoder_2``). A refiner has only that one.
- the negative side: with ``force_zeros_for_empty_prompt`` and *no* negative prompt (None, not ""),
  zeros of the same shapes; otherwise the encoders run on the negative prompt ("" when none).
- ``_get_add_time_ids``: (original h, w) + crop top-left (0, 0) + (target h, w), both the output
  size; a refiner (``requires_aesthetics_score``) ends in the aesthetic score (6.0, negative 2.5)
  in place of the target size.
- ``denoising_end`` (base, returning latents) cuts the schedule at ``round(T - end * T)``;
  ``denoising_start`` (refiner, from those latents) starts it there, adding no noise.

This module never imports the pipeline: errors are raised as the class the caller passes.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from runtime.manifest import Manifest
from runtime.tokenizer import CLIPTokenizer

F32 = np.float32


@dataclasses.dataclass
class XLRequest:
    """The SDXL-only arguments of a generate call."""

    denoising_start: float | None = None  # refiner: where the base's schedule stopped
    denoising_end: float | None = None  # base: stop there and hand the latents over
    aesthetic_score: float = 6.0  # refiner time ids
    negative_aesthetic_score: float = 2.5
    latents: np.ndarray | None = None  # the base's (unscaled) latents, the refiner's input
    negative_is_none: bool = True  # no negative prompt given: force_zeros_for_empty_prompt applies

    def sdxl_options(self) -> list[str]:
        """The SDXL-only options set, by their command-line names."""
        named = [("--denoising-start", self.denoising_start is not None),
                 ("--denoising-end", self.denoising_end is not None),
                 ("--aesthetic-score", self.aesthetic_score != 6.0),
                 ("--negative-aesthetic-score", self.negative_aesthetic_score != 2.5),
                 ("base latents (image=ndarray)", self.latents is not None)]
        return [name for name, on in named if on]


def _fraction(value, name: str, error) -> float | None:
    if value is None:
        return None
    value = float(value)
    if not (np.isfinite(value) and 0.0 < value < 1.0):
        raise error(f"{name} {value}: expected a fraction strictly between 0 and 1")
    return value


def check_request(manifest: Manifest, xl: XLRequest, *, has_image: bool, has_mask: bool, error) -> XLRequest:
    """Refused in one line: SDXL options on an SD 1.x/2.x export, SD-only ones on SDXL, a refiner without input."""
    info = manifest.model
    if not info.is_sdxl:
        used = xl.sdxl_options()
        if used:
            raise error(f"{used[0]} is an SDXL option; this export is a {info.family} model")
        return xl
    if has_mask and (xl.denoising_start is not None or xl.latents is not None):
        raise error("SDXL inpainting (--mask) starts from an image, not from a base's latents or --denoising-start")
    xl.denoising_start = _fraction(xl.denoising_start, "--denoising-start", error)
    xl.denoising_end = _fraction(xl.denoising_end, "--denoising-end", error)
    if xl.denoising_start is not None and xl.denoising_end is not None and xl.denoising_start >= xl.denoising_end:
        raise error(f"--denoising-start {xl.denoising_start} must be below --denoising-end {xl.denoising_end}")
    for name, value in (("--aesthetic-score", xl.aesthetic_score), ("--negative-aesthetic-score", xl.negative_aesthetic_score)):
        if not np.isfinite(float(value)):
            raise error(f"{name} {value}: expected a finite number")
    refiner = info.requires_aesthetics_score
    if not has_image and xl.latents is None:
        if xl.denoising_start is not None:
            raise error("--denoising-start continues a base run: give the base's latents (--refiner on the base "
                        "export) or an --image")
        if refiner:
            raise error("this export is an SDXL refiner: give an --image to refine, or run it after a base "
                        "export with `sdexport generate BASE --refiner THIS`")
    if xl.latents is not None:
        _check_latents(xl.latents, info.latent_channels, error)
    return xl


def _check_latents(latents, channels: int, error) -> None:
    if not isinstance(latents, np.ndarray) or latents.ndim != 4 or latents.shape[1] != channels:
        raise error(f"base latents: expected a [batch, {channels}, h, w] array, got "
                    f"{getattr(latents, 'shape', type(latents).__name__)}")
    if not np.isfinite(latents).all():
        raise error("base latents hold non-finite values")


class Conditioner:
    """Both prompts encoded (two encoders, or the refiner's one), pooled embeds and time ids."""

    def __init__(self, manifest: Manifest, session):
        self.manifest, self.info, self.session = manifest, manifest.model, session
        self.first = "text_encoder" in manifest.components
        self.tokenizer = CLIPTokenizer.from_dir(manifest.path(manifest.tokenizer_dir, "tokenizer")) if self.first else None
        self.tokenizer_2 = CLIPTokenizer.from_dir(manifest.path(manifest.tokenizer_2_dir or "tokenizer_2", "tokenizer_2"))

    def encode(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(penultimate hidden states of both encoders concatenated [B, 77, D1+D2], text_embeds [B, P])."""
        parts = []
        if self.first:
            out = self.session("text_encoder").run({"input_ids": self.tokenizer(prompts)})
            parts.append(out["penultimate_hidden_state"].astype(F32, copy=False))
        out = self.session("text_encoder_2").run({"input_ids": self.tokenizer_2(prompts)})
        parts.append(out["penultimate_hidden_state"].astype(F32, copy=False))
        return np.concatenate(parts, axis=-1), out["text_embeds"].astype(F32, copy=False)

    def time_ids(self, height: int, width: int, score: float) -> np.ndarray:
        """[1, 6] (original size, crop top-left, target size) or, for a refiner, [1, 5] ending in ``score``."""
        tail = (score,) if self.info.requires_aesthetics_score else (height, width)
        return np.asarray([[height, width, 0, 0, *tail]], F32)

    def conditioning(self, prompts, negatives, height: int, width: int, do_cfg: bool, xl: XLRequest):
        """(encoder_hidden_states [N, 77, D], {"text_embeds": [N, P], "time_ids": [N, 5|6]}), the
        negative half first under classifier-free guidance."""
        embeds, pooled = self.encode(prompts)
        batch = len(prompts)
        time_ids = np.repeat(self.time_ids(height, width, xl.aesthetic_score), batch, axis=0)
        if not do_cfg:
            return embeds, {"text_embeds": pooled, "time_ids": time_ids}
        if xl.negative_is_none and self.info.force_zeros_for_empty_prompt:
            neg_embeds, neg_pooled = np.zeros_like(embeds), np.zeros_like(pooled)
        else:
            neg_embeds, neg_pooled = self.encode(negatives)
        neg_ids = np.repeat(self.time_ids(height, width, xl.negative_aesthetic_score), batch, axis=0)
        return (np.concatenate([neg_embeds, embeds]),
                {"text_embeds": np.concatenate([neg_pooled, pooled]), "time_ids": np.concatenate([neg_ids, time_ids])})


def _cutoff(sched, fraction: float) -> int:
    train = sched.config.num_train_timesteps
    return int(round(train - fraction * train))


def cut_at_end(sched, timesteps: np.ndarray, denoising_end: float | None) -> np.ndarray:
    """The base's schedule up to ``denoising_end``: the timesteps at or above the cut-off."""
    if denoising_end is None:
        return timesteps
    cutoff = _cutoff(sched, denoising_end)
    return timesteps[: int(sum(1 for t in timesteps if t >= cutoff))]


def start_at(sched, denoising_start: float) -> np.ndarray:
    """The refiner's schedule from ``denoising_start`` (diffusers' get_timesteps with denoising_start):
    the timesteps below the cut-off, one more for a second-order scheduler whose count is even."""
    all_timesteps = np.asarray(sched.timesteps)
    n = int((all_timesteps < _cutoff(sched, denoising_start)).sum())
    if sched.order == 2 and n % 2 == 0:
        n += 1
    t_start = len(all_timesteps) - n
    sched.set_begin_index(t_start)
    return all_timesteps[t_start:]
