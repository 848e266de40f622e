"""The runtime's scheduler names on the diffusers side: what the torch references (bench, calibration,
tests) set on a diffusers pipeline so that it samples as the runtime does."""

from __future__ import annotations

DIFFUSERS_SCHEDULERS = {  # our short names -> diffusers class + config overrides
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpmpp-2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False}),
    "dpmpp-2m-karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
}


def use_scheduler(pipe, name: str) -> None:
    """Replace ``pipe.scheduler`` by diffusers' scheduler for our ``name``, keeping the model's config."""
    import diffusers

    cls, overrides = DIFFUSERS_SCHEDULERS[name]
    pipe.scheduler = getattr(diffusers, cls).from_config(pipe.scheduler.config, **overrides)
