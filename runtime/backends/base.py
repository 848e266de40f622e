"""The Session protocol every backend implements, and the input checks they share."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Protocol, Sequence

import numpy as np

from runtime.manifest import Component, TensorSpec


class BackendError(RuntimeError):
    """A backend cannot load or run a component; the message says which and why."""


@dataclasses.dataclass(frozen=True)
class SessionOptions:
    """Backend settings from the profile / command line. Unknown keys go to ``extra``."""

    device: str = "cpu"  # cpu | cuda | gpu | npu | auto | coreml | dml ...
    providers: tuple[str, ...] = ()  # ONNX Runtime execution providers, in priority order
    threads: int = 0  # 0: the backend's default
    precision_hint: str | None = None  # OpenVINO INFERENCE_PRECISION_HINT (f32 for parity, bf16, f16)
    performance_hint: str | None = None  # OpenVINO LATENCY / THROUGHPUT
    cache_dir: str | None = None  # compiled-model cache
    winograd: str | None = None  # OpenVINO CPU f32: "auto" applies the export's Winograd plan, "off" never
    compute_units: str | None = None  # Core ML
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "SessionOptions":
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in values.items() if k in names and v is not None}
        if "providers" in known:
            known["providers"] = tuple(known["providers"])
        extra = {k: v for k, v in values.items() if k not in names}
        return cls(**known, extra=extra)


class Session(Protocol):
    component: Component

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once; feeds and results are host numpy arrays keyed by the manifest's names."""


_NP_DTYPES = {
    "float32": np.float32,
    "float16": np.float16,
    "int64": np.int64,
    "int32": np.int32,
    "int8": np.int8,
    "uint8": np.uint8,
    "bool": np.bool_,
}


def check_feeds(component: Component, feeds: Mapping[str, np.ndarray], specs: Sequence[TensorSpec] | None = None) -> dict[str, np.ndarray]:
    """Names, ranks and fixed dimensions as the manifest says; dtypes converted to the declared ones.

    Symbolic dimensions with the same name must agree across inputs (the batch of ``sample`` and of
    ``encoder_hidden_states``, say), which catches a mismatched CFG batch before the backend does.
    """
    specs = list(specs if specs is not None else component.inputs)
    expected = {s.name for s in specs}
    missing = expected - set(feeds)
    unknown = set(feeds) - expected
    if missing or unknown:
        raise BackendError(
            f"{component.name}: inputs do not match the manifest"
            + (f"; missing {sorted(missing)}" if missing else "")
            + (f"; unexpected {sorted(unknown)}" if unknown else "")
        )
    bound: dict[str, tuple[int, str]] = {}
    out: dict[str, np.ndarray] = {}
    for spec in specs:
        value = np.asarray(feeds[spec.name])
        if value.ndim != len(spec.shape):
            raise BackendError(
                f"{component.name}: input {spec.name} has shape {value.shape}, expected rank {len(spec.shape)} ({spec.describe()})"
            )
        for axis, (dim, size) in enumerate(zip(spec.shape, value.shape)):
            if isinstance(dim, int) and dim != size:
                raise BackendError(
                    f"{component.name}: input {spec.name} has shape {tuple(value.shape)}, expected {spec.describe()}"
                )
            if isinstance(dim, str):
                seen = bound.setdefault(dim, (size, spec.name))
                if seen[0] != size:
                    raise BackendError(
                        f"{component.name}: dimension {dim!r} is {seen[0]} in {seen[1]} but {size} in {spec.name}"
                    )
        out[spec.name] = np.ascontiguousarray(value, dtype=_NP_DTYPES[spec.dtype])
    return out
