"""diffusers' ``scheduler_config.json`` read into frozen, validated data.

Every scheduler class declares a frozen dataclass whose fields are the keys that diffusers'
class of the same name accepts, with diffusers' defaults. Each field carries a small parser in its
metadata; :func:`parse_config` applies the parsers to the keys present in a JSON dict and ignores
every other key, as diffusers' ``from_config`` does (``_diffusers_version``, keys of other classes).

A key that diffusers knows but this runtime does not implement is still declared, with a parser
that accepts only the value that needs no implementation, so that a config relying on it fails
loudly instead of sampling differently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping

__all__ = [
    "SchedulerConfigError",
    "BaseConfig",
    "option",
    "parse_config",
    "boolean",
    "integer",
    "number",
    "optional_number",
    "choice",
    "numbers_or_none",
    "integers",
    "unsupported",
    "only_one_sigma_schedule",
    "BETA_SCHEDULES",
    "TIMESTEP_SPACINGS",
]

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")


class SchedulerConfigError(ValueError):
    """A scheduler config that cannot be used: unknown class or name, malformed or unsupported value."""

    def __init__(self, problem: str, *, key: str | None = None, path: str | None = None):
        self.problem = problem
        self.key = key
        self.path = None if path is None else str(path)
        where = f"{self.path}: " if self.path else ""
        what = f"scheduler config key {key!r}: " if key else "scheduler config: "
        super().__init__(where + what + problem)

    def at(self, path: str | None) -> "SchedulerConfigError":
        """The same error, naming ``path`` (unless it already names a file)."""
        if path is None or self.path is not None:
            return self
        return SchedulerConfigError(self.problem, key=self.key, path=path)


class _Invalid(Exception):
    """Raised by a field parser; parse_config turns it into a SchedulerConfigError naming the key."""


Parser = Callable[[Any], Any]


def option(default: Any, parse: Parser) -> Any:
    """A config field: its diffusers default and the parser for its JSON value."""
    return field(default=default, metadata={"parse": parse})


# --- parsers for JSON values --------------------------------------------------------------------


def boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise _Invalid(f"expected true or false, got {value!r}")


def integer(minimum: int | None = None) -> Parser:
    def parse(value: Any) -> int:
        # JSON writers sometimes emit 1000.0; a fractional or boolean value is a mistake.
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
            raise _Invalid(f"expected an integer, got {value!r}")
        value = int(value)
        if minimum is not None and value < minimum:
            raise _Invalid(f"expected an integer >= {minimum}, got {value}")
        return value

    return parse


def number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Invalid(f"expected a number, got {value!r}")
    if not math.isfinite(value):  # a NaN beta gives a NaN schedule and a garbage image with exit 0
        raise _Invalid(f"expected a finite number, got {value!r}")
    return float(value)


def bound(value: Any) -> float:
    """A clipping bound: any number but NaN (diffusers writes lambda_min_clipped = -Infinity)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise _Invalid(f"expected a number or an infinity, got {value!r}")
    return float(value)


def optional_number(value: Any) -> float | None:
    return None if value is None else number(value)


def choice(*choices: str, aliases: Mapping[str, str] | None = None, unsupported: tuple[str, ...] = ()) -> Parser:
    """One of ``choices``; ``aliases`` are values diffusers maps to another one; ``unsupported`` are
    values diffusers implements and this runtime does not."""
    aliases = dict(aliases or {})

    def parse(value: Any) -> str:
        if isinstance(value, str) and value in choices:
            return value
        if isinstance(value, str) and value in aliases:
            return aliases[value]
        if isinstance(value, str) and value in unsupported:
            raise _Invalid(f"{value!r} is not supported by the numpy schedulers; use one of {', '.join(choices)}")
        raise _Invalid(f"unknown value {value!r}; expected one of {', '.join(choices)}")

    return parse


def numbers_or_none(value: Any) -> tuple[float, ...] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not value:
        raise _Invalid(f"expected a non-empty list of numbers or null, got {type(value).__name__}")
    out = []
    for i, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise _Invalid(f"item {i} is not a finite number: {v!r}")
        out.append(float(v))
    return tuple(out)


def integers(value: Any) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)):
        raise _Invalid(f"expected a list of integers, got {value!r}")
    parse_int = integer()
    return tuple(parse_int(v) for v in value)


def unsupported(default: Any, why: str) -> Parser:
    """A diffusers option this runtime does not implement: only its neutral value is accepted."""

    def parse(value: Any) -> Any:
        if value == default and type(value) is type(default):
            return value
        raise _Invalid(f"{value!r} is not supported by the numpy schedulers ({why})")

    return parse


# --- the shared part of every scheduler config --------------------------------------------------


@dataclass(frozen=True)
class BaseConfig:
    """The keys every diffusers scheduler understands: the training noise schedule and the timesteps."""

    num_train_timesteps: int = option(1000, integer(minimum=2))
    beta_start: float = option(0.0001, number)
    beta_end: float = option(0.02, number)
    beta_schedule: str = option("linear", choice(*BETA_SCHEDULES))
    trained_betas: tuple[float, ...] | None = option(None, numbers_or_none)
    prediction_type: str = option("epsilon", choice("epsilon", "sample", "v_prediction"))
    timestep_spacing: str = option("leading", choice(*TIMESTEP_SPACINGS))
    steps_offset: int = option(0, integer(minimum=0))

    def __post_init__(self) -> None:
        if self.trained_betas is not None and len(self.trained_betas) != self.num_train_timesteps:
            raise SchedulerConfigError(
                f"has {len(self.trained_betas)} values but num_train_timesteps is {self.num_train_timesteps}",
                key="trained_betas",
            )

    def to_dict(self) -> dict[str, Any]:
        """The effective values, as diffusers would write them to scheduler_config.json."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


def only_one_sigma_schedule(config: Any) -> None:
    """diffusers rejects more than one of the sigma-spacing switches."""
    chosen = [k for k in ("use_karras_sigmas", "use_exponential_sigmas") if getattr(config, k, False)]
    if len(chosen) > 1:
        raise SchedulerConfigError(f"only one of {', '.join(chosen)} can be true", key=chosen[-1])


def parse_config(config_cls: type, raw: Mapping[str, Any], path: str | None = None, **overrides: Any):
    """Build ``config_cls`` from the keys of ``raw`` that it declares; ``overrides`` win over ``raw``."""
    if not isinstance(raw, Mapping):
        raise SchedulerConfigError(f"expected a JSON object, got {type(raw).__name__}", path=path)
    # A config taken from a live diffusers object lists the keys it never set; diffusers'
    # from_config lets the target class use its own defaults for those.
    defaulted = set(raw.get("_use_default_values", ()))
    merged = {**{k: v for k, v in raw.items() if k not in defaulted}, **overrides}
    values = {}
    for f in fields(config_cls):
        if f.name in merged:
            try:
                values[f.name] = f.metadata["parse"](merged[f.name])
            except _Invalid as exc:
                raise SchedulerConfigError(str(exc), key=f.name, path=path) from None
    try:
        return config_cls(**values)
    except SchedulerConfigError as exc:
        raise exc.at(path) from None
