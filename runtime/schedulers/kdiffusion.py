"""The k-diffusion samplers (Karras et al. 2022; Crowson's k-diffusion) as diffusers exposes them:
LMS, Euler, Euler ancestral and Heun. They integrate the probability-flow ODE in sigma,
dx/dsigma = (x - x0(x, sigma)) / sigma, over a decreasing array of sigmas that ends in 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import VESigmaScheduler
from .config import (
    BETA_SCHEDULES,
    BaseConfig,
    boolean,
    choice,
    number,
    only_one_sigma_schedule,
    optional_number,
    option,
    unsupported,
)
from .prediction import ve_x0
from .schedules import exponential_sigmas, karras_sigmas, sigma_to_t, timestep_grid
from .solvers import F32, ancestral_sigmas, lincomb, lms_coefficients, log, sqrt, to_d

__all__ = [
    "LMSConfig",
    "LMSDiscreteScheduler",
    "EulerConfig",
    "EulerDiscreteScheduler",
    "EulerAncestralConfig",
    "EulerAncestralDiscreteScheduler",
    "HeunConfig",
    "HeunDiscreteScheduler",
]

_NO_SCIPY = "it needs scipy's beta distribution"


@dataclass(frozen=True)
class _SigmaSpacing(BaseConfig):
    """Switches that replace the interpolated sigmas by a Karras or exponential spacing."""

    timestep_spacing: str = option("linspace", choice("linspace", "leading", "trailing"))
    use_karras_sigmas: bool = option(False, boolean)
    use_exponential_sigmas: bool = option(False, boolean)
    use_beta_sigmas: bool = option(False, unsupported(False, _NO_SCIPY))
    # diffusers reads these two from the config when present, for the spacings above.
    sigma_min: float | None = option(None, optional_number)
    sigma_max: float | None = option(None, optional_number)

    def __post_init__(self) -> None:
        super().__post_init__()
        only_one_sigma_schedule(self)


def _float_timesteps(config, num_inference_steps: int) -> np.ndarray:
    grid = timestep_grid(config.timestep_spacing, num_inference_steps, config.num_train_timesteps, config.steps_offset)
    return grid.astype(F32)


class _KDiffusionScheduler(VESigmaScheduler):
    """Sigma schedule construction shared by the four samplers."""

    #: whether this class's Karras spacing honours config.sigma_min / sigma_max (LMS's does not).
    _karras_reads_config_limits = True

    def _inference_sigmas(self, timesteps: np.ndarray, num_inference_steps: int):
        """(sigmas, timesteps) for a run: sigma_t interpolated at ``timesteps``, or a Karras or
        exponential spacing between the same end points with the timesteps that match it."""
        c = self.config
        training = self._training_sigmas()
        log_sigmas = np.log(training)
        sigmas = np.interp(timesteps, np.arange(len(training)), training)
        if c.use_karras_sigmas or c.use_exponential_sigmas:
            low, high = sigmas[-1].item(), sigmas[0].item()
            if c.use_exponential_sigmas or self._karras_reads_config_limits:
                low = c.sigma_min if c.sigma_min is not None else low
                high = c.sigma_max if c.sigma_max is not None else high
            spacing = karras_sigmas if c.use_karras_sigmas else exponential_sigmas
            sigmas = spacing(low, high, num_inference_steps)
            timesteps = sigma_to_t(sigmas, log_sigmas)
        return sigmas, timesteps

    def _start_run(self, num_inference_steps: int) -> None:
        self.num_inference_steps = num_inference_steps
        self._reset()


# --- LMS ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LMSConfig(_SigmaSpacing):
    pass


class LMSDiscreteScheduler(_KDiffusionScheduler):
    """Linear multistep in sigma, up to 4th order (k-diffusion's sample_lms)."""

    Config = LMSConfig
    diffusers_name = "LMSDiscreteScheduler"
    _karras_reads_config_limits = False
    _max_order = 4
    _steps_before_set_timesteps = True

    def __init__(self, config=None, **changes):
        super().__init__(config, **changes)
        self.set_timesteps(self.config.num_train_timesteps)  # diffusers starts this way

    def set_timesteps(self, num_inference_steps: int) -> None:
        timesteps = _float_timesteps(self.config, num_inference_steps)
        sigmas, timesteps = self._inference_sigmas(timesteps, num_inference_steps)
        self.sigmas = np.concatenate([sigmas, [0.0]]).astype(F32)
        self.timesteps = np.asarray(timesteps).astype(F32)
        self._derivatives: list[np.ndarray] = []
        self._weights: dict[tuple[int, int], list[np.float32]] = {}
        self._start_run(num_inference_steps)

    def step(self, model_output: np.ndarray, timestep, sample: np.ndarray, *, rng=None) -> np.ndarray:
        model_output, sample = self._begin_step(model_output, sample)
        self._init_step_index(timestep)
        i = self._step_index
        sigma = self.sigmas[i]
        x0 = ve_x0(model_output, sample, sigma, self.config.prediction_type)
        self._derivatives = (self._derivatives + [to_d(sample, x0, sigma)])[-self._max_order :]
        # The order follows the step index, not the history: a run that starts mid-schedule
        # (img2img) uses higher-order weights with fewer derivatives, as diffusers does.
        order = min(i + 1, self._max_order)
        if (i, order) not in self._weights:
            self._weights[(i, order)] = lms_coefficients(self.sigmas, i, order)
        weights = self._weights[(i, order)]
        update = lincomb(*zip(weights, self._derivatives[::-1]))
        update += sample
        self._step_index += 1
        return update


# --- Euler --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EulerConfig(_SigmaSpacing):
    prediction_type: str = option("epsilon", choice("epsilon", "sample", "v_prediction", "original_sample"))
    interpolation_type: str = option(
        "linear", choice("linear", unsupported=("log_linear",))
    )
    timestep_type: str = option("discrete", choice("discrete", "continuous"))
    rescale_betas_zero_snr: bool = option(False, boolean)
    final_sigmas_type: str = option("zero", choice("zero", "sigma_min"))


class EulerDiscreteScheduler(_KDiffusionScheduler):
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 1 without churn)."""

    Config = EulerConfig
    diffusers_name = "EulerDiscreteScheduler"
    _zero_snr_floor = True
    _steps_before_set_timesteps = True

    def __init__(self, config=None, **changes):
        super().__init__(config, **changes)
        if self.config.timestep_type == "continuous" and self.config.prediction_type == "v_prediction":
            self.timesteps = self._continuous_timesteps()

    def _continuous_timesteps(self) -> np.ndarray:
        """Networks trained on continuous noise levels (EDM-style v models) take c_noise = log(sigma) / 4."""
        return np.array([F32(0.25) * log(s) for s in self.sigmas[:-1]], dtype=F32)

    def set_timesteps(self, num_inference_steps: int) -> None:
        c = self.config
        timesteps = _float_timesteps(c, num_inference_steps)
        sigmas, timesteps = self._inference_sigmas(timesteps, num_inference_steps)
        if c.final_sigmas_type == "sigma_min":  # stop at the smallest training sigma, not at 0
            alpha_bar_0 = self.alphas_cumprod[0]
            sigma_last = sqrt((1 - alpha_bar_0) / alpha_bar_0)
        else:
            sigma_last = 0.0
        self.sigmas = np.concatenate([sigmas, [sigma_last]]).astype(F32)
        if c.timestep_type == "continuous" and c.prediction_type == "v_prediction":
            self.timesteps = self._continuous_timesteps()
        else:
            self.timesteps = np.asarray(timesteps).astype(F32)
        self._start_run(num_inference_steps)

    def step(self, model_output: np.ndarray, timestep, sample: np.ndarray, *, rng=None) -> np.ndarray:
        model_output, sample = self._begin_step(model_output, sample)
        self._init_step_index(timestep)
        i = self._step_index
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        x0 = ve_x0(model_output, sample, sigma, self.config.prediction_type)
        d = to_d(sample, x0, sigma)
        d *= sigma_next - sigma
        d += sample
        self._step_index += 1
        return d


# --- Euler ancestral ----------------------------------------------------------------------------


@dataclass(frozen=True)
class EulerAncestralConfig(BaseConfig):
    prediction_type: str = option("epsilon", choice("epsilon", "v_prediction", unsupported=("sample",)))
    timestep_spacing: str = option("linspace", choice("linspace", "leading", "trailing"))
    rescale_betas_zero_snr: bool = option(False, boolean)


class EulerAncestralDiscreteScheduler(_KDiffusionScheduler):
    """Euler steps to sigma_down plus fresh noise of std sigma_up (k-diffusion's sample_euler_ancestral)."""

    Config = EulerAncestralConfig
    diffusers_name = "EulerAncestralDiscreteScheduler"
    stochastic = True
    _zero_snr_floor = True
    _steps_before_set_timesteps = True

    def set_timesteps(self, num_inference_steps: int) -> None:
        timesteps = _float_timesteps(self.config, num_inference_steps)
        training = self._training_sigmas()
        sigmas = np.interp(timesteps, np.arange(len(training)), training)
        self.sigmas = np.concatenate([sigmas, [0.0]]).astype(F32)
        self.timesteps = timesteps
        self._start_run(num_inference_steps)

    def step(self, model_output: np.ndarray, timestep, sample: np.ndarray, *, rng=None) -> np.ndarray:
        model_output, sample = self._begin_step(model_output, sample)
        self._init_step_index(timestep)
        i = self._step_index
        sigma = self.sigmas[i]
        x0 = ve_x0(model_output, sample, sigma, self.config.prediction_type)
        sigma_down, sigma_up = ancestral_sigmas(sigma, self.sigmas[i + 1])
        prev_sample = to_d(sample, x0, sigma)
        prev_sample *= sigma_down - sigma
        prev_sample += sample
        # Drawn even when sigma_up is 0 (last step), so the noise stream matches diffusers'.
        noise = self._noise(rng, model_output.shape, "EulerAncestral")
        prev_sample += noise * sigma_up
        self._step_index += 1
        return prev_sample


# --- Heun ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeunConfig(_SigmaSpacing):
    beta_start: float = option(0.00085, number)
    beta_end: float = option(0.012, number)
    beta_schedule: str = option("linear", choice(*BETA_SCHEDULES, "exp"))
    clip_sample: bool = option(False, boolean)
    clip_sample_range: float = option(1.0, number)


class HeunDiscreteScheduler(_KDiffusionScheduler):
    """Heun's 2nd-order method (Karras et al. 2022, Algorithm 1): an Euler step, then a correction
    with the derivative at its end point. Each step but the last needs two model evaluations, so
    ``timesteps`` (and ``sigmas``) list every inner point twice."""

    Config = HeunConfig
    diffusers_name = "HeunDiscreteScheduler"
    order = 2
    _steps_before_set_timesteps = True

    def __init__(self, config=None, **changes):
        super().__init__(config, **changes)
        self.set_timesteps(self.config.num_train_timesteps)  # diffusers starts this way

    def set_timesteps(self, num_inference_steps: int) -> None:
        timesteps = _float_timesteps(self.config, num_inference_steps)
        sigmas, timesteps = self._inference_sigmas(timesteps, num_inference_steps)
        sigmas = np.concatenate([sigmas, [0.0]]).astype(F32)
        self.sigmas = np.concatenate([sigmas[:1], sigmas[1:-1].repeat(2), sigmas[-1:]])
        timesteps = np.asarray(timesteps)
        self.timesteps = np.concatenate([timesteps[:1], timesteps[1:].repeat(2)]).astype(F32)
        self._first_stage: tuple[np.ndarray, np.ndarray, np.float32] | None = None  # (x, d, dt)
        self._start_run(num_inference_steps)

    @property
    def state_in_first_order(self) -> bool:
        return self._first_stage is None

    def step(self, model_output: np.ndarray, timestep, sample: np.ndarray, *, rng=None) -> np.ndarray:
        model_output, sample = self._begin_step(model_output, sample)
        self._init_step_index(timestep)
        c = self.config
        i = self._step_index
        first = self._first_stage is None
        # The second evaluation sits at sigma_next = sigmas[i] of the pair (sigmas[i-1], sigmas[i]).
        sigma, sigma_next = (self.sigmas[i], self.sigmas[i + 1]) if first else (self.sigmas[i - 1], self.sigmas[i])
        x0 = ve_x0(model_output, sample, sigma if first else sigma_next, c.prediction_type)
        if c.clip_sample:
            x0 = np.clip(x0, -c.clip_sample_range, c.clip_sample_range)
        if first:
            d = to_d(sample, x0, sigma)
            dt = sigma_next - sigma
            self._first_stage = (sample, d, dt)
            prev_sample = d * dt
        else:
            x_start, d_start, dt = self._first_stage
            prev_sample = to_d(sample, x0, sigma_next)
            prev_sample += d_start  # the mean of the two slopes
            prev_sample /= 2
            prev_sample *= dt
            sample = x_start
            self._first_stage = None
        prev_sample += sample
        self._step_index += 1
        return prev_sample
