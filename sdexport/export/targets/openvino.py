"""OpenVINO target: IR (model.xml + model.bin) per component, NNCF weight compression, hybrid and full int8.

Frontend: ``openvino.convert_model`` straight from the torch module (TorchScript trace of the spec's
example inputs), not from an ONNX export. Measured on this project's CPU (2 cores, AVX-512 BF16),
SD 1.5 architecture U-Net at 256x256, batch 2, 2 threads, INFERENCE_PRECISION_HINT f32:

                          torch frontend        ONNX frontend (export_torch + clean_graph)
    ops in the IR         2,426                 2,774 (GroupNorm as Reshape+MVN: 109 MVN, 109 ShapeOf)
    conversion            100 s                 182 s
    parity vs torch       129.0 dB              129.1 dB
    dynamic shapes        954 ms                1,000 ms
    static shapes         890 ms                894 ms
    static, bf16 hint     494 ms                504 ms

The torch frontend keeps GroupNormalization and ScaledDotProductAttention as single ops (fused CPU
kernels), converts in half the time, needs no 2 GB protobuf workaround, and is as exact. The ONNX
route stays selectable (``frontend = "onnx"`` in the profile's ``openvino`` table) for models the
tracer cannot follow.

Precisions (``Converted.details`` records per component what was done: weight format per op type,
bytes per element type, file sizes, calibration):

- ``fp32``: weights as exported (``compress_to_fp16=False``). With static shapes the export also
  measures, per 3x3 convolution shape, whether Winograd F(2)/F(4) beats the CPU plugin's direct
  convolution at f32 and records the plan (``details["winograd"]``); the runtime applies it when it
  compiles for the CPU at f32 (``winograd`` = auto | off | f2 | f4 in the profile's ``openvino`` table or
  ``--winograd``; see :mod:`sdexport.export.targets.winograd_tuning`). The IR on disk is unchanged by it.
- ``fp16``: weights stored in fp16, decompressed at load; compute precision is the runtime's hint.
- ``int8``: NNCF weight-only compression, int8 asymmetric per output channel, of every MatMul,
  Convolution and embedding; activations stay floating point.
- ``int4``: int4 (asymmetric, groups of 64 input channels) for the MatMul weights of the U-Net and
  ControlNets; their convolutions, embeddings and last MatMul stay int8. The text encoder and the
  VAE stay int8, by measurement (PSNR of the component output against torch fp32, dB; tiny test
  model / SD 1.5 architecture with random weights):

      component       int8          int4          size int8 -> int4 (SD 1.5)
      text encoder    53.9 / 50.3   30.3 / 29.4   124 -> 85 MB: too lossy for a 30% saving
      VAE decoder     52.1 / 55.0   49.9 / 50.0   49.9 -> 49.3 MB: 4 MatMuls, nothing to gain
      U-Net           54.1 / 54.0   48.5 / 46.0   863 -> 739 MB (convolutions stay int8)

- ``hybrid``: the U-Net (plain and control) gets int8 weight-only compression of MatMul/embedding
  weights and full int8 quantization (weights and activations) of the rest, the convolutions, with
  activation ranges from real pipeline runs (:mod:`sdexport.quantize.calibration`), as optimum-intel's
  hybrid mode does; the other components get int8 weights.
- ``int8-static``: the U-Net fully quantized, int8 weights and int8 activations in front of the
  convolutions and the MatMuls too (NNCF's transformer preset: SmoothQuant off, as for hybrid), from
  the same calibration runs; the other components get int8 weights. SD 1.5 architecture, 256x256,
  bf16 hint, this CPU (``benchmarks/results/openvino-cpu-sd15-256.md``): 287 ms per U-Net call against
  hybrid's 346 ms (int8 VNNI MatMuls instead of bf16), U-Net parity 37.3 dB against torch (hybrid
  37.5 dB), image 39.4 dB against fp32 (hybrid 39.4 dB).
"""

