"""TensorRT target: ONNX export, then one serialized engine (``model.plan``) per component.

Per component: the ONNX target writes the graph (fp16 with fp32 islands for fp16 engines, or the QDQ
graph of an ``int8-static`` export for int8), TensorRT's ONNX parser reads it into a strongly typed
network (precision comes from the graph, so fp32 islands stay fp32; TensorRT 10 without strong typing
falls back to the FP16/INT8 builder flags), and the builder compiles it with

* one optimization profile: static when the export is static (the Jetson profile), otherwise
  min/opt/max batch and resolution (``[tensorrt] builder_batch`` / ``builder_size``);
* a timing cache shared by every build on the machine (``[tensorrt] timing_cache``);
* optionally refittable weights (``[tensorrt] refittable = true``): the plan is written weight-stripped
  next to the ONNX it came from (TensorRT refits it from there when it opens), and ``weights.json``
  maps diffusers parameter names to ONNX initializers to engine weights, so a LoRA refit set swaps
  weights without a rebuild (:func:`runtime.backends.tensorrt.refit_arrays`).

The manifest records the TensorRT version, GPU and compute capability an engine was built for, its
profile and its scratch size: the runtime checks them before loading (one line when they do not fit).

TensorRT is imported only to build. Everything else here (settings, profile shapes, weight maps,
manifest details, the dry-run plan) is plain Python, so ``--dry-run`` plans a TensorRT export on any
machine, and the tests cover it without TensorRT.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from runtime.manifest import TensorSpec
from sdexport.export.components import ComponentSpec, Shape
from sdexport.errors import ExportError, OptionError
from sdexport.export.targets.base import Converted, ExportOptions, Target

__all__ = [
    "EngineSettings",
    "TensorRTTarget",
    "profile_shapes",
    "component_prefix",
    "onnx_weight_map",
    "attach_engine_names",
    "engine_details",
    "require_tensorrt",
    "build_engine",
    "gpu_info",
]

PLAN = "model.plan"
WEIGHT_MAP = "weights.json"
TIMING_CACHE_ENV = "SDEXPORT_TRT_TIMING_CACHE"
QDQ_PRECISIONS = ("int8-static", "mixed")  # the onnx target's precisions that write Q/DQ graphs


# =============================================================================================
# Settings: the [tensorrt] table of a profile, resolved
# =============================================================================================


@dataclasses.dataclass(frozen=True)
class EngineSettings:
    optimization_level: int = 3
    timing_cache: str | None = None  # path; default: one file per user, shared by all builds
    refittable: bool = False
    builder_batch: tuple[int, int, int] | None = None  # prompts per call (dynamic exports)
    builder_size: tuple[int, int, int] | None = None  # pixels, both sides (dynamic exports)
    hardware_compatibility: str = "none"  # "ampere_plus": one engine for every GPU from Ampere on
    workspace_mb: int | None = None
    qdq_onnx: str | None = None  # an int8-static ONNX export (directory) or one QDQ .onnx file

    @classmethod
    def from_options(cls, options: ExportOptions) -> "EngineSettings":
        """The [tensorrt] section; its values were checked by their declarations (sdexport.options)."""
        t = options.tensorrt
        return cls(optimization_level=t.optimization_level, timing_cache=t.timing_cache, refittable=t.refittable,
                   builder_batch=t.builder_batch, builder_size=t.builder_size,
                   hardware_compatibility=t.hardware_compatibility, workspace_mb=t.workspace_mb, qdq_onnx=t.qdq_onnx)

    def timing_cache_path(self) -> Path:
        if self.timing_cache:
            return Path(self.timing_cache).expanduser()
        if os.environ.get(TIMING_CACHE_ENV):
            return Path(os.environ[TIMING_CACHE_ENV])
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        return base / "sdexport" / "tensorrt-timing.cache"


# =============================================================================================
# Optimization profiles from the spec and the options
# =============================================================================================


def _size_range(options: ExportOptions, settings: EngineSettings) -> tuple[int, int, int]:
    """Pixel range of a dynamic export: builder_size, else half to twice the model's native size
    (SDXL: 512..1024..2048; the traced size when the export run did not say)."""
    if settings.builder_size is not None:
        return settings.builder_size
    default = options.model_size or options.dynamic_size
    return max(64, default // 2), default, 2 * default


def profile_shapes(spec: ComponentSpec, options: ExportOptions, settings: EngineSettings) -> dict[str, dict[str, list[int]]]:
    """min/opt/max shapes of every input of ``spec`` (already made static where the export is).

    Batch: fixed by a static batch, else ``builder_batch`` (default 1..4 prompts, optimised for 1).
    The U-Net's batch N is 2B under batched CFG, B under sequential CFG; its minimum is B either way,
    since a run without guidance calls it on B. Size: fixed by a static export, else ``builder_size``
    (default half to twice the model's native size), the same range for height and width.
    """
    if options.batch is not None:
        batches = (options.batch,) * 3
    else:
        batches = settings.builder_batch or (1, 1, 4)
    if options.static:
        heights, widths = (options.height,) * 3, (options.width,) * 3
    else:
        heights = widths = _size_range(options, settings)
    chunks = (1, 1, options.prompt_chunks) if not options.static else (options.prompt_chunks,) * 3
    shapes = [Shape(b, h, w, prompt_chunks=c) for b, h, w, c in zip(batches, heights, widths, chunks)]
    sizes = [spec.sizes(s) for s in shapes]
    if options.cfg == "sequential":
        for s, b in zip(sizes, batches):
            s["N"] = b
    else:
        sizes[0]["N"] = batches[0]  # unguided runs call the U-Net on B
    out = {}
    for t in spec.inputs:
        dims = [[d if isinstance(d, int) else s[d] for d in t.shape] for s in sizes]
        out[t.name] = {"min": dims[0], "opt": dims[1], "max": dims[2]}
    return out


# =============================================================================================
# Weight maps: diffusers parameter names -> ONNX initializers -> engine weights
# =============================================================================================


def component_prefix(component: str) -> str:
    """The refit-set prefix of a component's parameters (sdexport.sources.lora.refit_set writes
    ``unet.<name>`` and ``text_encoder.<name>``)."""
    if component in ("unet", "unet_control"):
        return "unet"
    if component in ("vae_encoder", "vae_decoder"):
        return "vae"
    return component


def _digest(array: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest()


def onnx_weight_map(module, model, prefix: str) -> dict:
    """Which ONNX initializer holds each float parameter of ``module``, found by value.

    The exporter renames, reshapes and transposes weights (nn.Linear on 3-D inputs becomes MatMul with
    the transposed weight, named ``onnx::MatMul_...``; GroupNorm's scale becomes [C, 1, 1]), fp16
    conversion changes their dtype, and graph clean-up stores identical tensors once: matching bytes
    (as they are or transposed, in the initializer's dtype) is what survives all of that. Each entry
    says how to turn the parameter into the initializer: ``transform`` ("identity" or "transpose"),
    then reshape to ``shape`` in ``dtype``. Parameter names drop the export wrapper's first attribute
    (``unet.``, ``model.``, ``vae.`` ...) and get ``prefix``, as refit sets name them.
    """
    from onnx import TensorProto, numpy_helper

    float_types = {TensorProto.FLOAT, TensorProto.FLOAT16}
    index: dict[tuple, list[tuple[str, list[int]]]] = {}
    for init in model.graph.initializer:
        if init.data_type not in float_types or len(init.dims) == 0:
            continue
        array = numpy_helper.to_array(init)
        index.setdefault((array.dtype.name, array.size, _digest(array)), []).append((init.name, list(array.shape)))
    weights, unmapped, ambiguous, owners = {}, [], {}, {}
    for name, param in module.named_parameters():
        key = f"{prefix}.{name.split('.', 1)[1] if '.' in name else name}"
        value = param.detach().float().cpu().numpy()
        found = None
        for dtype in ("float32", "float16"):
            cast = value.astype(dtype)
            candidates = [(cast, "identity")] + ([(cast.T, "transpose")] if cast.ndim == 2 else [])
            for array, transform in candidates:
                hits = index.get((dtype, array.size, _digest(array)))
                if hits:
                    found = [{"initializer": n, "transform": transform, "shape": s, "dtype": dtype} for n, s in hits]
                    break
            if found:
                break
        if found is None:
            unmapped.append(key)
            continue
        if len(found) > 1:  # equal bytes in several initializers (e.g. untrained norms): no safe refit
            ambiguous[key] = sorted(f["initializer"] for f in found)
            continue
        found = found[0]
        weights[key] = found
        owners.setdefault(found["initializer"], []).append(key)
    shared = {init: sorted(keys) for init, keys in owners.items() if len(keys) > 1}
    return {"format": 1, "prefix": prefix, "weights": weights, "shared": shared, "ambiguous": ambiguous,
            "unmapped": sorted(unmapped)}


def attach_engine_names(weight_map: dict, refittable: Iterable[str]) -> dict:
    """Engine weight names (TensorRT's ONNX parser names weights after their initializers)."""
    names = set(refittable)
    out = dict(weight_map)
    out["weights"] = {k: {**v, "engine": v["initializer"] if v["initializer"] in names else None}
                      for k, v in weight_map["weights"].items()}
    out["refittable"] = sum(1 for v in out["weights"].values() if v["engine"])
    return out


# =============================================================================================
# Building (needs TensorRT and an NVIDIA GPU)
# =============================================================================================


def require_tensorrt():
    """The tensorrt module, or one line saying what building engines needs."""
    try:
        import tensorrt as trt
    except Exception as e:  # the PyPI stub raises at import time, not only ImportError
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ExportError(
            f"building TensorRT engines needs TensorRT's Python package (pip install tensorrt) and an NVIDIA GPU; "
            f"it cannot be loaded here ({first[:160]}): plan with --dry-run here and build on the target device"
        ) from None
    return trt


def gpu_info() -> dict:
    """Name and compute capability of GPU 0 (cuda-python, else nvidia-smi)."""
    try:
        from runtime.backends.tensorrt import _Cuda

        return _Cuda.get().device_info()
    except Exception:
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
        name, cc = (p.strip() for p in out[0].split(","))
        return {"gpu": name, "compute_capability": cc}
    except Exception as e:
        raise ExportError(f"cannot tell which GPU TensorRT builds for (no cuda-python, no nvidia-smi: {e})") from None


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def build_engine(onnx_path: Path, plan_path: Path, shapes: Mapping[str, Mapping[str, Sequence[int]]],
                 settings: EngineSettings, precision: str) -> dict:
    """Parse ``onnx_path``, build with one optimization profile, write ``plan_path``; return what the
    manifest records (TensorRT version, typing, scratch size, refittable weight names)."""
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flag_enum = trt.NetworkDefinitionCreationFlag
    # strongly typed: the graph's own types decide (fp32 islands stay fp32). TensorRT 11 has only
    # that; TensorRT 10 builds int8 Q/DQ graphs weakly typed so unquantized layers may use fp16.
    weak_available = hasattr(trt.BuilderFlag, "FP16")
    strongly = not weak_available or (hasattr(flag_enum, "STRONGLY_TYPED") and precision != "int8")
    flags = 1 << int(flag_enum.STRONGLY_TYPED) if strongly else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"{onnx_path.parent.name}: TensorRT's ONNX parser failed ({errors[:300]})")
    config = builder.create_builder_config()
    config.builder_optimization_level = settings.optimization_level
    if settings.workspace_mb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(settings.workspace_mb) << 20)
    if not strongly:
        # TensorRT 10 weak typing (int8 from Q/DQ: quantized layers int8, the rest may run in fp16)
        if precision in ("fp16", "int8"):
            config.set_flag(trt.BuilderFlag.FP16)
        if precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
    if settings.refittable:
        config.set_flag(trt.BuilderFlag.REFIT)
        config.set_flag(trt.BuilderFlag.STRIP_PLAN)
    if settings.hardware_compatibility == "ampere_plus":
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
    profile = builder.create_optimization_profile()
    for name, bounds in shapes.items():
        profile.set_shape(name, tuple(bounds["min"]), tuple(bounds["opt"]), tuple(bounds["max"]))
    config.add_optimization_profile(profile)
    cache_path = settings.timing_cache_path()
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"{onnx_path.parent.name}: TensorRT could not build an engine (see its log above)")
    _write_atomic(plan_path, bytes(serialized))
    try:
        _write_atomic(cache_path, bytes(config.get_timing_cache().serialize()))
    except OSError:
        pass  # a read-only cache location only costs the next build time
    engine = trt.Runtime(logger).deserialize_cuda_engine(bytes(serialized))
    memory = getattr(engine, "device_memory_size_v2", None) or engine.device_memory_size
    refittable = list(trt.Refitter(engine, logger).get_all_weights()) if settings.refittable else []
    return {"version": trt.__version__, "typing": "strong" if strongly else "weak",
            "device_memory_size": int(memory), "refittable_weights": refittable}


