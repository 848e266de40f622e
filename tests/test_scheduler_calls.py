"""Scheduler calls as diffusers makes them: one table of short names for the runtime and the torch
reference, keyword-only arguments after ``sample``, and stepping before ``set_timesteps`` where
diffusers allows it. Comparisons as in test_schedulers.py (relative error 1e-5, same model outputs)."""

from __future__ import annotations

import inspect
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from runtime.rng import make_rng  # noqa: E402
from runtime.schedulers import SCHEDULER_CLASSES, SCHEDULER_NAMES, scheduler_from_config  # noqa: E402
from sdexport.measure.reference_schedulers import use_scheduler  # noqa: E402
from tests.test_schedulers import SD15, SMALL, TOL, model_output, rel_err  # noqa: E402

DPM = {"_class_name": "DPMSolverMultistepScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
       "beta_end": 0.012, "num_train_timesteps": 1000, "steps_offset": 1}  # fmt: skip


def reference(config: dict, name: str):
    """diffusers' scheduler for ``name``, set the way bench, quality and calibration set it."""
    pipe = types.SimpleNamespace(scheduler=getattr(diffusers, config["_class_name"]).from_config(config))
    use_scheduler(pipe, name)
    return pipe.scheduler


def trajectory_error(ours, theirs, n: int) -> float:
    ours.set_timesteps(n)
    theirs.set_timesteps(n)
    np.testing.assert_array_equal(ours.timesteps, theirs.timesteps.numpy())
    worst = rel_err(ours.sigmas, theirs.sigmas)
    x_o = np.random.default_rng(0).standard_normal(SMALL, dtype=np.float32)
    x_t = torch.from_numpy(x_o.copy())
    for i, (t_o, t_t) in enumerate(zip(ours.timesteps, theirs.timesteps)):
        x_t = theirs.step(torch.from_numpy(model_output(i, theirs.scale_model_input(x_t, t_t).numpy())), t_t, x_t).prev_sample
        x_o = ours.step(model_output(i, ours.scale_model_input(x_o, t_o)), t_o, x_o)
        worst = max(worst, rel_err(x_o, x_t))
    return worst


# --- one table of short names -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["dpmpp-2m", "dpmpp-2m-karras"])
@pytest.mark.parametrize("key", ["use_exponential_sigmas", "use_lu_lambdas"])
def test_reference_samples_like_the_runtime_on_a_config_that_sets_sigma_options(name, key):
    """A scheduler_config.json with exponential sigmas or Lu lambdas: the torch reference for a short
    name runs the scheduler the runtime runs (the two tables used to differ here)."""
    config = {**DPM, key: True}
    ours, theirs = scheduler_from_config(config, name), reference(config, name)
    assert not getattr(ours.config, key) and not theirs.config[key]
    assert trajectory_error(ours, theirs, 10) <= TOL


def test_every_short_name_has_the_same_class_on_both_sides():
    for name in SCHEDULER_NAMES:
        theirs = reference(SD15, name)
        assert type(scheduler_from_config(SD15, name)).diffusers_name == type(theirs).__name__


# --- keyword-only arguments after sample ----------------------------------------------------------


def test_ddim_positional_eta_is_refused():
    """diffusers' fourth argument is eta; a positional 1.0 must not silently run eta 0."""
    sched = scheduler_from_config(SD15, "ddim")
    sched.set_timesteps(4)
    x = np.zeros(SMALL, np.float32)
    with pytest.raises(TypeError):
        sched.step(x, sched.timesteps[0], x, 1.0)
    sched.step(x, sched.timesteps[0], x, eta=0.0)


@pytest.mark.parametrize("class_name", sorted(SCHEDULER_CLASSES))
def test_every_step_takes_only_three_positional_arguments(class_name):
    sched = scheduler_from_config({**SD15, "_class_name": class_name})
    sched.set_timesteps(4)
    x = np.zeros(SMALL, np.float32)
    with pytest.raises(TypeError):
        sched.step(x, sched.timesteps[0], x, make_rng(0))


# --- stepping before set_timesteps ---------------------------------------------------------------


