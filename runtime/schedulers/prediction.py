"""What the network predicts, turned into what a sampler needs: the clean sample x0 or the noise eps.

Two ways of writing a noisy sample are in use:

* variance preserving (DDPM, DDIM, PNDM, LCM, DPM-Solver, UniPC): x_t = alpha_t * x0 + sigma_t * eps,
  with alpha_t = sqrt(alpha_bar_t) and sigma_t = sqrt(1 - alpha_bar_t);
* variance exploding (the k-diffusion samplers LMS, Euler, Heun): x = x0 + sigma * eps, where the
  network was trained on x / sqrt(sigma^2 + 1), the same point scaled back to unit variance.

A network predicts eps ("epsilon"), x0 ("sample") or the velocity v = alpha_t * eps - sigma_t * x0
("v_prediction", Salimans & Ho 2022). The expressions keep diffusers' order of float32 operations.
"""

from __future__ import annotations

import numpy as np

from .solvers import lincomb

__all__ = ["vp_x0", "vp_eps", "ve_x0", "clip_or_threshold", "dynamic_threshold"]


def vp_x0(model_output: np.ndarray, x: np.ndarray, alpha, sigma, prediction_type: str) -> np.ndarray:
    """x0 from a variance-preserving x_t = alpha * x0 + sigma * eps."""
    if prediction_type == "epsilon":
        x0 = lincomb((1, x), (-sigma, model_output))
        x0 /= alpha
        return x0
    if prediction_type == "sample":
        return model_output
    if prediction_type == "v_prediction":
        return lincomb((alpha, x), (-sigma, model_output))
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def vp_eps(model_output: np.ndarray, x: np.ndarray, alpha, sigma, prediction_type: str) -> np.ndarray:
    """eps from a variance-preserving x_t = alpha * x0 + sigma * eps."""
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "sample":
        eps = lincomb((1, x), (-alpha, model_output))
        eps /= sigma
        return eps
    if prediction_type == "v_prediction":
        return lincomb((alpha, model_output), (sigma, x))
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def ve_x0(model_output: np.ndarray, x: np.ndarray, sigma, prediction_type: str) -> np.ndarray:
    """x0 from a variance-exploding x = x0 + sigma * eps whose network input was scaled to unit variance."""
    if prediction_type == "epsilon":
        return lincomb((1, x), (-sigma, model_output))
    if prediction_type in ("sample", "original_sample"):
        return model_output
    if prediction_type == "v_prediction":
        # The network saw c_in * x with c_in = 1 / sqrt(sigma^2 + 1); its v is in that scaled space.
        sigma_sq_plus_1 = sigma * sigma + 1
        x0 = model_output * (-sigma / np.sqrt(sigma_sq_plus_1))
        x0 += x / sigma_sq_plus_1
        return x0
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def dynamic_threshold(x0: np.ndarray, ratio: float, max_value: float) -> np.ndarray:
    """Imagen's dynamic thresholding (Saharia et al. 2022): per sample, clip x0 to the ``ratio``
    quantile s of |x0| (s kept in [1, max_value]) and divide by s."""
    flat = x0.reshape(x0.shape[0], -1)
    s = np.quantile(np.abs(flat), ratio, axis=1).astype(np.float32)
    s = np.clip(s, 1, max_value).astype(np.float32)[:, None]
    return (np.clip(flat, -s, s) / s).reshape(x0.shape)


def clip_or_threshold(x0: np.ndarray, config) -> np.ndarray:
    """The x0 post-processing a config asks for: dynamic thresholding, else clipping, else nothing."""
    if getattr(config, "thresholding", False):
        return dynamic_threshold(x0, config.dynamic_thresholding_ratio, config.sample_max_value)
    if getattr(config, "clip_sample", False):
        limit = config.clip_sample_range
        return np.clip(x0, -limit, limit)
    return x0