def engine_details(built: Mapping[str, Any], gpu: Mapping[str, str], shapes: Mapping, settings: EngineSettings,
                   precision: str, source: Mapping[str, Any]) -> dict:
    """The manifest details of one engine (what the runtime checks before it loads it)."""
    details = {
        "tensorrt": {
            "version": built["version"],
            "gpu": gpu.get("gpu"),
            "compute_capability": gpu.get("compute_capability"),
            "hardware_compatibility": settings.hardware_compatibility,
            "version_compatible": False,
            "typing": built.get("typing", "strong"),
        },
        "profiles": {name: {k: list(v) for k, v in bounds.items()} for name, bounds in shapes.items()},
        "device_memory_size": int(built["device_memory_size"]),
        "builder": {"optimization_level": settings.optimization_level, "precision": precision},
        "built_from": dict(source),
    }
    if settings.refittable:
        details["refit"] = {"weights": WEIGHT_MAP, "stripped": True, "source": "model.onnx",
                            "refittable_weights": len(built.get("refittable_weights", ()))}
    return details


# =============================================================================================
# The target
# =============================================================================================


def _qdq_path(settings: EngineSettings, component: str) -> Path | None:
    """This component's Q/DQ graph in an int8-static ONNX export (None when it has none)."""
    if not settings.qdq_onnx:
        raise OptionError("--precision int8 on the tensorrt target builds from a Q/DQ ONNX: pass the "
                          "directory of an `--target onnx --precision int8-static` export as [tensorrt] qdq_onnx")
    root = Path(settings.qdq_onnx)
    if root.suffix == ".onnx":
        if not root.is_file():
            raise OptionError(f"{root}: no such Q/DQ ONNX file")
        return root if component == "unet" else None
    from runtime.manifest import Manifest, ManifestError

    try:
        manifest = Manifest.load(root)
    except ManifestError as e:
        raise OptionError(f"[tensorrt] qdq_onnx: {e}") from None
    entry = manifest.components.get(component)
    # Q/DQ graphs only: the dynamic int8 ("int8": MatMulInteger) of text encoders is ONNX Runtime's
    if entry is None or entry.precision not in QDQ_PRECISIONS:
        return None
    return root / entry.main_file.path


