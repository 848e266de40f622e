"""The runtime's scheduler names on the diffusers side: what the torch references (bench, quality,
calibration, tests) set on a diffusers pipeline so that it samples as the runtime does.

The table itself is ``runtime.schedulers.SHORT_NAMES``; this module only turns an entry into
diffusers' class, so the reference cannot drift from what the runtime runs."""

from __future__ import annotations

from typing import Any, Mapping

from runtime.schedulers import SCHEDULER_NAMES, SHORT_NAMES, short_name_entry

#: our short names -> (diffusers class name, config overrides); the runtime's table.
DIFFUSERS_SCHEDULERS = SHORT_NAMES

__all__ = ["DIFFUSERS_SCHEDULERS", "SCHEDULER_NAMES", "diffusers_scheduler", "use_scheduler"]


def diffusers_scheduler(config: Mapping[str, Any], name: str):
    """diffusers' scheduler for our short ``name``, built from a model's scheduler config."""
    import diffusers

    class_name, overrides = short_name_entry(name)
    return getattr(diffusers, class_name).from_config(config, **overrides)


def use_scheduler(pipe, name: str) -> None:
    """Replace ``pipe.scheduler`` by diffusers' scheduler for our ``name``, keeping the model's config."""
    pipe.scheduler = diffusers_scheduler(pipe.scheduler.config, name)
