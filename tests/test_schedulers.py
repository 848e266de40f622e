"""runtime.schedulers against diffusers: API, short names, errors, add_noise, img2img, full-size latents.

The combinatorial grid of config options is in test_schedulers_grid.py; the comparison machinery
it shares lives here.

How results are compared: the same initial sample, the same model outputs (a fixed pseudo-random
table per step plus 0.1 x the scheduler's own model input, so that errors propagate and multistep
history matters) and, for the stochastic schedulers, the same noise (``torch.Generator`` for
diffusers, ``make_rng(seed, "torch")`` for ours). Every step's returned sample, every
``scale_model_input`` output, ``timesteps`` and ``init_noise_sigma`` must agree to a relative error
of 1e-5 (max |ours - theirs| / max |theirs|; non-finite entries must coincide).

One cause of disagreement cannot be removed: on x86 CPUs torch computes float32 ``sqrt`` (and
``x ** 0.5``) with MKL, which is faithfully but not correctly rounded (~20% of results are 1 ulp
off), and its float32 log/exp/expm1 differ from the correctly rounded value in a few percent of
cases. Most runs are insensitive to that, but some steps are ill-conditioned (zero-terminal-SNR
schedules, 3rd-order multistep coefficients at 50 steps, x0 clipping at sigma ~ 1e4), and there
diffusers' own output is rounding noise of those functions, different on an ARM build of torch.
For such a run the comparison is repeated against diffusers executed with correctly rounded
float32 sqrt/log/exp/expm1 (everything else unchanged), which must then agree to 1e-5; the size of
the deviation from stock diffusers is reported as a ``TorchRoundingDeviation`` warning.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import logging
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from runtime.rng import make_rng  # noqa: E402
from runtime.schedulers import (  # noqa: E402
    SCHEDULER_CLASSES,
    SCHEDULER_NAMES,
    SchedulerConfigError,
    scheduler_from_config,
    scheduler_from_file,
)
from sdexport.measure.reference_schedulers import diffusers_scheduler as reference_scheduler  # noqa: E402

diffusers.utils.logging.set_verbosity_error()
logging.getLogger("diffusers").setLevel(logging.ERROR)

TOL = 1e-5
STEP_COUNTS = (1, 2, 10, 25, 50)
SMALL = (1, 4, 8, 8)
LARGE = (2, 4, 64, 64)
ROOT = Path(__file__).resolve().parents[1]

SD15 = {  # stable-diffusion-v1-5/scheduler/scheduler_config.json
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
SD21_V = {  # stable-diffusion-2-1/scheduler/scheduler_config.json (a v-prediction model)
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.8.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

#: A default config per class: the SD 1.5 betas and spacing, as diffusers' from_config would carry them.
SD_CONFIGS = {name: {**SD15, "_class_name": name} for name in SCHEDULER_CLASSES}


class TorchRoundingDeviation(UserWarning):
    """Stock diffusers differs by more than 1e-5 only through torch's float32 elementary functions."""


class DiffusersRejects(Exception):
    """diffusers raised for this config/step count, and so did ours."""


# --- reference: diffusers, optionally with correctly rounded float32 elementary functions ----


@contextlib.contextmanager
def ieee_torch():
    """torch's float32 sqrt, ``** 0.5``, log, exp and expm1 computed in float64 and rounded once."""
    saved = []

    def patch(owner, name, replacement):
        saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, replacement)

    def correctly_rounded(original):
        def function(x, *args, **kwargs):
            if isinstance(x, torch.Tensor) and x.dtype == torch.float32 and not args and not kwargs:
                return original(x.double()).float()
            return original(x, *args, **kwargs)

        return function

    for owner in (torch, torch.Tensor):
        for name in ("sqrt", "log", "exp", "expm1"):
            patch(owner, name, correctly_rounded(getattr(owner, name)))
    power = torch.Tensor.__pow__

    def pow_(x, exponent):
        if x.dtype == torch.float32 and isinstance(exponent, (int, float)) and exponent == 0.5:
            return x.double().sqrt().float()
        return power(x, exponent)

    patch(torch.Tensor, "__pow__", pow_)
    try:
        yield
    finally:
        for owner, name, original in reversed(saved):
            setattr(owner, name, original)