class TensorRTTarget(Target):
    name = "tensorrt"
    backend = "tensorrt"
    precisions = ("fp16", "fp32", "int8")
    file_names = (PLAN,)

    def plan_details(self, spec: ComponentSpec, options: ExportOptions) -> dict:
        """What a dry run records: the optimization profile and builder settings, no TensorRT needed."""
        settings = EngineSettings.from_options(options)
        return {"profiles": profile_shapes(spec, options, settings),
                "builder": {"optimization_level": settings.optimization_level,
                            "precision": "fp32" if spec.keep_fp32 else options.precision,  # SDXL's VAE (force_upcast)
                            "refittable": settings.refittable, "hardware_compatibility": settings.hardware_compatibility}}

    def convert(self, spec: ComponentSpec, module, out_dir: Path, options: ExportOptions, precision: str) -> Converted:
        if precision not in self.precisions:
            raise ExportError(f"the tensorrt target supports precisions {', '.join(self.precisions)}, not {precision!r}")
        settings = EngineSettings.from_options(options)
        if settings.refittable and precision == "int8":
            raise OptionError("[tensorrt] refittable engines are fp16 or fp32: an int8 engine's weights are quantized "
                              "at build time (build fp16 to swap LoRAs without a rebuild)")
        require_tensorrt()
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        shapes = profile_shapes(spec, options, settings)
        with tempfile.TemporaryDirectory(prefix="sdexport-trt-") as scratch:
            onnx_path, inputs, outputs, source, used = self._onnx(spec, module, options, precision, Path(scratch))
            built = build_engine(onnx_path, out_dir / PLAN, shapes, settings, used)
            files = [out_dir / PLAN]
            if settings.refittable:
                import onnx

                model = onnx.load(str(onnx_path))
                weight_map = attach_engine_names(onnx_weight_map(module, model, component_prefix(spec.name)),
                                                 built["refittable_weights"])
                (out_dir / WEIGHT_MAP).write_text(json.dumps(weight_map, indent=1) + "\n", encoding="utf-8")
                for f in _onnx_files(onnx_path):  # the weights of the stripped plan
                    target = out_dir / ("model.onnx" if f == onnx_path else f.name)
                    shutil.copyfile(f, target)
                    files.append(target)
                files.append(out_dir / WEIGHT_MAP)
        details = engine_details(built, gpu_info(), shapes, settings, used, source)
        return Converted(files=files, precision=used, inputs=inputs, outputs=outputs, details=details)

    def _onnx(self, spec, module, options, precision, scratch: Path):
        """(onnx path, inputs, outputs, where it came from, the precision the engine gets)."""
        if precision == "int8":
            qdq = _qdq_path(EngineSettings.from_options(options), spec.name)
            if qdq is not None:
                import onnx

                model = onnx.load(str(qdq), load_external_data=False)
                inputs, outputs = _graph_io(model, spec)
                return qdq, inputs, outputs, {"onnx": "int8-static Q/DQ", "path": str(qdq)}, "int8"
            precision = "fp16"  # components the Q/DQ export left in float
        from sdexport.export.targets.onnx import OnnxTarget

        # TensorRT parses plain ONNX: onnxruntime's CUDA fusions (a profile's [onnx] optimize = "gpu",
        # e.g. nvidia-gpu with --target tensorrt) are contrib ops its parser does not know.
        plain = dataclasses.replace(options, onnx=dataclasses.replace(options.onnx, optimize="none"))
        converted = OnnxTarget().convert(spec, module, scratch / "onnx", plain, precision)
        source = {"onnx": f"sdexport onnx {precision}", **{k: v for k, v in converted.details.items() if k == "kept_fp32"}}
        return converted.files[0], converted.inputs, converted.outputs, source, precision


def _onnx_files(onnx_path: Path) -> list[Path]:
    """The ONNX file and its external data file, as sdexport's ONNX target writes them."""
    from sdexport.export.targets.onnx import EXTERNAL_DATA

    data = onnx_path.parent / EXTERNAL_DATA
    return [onnx_path] + ([data] if data.is_file() else [])


def _graph_io(model, spec: ComponentSpec) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    from onnx import TensorProto

    names = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16", TensorProto.INT64: "int64",
             TensorProto.INT32: "int32"}
    declared = {v.name: names.get(v.type.tensor_type.elem_type, "float32") for v in list(model.graph.input) + list(model.graph.output)}
    missing = [t.name for t in spec.inputs + spec.outputs if t.name not in declared]
    if missing:
        raise ExportError(f"{spec.name}: the Q/DQ graph lacks {', '.join(missing)}")
    fix = lambda t: TensorSpec(t.name, declared[t.name], t.shape)  # noqa: E731
    return tuple(map(fix, spec.inputs)), tuple(map(fix, spec.outputs))
