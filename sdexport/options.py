"""Typed export options: every setting of a device profile declared once.

A profile (``profiles/*.toml``) has a head (description, target, precision) and one table per
section below. Each field is declared here with its type, allowed values, default, help text and,
where it has one, its ``sdexport export`` flag; the profile schema and its validation
(sdexport.profile), the command-line flags and their choices (sdexport.cli) and the checks of
options built in code all come from these declarations. No torch here: the CLI imports this module.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Callable, ClassVar, Mapping

from sdexport.errors import OptionError

# --- allowed values, one place each --------------------------------------------------------------

TARGETS = ("onnx", "openvino", "coreml", "tensorrt")
PRECISIONS = ("fp32", "fp16", "int8", "int4", "hybrid", "int8-static", "mixed")
CFG_MODES = ("batched", "sequential")
WINOGRAD_MODES = ("auto", "off", "f2", "f4")
# At run time the export's Winograd plan is applied or not: the tiles were chosen at export.
WINOGRAD_RUN_MODES = WINOGRAD_MODES[:2]
ATTENTION_MODES = ("original", "split-einsum")
COMPRESS_MODES = ("none", "palettize4", "palettize6", "palettize8", "linear8")
COMPUTE_UNITS = ("all", "cpu-and-gpu", "cpu-and-ne", "cpu-only")
DEVICE_LOOP_MODES = ("auto", "on", "off")
PRECISION_HINTS = ("f32", "bf16", "f16")
PERFORMANCE_HINTS = ("LATENCY", "THROUGHPUT")
OPTIMIZE_MODES = ("none", "gpu")
FRONTENDS = ("torch", "onnx")
HARDWARE_LEVELS = ("none", "ampere_plus")
ACTIVATIONS = ("int8", "uint8")
DEFAULT_DEPLOYMENT_TARGET = "macOS14"
# Families a profile can size separately ([shapes] sizes); inpainting and the SDXL refiner count as their base.
MODEL_FAMILIES = ("sd1", "sd2", "sd2-v", "sdxl")


# --- declarations ----------------------------------------------------------------------------------

Check = Callable[[Any], "str | None"]  # None: fine; else what is wrong, after the field's name


def setting(default: Any = None, *, kind: type | tuple[type, ...], help: str, choices: tuple[str, ...] | None = None,
            flag: str | None = None, metavar: str | None = None, check: Check | None = None,
            for_target: str | None = None, flag_choices: bool = True) -> Any:
    """One setting. ``default`` None means "not set": the reader's (export's or runtime's) own default.
    ``for_target``: its flag is refused for other targets. ``flag_choices`` False: the flag takes any
    string and a later, more specific check names the allowed values (they differ per target)."""
    meta = {"kind": kind, "help": help, "choices": choices, "flag": flag, "metavar": metavar, "check": check,
            "for_target": for_target, "flag_choices": flag_choices}
    return dataclasses.field(default=default, metadata=meta)


def at_least(low: int) -> Check:
    return lambda v: None if v >= low else f"must be at least {low}, got {v!r}"


def _in_range(low: int, high: int) -> Check:
    return lambda v: None if low <= v <= high else f"must be {low}..{high}, got {v!r}"


def _psnr(value: float) -> str | None:
    return None if 0 < value < 1000 else f"{value:g}: expected a PSNR in dB, e.g. 35"


def _triple(value) -> str | None:
    ok = (len(value) == 3 and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
          and value[0] <= value[1] <= value[2])
    return None if ok else f"must be three positive integers [min, opt, max] in order, got {list(value)!r}"


def _family_sizes(value) -> str | None:
    for family, size in value.items():
        if family not in MODEL_FAMILIES:
            return f"has {family!r}: families are {', '.join(MODEL_FAMILIES)}"
        sizes = [size] * 2 if isinstance(size, int) and not isinstance(size, bool) else size
        if not (isinstance(sizes, (list, tuple)) and len(sizes) == 2 and all(
                isinstance(v, int) and not isinstance(v, bool) and v > 0 and v % 8 == 0 for v in sizes)):
            return f"{family}: expected a size in pixels (a multiple of 8) or [height, width], got {size!r}"
    return None


def _type_name(kind) -> str:
    return " or ".join(k.__name__ for k in kind) if isinstance(kind, tuple) else kind.__name__


def check_value(where: str, value: Any, meta: Mapping[str, Any]) -> None:
    """One setting's value against its declaration; the message starts with ``where``."""
    if value is None:
        return
    kind, choices = meta["kind"], meta["choices"]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    numeric = float in kinds and isinstance(value, int) and not isinstance(value, bool)
    if isinstance(value, tuple) and list in kinds:
        value = list(value)
    if not numeric and (not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds):
        raise OptionError(f"{where}: expected {_type_name(kind)}, got {type(value).__name__} {value!r}")
    if choices is not None:
        for v in value.values() if isinstance(value, dict) else [value]:
            if v not in choices:
                raise OptionError(f"{where}: {v!r} is not one of {', '.join(choices)}")
    problem = meta["check"](value) if meta["check"] else None
    if problem:
        raise OptionError(f"{where} {problem}")


