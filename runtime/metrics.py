"""Parity measures shared by export validation, tests and benchmarks (numpy only)."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def max_abs_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))) if np.size(a) else 0.0


def psnr(reference: np.ndarray, test: np.ndarray, peak: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB. ``peak`` defaults to the reference's value range, so
    that tensors of any scale (latents, hidden states) are judged relative to their own spread;
    pass 255 for 8-bit images. Identical inputs give ``inf``."""
    ref = np.asarray(reference, np.float64)
    err = np.asarray(test, np.float64) - ref
    if not np.all(np.isfinite(err)):
        return float("-inf")
    mse = float(np.mean(err * err))
    if mse == 0.0:
        return float("inf")
    if peak is None:
        peak = float(ref.max() - ref.min()) or 1.0
    return 10.0 * math.log10(peak * peak / mse)


def pooled_psnr(reference: Sequence[np.ndarray], test: Sequence[np.ndarray],
                peak: float | None = None) -> tuple[float, float]:
    """PSNR of many (reference, test) pairs judged as one tensor, and of the worst single pair.

    Pooling weighs every element once and (``peak`` None) takes the peak from the whole reference
    set, so one pair with a small value range cannot dominate; the worst pair shows what pooling
    averages away. Used by the quantizer's parity gate and by ``sdexport quality``."""
    if len(reference) != len(test) or not len(reference):
        raise ValueError(f"pooled_psnr needs pairs: {len(reference)} references, {len(test)} tests")
    ref_all = np.concatenate([np.asarray(r, np.float64).ravel() for r in reference])
    out_all = np.concatenate([np.asarray(t, np.float64).ravel() for t in test])
    return psnr(ref_all, out_all, peak), min(psnr(r, t, peak) for r, t in zip(reference, test))


def ssim(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    """Mean structural similarity of two HxW or HxWxC images, 7x7 uniform windows (Wang et al. 2004)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.ndim == 3:
        return float(np.mean([ssim(a[..., c], b[..., c], peak) for c in range(a.shape[-1])]))
    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    win = 7
    if min(a.shape) < win:
        win = min(a.shape)

    def mean_filter(x):
        s = np.cumsum(np.cumsum(np.pad(x, ((1, 0), (1, 0))), 0), 1)
        return (s[win:, win:] - s[:-win, win:] - s[win:, :-win] + s[:-win, :-win]) / (win * win)

    mu_a, mu_b = mean_filter(a), mean_filter(b)
    var_a = mean_filter(a * a) - mu_a**2
    var_b = mean_filter(b * b) - mu_b**2
    cov = mean_filter(a * b) - mu_a * mu_b
    n = win * win
    var_a, var_b, cov = var_a * n / (n - 1), var_b * n / (n - 1), cov * n / (n - 1)  # sample statistics
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(s.mean())


def finite(x) -> float | None:
    """A JSON-friendly float (inf/nan become None)."""
    x = float(x)
    return x if math.isfinite(x) else None
