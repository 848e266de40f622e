"""What every target shares: the export options and the result of converting one component."""

from __future__ import annotations

import abc
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from runtime.manifest import TensorSpec
from sdexport.errors import OptionError
from sdexport.export.components import ComponentSpec, Shape
from sdexport.options import (
    CFG_MODES,
    BackendOptions,
    CoreMLOptions,
    OnnxOptions,
    OpenVinoOptions,
    QuantizeOptions,
    TensorRTOptions,
    ValidationOptions,
)

if TYPE_CHECKING:
    from sdexport.quantize.calibration import CalibrationSettings


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    """Everything an export run was asked to do, as one frozen value (flags and profile resolved).

    The profile's [shapes] and [cfg] resolve into height/width/batch and cfg; every other profile
    section is a typed field (sdexport.options declares them)."""

    target: str = "onnx"
    precision: str = "fp32"
    height: int | None = None  # both set: static spatial shapes
    width: int | None = None
    batch: int | None = None  # set: static batch (prompts per call)
    prompt_chunks: int = 1  # static exports: the U-Net's text length, in 75-token chunks (dynamic: any)
    cfg: str = "batched"  # "batched" (U-Net sees 2B) or "sequential" (B, two calls)
    controlnets: tuple[str, ...] = ()
    depth_estimator: str | None = None  # a DPT folder exported as the depth_estimator component
    loras: tuple[str, ...] = ()  # FILE[:SCALE], fused into the weights in this order
    source_config: str | None = None  # single-file sources: a diffusers folder describing the architecture
    prediction_type: str | None = None  # single-file sources: epsilon | v_prediction (not in the weights)
    few_step: str | None = None  # lcm | turbo: the sampler and defaults of few-step models
    vae: str | None = None  # another VAE: a diffusers folder or one .safetensors (sdexport.sources.vae)
    validate: bool = True
    overwrite: bool = False
    default_size: int = 512  # pixels traced for dynamic exports, capped by the model's own size
    trace_size: int | None = None  # dynamic exports: the size traced (the export run sets it from the model)
    model_size: int | None = None  # the model's own size (the export run sets it): TensorRT's dynamic profile's opt
    dry_run: bool = False  # resolve and validate everything, write a plan manifest, convert nothing
    profile_name: str = "custom"
    description: str = ""
    backend: BackendOptions = BackendOptions()
    coreml: CoreMLOptions = CoreMLOptions()
    tensorrt: TensorRTOptions = TensorRTOptions()
    onnx: OnnxOptions = OnnxOptions()
    openvino: OpenVinoOptions = OpenVinoOptions()
    quantize: QuantizeOptions = QuantizeOptions()
    validation: ValidationOptions = ValidationOptions()
    # In code only (benchmarks): the calibration runs in full, a quantize.calibration.CalibrationSettings;
    # the [quantize] calibration_prompts / calibration_steps of a profile or the flags apply on top.
    calibration: CalibrationSettings | None = None

    def __post_init__(self):
        if self.cfg not in CFG_MODES:
            raise OptionError(f"cfg mode {self.cfg!r}: use {' or '.join(CFG_MODES)}")

    @property
    def static(self) -> bool:
        return self.height is not None and self.width is not None

    @property
    def min_psnr_fp32(self) -> float | None:  # parity gates (dB); None: each component spec's own
        return self.validation.min_psnr_fp32

    @property
    def min_psnr_reduced(self) -> float | None:
        return self.validation.min_psnr_reduced

    @property
    def backend_options(self) -> dict[str, Any]:
        """Backend options of the parity check's sessions (what describes this machine's run)."""
        return self.backend.validation_options()

    def trace_shape(self, spec: ComponentSpec) -> Shape:
        cfg_batch = 1 if self.cfg == "sequential" else 2
        if self.static:
            return Shape(self.batch or 1, self.height, self.width, cfg_batch, self.prompt_chunks)
        return Shape(self.batch or 1, self.dynamic_size + spec.trace_pad, self.dynamic_size, cfg_batch)

    @property
    def dynamic_size(self) -> int:
        return int(self.trace_size or self.default_size)

    def profile_record(self) -> dict[str, Any]:
        """The resolved profile as the manifest records it (for people; the runtime reads typed fields)."""
        shapes = {"static": self.static, "height": self.height, "width": self.width, "batch": self.batch,
                  "prompt_chunks": self.prompt_chunks if self.prompt_chunks != 1 else None}
        record: dict[str, Any] = {"name": self.profile_name, "description": self.description, "target": self.target,
                                  "precision": self.precision, "shapes": {k: v for k, v in shapes.items() if v is not None}}
        for name in ("coreml", "tensorrt", "onnx", "openvino", "quantize", "validation"):
            record[name] = getattr(self, name).to_table()
        if self.calibration is not None:
            record["calibration"] = dataclasses.asdict(self.calibration)
        return record | {"backend_options": self.backend.to_table(), "cfg": self.cfg}


@dataclasses.dataclass
class Converted:
    files: list[Path]  # the first is the file a backend opens
    precision: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    details: dict[str, Any]


class Target(abc.ABC):
    """A target turns a torch component into files its runtime backend opens."""

    name: ClassVar[str]
    backend: ClassVar[str]  # the runtime backend that runs this target's files
    precisions: ClassVar[tuple[str, ...]]
    file_names: ClassVar[tuple[str, ...]] = ("model",)  # what a dry run plans per component

    @abc.abstractmethod
    def convert(self, spec: ComponentSpec, module: torch.nn.Module, out_dir: Path, options: ExportOptions,
                precision: str) -> Converted: ...

    def can_validate_here(self) -> bool:
        """False where this machine cannot run the backend (Core ML off macOS): the parity check is
        then what offline_parity can say, recorded as skipped."""
        return True

    def offline_parity(self, spec: ComponentSpec, module: torch.nn.Module, shape: Shape,
                       options: ExportOptions) -> dict[str, Any]:
        return {"skipped": f"the {self.backend} backend cannot run on this machine"}

    def plan_details(self, spec: ComponentSpec, options: ExportOptions) -> dict[str, Any]:
        """What a dry run records per component beyond its inputs and outputs."""
        return {}
