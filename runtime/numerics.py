"""Reduced precision at run time: a NaN or inf from a component stops the run, it never becomes an image.

An fp16 U-Net or VAE decoder that overflows (the SD 1.5 VAE decoder is the known case) gives NaN/inf
latents or pixels, which the image conversion would clip into a black or noise image without a word.
:func:`check_finite` is called on the U-Net loop's final latents and on the VAE decoder's output and
raises :class:`NumericsError`: one line naming the component, its precision and the remedy.
"""

from __future__ import annotations

import numpy as np

from runtime.backends.base import BackendError

__all__ = ["NumericsError", "check_finite", "remedy"]

FULL_PRECISION = ("fp32", "float32")


class NumericsError(BackendError):
    """A component produced NaN or inf; the message names it and what to do."""


def remedy(component: str, precision: str | None) -> str:
    if precision and precision.lower() not in FULL_PRECISION:
        fix = f"re-export {component} with --precision fp32"
        if component.startswith("vae"):
            fix += " (an fp32 VAE decoder: SD's VAE overflows fp16)"
        return fix
    return "the component is fp32: check its weights and the inputs (a NaN in the prompt embeddings or latents?)"


def check_finite(component: str, array, precision: str | None = None) -> None:
    """Raise :class:`NumericsError` when ``array`` (the component's output) holds NaN or inf."""
    values = np.asarray(array)
    if values.dtype.kind != "f" or bool(np.isfinite(values).all()):
        return
    nan = int(np.isnan(values).sum())
    inf = int(values.size - nan - np.isfinite(values).sum())
    what = " and ".join(f"{n} {kind}" for n, kind in ((nan, "NaN"), (inf, "inf")) if n)
    label = f"{component} ({precision})" if precision else component
    raise NumericsError(f"{label} produced {what} of {values.size} values; no image written: {remedy(component, precision)}")