@dataclasses.dataclass(frozen=True)
class Section:
    """A profile table. Values are checked on construction, whoever builds it."""

    NAME: ClassVar[str] = ""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):  # frozen and hashable: TOML arrays become tuples
                object.__setattr__(self, f.name, tuple(value))
            check_value(self.where(f.name), getattr(self, f.name), f.metadata)

    @classmethod
    def where(cls, name: str) -> str:
        return f"{cls.NAME}.{name}" if cls.NAME else name

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_table(cls, table: Mapping[str, Any], source: str = "") -> "Section":
        prefix = f"{source}: " if source else ""
        for key, value in table.items():
            if key not in cls.names():
                what = f"{cls.NAME}.{key}" if cls.NAME else repr(key)
                raise OptionError(f"{prefix}unknown field {what} (known: {', '.join(cls.names())})")
            check_value(prefix + cls.where(key), value, _field(cls, key).metadata)
        return cls(**table)

    def to_table(self) -> dict[str, Any]:
        """The fields that are set, JSON-ready."""
        out = {}
        for name in self.names():
            value = getattr(self, name)
            if value is not None:
                out[name] = list(value) if isinstance(value, tuple) else value
        return out

    def replace(self, **changes) -> "Section":
        return dataclasses.replace(self, **changes) if changes else self


def _field(cls, name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(cls) if f.name == name)


# --- the sections ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Head(Section):
    """The profile's top-level fields."""

    NAME: ClassVar[str] = ""
    description: str = setting("", kind=str, help="one line: the device and what the profile chooses")
    target: str = setting("onnx", kind=str, choices=TARGETS, flag="--target", flag_choices=False,
                          help="onnx | openvino | coreml | tensorrt (default: the profile's, else onnx)")
    precision: str = setting("fp32", kind=str, choices=PRECISIONS, flag="--precision", flag_choices=False,
                             help="fp32 | fp16, and target-specific ones: onnx int8 | int8-static | mixed, "
                                  "openvino int8 | int4 | hybrid | int8-static (default: the profile's, else fp32)")


@dataclasses.dataclass(frozen=True)
class ShapesOptions(Section):
    NAME: ClassVar[str] = "shapes"
    static: bool = setting(False, kind=bool, help="fixed height, width and batch (needs height and width)")
    height: int | None = setting(kind=int, flag="--height", help="static height in pixels (with --width)")
    width: int | None = setting(kind=int, flag="--width", help="static width in pixels (with --height)")
    batch: int | None = setting(kind=int, flag="--batch", help="static number of prompts per call")
    sizes: dict | None = setting(kind=dict, check=_family_sizes,
                                 help="static size per model family ({sd1 = 512, sdxl = 1024}, or [height, width]); "
                                      "a family not listed gets the model's own size")

    def size_for(self, family) -> tuple[int, int] | None:
        """Static (height, width) for a model (a sdexport.sources.family.ModelFamily; None: unknown, then
        the SD 1.x entry, the size these profiles had before they knew families), or None if dynamic:
        the family's entry in ``sizes``, else the profile's one height and width, else the model's own size."""
        if not self.static:
            return None
        size = (self.sizes or {}).get(family.name if family is not None else "sd1")
        if size is not None:
            return (size, size) if isinstance(size, int) else (size[0], size[1])
        if self.height is not None and self.width is not None:
            return self.height, self.width
        return (family.height, family.width) if family is not None else None


@dataclasses.dataclass(frozen=True)
class CfgOptions(Section):
    NAME: ClassVar[str] = "cfg"
    mode: str = setting("batched", kind=str, choices=CFG_MODES, flag="--cfg",
                        help="batched: one U-Net call on 2B; sequential: two calls on B (less memory)")


