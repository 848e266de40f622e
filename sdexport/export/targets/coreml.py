"""Core ML target: one ML Program ``model.mlpackage`` per component, for Apple Silicon Macs, iPhones and iPads.

Path. ``torch.export.export`` (with the chosen attention implementation swapped in, see
:mod:`sdexport.export.attention`), then ``coremltools.convert`` on the exported program. The TorchScript
path (``torch.jit.trace``) fails with torch 2.13 on diffusers' U-Net and VAE ("only 0-dimensional
arrays can be converted"); the exported program converts every component.

Shapes are static: Core ML compiles a model for one shape per input, and the Neural Engine runs
nothing else. An export without ``--height/--width`` is refused with one line saying so. The batch
is ``--batch`` (default 1 prompt; the U-Net and ControlNets see 2x that under batched CFG).

Inputs and outputs keep the ComponentSpec's names. Float inputs and outputs are float32 at either
precision (the runtime feeds float32; at fp16 Core ML casts at the edges, as the ONNX target does);
``input_ids`` is int32 because Core ML has no int64 inputs. What a package really declares is read
back from it and written to the manifest.

Settings, from the profile's ``coreml`` table (the CLI fills it from flags):

- ``attention``: ``split-einsum`` (default; Apple's Neural Engine layout) or ``original``.
- ``compute_units`` (or the profile's ``[backend] compute_units``): ``all``, ``cpu-and-gpu``,
  ``cpu-and-ne``, ``cpu-only``. Default: ``cpu-and-ne`` for split-einsum at fp16, ``cpu-and-gpu``
  otherwise (Apple's recommendation; the Neural Engine runs fp16 only). Recorded per component;
  the runtime backend opens the model with it unless its own options say otherwise.
- ``minimum_deployment_target``: ``macOS14`` by default (= iOS17); ``macOS12``..``macOS26``, ``iOS15``..``iOS26``.
- ``compress``: ``palettize4`` / ``palettize6`` / ``palettize8`` (k-means look-up tables, per tensor)
  or ``linear8`` (int8 symmetric per output channel), for every component, or a table
  ``{component name or role: mode or "none"}`` with an optional ``default`` key.
- ``weight_threshold``: weights with fewer elements stay uncompressed (default 2048, coremltools' own).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import io
import logging
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from runtime.manifest import TensorSpec
from sdexport import options as options_mod
from sdexport.export.attention import UnsupportedAttention, attention_implementation
from sdexport.export.components import ComponentSpec, Shape
from sdexport.errors import ExportError, OptionError
from sdexport.export.targets.base import Converted, ExportOptions, Target

PACKAGE = "model.mlpackage"
# coremltools' ComputeUnit names ("cpu-and-ne" -> CPU_AND_NE) and compressors ("palettize6" -> 6-bit
# palettization) follow from the declared names (sdexport.options).
COMPUTE_UNITS = {units: units.upper().replace("-", "_") for units in options_mod.COMPUTE_UNITS}
COMPRESSION = {mode: (mode.rstrip("0123456789"), int(mode[len(mode.rstrip("0123456789")):]))
               for mode in options_mod.COMPRESS_MODES if mode != "none"}
# The ops that decompress a weight at load time, by opset: iOS16/17 and iOS18+ spell them differently.
COMPRESSED_WEIGHT_OPS = {
    "palettize": ("constexpr_lut_to_dense",),
    "linear": ("constexpr_affine_dequantize", "constexpr_blockwise_shift_scale"),
}
DEFAULT_TARGET = options_mod.DEFAULT_DEPLOYMENT_TARGET
OLDEST_TARGET = "iOS15"  # ML Programs start here
OLDEST_COMPRESSION_TARGET = "iOS16"  # constexpr (compressed weight) ops start here


# --- coremltools, imported quietly --------------------------------------------------------------


@contextlib.contextmanager
def quiet_coremltools() -> Iterator[None]:
    """coremltools logs at import that its macOS-only library is missing and that this torch is untested,
    and draws a progress bar on stderr for every pass of every conversion: true on Linux and beside the
    point of an export, whose own progress bar says which component is being converted. Errors still
    arrive as exceptions."""
    logger = logging.getLogger("coremltools")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def coremltools():
    with quiet_coremltools():
        import coremltools as ct
        import coremltools.optimize.coreml  # noqa: F401  (ct.optimize.coreml)
    return ct


# --- settings ------------------------------------------------------------------------------------


def _parse_target(ct, name: str):
    # macOS14 and iOS17 are one enum value: the names are aliases, listed in __members__ only.
    members = {n: t for n, t in ct.target.__members__.items() if n.startswith(("macOS1", "macOS2", "iOS"))}
    lookup = {n.lower(): (n, t) for n, t in members.items()}
    found = lookup.get(str(name).lower().replace(" ", "").replace("_", ""))
    if found is None:
        choices = ", ".join(n for n, t in members.items() if t >= ct.target[OLDEST_TARGET])
        raise OptionError(f"Core ML minimum deployment target {name!r}: use one of {choices}")
    name, target = found
    if target < ct.target[OLDEST_TARGET]:
        raise OptionError(f"Core ML minimum deployment target {name}: ML Programs need macOS12 / iOS15 or newer")
    return name, target


@dataclasses.dataclass(frozen=True)
class CoreMLSettings:
    """The profile's ``coreml`` table, checked."""

    attention: str = "split-einsum"
    compress: Any = None  # None, a mode, or {component name | role | "default": mode | "none"}
    compute_units: str | None = None  # None: chosen from attention and precision
    minimum_deployment_target: str = DEFAULT_TARGET
    weight_threshold: int = 2048

    @classmethod
    def from_options(cls, options: ExportOptions) -> "CoreMLSettings":
        """The [coreml] section (values checked by its declarations) and, as device profiles keep
        compute units with the other runtime settings, [backend] compute_units."""
        c = options.coreml
        return cls(attention=c.attention, compress=c.compress, compute_units=options.backend.compute_units,
                   minimum_deployment_target=c.minimum_deployment_target, weight_threshold=c.weight_threshold)

    def compression_for(self, spec: ComponentSpec) -> str | None:
        if not isinstance(self.compress, dict):
            mode = self.compress
        else:
            mode = next((self.compress[k] for k in (spec.name, spec.role, "default") if k in self.compress), None)
        return None if mode in (None, "none") else mode

    def units_for(self, precision: str, kept_fp32: bool = False) -> str:
        """``kept_fp32``: the model keeps this component fp32 whatever was asked (SDXL's VAE, force_upcast);
        the Neural Engine cannot run it, so it gets the GPU instead of refusing the export."""
        if self.compute_units is not None:
            if self.compute_units == "cpu-and-ne" and precision == "fp32" and kept_fp32:
                return "cpu-and-gpu"
            if self.compute_units == "cpu-and-ne" and precision == "fp32":
                raise OptionError("--compute-units cpu-and-ne needs --precision fp16: the Neural Engine runs fp16 only")
            return self.compute_units
        return "cpu-and-ne" if self.attention == "split-einsum" and precision == "fp16" else "cpu-and-gpu"


