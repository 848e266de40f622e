"""What every target shares: the export options and the result of converting one component."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Protocol

import torch

from runtime.manifest import TensorSpec
from sdexport.export.components import ComponentSpec, Shape


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    """Everything an export run was asked to do, as one frozen value (flags and profile resolved)."""

    target: str = "onnx"
    precision: str = "fp32"
    height: int | None = None  # both set: static spatial shapes
    width: int | None = None
    batch: int | None = None  # set: static batch (prompts per call)
    cfg: str = "batched"  # "batched" (U-Net sees 2B) or "sequential" (B, two calls)
    controlnets: tuple[str, ...] = ()
    loras: tuple[str, ...] = ()  # FILE[:SCALE], fused into the weights in this order
    source_config: str | None = None  # single-file sources: a diffusers folder describing the architecture
    prediction_type: str | None = None  # single-file sources: epsilon | v_prediction (not in the weights)
    few_step: str | None = None  # lcm | turbo: the sampler and defaults of few-step models
    validate: bool = True
    overwrite: bool = False
    default_size: int = 512  # pixels traced for dynamic exports, capped by the model's own size
    min_psnr_fp32: float | None = None  # parity gates (dB); None: each component spec's own
    min_psnr_reduced: float | None = None
    dry_run: bool = False  # resolve and validate everything, write a plan manifest, convert nothing
    profile: dict[str, Any] = dataclasses.field(default_factory=dict)
    backend_options: dict[str, Any] = dataclasses.field(default_factory=dict)  # for validation sessions

    @property
    def static(self) -> bool:
        return self.height is not None and self.width is not None

    def trace_shape(self, spec: ComponentSpec) -> Shape:
        cfg_batch = 1 if self.cfg == "sequential" else 2
        if self.static:
            return Shape(self.batch or 1, self.height, self.width, cfg_batch)
        return Shape(self.batch or 1, self._dynamic_size + spec.trace_pad, self._dynamic_size, cfg_batch)

    @property
    def _dynamic_size(self) -> int:
        return int(self.profile.get("_trace_size", self.default_size))


@dataclasses.dataclass
class Converted:
    files: list[Path]  # the first is the file a backend opens
    precision: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    details: dict[str, Any]


class Target(Protocol):
    name: str
    backend: str  # the runtime backend that runs this target's files
    precisions: tuple[str, ...]

    def convert(self, spec: ComponentSpec, module: torch.nn.Module, out_dir: Path, options: ExportOptions,
                precision: str) -> Converted: ...

    # Optional: a target whose backend cannot run on this machine (Core ML off macOS) defines
    # can_validate_here() -> False and offline_parity(spec, module, shape, options) -> dict; the
    # component's parity then records {"skipped": why, ...what could be checked in torch}.