from __future__ import annotations

import contextlib
import io
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
import torch

from runtime.manifest import TensorSpec
from sdexport.export.components import ComponentSpec
from sdexport.errors import ExportError
from sdexport.export.targets.base import Converted, ExportOptions, Target
from sdexport.options import OpenVinoOptions

XML, BIN = "model.xml", "model.bin"
OV_DTYPES = {"float32": ov.Type.f32, "float16": ov.Type.f16, "int64": ov.Type.i64, "int32": ov.Type.i32}
DTYPE_NAMES = {"f32": "float32", "f16": "float16", "i64": "int64", "i32": "int32"}

INT4_ROLES = ("unet", "controlnet")  # roles whose MatMul weights int4 applies to (see the module docstring)


# --- conversion ------------------------------------------------------------------------------


def _partial_shape(t: TensorSpec) -> ov.PartialShape:
    return ov.PartialShape([d if isinstance(d, int) else -1 for d in t.shape])


def convert_from_torch(spec: ComponentSpec, module: torch.nn.Module, example: tuple) -> ov.Model:
    """torch module -> ov.Model; symbolic dims dynamic (-1), fixed ints static.

    torch.jit.trace's own check (a second run compared with the first, on the same inputs) is off:
    it tripled the conversion time of the tiny U-Net (10.7 -> 3.3 CPU s, identical IR), and every
    export is compared with torch afterwards anyway, at another shape.
    """
    from openvino.frontend.pytorch.ts_decoder import TorchScriptPythonDecoder

    inputs = [(_partial_shape(t), OV_DTYPES[t.dtype]) for t in spec.inputs]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow are expected here
        decoder = TorchScriptPythonDecoder(module, example_input=example, trace_kwargs={"check_trace": False})
        return ov.convert_model(decoder, example_input=example, input=inputs)


def convert_from_onnx(spec: ComponentSpec, module: torch.nn.Module, example: tuple, scratch: Path) -> ov.Model:
    import onnx

    from sdexport.export.targets.onnx import clean_file, clean_graph, export_torch, has_external_data, save

    raw = scratch / "raw.onnx"
    export_torch(spec, module, example, raw)
    if has_external_data(raw):  # past 2 GB (SDXL's U-Net): weights streamed, not loaded
        files = clean_file(raw, scratch / "clean")
    else:
        files = save(clean_graph(onnx.load(str(raw))), scratch / "clean")
    model = ov.convert_model(str(files[0]))
    # the ONNX graph keeps the dims symbolic; fix the ones the spec fixes
    model.reshape({model.inputs[i]: _partial_shape(t) for i, t in enumerate(spec.inputs)})
    return model


def name_ports(model: ov.Model, spec: ComponentSpec) -> None:
    """Input and output tensor names exactly as the spec (and so the manifest) says."""
    if len(model.inputs) != len(spec.inputs) or len(model.outputs) != len(spec.outputs):
        raise ExportError(
            f"{spec.name}: converted model has {len(model.inputs)} inputs / {len(model.outputs)} outputs, "
            f"the spec {len(spec.inputs)} / {len(spec.outputs)}"
        )
    for port, t in zip(model.inputs, spec.inputs):
        port.get_tensor().set_names({t.name})
    for port, t in zip(model.outputs, spec.outputs):
        port.get_tensor().set_names({t.name})


def io_specs(model: ov.Model, spec: ComponentSpec) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """Dtypes as the IR declares them, shapes (fixed or symbolic) from the spec."""

    def fix(port, t: TensorSpec) -> TensorSpec:
        dtype = DTYPE_NAMES.get(port.get_element_type().get_type_name())
        if dtype is None:
            raise ExportError(f"{spec.name}: {t.name} has element type {port.get_element_type()}, which the runtime cannot feed")
        return TensorSpec(t.name, dtype, t.shape)

    return (tuple(fix(p, t) for p, t in zip(model.inputs, spec.inputs)),
            tuple(fix(p, t) for p, t in zip(model.outputs, spec.outputs)))