def diffusers_scheduler(config: dict, name: str | None = None):
    """diffusers' scheduler for a config (and short name), as the torch references build it."""
    if name is None:
        return getattr(diffusers, SCHEDULER_CLASSES[config["_class_name"]].diffusers_name).from_config(config)
    return reference_scheduler(config, name)


# --- comparison ---------------------------------------------------------------------------


def rel_err(ours, theirs) -> float:
    """max |ours - theirs| / max |theirs|, over finite entries; inf when the non-finite ones differ."""
    theirs = theirs.numpy() if isinstance(theirs, torch.Tensor) else np.asarray(theirs)
    ours = np.asarray(ours)
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    diff = np.max(np.abs(ours.astype(np.float64) - theirs), initial=0.0)
    if np.isfinite(diff):
        return float(diff / max(np.max(np.abs(theirs), initial=0.0), 1e-30))
    finite_o, finite_t = np.isfinite(ours), np.isfinite(theirs)
    if not np.array_equal(finite_o, finite_t):
        return float("inf")
    bad_o, bad_t = ours[~finite_o], theirs[~finite_t]
    if not np.array_equal(np.isnan(bad_o), np.isnan(bad_t)) or not np.array_equal(
        bad_o[~np.isnan(bad_o)], bad_t[~np.isnan(bad_t)]
    ):
        return float("inf")
    return rel_err(np.where(finite_o, ours, 0), np.where(finite_t, theirs, 0))


_TABLES: dict[tuple, np.ndarray] = {}


def model_output(i: int, model_input: np.ndarray) -> np.ndarray:
    """A stand-in network: step-dependent pseudo-random output plus a little of its input."""
    shape = model_input.shape
    if shape not in _TABLES:
        _TABLES[shape] = np.random.default_rng(1234).standard_normal((100,) + shape, dtype=np.float32)
    return _TABLES[shape][i % 100] + np.float32(0.1) * model_input


_STEP_ARGUMENTS: dict[type, set] = {}


def _accepts(scheduler, argument: str) -> bool:
    cls = type(scheduler)
    if cls not in _STEP_ARGUMENTS:
        _STEP_ARGUMENTS[cls] = set(inspect.signature(cls.step).parameters)
    return argument in _STEP_ARGUMENTS[cls]


class Reference:
    """diffusers' scheduler for one config, built once (``from_config`` is slow) and copied per run."""

    def __init__(self, config: dict, name: str | None = None):
        self.config, self.name = config, name
        try:
            self._prototype, self.error = diffusers_scheduler(config, name), None
        except Exception as exc:
            self._prototype, self.error = None, exc

    def new(self):
        if self.error is not None:
            raise self.error
        return copy.deepcopy(self._prototype)


