"""Noise schedules: betas -> alphas_cumprod -> sigmas, the spacing of inference timesteps, and the
sigma spacings of Karras et al. (2022).

Notation: beta_t is the variance added by training step t, alpha_bar_t = prod_{s<=t} (1 - beta_s) the
signal fraction left at t, and sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) the same noise level in
the variance-exploding form x = x0 + sigma * eps used by the k-diffusion samplers.

diffusers builds betas with float32 torch ops and everything derived from sigmas with float64
numpy; both are reproduced here with their rounding, so that the schedules agree with diffusers to
the last bit (alphas_cumprod) or to the last bit of torch's float32 sqrt (sigmas).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "betas_from_config",
    "alphas_cumprod_from_betas",
    "rescale_zero_terminal_snr",
    "sigmas_from_alphas_cumprod",
    "timestep_grid",
    "karras_sigmas",
    "exponential_sigmas",
    "sigma_to_t",
]

_F32 = np.float32


def _torch_linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """``torch.linspace(start, end, n, dtype=torch.float32)`` on the CPU, bit for bit.

    torch steps from both ends towards the middle, with one fused multiply-add per element.
    """
    start32, end32 = _F32(start), _F32(end)
    if n == 1:
        return np.array([start32], dtype=_F32)
    step = np.float64((end32 - start32) / _F32(n - 1))  # the step is rounded to float32 first
    i = np.arange(n, dtype=np.float64)
    half = n // 2
    out = np.empty(n, dtype=np.float64)
    # float32 products are exact in float64, so one float64 add rounds like a float32 FMA.
    out[:half] = np.float64(start32) + step * i[:half]
    out[half:] = np.float64(end32) - step * (n - 1 - i[half:])
    return out.astype(_F32)


def _alpha_bar_betas(n: int, alpha_bar, max_beta: float = 0.999) -> np.ndarray:
    """Betas that reproduce a continuous alpha_bar(t) on [0, 1] (Nichol & Dhariwal 2021, eq. 17)."""
    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return np.array(betas, dtype=np.float64).astype(_F32)


def _cosine_alpha_bar(t: float) -> float:
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def _exp_alpha_bar(t: float) -> float:
    return math.exp(t * -12.0)


def _laplace_alpha_bar(t: float) -> float:
    lmb = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * math.fabs(0.5 - t) + 1e-6)
    snr = math.exp(lmb)
    return math.sqrt(snr / (1 + snr))


def betas_from_config(config) -> np.ndarray:
    """float32 betas of a config's training schedule (``trained_betas`` win over ``beta_schedule``)."""
    n = config.num_train_timesteps
    if config.trained_betas is not None:
        return np.array(config.trained_betas, dtype=np.float64).astype(_F32)
    schedule = config.beta_schedule
    if schedule == "linear":
        return _torch_linspace_f32(config.beta_start, config.beta_end, n)
    if schedule == "scaled_linear":  # linear in sqrt(beta): the Stable Diffusion schedule
        root = _torch_linspace_f32(config.beta_start**0.5, config.beta_end**0.5, n)
        return root * root
    if schedule == "squaredcos_cap_v2":
        return _alpha_bar_betas(n, _cosine_alpha_bar)
    if schedule == "exp":
        return _alpha_bar_betas(n, _exp_alpha_bar)
    if schedule == "laplace":
        return _alpha_bar_betas(n, _laplace_alpha_bar)
    if schedule == "sigmoid":
        x = _torch_linspace_f32(-6.0, 6.0, n)
        sigmoid = (_F32(1) / (_F32(1) + np.exp(-x))).astype(_F32)
        return sigmoid * _F32(config.beta_end - config.beta_start) + _F32(config.beta_start)
    raise ValueError(f"unknown beta_schedule {schedule!r}")  # configs are validated before this


def alphas_cumprod_from_betas(betas: np.ndarray) -> np.ndarray:
    """alpha_bar_t; torch's CPU cumprod accumulates float32 input in float64, and so does this."""
    alphas = _F32(1) - betas
    return np.cumprod(alphas.astype(np.float64)).astype(_F32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Shift and scale sqrt(alpha_bar) so the last step is pure noise (Lin et al. 2023, Algorithm 1)."""
    root = np.sqrt(alphas_cumprod_from_betas(betas))
    root_0, root_T = root[0], root[-1]
    root = (root - root_T) * (root_0 / (root_0 - root_T))
    alpha_bar = root * root
    alphas = np.concatenate([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return _F32(1) - alphas


def sigmas_from_alphas_cumprod(alphas_cumprod: np.ndarray) -> np.ndarray:
    """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), float32, ascending in t."""
    return np.sqrt((_F32(1) - alphas_cumprod) / alphas_cumprod)


def timestep_grid(spacing: str, num_steps: int, num_train_timesteps: int, steps_offset: int = 0) -> np.ndarray:
    """Descending float64 inference timesteps, before the rounding each scheduler applies.

    "linspace" spreads the steps over [0, T-1], "leading" starts at 0 with a stride of T // n (so it
    never reaches T-1 without ``steps_offset``), "trailing" ends at T-1 (Lin et al. 2023, Table 2).
    """
    T, n = num_train_timesteps, num_steps
    if spacing == "linspace":
        return np.linspace(0, T - 1, n)[::-1].copy()
    if spacing == "leading":
        return (np.arange(n) * (T // n))[::-1].astype(np.float64) + steps_offset
    if spacing == "trailing":
        return np.arange(T, 0, -T / n).round() - 1
    raise ValueError(f"unknown timestep_spacing {spacing!r}")  # configs are validated before this


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022), eq. 5: n sigmas from sigma_max to sigma_min, evenly spaced in sigma^(1/rho)."""
    ramp = np.linspace(0, 1, n)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """n sigmas from sigma_max to sigma_min, evenly spaced in log sigma."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timesteps of ``sigmas``: linear interpolation in log sigma.

    ``log_sigmas`` is the float32 log of the ascending training sigmas; diffusers mixes its float32
    entries with float64 arithmetic, and the dtypes here follow it.
    """
    sigmas = np.asarray(sigmas, dtype=np.float64)
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * high_idx).reshape(sigmas.shape)
