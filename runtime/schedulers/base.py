"""What every scheduler shares: config, training noise schedule, step bookkeeping, add_noise.

The classes built on this follow diffusers' scheduler surface so that a denoising loop written for
diffusers runs unchanged::

    sched.set_timesteps(steps)
    x = rng.randn(shape) * sched.init_noise_sigma
    for t in sched.timesteps:
        eps = unet(sched.scale_model_input(x, t), t)
        x = sched.step(eps, t, x, rng=rng)

img2img pipelines slice ``timesteps[t_start * order:]`` and call ``set_begin_index(t_start * order)``
before ``add_noise``; the per-run state (step index, model-output history) lives in the instance and
``set_timesteps`` resets it.
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping

import numpy as np

from .config import BaseConfig, parse_config
from .schedules import (
    alphas_cumprod_from_betas,
    betas_from_config,
    rescale_zero_terminal_snr,
    sigmas_from_alphas_cumprod,
)
from .solvers import F32, sqrt, vp_alpha_sigma

__all__ = ["Scheduler", "SigmaScheduler", "VESigmaScheduler", "VPSigmaScheduler"]


def _per_sample(coefficients: np.ndarray, ndim: int) -> np.ndarray:
    """One coefficient per batch entry ([B] or a single value), shaped to broadcast over [B, ...]."""
    return coefficients.reshape((-1,) + (1,) * (ndim - 1))


class Scheduler:
    """Base class: a frozen config, the training schedule (betas, alphas_cumprod), and step state."""

    Config: ClassVar[type[BaseConfig]] = BaseConfig
    #: diffusers' class name, the ``_class_name`` of the configs this class reads.
    diffusers_name: ClassVar[str] = ""
    #: model evaluations per entry of ``timesteps`` (2 for Heun, whose entries come in pairs).
    order: ClassVar[int] = 1
    #: True for the schedulers whose ``step`` draws noise (then pass ``rng``).
    stochastic: ClassVar[bool] = False
    #: diffusers clamps alpha_bar_T to 2**-24 after a zero-terminal-SNR rescale in the schedulers
    #: that divide by sigma_T / alpha_T, to keep sigma_T finite.
    _zero_snr_floor: ClassVar[bool] = False
    #: diffusers' integer timesteps (DDIM, DPM-Solver, ...) or float32 ones (Euler, LMS, Heun).
    _timestep_dtype: ClassVar[type] = np.int64
    #: whether ``step`` works before ``set_timesteps``, walking the timesteps set up at construction
    #: (the training ones, or LMS's and Heun's ``set_timesteps(num_train_timesteps)``); only where
    #: diffusers allows it, so that code ported either way behaves the same.
    _steps_before_set_timesteps: ClassVar[bool] = False

    def __init__(self, config: BaseConfig | Mapping[str, Any] | None = None, **changes: Any):
        """``config``: a scheduler_config.json dict or this class's Config; ``changes`` override keys."""
        if isinstance(config, self.Config) and not changes:
            self.config = config
        else:
            raw = config.to_dict() if isinstance(config, BaseConfig) else (config or {})
            self.config = parse_config(self.Config, raw, **changes)
        betas = betas_from_config(self.config)
        rescale = getattr(self.config, "rescale_betas_zero_snr", False)
        if rescale:
            betas = rescale_zero_terminal_snr(betas)
        self.betas = betas
        self.alphas_cumprod = alphas_cumprod_from_betas(betas)
        if rescale and self._zero_snr_floor:
            self.alphas_cumprod[-1] = 2.0**-24
        self.num_inference_steps: int | None = None
        T = self.config.num_train_timesteps
        self.timesteps = np.arange(T - 1, -1, -1).astype(self._timestep_dtype)
        self._begin_index: int | None = None
        self._step_index: int | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any], path: str | None = None, **changes: Any):
        """Like diffusers' ``from_config``: keys this class does not know are ignored; ``path`` is
        named in errors."""
        return cls(parse_config(cls.Config, config, path, **changes))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"

    # --- the surface every scheduler implements -----------------------------------------------

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Choose the run's ``timesteps`` (and ``sigmas``) and reset the per-run state."""
        raise NotImplementedError

    def check_step_count(self, num_inference_steps: int) -> None:
        """ValueError (before any model runs) for a step count this schedule cannot give: after
        ``set_timesteps``, every timestep must index the training schedule."""
        limit = self._max_steps()
        if limit is not None and num_inference_steps > limit:
            raise ValueError(f"{num_inference_steps} steps: {type(self).__name__} gives at most {limit} steps with "
                             f"this model's {self.config.num_train_timesteps} training timesteps")
        train = self.config.num_train_timesteps
        timesteps = np.asarray(self.timesteps)
        if timesteps.size and (timesteps.max() >= train or timesteps.min() < 0):
            raise ValueError(f"{num_inference_steps} steps: the schedule would need timestep {int(timesteps.max())}, "
                             f"beyond this model's {train} training timesteps (0..{train - 1}); use fewer steps")

    def _max_steps(self) -> int | None:
        return None

    def step(self, model_output: np.ndarray, timestep, sample: np.ndarray, *, rng=None) -> np.ndarray:
        """The sample at the next timestep, given the network's output at ``timestep``. ``rng``
        (``runtime.rng.make_rng``) is required by the schedulers that draw noise (``stochastic``).

        Arguments after ``sample`` are keyword-only: diffusers' fourth positional argument is DDIM's
        ``eta``, and code ported from diffusers must fail here rather than pass it as something else."""
        raise NotImplementedError

    # --- step bookkeeping --------------------------------------------------------------------

    @property
    def step_index(self) -> int | None:
        """Index into ``timesteps`` of the next ``step`` call (None before the first one)."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start the run at ``timesteps[begin_index]`` (img2img); call after ``set_timesteps``.
        DDIM, DDPM and PNDM find their place from the timestep alone and ignore it, as in diffusers."""
        self._begin_index = int(begin_index)

    def _reset(self) -> None:
        self._begin_index = None
        self._step_index = None

    def _begin_step(self, model_output, sample) -> tuple[np.ndarray, np.ndarray]:
        """Checks that a run is set up; the two arrays as float32 (a float16 network output would
        otherwise drag parts of the update into float16)."""
        if self.num_inference_steps is None and not self._steps_before_set_timesteps:
            raise RuntimeError(f"{type(self).__name__}: call set_timesteps() before step()")
        return np.asarray(model_output, dtype=np.float32), np.asarray(sample, dtype=np.float32)

    def index_for_timestep(self, timestep, schedule_timesteps: np.ndarray | None = None) -> int:
        """Position of ``timestep`` in the schedule. A timestep listed twice (Heun's pairs) maps to its
        second entry, so that a run starting mid-schedule does not skip a sigma."""
        schedule = self.timesteps if schedule_timesteps is None else schedule_timesteps
        found = np.flatnonzero(schedule == timestep)
        if len(found) == 0:
            return self._index_for_missing_timestep(timestep)
        return int(found[1] if len(found) > 1 else found[0])

    def _index_for_missing_timestep(self, timestep) -> int:
        raise ValueError(f"{type(self).__name__}: timestep {timestep} is not one of this scheduler's timesteps")

    def _init_step_index(self, timestep) -> None:
        if self._step_index is None:
            self._step_index = self._begin_index if self._begin_index is not None else self.index_for_timestep(timestep)

    @staticmethod
    def _noise(rng, shape, name: str) -> np.ndarray:
        if rng is None:
            raise ValueError(f"{name}.step draws noise: pass rng=make_rng(seed) (runtime.rng)")
        return rng.randn(shape)

    # --- the defaults of the alpha_bar-indexed schedulers ------------------------------------

    @property
    def init_noise_sigma(self) -> float:
        """Standard deviation of the initial noise."""
        return 1.0

    def scale_model_input(self, sample: np.ndarray, timestep=None) -> np.ndarray:
        """The network input for ``sample`` at ``timestep`` (unchanged for these schedulers)."""
        return sample

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timesteps) -> np.ndarray:
        """Forward diffusion q(x_t | x0): sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise."""
        t = np.asarray(timesteps).reshape(-1).astype(np.int64)
        alpha_bar = self.alphas_cumprod[t]
        signal = _per_sample(np.sqrt(alpha_bar), original_samples.ndim)
        noise_level = _per_sample(np.sqrt(F32(1) - alpha_bar), original_samples.ndim)
        return signal * original_samples + noise_level * noise

    def __len__(self) -> int:
        return self.config.num_train_timesteps