def run_pair(
    config: dict,
    n: int,
    *,
    name: str | None = None,
    reference: Reference | None = None,
    shape=SMALL,
    seed: int = 0,
    eta: float | None = None,
    strength: float | None = None,
    lcm_strength: float | None = None,
) -> float:
    """Run ours and diffusers side by side; the largest relative error seen (inf when integer
    timesteps differ).

    ``strength``: img2img as diffusers' pipelines do it (slice timesteps, set_begin_index,
    add_noise at the first kept timestep). ``lcm_strength``: the LCM img2img pipeline's way
    (``set_timesteps(..., strength=)``, add_noise at the first timestep).
    Raises DiffusersRejects when diffusers raises (constructing, setting timesteps or stepping)
    and ours raises too, at the same stage or earlier.
    """
    reference = reference or Reference(config, name)
    set_kwargs = {} if lcm_strength is None else {"strength": lcm_strength}
    try:
        theirs = reference.new()
        theirs.set_timesteps(n, **set_kwargs)
    except Exception as exc:
        with pytest.raises(ValueError):
            scheduler_from_config(config, name).set_timesteps(n, **set_kwargs)
        raise DiffusersRejects(f"diffusers raises {type(exc).__name__}: {exc}") from None
    try:
        ours = scheduler_from_config(config, name)
        ours.set_timesteps(n, **set_kwargs)
        rejected_by_us = None
    except SchedulerConfigError as exc:  # acceptable only if diffusers fails once it steps
        ours, rejected_by_us = None, exc

    worst = 0.0
    if ours is not None:
        their_ts = theirs.timesteps.numpy()
        assert ours.timesteps.dtype == their_ts.dtype, (ours.timesteps.dtype, their_ts.dtype)
        if their_ts.dtype.kind == "i":
            if not np.array_equal(ours.timesteps, their_ts):
                return float("inf")
        else:
            worst = max(worst, rel_err(ours.timesteps, their_ts))
        if hasattr(theirs, "sigmas"):
            worst = max(worst, rel_err(ours.sigmas, theirs.sigmas))
        assert type(ours.init_noise_sigma) is float
        their_sigma = float(theirs.init_noise_sigma)
        worst = max(worst, abs(ours.init_noise_sigma - their_sigma) / their_sigma)

    data = np.random.default_rng(seed)
    x = data.standard_normal(shape, dtype=np.float32)
    their_steps = theirs.timesteps
    our_steps = ours.timesteps if ours is not None else their_steps.numpy()
    if strength is not None or lcm_strength is not None:
        if strength is not None:
            init_timestep = min(int(n * strength), n)
            begin = max(n - init_timestep, 0) * theirs.order
            their_steps, our_steps = their_steps[begin:], our_steps[begin:]
            if hasattr(theirs, "set_begin_index"):
                theirs.set_begin_index(begin)
            if ours is not None:
                ours.set_begin_index(begin)
        noise = data.standard_normal(shape, dtype=np.float32)
        x_t = theirs.add_noise(torch.from_numpy(x), torch.from_numpy(noise), their_steps[:1])
        if ours is not None:
            x_o = ours.add_noise(x, noise, our_steps[:1])
            worst = max(worst, rel_err(x_o, x_t))
    else:
        x_t = torch.from_numpy(x * np.float32(float(theirs.init_noise_sigma)))
        if ours is not None:
            x_o = x * np.float32(ours.init_noise_sigma)

    their_kwargs, our_kwargs = {}, {}
    if _accepts(theirs, "generator"):
        their_kwargs["generator"] = torch.Generator().manual_seed(seed + 1)
    rng = make_rng(seed + 1, "torch")
    if eta is not None:
        their_kwargs["eta"] = our_kwargs["eta"] = eta

    for i, (t_t, t_o) in enumerate(zip(their_steps, our_steps)):
        in_t = theirs.scale_model_input(x_t, t_t)
        try:
            x_t = theirs.step(torch.from_numpy(model_output(i, in_t.numpy())), t_t, x_t, **their_kwargs).prev_sample
        except Exception as exc:
            if ours is not None:
                with pytest.raises(Exception):
                    ours.step(model_output(i, ours.scale_model_input(x_o, t_o)), t_o, x_o, rng=rng, **our_kwargs)
            raise DiffusersRejects(f"diffusers raises {type(exc).__name__} at step {i}: {exc}") from None
        if ours is None:
            continue
        in_o = ours.scale_model_input(x_o, t_o)
        worst = max(worst, rel_err(in_o, in_t))
        x_o = ours.step(model_output(i, in_o), t_o, x_o, rng=rng, **our_kwargs)
        assert x_o.dtype == np.float32 and x_o.shape == shape
        worst = max(worst, rel_err(x_o, x_t))
    if rejected_by_us is not None:
        raise AssertionError(f"diffusers runs this config, ours rejects it: {rejected_by_us}")
    return worst


def check_matches(config: dict, step_counts=STEP_COUNTS, **kwargs) -> None:
    """Every run in ``step_counts`` matches diffusers to TOL (see the module docstring for the
    fallback to correctly rounded torch functions); skips when diffusers rejects every run."""
    reference = Reference(config, kwargs.get("name"))
    rejected = []
    for n in step_counts:
        try:
            err = run_pair(config, n, reference=reference, **kwargs)
        except DiffusersRejects as exc:
            rejected.append(f"{n} steps: {exc}")
            continue
        if err <= TOL:
            continue
        try:
            with ieee_torch():
                ieee_err = run_pair(config, n, **kwargs)
        except DiffusersRejects as exc:
            rejected.append(f"{n} steps: {exc} (with correctly rounded torch functions)")
            continue
        assert ieee_err <= TOL, f"{n} steps: relative error {err:.2e}, and {ieee_err:.2e} with IEEE torch functions"
        warnings.warn(TorchRoundingDeviation(
            f"{config['_class_name']} {kwargs.get('name') or ''} {n} steps: stock diffusers {err:.1e}, "
            f"correctly rounded torch {ieee_err:.1e}; config {config}"
        ))  # fmt: skip
    if len(rejected) == len(step_counts):
        pytest.skip("; ".join(rejected))