# --- compression -----------------------------------------------------------------------------


_WEIGHT_PATH = ("Convert", "Reshape", "FakeQuantize", "Transpose", "Subtract", "Multiply")
WEIGHTED_OPS = ("MatMul", "Convolution", "GroupConvolution", "ConvolutionBackpropData", "Gather")


def _weight_constant(op, port: int):
    """The Constant behind an op input, through the decompression chain NNCF and save_model leave
    (Constant -> Convert -> Subtract zero point -> Multiply scale -> Reshape, or FakeQuantize)."""
    node = op.input_value(port).get_node()
    while node.get_type_name() in _WEIGHT_PATH and node.inputs():
        node = node.input_value(0).get_node()
    return node if node.get_type_name() == "Constant" else None


def weight_formats(model: ov.Model) -> dict[str, dict[str, int]]:
    """Per weighted op type, how many ops store their weights in each element type (u4, u8, i8, f16, f32)."""
    out: dict[str, dict[str, int]] = {}
    for op in model.get_ops():
        kind = op.get_type_name()
        if kind not in WEIGHTED_OPS:
            continue
        port = 0 if kind == "Gather" else 1
        const = _weight_constant(op, port)
        if const is None or (kind == "Gather" and not op.input_value(0).get_element_type().is_real()):
            continue
        fmt = const.get_element_type().get_type_name()
        out.setdefault(kind, {})[fmt] = out.setdefault(kind, {}).get(fmt, 0) + 1
    return out


def activation_quantizers(model: ov.Model) -> dict[str, int]:
    """FakeQuantize ops on activations (not on weights), counted by the op type they feed."""
    out: dict[str, int] = {}
    for op in model.get_ops():
        if op.get_type_name() == "FakeQuantize" and _weight_constant(op, 0) is None:
            for target in op.output(0).get_target_inputs():
                kind = target.get_node().get_type_name()
                out[kind] = out.get(kind, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def weighted_matmuls_and_embeddings(model: ov.Model) -> list[str]:
    """Ops whose weights hybrid quantization compresses (and whose activations it leaves alone)."""
    names = []
    for op in model.get_ops():
        kind = op.get_type_name()
        if kind == "MatMul" and (_weight_constant(op, 0) is not None or _weight_constant(op, 1) is not None):
            names.append(op.get_friendly_name())
        elif kind == "Gather" and op.input_value(0).get_element_type().is_real() and _weight_constant(op, 0) is not None:
            names.append(op.get_friendly_name())
    return names


def weight_bytes(model: ov.Model) -> dict[str, int]:
    """Bytes of constants per element type: what compression did, in numbers."""
    out: dict[str, int] = {}
    for op in model.get_ops():
        if op.get_type_name() == "Constant":
            t = op.get_element_type()
            shape = op.get_output_partial_shape(0)
            if shape.is_static:
                n = int(np.prod([d.get_length() for d in shape])) if len(shape) else 1
                out[t.get_type_name()] = out.get(t.get_type_name(), 0) + (n * t.bitwidth + 7) // 8
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


@contextlib.contextmanager
def _quiet_nncf():
    """NNCF logs tables and draws rich progress bars on stdout; the export has its own progress."""
    import nncf

    nncf.set_log_level(40)  # errors only
    with contextlib.redirect_stdout(io.StringIO()):
        yield nncf


def compress_int8(model: ov.Model, ignored_types: tuple[str, ...] = ()) -> ov.Model:
    with _quiet_nncf() as nncf:
        ignored = nncf.IgnoredScope(types=list(ignored_types)) if ignored_types else None
        return nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM, ignored_scope=ignored)


