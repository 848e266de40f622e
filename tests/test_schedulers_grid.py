"""Every scheduler over the combinations of its config options, against diffusers, at 1, 2, 10, 25
and 50 steps (see test_schedulers.py for how runs are compared).

test_grid: for each class, the full product of prediction type (epsilon, v_prediction, sample) x
timestep spacing (linspace, leading, leading with steps_offset 1, trailing) x that class's own
options, on the Stable Diffusion betas. Left out are only combinations that cannot differ:
steps_offset with another spacing than "leading" (the only one that reads it), LCM's spacing (LCM
ignores it), DPM-Solver's solver_type at order 1 (unused there), and the spacing of DPM-Solver and
UniPC with Karras sigmas (their Karras timesteps do not depend on it).

test_betas: the other beta schedules (linear, squaredcos_cap_v2, trained_betas) change only the
alpha_bar table, which test_schedulers.py checks bit for bit; they are crossed with prediction
type, zero-terminal-SNR rescaling and the sigma spacings, at the spacing that reaches t = T-1.

test_extra_options: options that act on one part of the computation (exponential / lu sigmas,
final-step options, lambda clipping, disable_corrector, ...), crossed with prediction type and
spacing.

Combinations that diffusers itself rejects are skipped, after checking that ours raises too.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from runtime.schedulers import SCHEDULER_CLASSES
from tests.test_schedulers import check_matches

SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
BETAS = {
    "linear": {"beta_schedule": "linear"},
    "cosine": {"beta_schedule": "squaredcos_cap_v2"},
    "trained": {"trained_betas": [float(b) for b in np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2]},
}
SPACINGS = {
    "linspace": {"timestep_spacing": "linspace"},
    "leading": {"timestep_spacing": "leading"},
    "leading1": {"timestep_spacing": "leading", "steps_offset": 1},
    "trailing": {"timestep_spacing": "trailing"},
}
TRAILING = {"trailing": {"timestep_spacing": "trailing"}}
PREDICTIONS = {"eps": {"prediction_type": "epsilon"}, "v": {"prediction_type": "v_prediction"},
               "x0": {"prediction_type": "sample"}}  # fmt: skip


def flag(key, *values, labels=None):
    labels = labels or [f"{key}={v}" for v in values]
    return {label: {key: v} for label, v in zip(labels, values)}


NONE = {"": {}}
ZSNR = flag("rescale_betas_zero_snr", False, True, labels=["", "zsnr"])
CLIP = flag("clip_sample", False, True, labels=["", "clip"])
ALPHA_ONE = flag("set_alpha_to_one", True, False, labels=["", "alpha0"])
SIGMAS = {"": {}, "karras": {"use_karras_sigmas": True}, "exp": {"use_exponential_sigmas": True}}
KARRAS = {"karras": {"use_karras_sigmas": True}}
DPM_SOLVERS = {
    "o1": {"solver_order": 1},
    "o2mid": {"solver_order": 2, "solver_type": "midpoint"},
    "o2heun": {"solver_order": 2, "solver_type": "heun"},
    "o3mid": {"solver_order": 3, "solver_type": "midpoint"},
    "o3heun": {"solver_order": 3, "solver_type": "heun"},
}
DPM_ALGORITHMS = flag("algorithm_type", "dpmsolver++", "sde-dpmsolver++", labels=["", "sde"])
UNIPC_SOLVERS = {
    f"o{order}{variant}{'' if x0 else '-eps'}": {"solver_order": order, "solver_type": variant, "predict_x0": x0}
    for order in (1, 2, 3)
    for variant in ("bh1", "bh2")
    for x0 in (True, False)
}


def combos(class_name, *axes):
    """(id, config) for the product of ``axes`` (dicts label -> config fragment)."""
    for parts in itertools.product(*(axis.items() for axis in axes)):
        config = {"_class_name": class_name}
        for _, fragment in parts:
            config.update(fragment)
        yield "-".join(label for label, _ in parts if label), config


# class -> (the product that test_grid crosses with prediction type and spacing,
#           the options that test_betas crosses with the beta schedules)
CLASS_OPTIONS = {
    "DDIMScheduler": ([CLIP, ALPHA_ONE, ZSNR], [ZSNR]),
    "DDPMScheduler": (
        [flag("variance_type", "fixed_small", "fixed_small_log", "fixed_large", labels=["", "small_log", "large"]),
         CLIP, ZSNR],
        [ZSNR],
    ),  # fmt: skip
    "PNDMScheduler": ([flag("skip_prk_steps", True, False, labels=["plms", "prk"]), ALPHA_ONE], [NONE]),
    "LCMScheduler": ([CLIP, ALPHA_ONE, ZSNR], [ZSNR]),
    "LMSDiscreteScheduler": ([SIGMAS], [SIGMAS]),
    "EulerDiscreteScheduler": (
        [SIGMAS, ZSNR, flag("final_sigmas_type", "zero", "sigma_min", labels=["", "final_min"])],
        [SIGMAS, ZSNR],
    ),
    "EulerAncestralDiscreteScheduler": ([ZSNR], [ZSNR]),
    "HeunDiscreteScheduler": ([SIGMAS, CLIP], [SIGMAS]),
    "DPMSolverMultistepScheduler": ([DPM_SOLVERS, DPM_ALGORITHMS, ZSNR], [{"": {}, **KARRAS}, ZSNR]),
    "UniPCMultistepScheduler": ([UNIPC_SOLVERS, ZSNR], [{"": {}, **KARRAS}, ZSNR]),
}

GRID = []
BETA_GRID = []
for _name, (_options, _beta_options) in CLASS_OPTIONS.items():
    _spacings = NONE if _name == "LCMScheduler" else SPACINGS
    GRID += combos(_name, {"": SD}, PREDICTIONS, _spacings, *_options)
    if _name in ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler"):
        GRID += combos(_name, {"": SD}, PREDICTIONS, KARRAS, *_options)
    BETA_GRID += combos(_name, BETAS, PREDICTIONS, TRAILING, *_beta_options)

EXTRA = []
EXTRA += combos("DPMSolverMultistepScheduler", {"": SD}, PREDICTIONS, SPACINGS, {
    "exp": {"use_exponential_sigmas": True},
    "lu": {"use_lu_lambdas": True},
    "final_min": {"final_sigmas_type": "sigma_min"},
    "final_min-no_lof": {"final_sigmas_type": "sigma_min", "lower_order_final": False},
    "euler_final": {"final_sigmas_type": "sigma_min", "euler_at_final": True},
    "no_lof": {"lower_order_final": False, "solver_order": 3},
    "clip_lambda": {"lambda_min_clipped": -5.1, "beta_schedule": "squaredcos_cap_v2"},
    "karras-cosine-o3": {"use_karras_sigmas": True, "solver_order": 3, "beta_schedule": "squaredcos_cap_v2"},
})  # fmt: skip
EXTRA += combos("UniPCMultistepScheduler", {"": SD}, PREDICTIONS, SPACINGS, {
    "exp": {"use_exponential_sigmas": True},
    "final_min": {"final_sigmas_type": "sigma_min"},
    "karras-final_min": {"final_sigmas_type": "sigma_min", "use_karras_sigmas": True},
    "no_lof-o3": {"lower_order_final": False, "solver_order": 3},
    "no_corrector": {"disable_corrector": [0, 1, 5]},
})  # fmt: skip
EXTRA += combos("EulerDiscreteScheduler", {"": SD}, SPACINGS, {
    "continuous": {"timestep_type": "continuous", "prediction_type": "v_prediction"},
    "continuous-karras": {"timestep_type": "continuous", "prediction_type": "v_prediction", "use_karras_sigmas": True},
    "karras-limits": {"use_karras_sigmas": True, "sigma_min": 0.05, "sigma_max": 10.0},
    "exp-limits": {"use_exponential_sigmas": True, "sigma_min": 0.05, "sigma_max": 10.0},
})  # fmt: skip
EXTRA += combos("LCMScheduler", {"": SD}, PREDICTIONS, {
    "orig25": {"original_inference_steps": 25},
    "scaling1": {"timestep_scaling": 1.0},
})  # fmt: skip
EXTRA += combos("DDPMScheduler", {"sigmoid": {"beta_schedule": "sigmoid"}, "laplace": {"beta_schedule": "laplace"}},
                PREDICTIONS)  # fmt: skip
EXTRA += combos("HeunDiscreteScheduler", {"exp_betas": {"beta_schedule": "exp"}}, PREDICTIONS, SIGMAS)


def _params(items):
    return [pytest.param(config, id=f"{config['_class_name'].replace('Scheduler', '')}-{ident}") for ident, config in items]


@pytest.mark.parametrize("config", _params(GRID))
def test_grid(config):
    check_matches(config)


@pytest.mark.parametrize("config", _params(BETA_GRID))
def test_betas(config):
    check_matches(config)


@pytest.mark.parametrize("config", _params(EXTRA))
def test_extra_options(config):
    check_matches(config)


def test_grid_covers_every_class():
    assert {config["_class_name"] for _, config in GRID} == set(SCHEDULER_CLASSES)