# --- the default config of every class, full size -------------------------------------------


@pytest.mark.parametrize("class_name", sorted(SCHEDULER_CLASSES))
def test_sd_config_on_full_size_latents(class_name):
    check_matches(SD_CONFIGS[class_name], shape=LARGE)


def test_sd21_v_prediction_on_full_size_latents():
    for name in ("ddim", "euler", "dpmpp-2m-karras", "unipc"):
        check_matches(SD21_V, (1, 10, 25), name=name, shape=LARGE)


# --- img2img and add_noise ------------------------------------------------------------------


@pytest.mark.parametrize("class_name", sorted(SCHEDULER_CLASSES))
@pytest.mark.parametrize("strength", [0.3, 0.75, 1.0])
def test_img2img_path(class_name, strength):
    config = SD_CONFIGS[class_name]
    if class_name == "PNDMScheduler":
        config = {**config, "skip_prk_steps": False}  # exercise the PRK bookkeeping too
        check_matches(config, (4, 10, 25), strength=strength, seed=3)
    check_matches(SD_CONFIGS[class_name], (2, 10, 25, 50), strength=strength, seed=3)


@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_lcm_img2img_strength_schedule(strength):
    check_matches(SD_CONFIGS["LCMScheduler"], (2, 4, 8), lcm_strength=strength, seed=5)


@pytest.mark.parametrize("class_name", sorted(SCHEDULER_CLASSES))
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_add_noise_batch_of_timesteps(class_name, prediction_type):
    config = {**SD_CONFIGS[class_name], "prediction_type": prediction_type}
    theirs, ours = diffusers_scheduler(config), scheduler_from_config(config)
    theirs.set_timesteps(20)
    ours.set_timesteps(20)
    data = np.random.default_rng(7)
    x, noise = (data.standard_normal((2, 4, 8, 8), dtype=np.float32) for _ in range(2))
    for index in ([0, 5], [19, 3], [7, 7]):
        t_t, t_o = theirs.timesteps[index], ours.timesteps[index]
        expected = theirs.add_noise(torch.from_numpy(x), torch.from_numpy(noise), t_t)
        assert rel_err(ours.add_noise(x, noise, t_o), expected) <= TOL


def test_add_noise_inside_a_run_uses_the_current_step():
    """Inpainting re-noises the known region every step: after set_begin_index the sigma-based
    schedulers use the current step, not the timestep's position."""
    for class_name in ("EulerDiscreteScheduler", "DPMSolverMultistepScheduler", "HeunDiscreteScheduler"):
        config = SD_CONFIGS[class_name]
        theirs, ours = diffusers_scheduler(config), scheduler_from_config(config)
        theirs.set_timesteps(10)
        ours.set_timesteps(10)
        theirs.set_begin_index(2)
        ours.set_begin_index(2)
        x = np.ones((1, 4, 8, 8), np.float32)
        noise = np.full((1, 4, 8, 8), 0.5, np.float32)
        for i in range(2, 6):
            t_t, t_o = theirs.timesteps[i], ours.timesteps[i]
            expected = theirs.add_noise(torch.from_numpy(x), torch.from_numpy(noise), theirs.timesteps[:1])
            assert rel_err(ours.add_noise(x, noise, ours.timesteps[:1]), expected) <= TOL
            x_t = theirs.step(torch.from_numpy(noise), t_t, torch.from_numpy(x)).prev_sample
            x_o = ours.step(noise, t_o, x)
            assert rel_err(x_o, x_t) <= TOL


# --- short names -----------------------------------------------------------------------------

EXPECTED_CLASSES = {
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpmpp-2m": "DPMSolverMultistepScheduler",
    "dpmpp-2m-karras": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "lcm": "LCMScheduler",
    "ddpm": "DDPMScheduler",
}


def test_scheduler_names_are_the_documented_ones():
    assert set(SCHEDULER_NAMES) == set(EXPECTED_CLASSES)