def compress_int4(model: ov.Model, group_size: int) -> ov.Model:
    """int4 for MatMul weights (groups of ``group_size`` input channels), int8 for the rest."""
    with _quiet_nncf() as nncf:
        return nncf.compress_weights(
            model, mode=nncf.CompressWeightsMode.INT4_ASYM, group_size=group_size, ratio=1.0,
            advanced_parameters=nncf.AdvancedCompressionParameters(
                group_size_fallback_mode=nncf.GroupSizeFallbackMode.ADJUST),
        )


def _quantize(model: ov.Model, feeds: list[dict[str, np.ndarray]], keep_float: list[str] = ()) -> ov.Model:
    """NNCF post-training quantization (transformer preset, SmoothQuant off as optimum-intel does),
    activation ranges from the feeds; the ops named in ``keep_float`` keep float activations."""
    with _quiet_nncf() as nncf:
        return nncf.quantize(
            model,
            nncf.Dataset(feeds),
            subset_size=len(feeds),
            model_type=nncf.ModelType.TRANSFORMER,
            ignored_scope=nncf.IgnoredScope(names=list(keep_float), validate=False) if keep_float else None,
            advanced_parameters=nncf.AdvancedQuantizationParameters(
                smooth_quant_alphas=nncf.AdvancedSmoothQuantParameters(matmul=-1)
            ),
        )


def hybrid_quantize(model: ov.Model, feeds: list[dict[str, np.ndarray]]) -> ov.Model:
    """Weights of MatMul/embeddings to int8 (weight-only); everything else (convolutions) gets int8
    weights and int8 activations, with ranges from the calibration feeds."""
    keep_float_activations = weighted_matmuls_and_embeddings(model)
    has_conv = any(op.get_type_name() == "Convolution" for op in model.get_ops())
    model = compress_int8(model, ignored_types=("Convolution",) if has_conv else ())
    return _quantize(model, feeds, keep_float_activations)


def full_quantize(model: ov.Model, feeds: list[dict[str, np.ndarray]]) -> ov.Model:
    """int8 weights and activations wherever the transformer preset puts quantizers, MatMuls included."""
    return _quantize(model, feeds)


CALIBRATED = ("hybrid", "int8-static")  # precisions whose U-Net is calibrated on pipeline runs


def save(model: ov.Model, out_dir: Path, compress_to_fp16: bool) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, out_dir / XML, compress_to_fp16=compress_to_fp16)
    return [out_dir / XML, out_dir / BIN]


# --- the target ------------------------------------------------------------------------------