# --- shapes --------------------------------------------------------------------------------------


def static_io(spec: ComponentSpec, shape: Shape) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """The spec's inputs and outputs with every symbolic dimension replaced by its size at ``shape``."""
    sizes = spec.sizes(shape)
    fix = lambda t: dataclasses.replace(t, shape=tuple(d if isinstance(d, int) else int(sizes[d]) for d in t.shape))  # noqa: E731
    return tuple(map(fix, spec.inputs)), tuple(map(fix, spec.outputs))


def export_program(module: torch.nn.Module, example: tuple, attention: str):
    """torch.export with ``attention`` swapped in, decomposed to the ATen ops coremltools converts.
    Returns the program and the attention report (what was rewritten)."""
    with attention_implementation(module, attention) as report, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(module, example, strict=False)
    program = program.run_decompositions({})
    return drop_aliases(program), report


def drop_aliases(program):
    """``aten.alias`` (a full slice such as CLIP's ``position_ids[:, :77]``) is an identity in a functional
    graph, and coremltools has no converter for it: forward its input instead."""
    graph = program.graph_module.graph
    changed = False
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target == torch.ops.aten.alias.default and len(node.users):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            changed = True
    if changed:
        program.graph_module.recompile()
    return program


# --- conversion ----------------------------------------------------------------------------------

_NP = {"float32": np.float32, "int64": np.int32, "int32": np.int32}  # Core ML has no int64 inputs
_CT_DTYPES = {65568: "float32", 65552: "float16", 131104: "int32", 131080: "int8"}  # ArrayFeatureType


def to_coreml(ct, program, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...], precision: str, target):
    return ct.convert(
        program,
        convert_to="mlprogram",
        inputs=[ct.TensorType(name=t.name, shape=t.shape, dtype=_NP[t.dtype]) for t in inputs],
        outputs=[ct.TensorType(name=t.name, dtype=np.float32) for t in outputs],
        compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32,
        minimum_deployment_target=target,
        skip_model_load=True,  # loading needs macOS; the runtime backend loads it there
    )


