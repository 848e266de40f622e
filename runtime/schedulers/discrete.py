"""Schedulers indexed by the training timestep t itself: DDIM, DDPM, PNDM and LCM.

Each looks up alpha_bar at integer timesteps and works on the unscaled variance-preserving sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import Scheduler
from .config import (
    BETA_SCHEDULES,
    BaseConfig,
    boolean,
    choice,
    integer,
    number,
    option,
)
from .prediction import clip_or_threshold, vp_eps, vp_x0
from .schedules import timestep_grid
from .solvers import (
    F32,
    adams_bashforth_eps,
    ddim_std,
    ddim_step,
    ddpm_posterior_mean,
    ddpm_posterior_variance,
    exp,
    lcm_boundary_scalings,
    lincomb,
    log,
    pndm_transfer,
    sqrt,
)

__all__ = [
    "DDIMConfig",
    "DDIMScheduler",
    "DDPMConfig",
    "DDPMScheduler",
    "PNDMConfig",
    "PNDMScheduler",
    "LCMConfig",
    "LCMScheduler",
]


@dataclass(frozen=True)
class _X0Options(BaseConfig):
    """Post-processing of the x0 prediction (pixel-space models; latent models leave it off)."""

    clip_sample: bool = option(True, boolean)
    clip_sample_range: float = option(1.0, number)
    thresholding: bool = option(False, boolean)
    dynamic_thresholding_ratio: float = option(0.995, number)
    sample_max_value: float = option(1.0, number)
    rescale_betas_zero_snr: bool = option(False, boolean)


def _integer_timesteps(config, num_inference_steps: int) -> np.ndarray:
    if num_inference_steps > config.num_train_timesteps:
        raise ValueError(
            f"num_inference_steps ({num_inference_steps}) cannot exceed num_train_timesteps "
            f"({config.num_train_timesteps})"
        )
    grid = timestep_grid(config.timestep_spacing, num_inference_steps, config.num_train_timesteps, config.steps_offset)
    return grid.round().astype(np.int64)


def _alpha_sigma(alpha_bar) -> tuple[np.float32, np.float32]:
    return sqrt(alpha_bar), sqrt(1 - alpha_bar)


# --- DDIM ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DDIMConfig(_X0Options):
    set_alpha_to_one: bool = option(True, boolean)


class DDIMScheduler(Scheduler):
    """DDIM (Song et al. 2021); ``eta`` > 0 in ``step`` adds DDPM-like noise."""

    Config = DDIMConfig
    diffusers_name = "DDIMScheduler"

    def __init__(self, config=None, **changes):
        super().__init__(config, **changes)
        # The step after the last one lands on alpha_bar = 1 (a clean image) or on alpha_bar_0.
        self.final_alpha_cumprod = F32(1) if self.config.set_alpha_to_one else self.alphas_cumprod[0]

    def set_timesteps(self, num_inference_steps: int) -> None:
        self.timesteps = _integer_timesteps(self.config, num_inference_steps)
        self.num_inference_steps = num_inference_steps
        self._reset()

    def step(
        self, model_output: np.ndarray, timestep, sample: np.ndarray, *, rng=None, eta: float = 0.0
    ) -> np.ndarray:
        model_output, sample = self._begin_step(model_output, sample)
        c = self.config
        t = int(timestep)
        # DDIM steps by a fixed stride, whatever the spacing: this is what diffusers does.
        prev_t = t - c.num_train_timesteps // self.num_inference_steps
        alpha_bar_t = self.alphas_cumprod[t]
        alpha_bar_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod

        alpha_t, sigma_t = _alpha_sigma(alpha_bar_t)
        x0 = vp_x0(model_output, sample, alpha_t, sigma_t, c.prediction_type)
        eps = vp_eps(model_output, sample, alpha_t, sigma_t, c.prediction_type)
        x0 = clip_or_threshold(x0, c)

        std = ddim_std(alpha_bar_t, alpha_bar_prev, eta)
        prev_sample = ddim_step(x0, eps, alpha_bar_prev, std)
        if eta > 0:
            prev_sample += std * self._noise(rng, model_output.shape, "DDIM with eta > 0")
        return prev_sample


# --- DDPM ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DDPMConfig(_X0Options):
    beta_schedule: str = option("linear", choice(*BETA_SCHEDULES, "sigmoid", "laplace"))
    variance_type: str = option(
        "fixed_small",
        choice(
            "fixed_small",
            "fixed_small_log",
            "fixed_large",
            unsupported=("fixed_large_log", "learned", "learned_range"),
        ),
    )


class DDPMScheduler(Scheduler):
    """DDPM ancestral sampling (Ho et al. 2020) on a subsequence of the training timesteps."""

    Config = DDPMConfig
    diffusers_name = "DDPMScheduler"
    stochastic = True
    _steps_before_set_timesteps = True  # over the training timesteps, each to the one before it

    def set_timesteps(self, num_inference_steps: int) -> None:
        self.timesteps = _integer_timesteps(self.config, num_inference_steps)
        self.num_inference_steps = num_inference_steps
        self._reset()

    def _previous_timestep(self, t: int) -> int:
        index = int(np.flatnonzero(self.timesteps == t)[0])
        return int(self.timesteps[index + 1]) if index + 1 < len(self.timesteps) else -1

    def step(self, model_output: np.ndarray, timestep, sample: np.ndarray, *, rng=None) -> np.ndarray:
        model_output, sample = self._begin_step(model_output, sample)
        c = self.config
        t = int(timestep)
        prev_t = self._previous_timestep(t)
        alpha_bar_t = self.alphas_cumprod[t]
        alpha_bar_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else F32(1)

        alpha_t, sigma_t = _alpha_sigma(alpha_bar_t)
        x0 = clip_or_threshold(vp_x0(model_output, sample, alpha_t, sigma_t, c.prediction_type), c)
        prev_sample = ddpm_posterior_mean(x0, sample, alpha_bar_t, alpha_bar_prev)
        if t > 0:
            noise = self._noise(rng, model_output.shape, "DDPM")
            small, large = ddpm_posterior_variance(alpha_bar_t, alpha_bar_prev)
            if c.variance_type == "fixed_small":
                std = sqrt(small)
            elif c.variance_type == "fixed_small_log":
                std = exp(F32(0.5) * log(small))
            else:  # fixed_large
                std = sqrt(large)
            prev_sample += std * noise
        return prev_sample


# --- PNDM ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PNDMConfig(BaseConfig):
    prediction_type: str = option("epsilon", choice("epsilon", "v_prediction", unsupported=("sample",)))
    skip_prk_steps: bool = option(False, boolean)
    set_alpha_to_one: bool = option(False, boolean)


class PNDMScheduler(Scheduler):
    """Pseudo numerical methods (Liu et al. 2022): Runge-Kutta warm-up steps (PRK, unless
    ``skip_prk_steps``), then the 4th-order linear multistep PLMS, on DDIM's transfer function.

    PRK takes four model evaluations per step, listed as separate timesteps; PLMS without PRK warms
    up with a two-evaluation first step (the timestep before the last is listed twice).
    """

    Config = PNDMConfig
    diffusers_name = "PNDMScheduler"
    _rk_order = 4

    def __init__(self, config=None, **changes):
        super().__init__(config, **changes)
        self.final_alpha_cumprod = F32(1) if self.config.set_alpha_to_one else self.alphas_cumprod[0]
        self.prk_timesteps = np.empty(0, np.int64)
        self._clear_history()

    def _clear_history(self) -> None:
        self._counter = 0
        self._ets: list[np.ndarray] = []  # past noise predictions, newest last
        self._rk_sum = None  # running weighted sum of the four RK evaluations
        self._rk_sample = None  # the sample an RK (or the PLMS warm-up) step starts from

    def set_timesteps(self, num_inference_steps: int) -> None:
        c = self.config
        n, T = num_inference_steps, c.num_train_timesteps
        ascending = timestep_grid(c.timestep_spacing, n, T, c.steps_offset)[::-1].round()
        if c.skip_prk_steps:
            prk = np.empty(0)
            plms = np.concatenate([ascending[:-1], ascending[-2:-1], ascending[-1:]])[::-1]
        else:
            if n < self._rk_order:
                raise ValueError(f"PNDM with skip_prk_steps=false needs at least {self._rk_order} steps, got {n}")
            # Each of the last 4 steps is split in two halves, each evaluated at its start and its midpoint.
            half_step = T // n // 2
            prk = np.array(ascending[-self._rk_order :]).repeat(2) + np.tile([0, half_step], self._rk_order)
            prk = prk[:-1].repeat(2)[1:-1][::-1]
            plms = ascending[:-3][::-1]
        self.prk_timesteps = prk.astype(np.int64)
        self.timesteps = np.concatenate([prk, plms]).astype(np.int64)
        self.num_inference_steps = n
        self._clear_history()
        self._reset()

    def step(self, model_output: np.ndarray, timestep, sample: np.ndarray, *, rng=None) -> np.ndarray:
        model_output, sample = self._begin_step(model_output, sample)
        if self._counter < len(self.prk_timesteps) and not self.config.skip_prk_steps:
            prev_sample = self._step_prk(model_output, int(timestep), sample)
        else:
            prev_sample = self._step_plms(model_output, int(timestep), sample)
        self._counter += 1
        return prev_sample

    def _step_prk(self, model_output, t, sample):
        stride = self.config.num_train_timesteps // self.num_inference_steps
        prev_t = t - (0 if self._counter % 2 else stride // 2)
        t = int(self.prk_timesteps[self._counter // 4 * 4])  # every RK stage starts from the step's start
        stage = self._counter % 4
        # Classic RK4 weights 1/6, 1/3, 1/3, 1/6 on the four noise evaluations.
        if stage == 0:
            self._rk_sum = (1 / 6) * model_output
            self._ets.append(model_output)
            self._rk_sample = sample
        elif stage in (1, 2):
            self._rk_sum += (1 / 3) * model_output
        else:
            self._rk_sum += (1 / 6) * model_output
            model_output, self._rk_sum = self._rk_sum, None
        return self._transfer(self._rk_sample, t, prev_t, model_output)

    def _step_plms(self, model_output, t, sample):
        if not self.config.skip_prk_steps and len(self._ets) < 3:
            raise RuntimeError("PNDM: the PLMS steps need the 12 PRK steps before them")
        stride = self.config.num_train_timesteps // self.num_inference_steps
        prev_t = t - stride
        if self._counter != 1:
            self._ets = self._ets[-3:] + [model_output]
        else:  # the second evaluation of the warm-up step, made at its end point
            prev_t, t = t, t + stride

        if len(self._ets) == 1 and self._counter == 0:
            self._rk_sample = sample
        elif len(self._ets) == 1 and self._counter == 1:
            model_output = (model_output + self._ets[-1]) / 2  # Heun-like warm-up
            sample, self._rk_sample = self._rk_sample, None
        else:
            model_output = adams_bashforth_eps(self._ets)
        return self._transfer(sample, t, prev_t, model_output)

    def _transfer(self, sample, t, prev_t, model_output):
        alpha_bar_t = self.alphas_cumprod[t]
        alpha_bar_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        alpha_t, sigma_t = _alpha_sigma(alpha_bar_t)
        eps = vp_eps(model_output, sample, alpha_t, sigma_t, self.config.prediction_type)
        return pndm_transfer(sample, eps, alpha_bar_t, alpha_bar_prev)


# --- LCM ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LCMConfig(_X0Options):
    beta_start: float = option(0.00085, number)
    beta_end: float = option(0.012, number)
    beta_schedule: str = option("scaled_linear", choice(*BETA_SCHEDULES))
    clip_sample: bool = option(False, boolean)
    set_alpha_to_one: bool = option(True, boolean)
    original_inference_steps: int = option(50, integer(minimum=1))
    timestep_scaling: float = option(10.0, number)


class LCMScheduler(Scheduler):
    """Multistep latent consistency sampling (Luo et al. 2023): each step maps x_t to the
    consistency function's x0 estimate (``denoised``), then re-noises it to the next timestep.

    ``timestep_spacing`` is read but, as in diffusers, unused: LCM timesteps come from the
    ``original_inference_steps``-point schedule the model was distilled on.
    """

    Config = LCMConfig
    diffusers_name = "LCMScheduler"
    stochastic = True

    def __init__(self, config=None, **changes):
        super().__init__(config, **changes)
        self.final_alpha_cumprod = F32(1) if self.config.set_alpha_to_one else self.alphas_cumprod[0]
        #: the x0 estimate of the last ``step`` (the LCM pipeline decodes this one).
        self.denoised: np.ndarray | None = None

    def set_timesteps(
        self, num_inference_steps: int, original_inference_steps: int | None = None, strength: float = 1.0
    ) -> None:
        """``strength`` < 1 (img2img) keeps the first ``strength`` fraction of the distillation schedule."""
        T = self.config.num_train_timesteps
        original = original_inference_steps or self.config.original_inference_steps
        if original > T:
            raise ValueError(f"original_inference_steps ({original}) cannot exceed num_train_timesteps ({T})")
        if num_inference_steps > T:
            raise ValueError(f"num_inference_steps ({num_inference_steps}) cannot exceed num_train_timesteps ({T})")
        k = T // original
        distilled = np.arange(1, int(original * strength) + 1, dtype=np.int64) * k - 1
        if len(distilled) // num_inference_steps < 1:
            raise ValueError(
                f"original_inference_steps x strength ({original} x {strength}) is smaller than "
                f"num_inference_steps ({num_inference_steps})"
            )
        if num_inference_steps > original:
            raise ValueError(
                f"num_inference_steps ({num_inference_steps}) cannot exceed original_inference_steps ({original})"
            )
        distilled = distilled[::-1]
        picks = np.floor(np.linspace(0, len(distilled), num=num_inference_steps, endpoint=False)).astype(np.int64)
        self.timesteps = distilled[picks].copy()
        self.num_inference_steps = num_inference_steps
        self.denoised = None
        self._reset()

    def step(self, model_output: np.ndarray, timestep, sample: np.ndarray, *, rng=None) -> np.ndarray:
        model_output, sample = self._begin_step(model_output, sample)
        self._init_step_index(timestep)
        c = self.config
        t = int(timestep)
        i = self._step_index
        prev_t = int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else t
        alpha_bar_t = self.alphas_cumprod[t]
        alpha_bar_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod

        c_skip, c_out = lcm_boundary_scalings(t, c.timestep_scaling)
        alpha_t, sigma_t = _alpha_sigma(alpha_bar_t)
        x0 = clip_or_threshold(vp_x0(model_output, sample, alpha_t, sigma_t, c.prediction_type), c)
        denoised = lincomb((c_out, x0), (c_skip, sample))
        if i != self.num_inference_steps - 1:
            noise = self._noise(rng, model_output.shape, "LCM")
            alpha_prev, sigma_prev = _alpha_sigma(alpha_bar_prev)
            prev_sample = lincomb((alpha_prev, denoised), (sigma_prev, noise))
        else:
            prev_sample = denoised
        self.denoised = denoised
        self._step_index += 1
        return prev_sample