@dataclasses.dataclass(frozen=True)
class BackendOptions(Section):
    """How the runtime runs the export on the device (written to the manifest, applied at run time)."""

    NAME: ClassVar[str] = "backend"
    device: str | None = setting(kind=str, help="backend device: cpu, cuda, gpu, npu, auto ...")
    providers: tuple[str, ...] | None = setting(kind=list, help="ONNX Runtime execution providers, in order")
    threads: int | None = setting(kind=int, check=at_least(0), help="inference threads (0: the backend's default)")
    precision_hint: str | None = setting(kind=str, choices=PRECISION_HINTS, help="OpenVINO inference precision")
    performance_hint: str | None = setting(kind=str, choices=PERFORMANCE_HINTS, help="OpenVINO performance hint")
    winograd: str | None = setting(kind=str, choices=WINOGRAD_RUN_MODES,
                                   help="OpenVINO CPU at f32: apply the export's Winograd plan (auto) or not (off)")
    compute_units: str | None = setting(kind=str, choices=COMPUTE_UNITS, flag="--compute-units", for_target="coreml",
                                        help="Core ML: where the models run (default: cpu-and-ne for split-einsum "
                                             "fp16, else cpu-and-gpu)")
    device_loop: str | None = setting(kind=str, choices=DEVICE_LOOP_MODES,
                                      help="the device-resident denoising loop: auto (on the CUDA provider), on, off")

    # Settings that describe the target device, not the export machine: the parity check at export
    # runs here, so they stay out of its sessions (device_loop is the pipeline's, not a session's).
    DEVICE_ONLY: ClassVar[tuple[str, ...]] = ("device", "providers", "compute_units", "device_loop")

    def session_options(self) -> dict[str, Any]:
        """What the runtime's sessions get (SessionOptions.from_mapping)."""
        return {k: v for k, v in self.to_table().items() if k != "device_loop"}

    def validation_options(self) -> dict[str, Any]:
        return {k: v for k, v in self.to_table().items() if k not in self.DEVICE_ONLY}


@dataclasses.dataclass(frozen=True)
class CoreMLOptions(Section):
    NAME: ClassVar[str] = "coreml"
    attention: str = setting("split-einsum", kind=str, choices=ATTENTION_MODES, flag="--attention", for_target="coreml",
                             help="Core ML: stock attention (GPU) or split-einsum (Neural Engine; the default)")
    # a mode, or per component name / role / "default": a mode (in code, or a TOML table)
    compress: Any = setting(kind=(str, dict), choices=COMPRESS_MODES, flag="--compress", for_target="coreml",
                            help="Core ML: k-means palettized weights (4/6/8 bits) or int8 weights")
    minimum_deployment_target: str = setting(DEFAULT_DEPLOYMENT_TARGET, kind=str,
                                             help="oldest macOS / iOS the packages load on (macOS14, iOS17 ...)")
    weight_threshold: int = setting(2048, kind=int, check=at_least(1),
                                    help="weights with fewer elements than this stay uncompressed")


@dataclasses.dataclass(frozen=True)
class TensorRTOptions(Section):
    NAME: ClassVar[str] = "tensorrt"
    optimization_level: int = setting(3, kind=int, check=_in_range(0, 5), help="builder optimization level 0..5")
    timing_cache: str | None = setting(kind=str, help="timing cache file (default: one per user, shared by all builds)")
    refittable: bool = setting(False, kind=bool, help="engines whose weights can be replaced (LoRA at run time)")
    builder_batch: tuple[int, int, int] | None = setting(kind=list, check=_triple,
                                                         help="dynamic exports: [min, opt, max] prompts per call")
    builder_size: tuple[int, int, int] | None = setting(kind=list, check=_triple,
                                                        help="dynamic exports: [min, opt, max] pixels, both sides")
    hardware_compatibility: str = setting("none", kind=str, choices=HARDWARE_LEVELS,
                                          help="ampere_plus: one engine for every GPU from Ampere on")
    qdq_onnx: str | None = setting(kind=str, flag="--qdq-onnx", metavar="DIR",
                                   help="tensorrt --precision int8: an `--target onnx --precision int8-static` export")
    workspace_mb: int | None = setting(kind=int, check=at_least(1), help="builder scratch memory in MB")


@dataclasses.dataclass(frozen=True)
class OnnxOptions(Section):
    NAME: ClassVar[str] = "onnx"
    optimize: str = setting("none", kind=str, choices=OPTIMIZE_MODES, flag="--optimize",
                            help="onnx: gpu = onnxruntime.transformers fusions for the CUDA provider, then fp16 "
                                 "(default: the profile's)")