def _step_untimed(ours, theirs, steps: int, seed: int = 0) -> float:
    """``steps`` steps over the training timesteps, neither scheduler having seen set_timesteps."""
    x_o = np.random.default_rng(seed).standard_normal(SMALL, dtype=np.float32) * np.float32(ours.init_noise_sigma)
    x_t = torch.from_numpy(np.random.default_rng(seed).standard_normal(SMALL, dtype=np.float32))
    x_t = x_t * float(theirs.init_noise_sigma)
    their_ts = theirs.timesteps.numpy()
    if their_ts.dtype.kind == "i":
        np.testing.assert_array_equal(ours.timesteps, their_ts)
    worst = rel_err(ours.timesteps, their_ts)
    g, rng = torch.Generator().manual_seed(seed + 1), make_rng(seed + 1, "torch")
    kwargs = {"generator": g} if "generator" in inspect.signature(theirs.step).parameters else {}
    for i in range(steps):
        t_o, t_t = ours.timesteps[i], theirs.timesteps[i]
        in_t = theirs.scale_model_input(x_t, t_t)
        in_o = ours.scale_model_input(x_o, t_o)
        worst = max(worst, rel_err(in_o, in_t))
        x_t = theirs.step(torch.from_numpy(model_output(i, in_t.numpy())), t_t, x_t, **kwargs).prev_sample
        x_o = ours.step(model_output(i, in_o), t_o, x_o, rng=rng)
        worst = max(worst, rel_err(x_o, x_t))
    return worst


def test_ddpm_steps_over_the_training_timesteps_without_set_timesteps():
    """diffusers' own DDPM tests step a fresh scheduler over its 1000 training timesteps."""
    for config in (SD15, {"_class_name": "DDPMScheduler"}):
        config = {**config, "_class_name": "DDPMScheduler"}
        ours, theirs = scheduler_from_config(config), diffusers.DDPMScheduler.from_config(config)
        assert _step_untimed(ours, theirs, len(theirs.timesteps)) <= TOL
    # The last training timestep, t = 0, adds no noise and lands on the x0 estimate.
    ours, theirs = scheduler_from_config(SD15, "ddpm"), diffusers.DDPMScheduler.from_config(SD15)
    x = np.random.default_rng(3).standard_normal(SMALL, dtype=np.float32)
    out = model_output(0, x)
    expected = theirs.step(torch.from_numpy(out), 0, torch.from_numpy(x)).prev_sample
    assert rel_err(ours.step(out, 0, x), expected) <= TOL


def _diffusers_steps_fresh(class_name: str, config: dict) -> bool:
    theirs = getattr(diffusers, class_name).from_config(config)
    x = torch.zeros(SMALL)
    if theirs.timesteps is None:  # PNDM has no timesteps before set_timesteps
        return False
    t = theirs.timesteps[0]
    try:
        theirs.step(theirs.scale_model_input(x, t), t, x, generator=torch.Generator().manual_seed(0))
    except TypeError as exc:
        if "generator" not in str(exc):
            return False
        theirs = getattr(diffusers, class_name).from_config(config)
        try:
            theirs.step(theirs.scale_model_input(x, t), t, x)
        except Exception:
            return False
    except Exception:
        return False
    return True


@pytest.mark.parametrize("variant", [{}, {"use_karras_sigmas": True}, {"timestep_spacing": "trailing"},
                                     {"prediction_type": "v_prediction"}])  # fmt: skip
@pytest.mark.parametrize("class_name", sorted(SCHEDULER_CLASSES))
def test_step_before_set_timesteps_as_diffusers(class_name, variant):
    """Where diffusers steps a fresh scheduler, ours does with the same numbers; where it refuses, so do we."""
    config = {**SD15, "_class_name": class_name, **variant}
    ours = scheduler_from_config(config)
    if not _diffusers_steps_fresh(class_name, config):
        x = np.zeros(SMALL, np.float32)
        with pytest.raises((RuntimeError, ValueError)):
            ours.step(x, ours.timesteps[0], x, rng=make_rng(0))
        return
    theirs = getattr(diffusers, class_name).from_config(config)
    assert _step_untimed(ours, theirs, 4) <= TOL


def test_diffusers_default_infinite_bound_is_read():
    """diffusers writes DPM-Solver's lambda_min_clipped as -Infinity; the demo's export has one."""
    import json

    from diffusers import DPMSolverMultistepScheduler

    from runtime.schedulers import SchedulerConfigError, scheduler_from_config

    config = json.loads(DPMSolverMultistepScheduler().to_json_string())
    assert config["lambda_min_clipped"] == -float("inf")
    ours = scheduler_from_config(config)
    ours.set_timesteps(5)
    ref = DPMSolverMultistepScheduler.from_config(config)
    ref.set_timesteps(5)
    assert list(ours.timesteps) == ref.timesteps.tolist()
    with pytest.raises(SchedulerConfigError, match="lambda_min_clipped"):
        scheduler_from_config({**config, "lambda_min_clipped": float("nan")})
