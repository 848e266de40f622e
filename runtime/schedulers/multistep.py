"""Multistep exponential integrators in log-SNR: DPM-Solver++ (Lu et al. 2022) and UniPC (Zhao et
al. 2023). Both keep the last few converted model outputs and step in lambda = log(alpha / sigma).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import VPSigmaScheduler
from .config import (
    BaseConfig,
    SchedulerConfigError,
    boolean,
    bound,
    choice,
    integer,
    integers,
    number,
    only_one_sigma_schedule,
    optional_number,
    option,
    unsupported,
)
from .prediction import clip_or_threshold, vp_eps, vp_x0
from .schedules import exponential_sigmas, karras_sigmas, sigma_to_t, timestep_grid
from .solvers import (
    F32,
    dpmpp_first_order,
    dpmpp_second_order,
    dpmpp_third_order,
    log_snr,
    sqrt,
    unipc_corrector,
    unipc_predictor,
    vp_alpha_sigma,
)

__all__ = [
    "DPMSolverMultistepConfig",
    "DPMSolverMultistepScheduler",
    "UniPCMultistepConfig",
    "UniPCMultistepScheduler",
]

_FLOW = "flow-matching models are not supported"


@dataclass(frozen=True)
class _MultistepConfig(BaseConfig):
    prediction_type: str = option(
        "epsilon", choice("epsilon", "sample", "v_prediction", unsupported=("flow_prediction",))
    )
    timestep_spacing: str = option("linspace", choice("linspace", "leading", "trailing"))
    solver_order: int = option(2, integer(minimum=1))
    thresholding: bool = option(False, boolean)
    dynamic_thresholding_ratio: float = option(0.995, number)
    sample_max_value: float = option(1.0, number)
    lower_order_final: bool = option(True, boolean)
    use_karras_sigmas: bool = option(False, boolean)
    use_exponential_sigmas: bool = option(False, boolean)
    use_beta_sigmas: bool = option(False, unsupported(False, "it needs scipy's beta distribution"))
    use_flow_sigmas: bool = option(False, unsupported(False, _FLOW))
    flow_shift: float = option(1.0, number)  # only read with use_flow_sigmas
    use_dynamic_shifting: bool = option(False, unsupported(False, _FLOW))
    time_shift_type: str = option("exponential", choice("exponential", "linear"))  # idem
    final_sigmas_type: str = option("zero", choice("zero", "sigma_min"))
    rescale_betas_zero_snr: bool = option(False, boolean)
    # diffusers reads these two from the config when present, for the Karras/exponential spacings.
    sigma_min: float | None = option(None, optional_number)
    sigma_max: float | None = option(None, optional_number)

    def __post_init__(self) -> None:
        super().__post_init__()
        only_one_sigma_schedule(self)


class _MultistepScheduler(VPSigmaScheduler):
    _zero_snr_floor = True

    def _max_steps(self) -> int | None:
        # From one step per training timestep on, two sigmas coincide (a zero log-SNR step: NaN, as in
        # diffusers), and beyond twice that the solver indexes past its table (diffusers' IndexError).
        return self.config.num_train_timesteps - 1

    def _scaled_sigmas(self, sigmas_descending: np.ndarray, n: int):
        """Karras or exponential sigmas between the training end points (or config limits)."""
        c = self.config
        low = c.sigma_min if c.sigma_min is not None else sigmas_descending[-1].item()
        high = c.sigma_max if c.sigma_max is not None else sigmas_descending[0].item()
        return (karras_sigmas if c.use_karras_sigmas else exponential_sigmas)(low, high, n)

    def _sigma_min_of_training(self) -> np.float32:
        alpha_bar_0 = self.alphas_cumprod[0]
        return sqrt((1 - alpha_bar_0) / alpha_bar_0)

    def _alpha_sigma_lambda(self, index: int):
        """(alpha, sigma, lambda) of the VP process at ``sigmas[index]``."""
        return self._vp_table[index]

    def _start_run(self, timesteps: np.ndarray, sigmas: np.ndarray) -> None:
        self.sigmas = sigmas.astype(F32)
        # Every step needs these for two to four sigmas: computed once per run.
        self._vp_table = []
        for sigma in self.sigmas:
            alpha_t, sigma_t = vp_alpha_sigma(sigma)
            self._vp_table.append((alpha_t, sigma_t, log_snr(alpha_t, sigma_t)))
        self.timesteps = timesteps.astype(np.int64)  # truncates fractional ones, like torch's .to(int64)
        self.num_inference_steps = len(self.timesteps)
        self._model_outputs: list[np.ndarray] = []  # converted outputs, newest last
        self._lower_order_nums = 0
        self._reset()

    def _remember(self, converted: np.ndarray) -> None:
        self._model_outputs = (self._model_outputs + [converted])[-self.config.solver_order :]


# --- DPM-Solver++ -------------------------------------------------------------------------------


@dataclass(frozen=True)
class DPMSolverMultistepConfig(_MultistepConfig):
    algorithm_type: str = option(
        "dpmsolver++",
        choice(
            "dpmsolver++",
            "sde-dpmsolver++",
            aliases={"deis": "dpmsolver++"},
            unsupported=("dpmsolver", "sde-dpmsolver"),
        ),
    )
    solver_type: str = option(
        "midpoint", choice("midpoint", "heun", aliases={"logrho": "midpoint", "bh1": "midpoint", "bh2": "midpoint"})
    )
    euler_at_final: bool = option(False, boolean)
    use_lu_lambdas: bool = option(False, boolean)
    lambda_min_clipped: float = option(-float("inf"), bound)
    variance_type: str | None = option(None, unsupported(None, "learned variances are not supported"))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.solver_order > 3:
            raise SchedulerConfigError(f"expected 1, 2 or 3, got {self.solver_order}", key="solver_order")


class DPMSolverMultistepScheduler(_MultistepScheduler):
    """DPM-Solver++(1/2/3M) in the data-prediction form, and its SDE variant (``sde-dpmsolver++``,
    stochastic). With solver_order 2 this is "DPM++ 2M" (Karras: use_karras_sigmas)."""

    Config = DPMSolverMultistepConfig
    diffusers_name = "DPMSolverMultistepScheduler"

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        return self.config.algorithm_type == "sde-dpmsolver++"

    def set_timesteps(self, num_inference_steps: int) -> None:
        c = self.config
        n, T = num_inference_steps, c.num_train_timesteps
        # Clip the schedule where lambda falls below lambda_min_clipped (for cosine schedules).
        alpha = sqrt(self.alphas_cumprod)
        with np.errstate(divide="ignore"):
            lambdas = np.log(alpha) - np.log(sqrt(1 - self.alphas_cumprod))
        last = T - int(np.searchsorted(lambdas[::-1], c.lambda_min_clipped))
        if c.timestep_spacing == "trailing":
            timesteps = np.arange(last, 0, -T / n).round() - 1
        else:
            # n + 1 points, dropping the t = 0 end, at which no model evaluation happens.
            timesteps = timestep_grid(c.timestep_spacing, n + 1, last, c.steps_offset)[:-1].round()

        training = self._training_sigmas()
        log_sigmas = np.log(training)
        rounds = c.beta_schedule != "squaredcos_cap_v2"
        if c.use_karras_sigmas:
            sigmas = self._scaled_sigmas(training[::-1], n)
            timesteps = sigma_to_t(sigmas, log_sigmas)
            timesteps = timesteps.round() if rounds else timesteps
        elif c.use_lu_lambdas:
            # Uniform in log sigma (= -lambda) between the training end points (Lu et al. 2022):
            # diffusers writes it as the Karras ramp with rho = 1.
            sigmas = np.exp(karras_sigmas(log_sigmas[0].item(), log_sigmas[-1].item(), n, rho=1.0))
            timesteps = sigma_to_t(sigmas, log_sigmas)
            timesteps = timesteps.round() if rounds else timesteps
        elif c.use_exponential_sigmas:
            sigmas = self._scaled_sigmas(training[::-1], n)
            timesteps = sigma_to_t(sigmas, log_sigmas)
        else:
            sigmas = np.interp(timesteps, np.arange(len(training)), training)
        sigma_last = self._sigma_min_of_training() if c.final_sigmas_type == "sigma_min" else 0.0
        self._start_run(timesteps, np.concatenate([sigmas, [sigma_last]]))

    def step(self, model_output: np.ndarray, timestep, sample: np.ndarray, *, rng=None) -> np.ndarray:
        model_output, sample = self._begin_step(model_output, sample)
        self._init_step_index(timestep)
        c = self.config
        i, n = self._step_index, len(self.timesteps)
        short_run = c.lower_order_final and n < 15  # low-order final steps stabilise short runs
        final_first_order = i == n - 1 and (c.euler_at_final or short_run or c.final_sigmas_type == "zero")
        final_second_order = i == n - 2 and short_run

        alpha_s0, sigma_s0, lambda_s0 = self._alpha_sigma_lambda(i)
        x0 = clip_or_threshold(vp_x0(model_output, sample, alpha_s0, sigma_s0, c.prediction_type), c)
        self._remember(x0)
        noise = self._noise(rng, model_output.shape, "sde-dpmsolver++") if self.stochastic else None

        alpha_t, sigma_t, lambda_t = self._alpha_sigma_lambda(i + 1)
        h = lambda_t - lambda_s0
        m = self._model_outputs
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            if c.solver_order == 1 or self._lower_order_nums < 1 or final_first_order:
                prev_sample = dpmpp_first_order(sample, x0, alpha_t, sigma_t, sigma_s0, h, noise)
            elif c.solver_order == 2 or self._lower_order_nums < 2 or final_second_order:
                lambda_s1 = self._alpha_sigma_lambda(i - 1)[2]
                prev_sample = dpmpp_second_order(
                    sample, m[-1], m[-2], alpha_t, sigma_t, sigma_s0, h, lambda_s0 - lambda_s1, c.solver_type, noise
                )
            else:
                lambda_s1 = self._alpha_sigma_lambda(i - 1)[2]
                lambda_s2 = self._alpha_sigma_lambda(i - 2)[2]
                prev_sample = dpmpp_third_order(
                    sample, m[-1], m[-2], m[-3], alpha_t, sigma_t, sigma_s0, h,
                    lambda_s0 - lambda_s1, lambda_s1 - lambda_s2, noise,
                )  # fmt: skip
        self._lower_order_nums = min(self._lower_order_nums + 1, c.solver_order)
        self._step_index += 1
        return prev_sample


# --- UniPC --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UniPCMultistepConfig(_MultistepConfig):
    predict_x0: bool = option(True, boolean)
    solver_type: str = option(
        "bh2", choice("bh1", "bh2", aliases={"midpoint": "bh2", "heun": "bh2", "logrho": "bh2"})
    )
    disable_corrector: tuple[int, ...] = option((), integers)
    solver_p: None = option(None, unsupported(None, "a custom predictor scheduler cannot be read from JSON"))
    shift_terminal: float | None = option(None, unsupported(None, _FLOW))


class UniPCMultistepScheduler(_MultistepScheduler):
    """UniPC: a UniP predictor of order up to ``solver_order`` and, from the second step on, a UniC
    corrector that reuses the model evaluation at the predicted point (no extra network call)."""

    Config = UniPCMultistepConfig
    diffusers_name = "UniPCMultistepScheduler"

    def set_timesteps(self, num_inference_steps: int) -> None:
        c = self.config
        n, T = num_inference_steps, c.num_train_timesteps
        if c.timestep_spacing == "trailing":
            timesteps = np.arange(T, 0, -T / n).round() - 1
        else:
            timesteps = timestep_grid(c.timestep_spacing, n + 1, T, c.steps_offset)[:-1].round()
        training = self._training_sigmas()
        log_sigmas = np.log(training)
        if c.use_karras_sigmas or c.use_exponential_sigmas:
            sigmas = self._scaled_sigmas(training[::-1], n)
            timesteps = sigma_to_t(sigmas, log_sigmas)
            timesteps = timesteps.round() if c.use_karras_sigmas else timesteps
            sigma_last = sigmas[-1] if c.final_sigmas_type == "sigma_min" else 0.0
        else:
            sigmas = np.interp(timesteps, np.arange(len(training)), training)
            sigma_last = self._sigma_min_of_training() if c.final_sigmas_type == "sigma_min" else 0.0
        self._start_run(timesteps, np.concatenate([sigmas, [sigma_last]]))
        self._last_sample = None
        self._this_order = 1

    def _convert(self, model_output, sample, index):
        """The model output as UniPC's m: x0 (``predict_x0``, the default) or eps."""
        alpha, sigma, _ = self._alpha_sigma_lambda(index)
        c = self.config
        if c.predict_x0:
            return clip_or_threshold(vp_x0(model_output, sample, alpha, sigma, c.prediction_type), c)
        return vp_eps(model_output, sample, alpha, sigma, c.prediction_type)

    def _solve(self, update, x, index_s0: int, index_t: int, order: int, **extra):
        """Run ``update`` (predictor or corrector) from sigmas[index_s0] to sigmas[index_t], with the
        newest model output at s0 and the order - 1 before it at s0 - 1, s0 - 2, ..."""
        alpha_s0, sigma_s0, lambda_s0 = self._alpha_sigma_lambda(index_s0)
        alpha_t, sigma_t, lambda_t = self._alpha_sigma_lambda(index_t)
        h = lambda_t - lambda_s0
        history = [self._model_outputs[-(k + 1)] for k in range(1, order)]
        rks = [(self._alpha_sigma_lambda(index_s0 - k)[2] - lambda_s0) / h for k in range(1, order)]
        c = self.config
        return update(
            x, self._model_outputs[-1], history=history, rks=rks, h=h, alpha_t=alpha_t, sigma_t=sigma_t,
            alpha_s0=alpha_s0, sigma_s0=sigma_s0, order=order, predict_x0=c.predict_x0, variant=c.solver_type,
            **extra,
        )  # fmt: skip

    def step(self, model_output: np.ndarray, timestep, sample: np.ndarray, *, rng=None) -> np.ndarray:
        model_output, sample = self._begin_step(model_output, sample)
        self._init_step_index(timestep)
        c = self.config
        i = self._step_index
        use_corrector = i > 0 and (i - 1) not in c.disable_corrector and self._last_sample is not None
        converted = self._convert(model_output, sample, i)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            if use_corrector:  # UniC: the last step, redone with the model output at its end point
                sample = self._solve(unipc_corrector, self._last_sample, i - 1, i, self._this_order, m_t=converted)
            self._remember(converted)
            order = min(c.solver_order, len(self.timesteps) - i) if c.lower_order_final else c.solver_order
            self._this_order = min(order, self._lower_order_nums + 1)  # warm up one order per step
            self._last_sample = sample
            prev_sample = self._solve(unipc_predictor, sample, i, i + 1, self._this_order)
        self._lower_order_nums = min(self._lower_order_nums + 1, c.solver_order)
        self._step_index += 1
        return prev_sample