@dataclasses.dataclass(frozen=True)
class OpenVinoOptions(Section):
    NAME: ClassVar[str] = "openvino"
    frontend: str = setting("torch", kind=str, choices=FRONTENDS, help="convert from torch directly, or through ONNX")
    int4_group_size: int = setting(64, kind=int, check=at_least(1), help="int4: weights per quantization group")
    winograd: str = setting("auto", kind=str, choices=WINOGRAD_MODES, flag="--winograd", for_target="openvino",
                            help="openvino fp32 with static shapes: 3x3 convolutions as Winograd F(2)/F(4) on the "
                                 "CPU at f32; auto = where measured faster on this machine (default), f2/f4 = "
                                 "wherever the tile fits")


@dataclasses.dataclass(frozen=True)
class QuantizeOptions(Section):
    NAME: ClassVar[str] = "quantize"
    min_psnr: float | None = setting(kind=float, flag="--min-psnr", metavar="DB", check=_psnr,
                                     help="--precision mixed: PSNR (dB) against fp32 the U-Net must keep on the "
                                          "calibration set (default: the profile's quantize.min_psnr, else 35)")
    calibration_prompts: int | None = setting(kind=int, flag="--calibration-prompts", metavar="N", check=at_least(1),
                                              help="int8-static / mixed: prompts of the calibration runs "
                                                   "(default: the profile's, else 16)")
    calibration_steps: int | None = setting(kind=int, flag="--calibration-steps", metavar="N", check=at_least(1),
                                            help="int8-static / mixed: denoising steps of each calibration run "
                                                 "(default: the profile's, else 20)")
    activations: str = setting("int8", kind=str, choices=ACTIVATIONS,
                               help="int8 (signed, symmetric: TensorRT needs it, arm64 runs it fastest) or uint8 "
                                    "(what x86 ONNX Runtime fuses everywhere)")
    eval_samples: int = setting(8, kind=int, check=at_least(1),
                                help="calibration inputs the int8 candidates are compared on")


@dataclasses.dataclass(frozen=True)
class ValidationOptions(Section):
    NAME: ClassVar[str] = "validation"
    min_psnr_fp32: float | None = setting(kind=float, help="parity floor (dB) of fp32 components against torch")
    min_psnr_reduced: float | None = setting(kind=float, help="parity floor (dB) of reduced-precision components")


SECTIONS: dict[str, type[Section]] = {cls.NAME: cls for cls in (
    Head, ShapesOptions, CfgOptions, BackendOptions, CoreMLOptions, TensorRTOptions, OnnxOptions, OpenVinoOptions,
    QuantizeOptions, ValidationOptions)}


# --- command-line flags, from the declarations -----------------------------------------------------


def flag_fields() -> list[tuple[type[Section], dataclasses.Field]]:
    return [(cls, f) for cls in SECTIONS.values() for f in dataclasses.fields(cls) if f.metadata.get("flag")]


def _dest(cls: type[Section], f: dataclasses.Field) -> str:
    return f"opt_{cls.NAME or 'head'}_{f.name}"


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per declared setting that has one, with its type and choices."""
    for cls, f in flag_fields():
        meta = f.metadata
        kind = meta["kind"] if meta["kind"] in (int, float) else None
        choices = meta["choices"] if meta["flag_choices"] else None
        metavar = meta["metavar"] or (None if choices else f.name.upper())
        parser.add_argument(meta["flag"], dest=_dest(cls, f), type=kind, choices=choices, metavar=metavar,
                            help=meta["help"])


def flag_choices(flag: str) -> tuple[str, ...] | None:
    return next((f.metadata["choices"] for _, f in flag_fields() if f.metadata["flag"] == flag), None)


def flag_values(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """{section: {field: value}} of the flags given, checked (the message names the flag)."""
    given: dict[str, dict[str, Any]] = {}
    for cls, f in flag_fields():
        value = getattr(args, _dest(cls, f), None)
        if value is not None:
            meta = f.metadata if f.metadata["flag_choices"] else {**f.metadata, "choices": None}  # checked later
            check_value(meta["flag"], value, meta)
            given.setdefault(cls.NAME, {})[f.name] = value
    return given


def check_flags_for_target(flags: Mapping[str, Mapping[str, Any]], target: str) -> None:
    """Flags of one target's settings are refused for another (one line naming them)."""
    by_target: dict[str, list[str]] = {}
    for cls, f in flag_fields():
        owner = f.metadata["for_target"]
        if owner and owner != target and f.name in flags.get(cls.NAME, {}):
            by_target.setdefault(owner, []).append(f.metadata["flag"])
    for owner, names in by_target.items():
        verb = "applies" if len(names) == 1 else "apply"
        raise OptionError(f"{', '.join(names)} {verb} to --target {owner}, not {target}")
