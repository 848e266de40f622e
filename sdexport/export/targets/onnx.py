"""ONNX target: torch.onnx export, graph clean-up, fp16 conversion, external data past 2 GB.

Each component is exported in fp32 first: graph optimisers (ours and ONNX Runtime's fusions) match
fp32 patterns, and fp16 is a conversion of the cleaned fp32 graph that keeps the inputs and outputs
in float32 (the runtime feeds float32 everywhere) and leaves overflow-prone ops in fp32.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import onnx
import torch

from runtime.manifest import TensorSpec
from sdexport.export.components import ComponentSpec, Shape
from sdexport.errors import ExportError
from sdexport.quantize.onnx import QUANTIZED_PRECISIONS, quantize_component
from sdexport.export.targets.base import Converted, ExportOptions, Target

PROTOBUF_LIMIT = 2**31 - 2**24  # leave headroom below protobuf's 2 GiB message limit
EXTERNAL_DATA = "model.onnx_data"
OPSET = 17


def _dynamic_axes(spec: ComponentSpec) -> dict[str, dict[int, str]]:
    axes = {}
    for t in spec.inputs + spec.outputs:
        dims = {i: d for i, d in enumerate(t.shape) if isinstance(d, str)}
        if dims:
            axes[t.name] = dims
    return axes


def export_torch(spec: ComponentSpec, module: torch.nn.Module, example: tuple, path: Path) -> None:
    """torch -> ONNX with the spec's names and symbolic axes.

    The TorchScript exporter (``dynamo=False``) is used: it is an order of magnitude faster than the
    dynamo exporter on a U-Net, and its graphs are the ones ONNX Runtime's transformer fusions match.
    """
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow are expected here
        torch.onnx.export(
            module, example, str(path),
            input_names=[t.name for t in spec.inputs], output_names=[t.name for t in spec.outputs],
            dynamic_axes=_dynamic_axes(spec), opset_version=OPSET, do_constant_folding=True, dynamo=False,
        )


def _clean_ir(model_ir) -> None:
    import onnx_ir.passes.common as passes
    import onnxscript.optimizer

    # onnxscript's optimizer folds what torch's exporter leaves (shape arithmetic on constants).
    onnxscript.optimizer.optimize_ir(model_ir, num_iterations=2)
    passes.DeduplicateInitializersPass()(model_ir)
    passes.RemoveUnusedNodesPass()(model_ir)


def clean_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """Constant folding, dead nodes and duplicated initializers out: a leaner file, same math."""
    import onnx_ir as ir

    model_ir = ir.from_proto(model)
    _clean_ir(model_ir)
    return ir.to_proto(model_ir)


def has_external_data(path: Path) -> bool:
    """Whether torch wrote this graph's weights beside it (a graph past protobuf's 2 GB limit)."""
    graph = onnx.load(str(path), load_external_data=False).graph
    return any(init.data_location == onnx.TensorProto.EXTERNAL for init in graph.initializer)


def clean_file(raw: Path, directory: Path) -> list[Path]:
    """:func:`clean_graph` for a graph whose weights are external data, file to file.

    Loaded with ``onnx_ir``, the weights stay memory-mapped on disk and are streamed into one
    external data file: the fp32 SDXL U-Net (10 GB of weights) is cleaned and written without a
    second in-memory copy beside the torch module that is still held for validation.
    """
    import onnx_ir as ir

    model_ir = ir.load(raw)
    _clean_ir(model_ir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "model.onnx"
    ir.save(model_ir, path, external_data=EXTERNAL_DATA, size_threshold_bytes=1024)
    return [path, directory / EXTERNAL_DATA]


def to_fp16(model: onnx.ModelProto, block_ops: tuple[str, ...], workdir: Path) -> onnx.ModelProto:
    from onnxruntime.transformers import float16

    disable_infer = False
    # (model.ByteSize() itself fails on a proto over 2 GB: count the initializers, as save() does)
    if sum(init.ByteSize() for init in model.graph.initializer) > PROTOBUF_LIMIT:
        # shape inference on a proto over 2 GB only works from a file
        path = workdir / "infer.onnx"
        onnx.save_model(model, str(path), save_as_external_data=True, location="infer.onnx_data")
        onnx.shape_inference.infer_shapes_path(str(path), str(path))
        model = onnx.load(str(path))
        disable_infer = True
    return float16.convert_float_to_float16(
        model,
        keep_io_types=True,
        disable_shape_infer=disable_infer,
        op_block_list=list(float16.DEFAULT_OP_BLOCK_LIST) + list(block_ops),
    )


def save(model: onnx.ModelProto, directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "model.onnx"
    size = sum(init.ByteSize() for init in model.graph.initializer)
    if size > PROTOBUF_LIMIT:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=EXTERNAL_DATA, size_threshold=1024)
        return [path, directory / EXTERNAL_DATA]
    onnx.save_model(model, str(path))
    return [path]


def _io_specs(model: onnx.ModelProto, spec: ComponentSpec) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """Input/output specs as the written graph declares them (dtype from the graph, shapes from the spec)."""
    dtype_names = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
                   onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT32: "int32"}
    declared = {v.name: dtype_names.get(v.type.tensor_type.elem_type, "float32")
                for v in list(model.graph.input) + list(model.graph.output)}
    missing = [t.name for t in spec.inputs + spec.outputs if t.name not in declared]
    if missing:
        raise ExportError(f"{spec.name}: exported graph lacks {', '.join(missing)}")
    fix = lambda t: TensorSpec(t.name, declared[t.name], t.shape)  # noqa: E731
    return tuple(map(fix, spec.inputs)), tuple(map(fix, spec.outputs))


def optimize_mode(options: ExportOptions) -> str:
    """``--optimize`` / the profile's ``[onnx] optimize``: "none" or "gpu"."""
    return options.onnx.optimize