def declared_io(mlmodel) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """What the package declares: names, dtypes and (static) shapes of its features."""
    description = mlmodel.get_spec().description

    def read(feature) -> TensorSpec:
        array = feature.type.multiArrayType
        dtype = _CT_DTYPES.get(array.dataType)
        if dtype is None:
            raise ExportError(f"Core ML feature {feature.name}: unexpected data type {array.dataType}")
        return TensorSpec(feature.name, dtype, tuple(int(d) for d in array.shape))

    return tuple(map(read, description.input)), tuple(map(read, description.output))


def mil_op_counts(mlmodel) -> collections.Counter:
    """Op types of the model's ML Program (every function, nested blocks included), read from its
    spec: the same for a model just converted and one loaded from disk, without loading weights."""
    counts: collections.Counter = collections.Counter()

    def walk(block):
        for op in block.operations:
            counts[op.type] += 1
            for inner in op.blocks:
                walk(inner)

    for function in mlmodel.get_spec().mlProgram.functions.values():
        for block in function.block_specializations.values():
            walk(block)
    return counts


def compress(ct, mlmodel, mode: str, weight_threshold: int = 2048):
    """``mode`` applied to every weight of at least ``weight_threshold`` elements."""
    kind, bits = COMPRESSION[mode]
    cto = ct.optimize.coreml
    if kind == "palettize":
        config = cto.OpPalettizerConfig(mode="kmeans", nbits=bits, granularity="per_tensor", weight_threshold=weight_threshold)
        return cto.palettize_weights(mlmodel, cto.OptimizationConfig(global_config=config))
    config = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel",
                                         weight_threshold=weight_threshold)
    return cto.linear_quantize_weights(mlmodel, cto.OptimizationConfig(global_config=config))


def compressed_weight_count(counts: collections.Counter, mode: str) -> int:
    kind, _ = COMPRESSION[mode]
    return sum(counts[op] for op in COMPRESSED_WEIGHT_OPS[kind])


def package_files(package: Path) -> list[Path]:
    """Every file of a package, ``Manifest.json`` first (the runtime opens its folder)."""
    files = sorted(p for p in package.rglob("*") if p.is_file())
    files.sort(key=lambda p: p.name != "Manifest.json")
    return files


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _nothing_to_compress(spec: ComponentSpec, mode: str, settings: CoreMLSettings) -> str:
    return (f"{spec.name}: --compress {mode} is not supported for this component: it has no weight of "
            f"{settings.weight_threshold} elements or more to compress (set it to none for {spec.name})")


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