class SigmaScheduler(Scheduler):
    """Schedulers that walk a decreasing array of sigmas (one per timestep, then the final one)."""

    def __init__(self, config=None, **changes):
        super().__init__(config, **changes)
        # Before set_timesteps: the whole training schedule, as diffusers starts.
        self.sigmas = np.concatenate([self._training_sigmas()[::-1], [F32(0)]]).astype(F32)

    def _training_sigmas(self) -> np.ndarray:
        return sigmas_from_alphas_cumprod(self.alphas_cumprod)

    def _sigma_indices(self, timesteps) -> list[int]:
        t = np.asarray(timesteps).reshape(-1)
        if self._begin_index is None:
            return [self.index_for_timestep(ti) for ti in t]
        # Inside a run (inpainting re-noises the known region every step) or just before it.
        index = self._step_index if self._step_index is not None else self._begin_index
        return [index] * len(t)


class VESigmaScheduler(SigmaScheduler):
    """k-diffusion samplers: x = x0 + sigma * eps, the network sees x / sqrt(sigma^2 + 1)."""

    _timestep_dtype = np.float32

    @property
    def init_noise_sigma(self) -> float:
        sigma_max = self.sigmas.max()
        if self.config.timestep_spacing in ("linspace", "trailing"):
            return float(sigma_max)
        # "leading" never reaches the last training timestep: the largest sigma used is smaller
        # than sigma_T, and diffusers compensates with the unit variance the network expects.
        return float(sqrt(sigma_max * sigma_max + 1))

    def scale_model_input(self, sample: np.ndarray, timestep) -> np.ndarray:
        self._init_step_index(timestep)
        sigma = self.sigmas[self._step_index]
        return sample / sqrt(sigma * sigma + 1)

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timesteps) -> np.ndarray:
        sigma = _per_sample(self.sigmas[self._sigma_indices(timesteps)], original_samples.ndim)
        return original_samples + noise * sigma


class VPSigmaScheduler(SigmaScheduler):
    """DPM-Solver and UniPC: sigmas as in k-diffusion, but samples in the unscaled VP form."""

    @property
    def init_noise_sigma(self) -> float:
        return 1.0

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timesteps) -> np.ndarray:
        sigma = _per_sample(self.sigmas[self._sigma_indices(timesteps)], original_samples.ndim)
        alpha_t, sigma_t = vp_alpha_sigma(sigma)
        return alpha_t * original_samples + sigma_t * noise

    def _index_for_missing_timestep(self, timestep) -> int:
        return len(self.timesteps) - 1  # diffusers' choice for these two