def optimize_gpu(spec: ComponentSpec, model: onnx.ModelProto, precision: str, options: ExportOptions,
                 scratch: Path) -> tuple[onnx.ModelProto, dict]:
    """``--optimize gpu``: onnxruntime.transformers fusions on the fp32 graph, then fp16 with fp32
    islands found by running the fp32 graph on example inputs (at most 256 px: memory stays bounded)."""
    from sdexport.export.targets.onnx_gpu import optimize_for_gpu

    if precision not in ("fp32", "fp16"):
        raise ExportError(f"--optimize gpu works with --precision fp32 or fp16, not {precision}")
    probe = None
    if precision == "fp16":
        shape = options.trace_shape(spec)
        if not options.static:
            shape = Shape(shape.batch, min(shape.height, 256), min(shape.width, 256))
        example = spec.example(shape, torch.Generator().manual_seed(0))
        probe = {t.name: x.numpy() for t, x in zip(spec.inputs, example)}
    model, details = optimize_for_gpu(model, spec.role, precision, scratch / "gpu", probe_feeds=probe,
                                      block_ops=spec.fp16_block_ops)
    if precision == "fp16":
        details["kept_fp32"] = {"io": "inputs and outputs stay float32", "op_types": sorted(set(spec.fp16_block_ops))}
    return model, details


class OnnxTarget(Target):
    """fp32 and fp16 graphs, and the int8 precisions of :mod:`sdexport.quantize.onnx`:
    ``int8`` (int8 weights, activations quantized at run time, no calibration), ``int8-static``
    (QDQ, calibrated on real pipeline runs) and ``mixed`` (int8-static with the blocks most sensitive
    to it kept in float, to meet the profile's / ``--min-psnr`` target)."""

    name = "onnx"
    backend = "onnxruntime"
    precisions = ("fp32", "fp16", "int8", "int8-static", "mixed")
    file_names = ("model.onnx",)

    def convert(self, spec: ComponentSpec, module: torch.nn.Module, out_dir: Path, options: ExportOptions,
                precision: str) -> Converted:
        if precision not in self.precisions:
            raise ExportError(f"the onnx target supports precisions {', '.join(self.precisions)}, not {precision!r}")
        shape = options.trace_shape(spec)
        example = spec.example(shape, torch.Generator().manual_seed(0))
        with tempfile.TemporaryDirectory(prefix="sdexport-onnx-") as scratch:
            raw = Path(scratch) / "raw.onnx"
            try:
                export_torch(spec, module, example, raw)
            except ExportError:
                raise
            except Exception as e:
                raise ExportError(f"{spec.name}: torch.onnx export failed ({type(e).__name__}: {str(e).splitlines()[0][:300]})") from None
            if precision == "fp32" and optimize_mode(options) != "gpu" and has_external_data(raw):
                return self._convert_large(spec, raw, out_dir)
            model = onnx.load(str(raw))  # also pulls in external data the exporter wrote
            model = clean_graph(model)
            details = self._details(model)
            if optimize_mode(options) == "gpu":
                model, more = optimize_gpu(spec, model, precision, options, Path(scratch))
                details.update(more)
            elif precision == "fp16":
                model = to_fp16(model, spec.fp16_block_ops, Path(scratch))
                details["kept_fp32"] = {
                    "io": "inputs and outputs stay float32",
                    "op_types": sorted(set(spec.fp16_block_ops)),
                }
            elif precision in QUANTIZED_PRECISIONS:
                model, precision, more = quantize_component(spec, module, model, precision, options, Path(scratch))
                details.update(more)
            inputs, outputs = _io_specs(model, spec)
            files = save(model, out_dir)
            if "quantization" in details:
                details["quantization"]["bytes"] = sum(f.stat().st_size for f in files)  # as written
        return Converted(files=files, precision=precision, inputs=inputs, outputs=outputs, details=details)

    @staticmethod
    def _details(model: onnx.ModelProto) -> dict:
        opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=OPSET)
        return {"opset": opset, "exporter": "torch.onnx (TorchScript)"}

    def _convert_large(self, spec: ComponentSpec, raw: Path, out_dir: Path) -> Converted:
        files = clean_file(raw, out_dir)
        model = onnx.load(str(files[0]), load_external_data=False)
        inputs, outputs = _io_specs(model, spec)
        details = {**self._details(model), "external_data": "weights streamed file to file (graph over 2 GB)"}
        return Converted(files=files, precision="fp32", inputs=inputs, outputs=outputs, details=details)