class CoreMLTarget(Target):
    name = "coreml"
    backend = "coreml"
    precisions = ("fp16", "fp32")
    file_names = (f"{PACKAGE}/Manifest.json", f"{PACKAGE}/Data/com.apple.CoreML/model.mlmodel",
                  f"{PACKAGE}/Data/com.apple.CoreML/weights/weight.bin")

    def convert(self, spec: ComponentSpec, module: torch.nn.Module, out_dir: Path, options: ExportOptions,
                precision: str) -> Converted:
        if precision not in self.precisions:
            raise ExportError(f"the coreml target supports precisions {', '.join(self.precisions)}, not {precision!r}")
        if not options.static:
            raise ExportError("Core ML needs static shapes: pass --height and --width (for example --height 512 --width 512)")
        settings = CoreMLSettings.from_options(options)
        ct = coremltools()
        target_name, target = _parse_target(ct, settings.minimum_deployment_target)
        mode = settings.compression_for(spec)
        if mode and target < ct.target[OLDEST_COMPRESSION_TARGET]:
            raise OptionError(
                f"{spec.name}: --compress {mode} needs minimum deployment target macOS13 / iOS16 or newer "
                f"(compressed weights), not {settings.minimum_deployment_target}"
            )
        units = settings.units_for(precision, kept_fp32=spec.keep_fp32 is not None)
        if mode and max((p.numel() for p in module.parameters()), default=0) < settings.weight_threshold:
            raise ExportError(_nothing_to_compress(spec, mode, settings))  # before the slow part

        shape = options.trace_shape(spec)
        inputs, outputs = static_io(spec, shape)
        example = spec.example(shape, torch.Generator().manual_seed(0))
        try:
            program, attention = export_program(module, example, settings.attention)
        except UnsupportedAttention as e:
            raise ExportError(f"{spec.name}: {e}; use --attention original") from None
        except Exception as e:
            raise ExportError(f"{spec.name}: torch.export failed ({_one_line(e)})") from None
        try:
            with quiet_coremltools():
                mlmodel = to_coreml(ct, program, inputs, outputs, precision, target)
        except Exception as e:
            raise ExportError(f"{spec.name}: Core ML conversion failed ({_one_line(e)})") from None
        del program
        uncompressed_bytes = directory_bytes(Path(mlmodel.package_path))
        counts = mil_op_counts(mlmodel)
        compression = None
        if mode:
            try:
                with quiet_coremltools():
                    mlmodel = compress(ct, mlmodel, mode, settings.weight_threshold)
            except Exception as e:
                raise ExportError(f"{spec.name}: --compress {mode} failed ({_one_line(e)})") from None
            counts = mil_op_counts(mlmodel)
            n = compressed_weight_count(counts, mode)
            if n == 0:
                raise ExportError(_nothing_to_compress(spec, mode, settings))
            compression = {"mode": mode, "compressed_weights": n, "weight_threshold": settings.weight_threshold,
                           "uncompressed_bytes": uncompressed_bytes}

        declared_in, declared_out = declared_io(mlmodel)
        names = lambda ts: [t.name for t in ts]  # noqa: E731
        if names(declared_in) != names(inputs) or names(declared_out) != names(outputs):
            raise ExportError(
                f"{spec.name}: Core ML package declares {names(declared_in)} -> {names(declared_out)}, "
                f"expected {names(inputs)} -> {names(outputs)}"
            )
        mlmodel.short_description = f"sdexport {spec.name} ({spec.role}), {precision}, attention {settings.attention}"
        mlmodel.user_defined_metadata.update({
            "sdexport.component": spec.name, "sdexport.role": spec.role, "sdexport.precision": precision,
            "sdexport.export.attention": settings.attention, "sdexport.compute_units": units,
        })
        out_dir.mkdir(parents=True, exist_ok=True)
        package = out_dir / PACKAGE
        with quiet_coremltools():
            mlmodel.save(str(package))
        package_bytes = directory_bytes(package)
        if compression:
            compression.update(package_bytes=package_bytes,
                               ratio=round(uncompressed_bytes / max(package_bytes, 1), 3))
        details = {
            "format": "mlprogram",
            "exporter": f"torch.export + coremltools {ct.__version__}",
            "minimum_deployment_target": target_name,
            "compute_units": units,
            "attention": attention,
            "compression": compression,
            "package_bytes": package_bytes,
            "static_shape": {"batch": shape.batch, "height": shape.height, "width": shape.width},
            "mil_ops": dict(counts.most_common(12)),
        }
        return Converted(files=package_files(package), precision=precision, inputs=declared_in,
                         outputs=declared_out, details=details)

    # -- validation where Core ML cannot predict ------------------------------------------------

    def can_validate_here(self) -> bool:
        """Core ML predicts on macOS only; elsewhere the export cannot run what it wrote."""
        return sys.platform == "darwin"

    def offline_parity(self, spec: ComponentSpec, module: torch.nn.Module, shape: Shape, options: ExportOptions) -> dict:
        """What can be checked without Core ML: the rewritten torch module against the stock one.

        The package itself is not run (that needs macOS): the record says so, and never shows a PSNR
        for it. With split-einsum attention the torch rewrite that was converted is compared with
        the stock module in fp32 on the spec's example inputs.
        """
        settings = CoreMLSettings.from_options(options)
        record: dict = {"skipped": f"Core ML prediction needs macOS; this export ran on {_platform_name()}"}
        if settings.attention != "original":
            record["torch_rewrite"] = compare_attention(spec, module, shape, settings.attention)
        return record


def compare_attention(spec: ComponentSpec, module: torch.nn.Module, shape: Shape, implementation: str,
                      seed: int = 1) -> dict:
    """Stock module vs the same module with ``implementation`` swapped in, fp32, worst output."""
    from runtime.metrics import finite, max_abs_error, psnr

    example = spec.example(shape, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = module(*example)
        with attention_implementation(module, implementation):
            got = module(*example)
    expected = expected if isinstance(expected, tuple) else (expected,)
    got = got if isinstance(got, tuple) else (got,)
    errors = [max_abs_error(e.numpy(), g.numpy()) for e, g in zip(expected, got)]
    psnrs = [psnr(e.numpy(), g.numpy()) for e, g in zip(expected, got)]
    return {
        "reference": "stock torch module, fp32",
        "compared": f"torch module with {implementation} attention, fp32",
        "shape": {"batch": shape.batch, "height": shape.height, "width": shape.width},
        "max_abs_err": max(errors),
        "psnr_db": finite(min(psnrs)),
    }


def _platform_name() -> str:
    import platform

    return platform.system() or sys.platform