class OpenVinoTarget(Target):
    name = "openvino"
    backend = "openvino"
    precisions = ("fp32", "fp16", "int8", "int4", "hybrid", "int8-static")
    # Backend options for the parity check at export, over whatever the profile asks for at run time:
    # f32 compute (the CPU plugin would pick bf16 on AVX-512 BF16 / AMX CPUs) and no compiled-model
    # cache (a staging directory compiled once would only leave blobs behind).
    validation_options = {"precision_hint": "f32", "cache_dir": ""}
    file_names = (XML, BIN)  # what a dry run plans

    def convert(self, spec: ComponentSpec, module: torch.nn.Module, out_dir: Path, options: ExportOptions,
                precision: str) -> Converted:
        if precision not in self.precisions:
            raise ExportError(f"the openvino target supports precisions {', '.join(self.precisions)}, not {precision!r}")
        settings = options.openvino
        shape = options.trace_shape(spec)
        example = spec.example(shape, torch.Generator().manual_seed(0))
        details: dict[str, Any] = {}
        calibration = None
        if precision in CALIBRATED and spec.role == "unet":
            from sdexport.quantize.onnx import calibration_feeds

            # before conversion: the calibration runs use this same torch U-Net (LoRAs fused, say);
            # settings from the profile's [quantize] table / --calibration-prompts / --calibration-steps
            calibration = calibration_feeds(spec, module, options)

        with tempfile.TemporaryDirectory(prefix="sdexport-openvino-") as scratch:
            try:
                if settings.frontend == "torch":
                    model = convert_from_torch(spec, module, example)
                    details["frontend"] = "openvino.convert_model from torch (TorchScript trace)"
                else:
                    model = convert_from_onnx(spec, module, example, Path(scratch))
                    details["frontend"] = "openvino.convert_model from ONNX (torch.onnx TorchScript exporter)"
            except ExportError:
                raise
            except Exception as e:
                first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
                raise ExportError(f"{spec.name}: OpenVINO conversion failed ({type(e).__name__}: {first})") from None
            name_ports(model, spec)
            fp32_bytes = sum(weight_bytes(model).values())
            model, effective, weights = self._compress(spec, model, precision, settings, calibration)
            details["weights"] = weights
            if effective == "fp32":
                from sdexport.export.targets.winograd_tuning import plan as winograd_plan

                threads = options.backend.threads or 0
                winograd = winograd_plan(model, settings.winograd, threads=threads, label=spec.name)
                if winograd is not None:
                    details["winograd"] = winograd
            if calibration is not None:
                details["calibration"] = calibration[1]
            files = save(model, out_dir, compress_to_fp16=(effective == "fp16"))
        details["weight_formats"] = weight_formats(model)  # counted on the saved graph
        if effective in CALIBRATED:
            details["activation_quantizers"] = activation_quantizers(model)
        details["constant_bytes"] = weight_bytes(model)
        details["fp32_constant_bytes"] = fp32_bytes
        details["file_bytes"] = {f.name: f.stat().st_size for f in files}
        details["dynamic_inputs"] = sorted({d for t in spec.inputs for d in t.shape if isinstance(d, str)})
        inputs, outputs = io_specs(model, spec)
        return Converted(files=files, precision=effective, inputs=inputs, outputs=outputs, details=details)

    @staticmethod
    def _compress(spec: ComponentSpec, model: ov.Model, precision: str, settings: OpenVinoOptions,
                  calibration) -> tuple[ov.Model, str, dict]:
        """Apply the precision; returns the model, the precision it really has, and what was done."""
        if precision == "fp32":
            return model, "fp32", {"format": "fp32"}
        if precision == "fp16":
            return model, "fp16", {"format": "fp16", "note": "stored in fp16, decompressed at load; compute precision is the runtime hint"}
        if precision == "int4" and spec.role in INT4_ROLES:
            model = compress_int4(model, settings.int4_group_size)
            return model, "int4", {
                "format": f"int4_asym group {settings.int4_group_size} (MatMul), int8_asym per-channel (Convolution, embeddings, last MatMul)",
                "kept_higher": "convolutions, embeddings and the last MatMul at int8; activations float; biases and norms fp32",
            }
        if precision == "hybrid" and calibration is not None:
            model = hybrid_quantize(model, calibration[0])
            return model, "hybrid", {
                "format": "int8_asym weight-only (MatMul, embeddings) + int8_sym weights and int8 activations "
                          "(Convolution; see activation_quantizers for every op whose inputs are quantized)",
                "kept_higher": "MatMul/embedding activations float; biases and norms fp32",
            }
        if precision == "int8-static" and calibration is not None:
            model = full_quantize(model, calibration[0])
            return model, "int8-static", {
                "format": "int8 weights and int8 activations (Convolution and MatMul; see activation_quantizers)",
                "kept_higher": "what NNCF's transformer preset keeps float (softmax, normalizations); biases fp32",
            }
        model = compress_int8(model)
        weights = {"format": "int8_asym per-channel weight-only (MatMul, Convolution, embeddings)",
                   "kept_higher": "activations float; biases and norms fp32"}
        if precision != "int8":
            weights["requested"] = precision
            weights["why_int8"] = (f"{precision} applies to {', '.join(INT4_ROLES)} only" if precision == "int4"
                                   else f"{precision} quantization applies to the U-Net; other components get int8 weights")
        return model, "int8", weights
