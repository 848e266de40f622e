"""numpy schedulers that read diffusers' ``scheduler_config.json`` and step like diffusers does.

Layout:

* ``schedules``: training noise schedules and timestep/sigma spacings;
* ``prediction``: eps / v / x0 network outputs converted to what the samplers need;
* ``solvers``: the update rules, one small function per method;
* ``discrete``, ``kdiffusion``, ``multistep``: the diffusers-compatible classes, a thin layer that
  reads the config and keeps the per-run state;
* this module: picking a class from ``_class_name`` or a short name.

Usage::

    from runtime.schedulers import scheduler_from_file
    sched = scheduler_from_file("OUT/scheduler/scheduler_config.json", "dpmpp-2m-karras")
    sched.set_timesteps(25)
    x = rng.randn(shape) * sched.init_noise_sigma
    for t in sched.timesteps:
        x = sched.step(unet(sched.scale_model_input(x, t), t), t, x, rng=rng)
"""

from __future__ import annotations

import json
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from .base import Scheduler
from .config import SchedulerConfigError
from .discrete import DDIMScheduler, DDPMScheduler, LCMScheduler, PNDMScheduler
from .kdiffusion import (
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
)
from .multistep import DPMSolverMultistepScheduler, UniPCMultistepScheduler

__all__ = [
    "SCHEDULER_NAMES",
    "SCHEDULER_CLASSES",
    "SHORT_NAMES",
    "short_name_entry",
    "SchedulerConfigError",
    "Scheduler",
    "scheduler_from_config",
    "scheduler_from_file",
    "DDIMScheduler",
    "DDPMScheduler",
    "PNDMScheduler",
    "LCMScheduler",
    "LMSDiscreteScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "UniPCMultistepScheduler",
]

#: diffusers class name -> class.
SCHEDULER_CLASSES: dict[str, type[Scheduler]] = {
    cls.diffusers_name: cls
    for cls in (
        DDIMScheduler,
        DDPMScheduler,
        PNDMScheduler,
        LCMScheduler,
        LMSDiscreteScheduler,
        EulerDiscreteScheduler,
        EulerAncestralDiscreteScheduler,
        HeunDiscreteScheduler,
        DPMSolverMultistepScheduler,
        UniPCMultistepScheduler,
    )
}

_DPMPP_2M = {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_exponential_sigmas": False, "use_lu_lambdas": False}

#: Short name -> (diffusers class name, the config keys the name itself fixes). The one table of
#: short names: the runtime builds its scheduler from it, and the torch references
#: (``sdexport.measure.reference_schedulers``) build diffusers' from it, so both sample alike.
SHORT_NAMES: Mapping[str, tuple[str, Mapping[str, Any]]] = MappingProxyType({
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpmpp-2m": ("DPMSolverMultistepScheduler", {**_DPMPP_2M, "use_karras_sigmas": False}),
    "dpmpp-2m-karras": ("DPMSolverMultistepScheduler", {**_DPMPP_2M, "use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
})  # fmt: skip

#: The short names accepted by :func:`scheduler_from_config` (and ``--scheduler``).
SCHEDULER_NAMES: tuple[str, ...] = tuple(SHORT_NAMES)


def short_name_entry(name: str) -> tuple[str, dict[str, Any]]:
    """(diffusers class name, config overrides) for a short name; case and ``_``/``-`` are free."""
    key = name.strip().lower().replace("_", "-") if isinstance(name, str) else name
    if key not in SHORT_NAMES:
        raise SchedulerConfigError(f"unknown scheduler name {name!r}; expected one of {', '.join(SCHEDULER_NAMES)}")
    class_name, fixed = SHORT_NAMES[key]
    return class_name, dict(fixed)


def scheduler_from_config(config: Mapping[str, Any], name: str | None = None, *, path: str | None = None) -> Scheduler:
    """A scheduler from the content of a diffusers ``scheduler_config.json``.

    Without ``name``, the class is the one ``config["_class_name"]`` names. With a short name (see
    ``SCHEDULER_NAMES``), that scheduler is built from the keys of ``config`` it shares, as diffusers'
    ``XScheduler.from_config(other.config)`` does: the model's betas, prediction type and timestep
    spacing carry over. ``path`` is only used to name the file in errors.
    """
    if not isinstance(config, Mapping):
        raise SchedulerConfigError(f"expected a JSON object, got {type(config).__name__}", path=path)
    if name is None:
        class_name = config.get("_class_name")
        if class_name is None:
            raise SchedulerConfigError("missing; pass a scheduler name instead", key="_class_name", path=path)
        if class_name not in SCHEDULER_CLASSES:
            known = ", ".join(sorted(SCHEDULER_CLASSES))
            raise SchedulerConfigError(
                f"unknown scheduler class {class_name!r}; supported: {known}", key="_class_name", path=path
            )
        return SCHEDULER_CLASSES[class_name].from_config(config, path)
    class_name, fixed = short_name_entry(name)
    return SCHEDULER_CLASSES[class_name].from_config(config, path, **fixed)


def scheduler_from_file(path: str | Path, name: str | None = None) -> Scheduler:
    """:func:`scheduler_from_config` on a ``scheduler_config.json`` file; errors name the file."""
    path = str(path)
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except OSError as exc:
        raise SchedulerConfigError(f"cannot read the file: {exc.strerror or exc}", path=path) from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SchedulerConfigError(f"not valid JSON: {exc}", path=path) from exc
    return scheduler_from_config(config, name, path=path)