@pytest.mark.parametrize("name", sorted(EXPECTED_CLASSES))
@pytest.mark.parametrize("source", ["sd15", "sd21v"])
def test_short_name_carries_the_model_config(name, source):
    config = SD15 if source == "sd15" else SD21_V
    ours = scheduler_from_config(config, name)
    theirs = diffusers_scheduler(config, name)
    assert type(ours).__name__ == EXPECTED_CLASSES[name] == type(theirs).__name__
    # Every key both know has diffusers' value (betas, prediction type, spacing, offset, ...).
    for key, value in ours.config.to_dict().items():
        if key in theirs.config:
            assert value == theirs.config[key] or (value is None and theirs.config[key] is None), key
    assert ours.config.prediction_type == config.get("prediction_type", "epsilon")
    assert ours.config.num_train_timesteps == 1000
    np.testing.assert_array_equal(ours.alphas_cumprod, theirs.alphas_cumprod.numpy())
    if name == "dpmpp-2m-karras":
        assert ours.config.use_karras_sigmas and ours.config.solver_order == 2
    if name == "dpmpp-2m":
        assert not ours.config.use_karras_sigmas and ours.config.algorithm_type == "dpmsolver++"
    check_matches(config, (1, 10, 25), name=name)


def test_short_name_overrides_a_dpm_config():
    config = {"_class_name": "DPMSolverMultistepScheduler", "solver_order": 3, "algorithm_type": "sde-dpmsolver++",
              "use_karras_sigmas": True, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}  # fmt: skip
    plain = scheduler_from_config(config, "dpmpp-2m")
    assert (plain.config.solver_order, plain.config.algorithm_type, plain.config.use_karras_sigmas) == (
        2, "dpmsolver++", False,
    )  # fmt: skip
    assert scheduler_from_config(config, "DPMPP_2M_Karras").config.use_karras_sigmas


def test_class_name_picks_the_class():
    for class_name, cls in SCHEDULER_CLASSES.items():
        assert type(scheduler_from_config({"_class_name": class_name})) is cls


# --- malformed configs -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, name, key, words",
    [
        ({"_class_name": "FancyScheduler"}, None, "_class_name", "unknown scheduler class 'FancyScheduler'"),
        ({"beta_schedule": "linear"}, None, "_class_name", "missing"),
        (SD15, "euler-b", None, "unknown scheduler name 'euler-b'"),
        ({**SD15, "beta_schedule": "cubic"}, None, "beta_schedule", "unknown value 'cubic'"),
        ({**SD15, "timestep_spacing": "uniform"}, "ddim", "timestep_spacing", "unknown value 'uniform'"),
        ({**SD15, "beta_start": "0.00085"}, None, "beta_start", "expected a number"),
        ({**SD15, "trained_betas": [0.1, "x"] + [0.1] * 998}, None, "trained_betas", "item 1 is not a finite number"),
        ({**SD15, "trained_betas": [0.1, 0.2]}, None, "trained_betas", "has 2 values"),
        ({**SD15, "num_train_timesteps": 999.5}, None, "num_train_timesteps", "expected an integer"),
        ({**SD15, "skip_prk_steps": "yes"}, None, "skip_prk_steps", "expected true or false"),
        ({**SD15, "prediction_type": "sample"}, "euler-a", "prediction_type", "not supported"),
        ({**SD15, "use_karras_sigmas": True, "use_exponential_sigmas": True}, "euler", "use_exponential_sigmas",
         "only one of"),
        ({**SD15, "use_beta_sigmas": True}, "lms", "use_beta_sigmas", "scipy"),
        ({**SD15, "algorithm_type": "dpmsolver"}, "unipc", None, None),  # not a UniPC key: ignored
        ({**SD15, "_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver"}, None,
         "algorithm_type", "not supported"),
        ({**SD15, "_class_name": "DPMSolverMultistepScheduler", "solver_order": 4}, None, "solver_order",
         "expected 1, 2 or 3"),
        ({**SD15, "_class_name": "DDPMScheduler", "variance_type": "learned_range"}, None, "variance_type",
         "not supported"),
        ([1, 2], None, None, "expected a JSON object"),
    ],
)  # fmt: skip
def test_malformed_config_raises_a_clear_error(config, name, key, words):
    if words is None:
        scheduler_from_config(config, name)
        return
    with pytest.raises(SchedulerConfigError) as info:
        scheduler_from_config(config, name)
    assert isinstance(info.value, ValueError)
    assert info.value.key == key
    assert words in str(info.value)
    if key:
        assert repr(key) in str(info.value)


def test_diffusers_rejects_what_we_reject():
    """The config errors above are ones diffusers raises for too (at construction or first step)."""
    for config in ({**SD15, "beta_schedule": "cubic"}, {**SD15, "timestep_spacing": "uniform"}):
        with pytest.raises(Exception):
            s = diffusers.DDIMScheduler.from_config(config)
            s.set_timesteps(10)


def test_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "scheduler_config.json"
    bad.write_text('{"_class_name": "DDIMScheduler", "beta_schedule": ')
    with pytest.raises(SchedulerConfigError, match="not valid JSON") as info:
        scheduler_from_file(bad)
    assert str(bad) in str(info.value)

    bad.write_text(json.dumps({**SD15, "beta_schedule": "cubic"}))
    with pytest.raises(SchedulerConfigError, match="beta_schedule") as info:
        scheduler_from_file(bad, "euler")
    assert str(bad) in str(info.value)

    missing = tmp_path / "nope.json"
    with pytest.raises(SchedulerConfigError, match="cannot read") as info:
        scheduler_from_file(missing)
    assert str(missing) in str(info.value)

    good = tmp_path / "good.json"
    good.write_text(json.dumps(SD15))
    assert type(scheduler_from_file(good)).__name__ == "PNDMScheduler"
    assert type(scheduler_from_file(good, "euler-a")).__name__ == "EulerAncestralDiscreteScheduler"


def test_unknown_keys_are_ignored():
    config = {**SD15, "_diffusers_version": "0.30.0", "some_future_option": [1, 2], "_class_name": "EulerDiscreteScheduler"}
    sched = scheduler_from_config(config)
    assert sched.config.steps_offset == 1 and sched.config.beta_schedule == "scaled_linear"


# --- misc behaviour ----------------------------------------------------------------------------


def test_import_loads_no_torch():
    code = "import runtime.schedulers, sys; assert 'torch' not in sys.modules and 'diffusers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_stochastic_schedulers_need_an_rng():
    for name in ("euler-a", "ddpm", "lcm"):
        sched = scheduler_from_config(SD15, name)
        sched.set_timesteps(4)
        x = np.zeros((1, 4, 8, 8), np.float32)
        with pytest.raises(ValueError, match="rng"):
            sched.step(x, sched.timesteps[0], x)


def test_set_timesteps_resets_the_run():
    """A second run on the same instance gives the first run's result (history and step index reset)."""
    for name in ("pndm", "lms", "heun", "dpmpp-2m", "unipc", "euler-a"):
        sched = scheduler_from_config(SD15, name)
        results = []
        for _ in range(2):
            sched.set_timesteps(6)
            x = np.ones((1, 4, 8, 8), np.float32) * np.float32(sched.init_noise_sigma)
            rng = make_rng(0)
            for i, t in enumerate(sched.timesteps):
                x = sched.step(model_output(i, sched.scale_model_input(x, t)), t, x, rng=rng)
            results.append(x)
        np.testing.assert_array_equal(results[0], results[1])


def test_lcm_exposes_denoised():
    config = SD_CONFIGS["LCMScheduler"]
    theirs, ours = diffusers_scheduler(config), scheduler_from_config(config)
    theirs.set_timesteps(4)
    ours.set_timesteps(4)
    x = np.random.default_rng(0).standard_normal(SMALL, dtype=np.float32)
    x_t, x_o = torch.from_numpy(x), x
    g, rng = torch.Generator().manual_seed(9), make_rng(9, "torch")
    for i, (t_t, t_o) in enumerate(zip(theirs.timesteps, ours.timesteps)):
        out = theirs.step(torch.from_numpy(model_output(i, x_t.numpy())), t_t, x_t, generator=g)
        x_o = ours.step(model_output(i, x_o), t_o, x_o, rng=rng)
        x_t = out.prev_sample
        assert rel_err(ours.denoised, out.denoised) <= TOL
    np.testing.assert_array_equal(x_o, ours.denoised)  # the last step returns the x0 estimate


def test_config_is_frozen_data():
    sched = scheduler_from_config(SD15)
    with pytest.raises(Exception):
        sched.config.prediction_type = "v_prediction"
    assert sched.config.to_dict()["steps_offset"] == 1


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_training_schedule_is_bit_exact(schedule):
    """betas and alphas_cumprod reproduce torch's float32 linspace/cumprod exactly."""
    for class_name in SCHEDULER_CLASSES:
        config = {"_class_name": class_name, "beta_schedule": schedule}
        theirs, ours = diffusers_scheduler(config), scheduler_from_config(config)
        np.testing.assert_array_equal(ours.betas, theirs.betas.numpy())
        np.testing.assert_array_equal(ours.alphas_cumprod, theirs.alphas_cumprod.numpy())


def test_extra_beta_schedules_are_bit_exact():
    for class_name, schedule in (("DDPMScheduler", "laplace"), ("HeunDiscreteScheduler", "exp")):
        config = {"_class_name": class_name, "beta_schedule": schedule}
        np.testing.assert_array_equal(
            scheduler_from_config(config).alphas_cumprod, diffusers_scheduler(config).alphas_cumprod.numpy()
        )
    config = {"_class_name": "DDPMScheduler", "beta_schedule": "sigmoid"}  # torch's sigmoid is not IEEE-exact
    assert rel_err(scheduler_from_config(config).betas, diffusers_scheduler(config).betas) <= TOL


def test_zero_snr_rescale_differs_only_by_torch_sqrt():
    """rescale_betas_zero_snr takes a float32 sqrt of alphas_cumprod: exact against the correctly
    rounded sqrt; against MKL's, alpha_bar differs by a few 1e-6 relative (which then matters near
    alpha_bar = 1 and 0, see the module docstring)."""
    for schedule in ("linear", "scaled_linear", "squaredcos_cap_v2"):
        config = {"_class_name": "DDIMScheduler", "beta_schedule": schedule, "rescale_betas_zero_snr": True}
        ours = scheduler_from_config(config).alphas_cumprod
        with ieee_torch():
            exact = diffusers_scheduler(config).alphas_cumprod.numpy()
        np.testing.assert_array_equal(ours, exact)
        stock = diffusers_scheduler(config).alphas_cumprod.numpy()
        assert np.max(np.abs(ours - stock) / np.maximum(stock, 1e-30)) < 1e-5


def test_ddim_eta_draws_noise_like_diffusers():
    for eta in (0.3, 1.0):
        check_matches({**SD_CONFIGS["DDIMScheduler"]}, (2, 10, 50), eta=eta)


def test_thresholding_and_clip_range():
    for class_name in ("DDIMScheduler", "DDPMScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler",
                       "LCMScheduler"):  # fmt: skip
        config = {"_class_name": class_name, "thresholding": True, "sample_max_value": 1.5, "prediction_type": "sample"}
        check_matches(config, (2, 10, 25))
    for class_name in ("DDIMScheduler", "DDPMScheduler", "HeunDiscreteScheduler", "LCMScheduler"):
        check_matches({"_class_name": class_name, "clip_sample": True, "clip_sample_range": 2.0}, (2, 10, 25))


def test_live_diffusers_config_uses_target_defaults():
    """A diffusers ``scheduler.config`` (not a JSON file) marks the keys it never set; like
    ``from_config``, the target class then keeps its own defaults for them."""
    live = diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear").config
    assert "timestep_spacing" in live and "timestep_spacing" in live["_use_default_values"]
    ours = scheduler_from_config(live, "ddim")
    theirs = diffusers.DDIMScheduler.from_config(live)
    assert ours.config.timestep_spacing == theirs.config.timestep_spacing == "leading"
    assert ours.config.beta_schedule == "scaled_linear"


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_float16_model_output_gives_float32_samples(name):
    """An fp16 network's output is used as its float32 value; samples stay float32."""
    results = []
    for dtype in (np.float16, np.float32):
        sched = scheduler_from_config(SD15, name)
        sched.set_timesteps(5)
        x = np.ones(SMALL, np.float32)
        rng = make_rng(0)
        for i, t in enumerate(sched.timesteps):
            out = model_output(i, sched.scale_model_input(x, t)).astype(np.float16)
            x = sched.step(out.astype(dtype), t, x, rng=rng)
            assert x.dtype == np.float32
        results.append(x)
    np.testing.assert_array_equal(results[0], results[1])
