"""int8 quantization of ONNX components with onnxruntime.quantization, measured as it goes.

The onnx target's quantized precisions (``--precision``):

- ``int8``: int8 weights without calibration. MatMul/Gemm weights (linear layers, per output channel)
  and, for the U-Net, convolution weights too; activations are quantized per call at run time
  ("dynamic" quantization: DynamicQuantizeLinear + MatMulInteger / ConvInteger), so no calibration
  run is needed and every execution provider with integer kernels (x86 VNNI, arm64 dot-product) runs it.
- ``int8-static``: the U-Net as standard QDQ (QuantizeLinear/DequantizeLinear pairs, opset 17): int8
  weights per output channel, int8 activations with ranges calibrated on real pipeline runs
  (:mod:`sdexport.quantize.calibration`). Convolutions, linear layers and the time-embedding Gemms are
  quantized; attention score/value MatMuls (two activations), Softmax, GroupNorm
  (InstanceNormalization), LayerNorm and the elementwise ops stay float. ONNX Runtime fuses the
  pairs into QLinearConv / QLinearMatMul; TensorRT builds int8 engines from the same file.
- ``mixed``: ``int8-static`` where it is accurate enough, float where it is not. A sensitivity pass
  quantizes one U-Net block at a time and measures the output PSNR against fp32 on calibration
  inputs; the most sensitive blocks are kept in float (weights stored in fp16) until the whole
  model meets ``min_psnr`` on the calibration set, while the file stays smaller than fp16. When no
  such recipe exists the export fails with the best PSNR reached.

The text encoder gets dynamic int8 under all three (no calibration needed, its error is small); the
VAE and ControlNets get int8 weights with float activations (see ``ROLE_PLANS`` for the measurements
behind each choice).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx

from sdexport.errors import ExportError, OptionError

QUANTIZED_PRECISIONS = ("int8", "int8-static", "mixed")
DEFAULT_MIN_PSNR = 35.0
STATIC_ROLES = ("unet",)  # roles with recorded calibration inputs (a ControlNet has none)

# What each quantized precision does to each component role:
#   "weights": int8 weights without calibration (WEIGHT_OP_TYPES: dynamic MatMuls, weight-only convolutions)
#   "static":  QDQ int8 weights and activations, calibrated
#   "mixed":   static, with the most sensitive blocks kept in float to meet min_psnr
# Measured against fp32 on recorded inputs (tiny test pipeline / SD 1.5 architecture, random weights):
#   U-Net    weights 60.3 dB (SD 1.5), static 37.2 dB (tiny) / see benchmarks/results/quantize-cpu-sd15.md
#   VAE      weights: decoder 58.8 dB, encoder 52.6 dB (tiny); static: decoder 45.6 dB, encoder 38.4 dB,
#            so the VAE keeps float activations under every precision
#   text     weights 51.1 dB (tiny), 4x smaller with the embedding table
# A ControlNet has no recorded inputs (calibration records the U-Net's), so it gets int8 weights.
_WEIGHTS = dict.fromkeys(("text_encoder", "unet", "controlnet", "vae_encoder", "vae_decoder"), "weights")
ROLE_PLANS: dict[str, dict[str, str]] = {
    "int8": dict(_WEIGHTS),
    "int8-static": {**_WEIGHTS, "unet": "static"},
    "mixed": {**_WEIGHTS, "unet": "mixed"},
}


@contextlib.contextmanager
def _quiet():
    """onnxruntime.quantization logs advice through the root logger; the export has its own output."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


# --- recipes ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StaticRecipe:
    """A static QDQ quantization: which ops get int8 inputs and weights, and how."""

    op_types: tuple[str, ...] = ("Conv", "MatMul", "Gemm")
    activations: str = "int8"  # "int8": signed symmetric (TensorRT, arm64); "uint8": asymmetric
    per_channel: bool = True
    keep_float: tuple[str, ...] = ()  # node names left unquantized (mixed precision)
    # Blocks never quantized: conv_in reads the latent itself, and int8 there costs the tiny U-Net
    # 1.5 dB on held-out inputs (33.7 -> 35.1 dB) for 0.001% of the SD 1.5 weights.
    float_blocks: tuple[str, ...] = ("conv_in",)
    calibrate_method: str = "minmax"  # "minmax" | "percentile" | "entropy" (the last two measured no better)

    def describe(self) -> dict:
        return {
            "format": "QDQ (QuantizeLinear/DequantizeLinear), opset 17",
            "op_types": list(self.op_types),
            "matmul": "linear layers only (constant weights); attention score/value MatMuls stay float",
            "weights": "int8 symmetric" + (", per output channel" if self.per_channel else ", per tensor"),
            "activations": "int8 symmetric (zero point 0)" if self.activations == "int8" else "uint8 asymmetric",
            "calibration_method": self.calibrate_method,
            "float_blocks": list(self.float_blocks),
            "kept_float_nodes": len(self.keep_float),
        }


def _quant_types(recipe: StaticRecipe):
    from onnxruntime.quantization import QuantType

    act = QuantType.QInt8 if recipe.activations == "int8" else QuantType.QUInt8
    return act, QuantType.QInt8


def _calibrate_method(name: str):
    from onnxruntime.quantization import CalibrationMethod

    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    if name not in methods:
        raise OptionError(f"calibration method {name!r}: use one of {', '.join(methods)}")
    return methods[name]


class FeedReader:
    """onnxruntime's CalibrationDataReader over recorded feeds (dicts of numpy arrays)."""

    def __init__(self, feeds: Sequence[Mapping[str, np.ndarray]], names: Iterable[str]):
        names = list(names)
        self.feeds = [{k: np.ascontiguousarray(f[k]) for k in names} for f in feeds]
        self.index = 0

    def get_next(self):
        if self.index >= len(self.feeds):
            return None
        self.index += 1
        return self.feeds[self.index - 1]

    def rewind(self):
        self.index = 0

    def __len__(self):
        return len(self.feeds)

    def __iter__(self):
        return iter(self.feeds)

    def set_range(self, start_index: int, end_index: int):
        self.feeds = self.feeds[start_index:end_index]
        self.index = 0


# --- model files -----------------------------------------------------------------------------


def save_model(model: onnx.ModelProto, path: Path) -> Path:
    """Save with external data when big (quantizers and ORT read both)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    large = sum(i.ByteSize() for i in model.graph.initializer) > (1 << 30)
    if large:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + "_data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))
    return path


def model_bytes(path: Path) -> int:
    """The model file and its external data."""
    total = path.stat().st_size
    data = path.with_name(path.name + "_data")
    if data.exists():
        total += data.stat().st_size
    data = path.with_name(path.name + ".data")
    if data.exists():
        total += data.stat().st_size
    return total


def float_weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of float32 initializers: what an fp16 conversion halves."""
    return sum(int(np.prod(i.dims)) * 4 for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT)


def name_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every node gets a unique name (quantizer include/exclude lists address nodes by name)."""
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.name or node.op_type}_{i}"
        seen.add(node.name)
    return model


def _constants(model: onnx.ModelProto) -> set[str]:
    names = {i.name for i in model.graph.initializer}
    names |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return names


def quantizable_nodes(model: onnx.ModelProto, op_types: Sequence[str], float_blocks: Sequence[str] = ()) -> list[str]:
    """Nodes a static recipe quantizes: the op types asked for, MatMuls only with a constant weight,
    none in ``float_blocks``."""
    consts = _constants(model)
    out = []
    for node in model.graph.node:
        if node.op_type not in op_types or block_of(node.name) in float_blocks:
            continue
        if node.op_type == "MatMul" and node.input[1] not in consts:
            continue  # attention: activation x activation
        out.append(node.name)
    return out


_WRAPPERS = {"unet", "controlnet", "vae", "model", "text_model"}


def block_of(node_name: str) -> str:
    """The top-level model block a node belongs to, from the exporter's scope names:
    ``/unet/down_blocks.1/attentions.0/.../Conv`` -> ``down_blocks.1``."""
    parts = [p for p in node_name.split("/") if p]
    while len(parts) > 2 and parts[0] in _WRAPPERS:
        parts = parts[1:]
    return parts[0] if len(parts) >= 2 else "other"


# --- running ---------------------------------------------------------------------------------


def run_outputs(path: Path, feeds: Sequence[Mapping[str, np.ndarray]]) -> list[list[np.ndarray]]:
    from runtime.backends.onnxruntime import create_session

    session = create_session(path)
    names = [i.name for i in session.get_inputs()]
    return [session.run(None, {k: f[k] for k in names}) for f in feeds]


def compare(reference: list[list[np.ndarray]], test: list[list[np.ndarray]]) -> dict:
    """PSNR of each output pooled over all feeds (the worst output decides), and the worst single feed."""
    from runtime.metrics import finite, pooled_psnr

    pooled, worst = zip(*(pooled_psnr([r[i] for r in reference], [t[i] for t in test])
                          for i in range(len(reference[0]))))
    return {"psnr_db": finite(min(pooled)), "psnr_db_worst_input": finite(min(worst))}


def _mse_at(psnr_db: float | None, peak2: float) -> float:
    return 0.0 if psnr_db is None else peak2 / 10 ** (psnr_db / 10)


# --- weight-only and dynamic int8 ------------------------------------------------------------


def _weight_axis(node, weight: np.ndarray) -> int:
    """The output-channel axis of a weight: Conv [O, I, kh, kw] -> 0; MatMul [K, N] -> last;
    Gemm [K, N] -> 1, or 0 with transB."""
    if node.op_type in ("Conv", "ConvTranspose"):
        return 0 if node.op_type == "Conv" else 1
    if node.op_type == "Gemm":
        return 0 if any(a.name == "transB" and a.i for a in node.attribute) else 1
    return weight.ndim - 1


def weight_only_int8(model: onnx.ModelProto, op_types: Sequence[str]) -> tuple[onnx.ModelProto, int]:
    """int8 weights (symmetric, per output channel) behind a DequantizeLinear: stored 4x smaller,
    computed in float. Returns the model and the number of weights converted."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    users: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    dq_nodes, converted, done = [], 0, set()
    for node in model.graph.node:
        if node.op_type not in op_types or len(node.input) < 2:
            continue
        name = node.input[1]
        if name in done or name not in inits or inits[name].data_type != onnx.TensorProto.FLOAT:
            continue
        if any(u.op_type not in op_types or list(u.input).index(name) != 1 for u in users[name]):
            continue  # shared with an op that reads it differently
        weight = numpy_helper.to_array(inits[name]).astype(np.float32)
        if weight.ndim < 2:
            continue
        axis = _weight_axis(node, weight)
        reduce = tuple(i for i in range(weight.ndim) if i != axis)
        scale = (np.abs(weight).max(axis=reduce) / 127.0).astype(np.float32)
        scale[scale == 0] = 1.0
        shape = [1] * weight.ndim
        shape[axis] = -1
        q = np.clip(np.round(weight / scale.reshape(shape)), -127, 127).astype(np.int8)
        model.graph.initializer.remove(inits[name])
        model.graph.initializer.extend([numpy_helper.from_array(q, name + "_int8"),
                                        numpy_helper.from_array(scale, name + "_scale"),
                                        numpy_helper.from_array(np.zeros(scale.shape, np.int8), name + "_zero_point")])
        dq_nodes.append(onnx.helper.make_node("DequantizeLinear", [name + "_int8", name + "_scale", name + "_zero_point"],
                                              [name], axis=axis, name=name + "_DequantizeLinear"))
        done.add(name)
        converted += weight.size
    for dq in reversed(dq_nodes):
        model.graph.node.insert(0, dq)
    return model, converted



def quantize_weights_int8(fp32_path: Path, out_path: Path, dynamic: Sequence[str], weight_only: Sequence[str]) -> dict:
    """int8 weights without calibration: ``dynamic`` op types get onnxruntime's dynamic quantization
    (int8 weights per output channel, activations quantized per call: DynamicQuantizeLinear +
    MatMulInteger, fused to DynamicQuantizeMatMul), ``weight_only`` op types int8 weights behind a
    DequantizeLinear with float compute.

    Convolutions are weight-only: ConvInteger, onnxruntime's dynamic convolution, made the SD 1.5 U-Net
    2.4x slower than fp32 on this project's CPU (19.4 s vs 8.2 s per call under load), while weight-only
    convolutions with dynamic MatMuls run 7% faster than fp32 at 60 dB (see ROLE_PLANS).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out_path.parent.mkdir(parents=True, exist_ok=True)
    source = fp32_path
    if dynamic:
        with _quiet():
            quantize_dynamic(str(fp32_path), str(out_path), op_types_to_quantize=list(dynamic), per_channel=True,
                             weight_type=QuantType.QInt8, use_external_data_format=True,
                             extra_options={"MatMulConstBOnly": True})
        source = out_path
    converted = 0
    if weight_only:
        model, converted = weight_only_int8(onnx.load(str(source)), weight_only)
        for stale in out_path.parent.glob(out_path.name + "*"):
            stale.unlink()
        save_model(model, out_path)
        del model
    return {
        "format": "int8 weights, no calibration",
        "dynamic": {"op_types": list(dynamic), "weights": "int8 symmetric, per output channel",
                    "activations": "quantized per call at run time (DynamicQuantizeLinear, uint8)"} if dynamic else None,
        "weight_only": {"op_types": list(weight_only), "weights": "int8 symmetric, per output channel",
                        "compute": "float (DequantizeLinear -> op)", "weights_converted": converted} if weight_only else None,
        "kept_higher": "activations float except the dynamic ops' inputs; biases and norms fp32",
    }


# --- static QDQ ------------------------------------------------------------------------------


def quantize_static_qdq(fp32_path: Path, out_path: Path, feeds: Sequence[Mapping[str, np.ndarray]],
                        recipe: StaticRecipe, ranges: Path, nodes: Sequence[str] | None = None) -> None:
    """QDQ int8 of ``nodes`` (default: every node :func:`quantizable_nodes` picks for the recipe), with
    activation ranges from ``feeds``.

    The node list is explicit because onnxruntime's QDQ quantizer ignores ``MatMulConstBOnly`` (only
    its QOperator path reads it): by op type alone it would quantize attention's score and value MatMuls.
    ``ranges`` caches the calibrated tensor ranges: the first call computes them over all feeds, later
    calls with other node sets (the sensitivity pass) reuse them.
    """
    from onnxruntime.quantization import QuantFormat, quantize_static

    activation_type, weight_type = _quant_types(recipe)
    model = onnx.load(str(fp32_path), load_external_data=False)
    names = [i.name for i in model.graph.input]
    if nodes is None:
        nodes = quantizable_nodes(model, recipe.op_types, recipe.float_blocks)
    nodes = [n for n in nodes if n not in set(recipe.keep_float)]
    del model
    if not nodes:  # onnxruntime reads an empty list as "every node"
        raise ExportError(f"{fp32_path.parent.name}: no node left to quantize")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with _quiet():
        quantize_static(
            str(fp32_path), str(out_path), FeedReader(feeds, names),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(recipe.op_types),
            per_channel=recipe.per_channel,
            activation_type=activation_type,
            weight_type=weight_type,
            nodes_to_quantize=nodes,
            use_external_data_format=True,
            calibrate_method=_calibrate_method(recipe.calibrate_method),
            calibration_cache_path=str(ranges),
            extra_options={
                "ActivationSymmetric": recipe.activations == "int8",
                "WeightSymmetric": True,
                # MinMax calibration keeps one ReduceMin/ReduceMax scalar pair per tensor and input, so its
                # memory is small. (CalibMaxIntermediateOutputs, meant to bound it, drops the collected
                # ranges in onnxruntime 1.32 instead of merging them: not used.)
            },
        )


def store_kept_weights_fp16(model: onnx.ModelProto, nodes: Iterable[str]) -> tuple[onnx.ModelProto, int]:
    """Float weights of the kept nodes stored as fp16 behind a Cast to fp32 (folded when the session
    loads, so compute stays fp32): the kept blocks cost half their fp32 bytes on disk."""
    from onnx import numpy_helper

    nodes = set(nodes)
    users: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    inits = {i.name: i for i in model.graph.initializer}
    casts, converted = [], 0
    for name, init in list(inits.items()):
        if init.data_type != onnx.TensorProto.FLOAT or len(init.dims) < 2:
            continue  # biases and scalars stay fp32
        consumers = users.get(name, [])
        if not consumers or not all(n.name in nodes for n in consumers):
            continue
        array = numpy_helper.to_array(init)
        if np.abs(array).max(initial=0) >= 65504:
            continue
        half = numpy_helper.from_array(array.astype(np.float16), name + "_fp16")
        model.graph.initializer.remove(init)
        model.graph.initializer.append(half)
        casts.append(onnx.helper.make_node("Cast", [half.name], [name], to=onnx.TensorProto.FLOAT, name=name + "_to_fp32"))
        converted += array.size
    for cast in reversed(casts):
        model.graph.node.insert(0, cast)
    return model, converted


@dataclasses.dataclass
class Measured:
    path: Path
    psnr_db: float | None
    psnr_db_worst_input: float | None
    bytes: int
    seconds: float


class StaticQuantizer:
    """Static QDQ builds of one fp32 model, each measured against fp32 on the same calibration inputs."""

    def __init__(self, fp32_path: Path, feeds: Sequence[Mapping[str, np.ndarray]], eval_feeds: Sequence[Mapping[str, np.ndarray]],
                 recipe: StaticRecipe, workdir: Path, log: Callable[[str], None] | None = None):
        self.fp32_path, self.feeds, self.eval_feeds = fp32_path, list(feeds), list(eval_feeds)
        self.recipe, self.workdir = recipe, workdir
        self.ranges = workdir / "ranges.json"
        self.log = log or (lambda message: None)
        self.reference = run_outputs(fp32_path, self.eval_feeds)
        # peak**2 of the pooled PSNR, per output (the first output decides for the U-Net)
        ref = np.concatenate([np.asarray(r[0], np.float64).ravel() for r in self.reference])
        self.peak2 = float(ref.max() - ref.min()) ** 2 or 1.0
        self.candidates = quantizable_nodes(onnx.load(str(fp32_path), load_external_data=False), recipe.op_types,
                                            recipe.float_blocks)
        self.builds = 0

    def build(self, label: str, nodes: Sequence[str] | None = None, keep_float: Sequence[str] = ()) -> Measured:
        """Quantize ``nodes`` (default: every candidate not in ``keep_float``); the weights of the
        ``keep_float`` nodes are stored in fp16. Measured against fp32 on the evaluation feeds."""
        start = time.perf_counter()
        self.builds += 1
        out = self.workdir / f"build{self.builds}" / "model.onnx"
        keep = set(keep_float)
        nodes = [n for n in (self.candidates if nodes is None else nodes) if n not in keep]
        if nodes:
            recipe = dataclasses.replace(self.recipe, keep_float=tuple(keep_float))
            quantize_static_qdq(self.fp32_path, out, self.feeds, recipe, self.ranges, nodes)
        if keep:
            model = onnx.load(str(out if nodes else self.fp32_path))
            model, _ = store_kept_weights_fp16(model, keep)
            shutil.rmtree(out.parent, ignore_errors=True)
            save_model(model, out)
            del model
        result = compare(self.reference, run_outputs(out, self.eval_feeds))
        measured = Measured(out, result["psnr_db"], result["psnr_db_worst_input"], model_bytes(out), time.perf_counter() - start)
        self.log(f"{label}: {_fmt_db(measured.psnr_db)} dB, {measured.bytes / 1e6:.1f} MB ({measured.seconds:.0f} s)")
        return measured

    def discard(self, m: Measured) -> None:
        shutil.rmtree(m.path.parent, ignore_errors=True)


def _fmt_db(value: float | None) -> str:
    return "inf" if value is None else f"{value:.1f}"


def _db(value: float | None) -> float:
    return math.inf if value is None else value


def sensitivity(quantizer: StaticQuantizer, groups: Mapping[str, Sequence[str]]) -> dict[str, dict]:
    """Each group quantized alone (everything else fp32): its PSNR and the error power it adds."""
    out = {}
    for name, nodes in groups.items():
        m = quantizer.build(f"only {name}", nodes=nodes)
        out[name] = {"nodes": len(nodes), "psnr_db": m.psnr_db, "mse": _mse_at(m.psnr_db, quantizer.peak2)}
        quantizer.discard(m)
    return out


def search_mixed(quantizer: StaticQuantizer, candidates: Sequence[str], min_psnr: float, size_limit: int,
                 full: Measured, margin: float = 0.8) -> tuple[Measured, dict]:
    """Keep the most sensitive blocks in float until the model meets ``min_psnr``.

    First a bound: the model with no quantization at all and fp16 weights (what keeping everything
    would give); a target above it fails at once. Then each block is quantized alone; their error
    powers add up (nearly) to the whole model's, so blocks are kept in order of error power until the
    predicted error is under the target (with ``margin``), and each prediction is checked by a real
    build, keeping more blocks until one meets the target. Raises ExportError, with the best PSNR
    reached, when no build does while staying under ``size_limit`` bytes (the fp16 file).
    """
    groups: dict[str, list[str]] = {}
    for node in candidates:
        groups.setdefault(block_of(node), []).append(node)
    report: dict[str, Any] = {"min_psnr_db": min_psnr, "blocks": {g: len(n) for g, n in groups.items()}}

    def fail(best: Measured, kept: Sequence[str], why: str = ""):
        where = f"with {', '.join(kept[:4])}{' ...' if len(kept) > 4 else ''} kept in float" if kept else "int8-static"
        raise ExportError(f"no int8 recipe reaches {min_psnr:g} dB PSNR on the calibration set while staying smaller "
                          f"than fp16: the best was {_fmt_db(best.psnr_db)} dB ({where}){why}; "
                          f"lower --min-psnr or use --precision fp16")

    bound = quantizer.build("no quantization, fp16 weights", keep_float=candidates)
    quantizer.discard(bound)
    report["bound_psnr_db"] = bound.psnr_db
    if _db(bound.psnr_db) < min_psnr:
        fail(full, [], f", and even no quantization with fp16 weights gives only {_fmt_db(bound.psnr_db)} dB")

    sens = sensitivity(quantizer, groups)
    order = sorted(sens, key=lambda g: -sens[g]["mse"])
    report.update(sensitivity={g: {"nodes": s["nodes"], "psnr_db": s["psnr_db"]} for g, s in sens.items()}, order=order, tried=[])
    total = sum(s["mse"] for s in sens.values()) or 1e-30
    full_mse = _mse_at(full.psnr_db, quantizer.peak2)
    target_mse = _mse_at(min_psnr, quantizer.peak2)
    best, best_kept = full, []
    for count in range(1, len(order)):  # keeping every block is not a quantized model
        kept = order[:count]
        predicted = full_mse * sum(sens[g]["mse"] for g in order[count:]) / total
        if predicted > margin * target_mse and count < len(order) - 1:
            continue
        m = quantizer.build(f"keep {', '.join(kept)}", keep_float=[n for g in kept for n in groups[g]])
        report["tried"].append({"kept_float_blocks": list(kept), "psnr_db": m.psnr_db, "bytes": m.bytes})
        if m.bytes < size_limit and _db(m.psnr_db) > _db(best.psnr_db):
            if best is not full:
                quantizer.discard(best)
            best, best_kept = m, list(kept)
        else:
            quantizer.discard(m)
        if m.bytes >= size_limit or _db(m.psnr_db) >= min_psnr:
            break
    if _db(best.psnr_db) < min_psnr:
        fail(best, best_kept)
    report["kept_float_blocks"] = best_kept
    return best, report


# --- calibration for a component --------------------------------------------------------------


def calibration_settings(options) -> "Any":
    """CalibrationSettings from the options: ``options.calibration`` (set in code), then the
    [quantize] calibration_prompts / calibration_steps (profile files and command-line flags)."""
    from sdexport.quantize.calibration import CalibrationSettings

    settings = options.calibration or CalibrationSettings()
    quant = options.quantize
    changes: dict[str, Any] = {}
    if quant.calibration_prompts is not None:
        changes["samples"] = quant.calibration_prompts * min(settings.per_prompt, quant.calibration_steps or settings.steps)
    if quant.calibration_steps is not None:
        changes["steps"] = quant.calibration_steps
    return dataclasses.replace(settings, **changes) if changes else settings


def static_recipe(options) -> StaticRecipe:
    """The [quantize] activations: "int8" (signed, symmetric: TensorRT needs it, arm64 runs it
    fastest) or "uint8" (asymmetric: what x86 ONNX Runtime fuses everywhere without the
    ``session.qdqisint8allowed`` session option)."""
    return StaticRecipe(activations=options.quantize.activations)


def min_psnr(options) -> float:
    value = options.quantize.min_psnr
    return DEFAULT_MIN_PSNR if value is None else float(value)


def calibration_feeds(spec, module, options, settings=None) -> tuple[list[dict], dict]:
    """Recorded inputs of ``spec``'s component (its static batch), from real runs of the source model."""
    from sdexport.quantize.calibration import collect
    from sdexport.sources.diffusers import ControlNetSource

    settings = settings or calibration_settings(options)
    unet = getattr(module, "unet", None)
    source = getattr(getattr(unet, "config", None), "_name_or_path", None)
    if not source or not (Path(source) / "model_index.json").is_file():
        raise ExportError(f"{spec.name}: static int8 needs the source diffusers folder for calibration runs")
    controlnet = None
    if spec.name == "unet_control" and options.controlnets:
        controlnet = ControlNetSource.parse(options.controlnets[0]).path
    shape = options.trace_shape(spec)
    height, width = shape.height, shape.width
    if not options.static:  # calibrate at the traced size, without the odd-latent trace padding
        height -= getattr(spec, "trace_pad", 0)
    data = collect(source, [spec.name], height=height, width=width, settings=settings, unet=unet,
                   controlnet=controlnet, progress=False)
    batch = spec.inputs[0].shape[0]
    feeds = data.for_component(spec.name, batch if isinstance(batch, int) else None)
    if not feeds:
        raise ExportError(f"{spec.name}: calibration produced no inputs for a batch of {batch}")
    info = {
        "samples": len(feeds),
        "prompts": len(data.info.get("prompts", [])),
        "seed": settings.seed,
        "steps": settings.steps,
        "scheduler": data.info.get("scheduler"),
        "pipeline": data.info.get("pipeline"),  # the diffusers pipeline the inputs were recorded from
        "guidance_scale": data.info.get("settings", {}).get("guidance_scale", settings.guidance_scale),
        "resolution": [height, width],
        "residuals": data.info.get("residuals"),
        "cache_key": data.info.get("key"),
        "from_cache": bool(data.info.get("cached")),
        "bytes": data.nbytes,
    }
    return feeds, info


def eval_subset(feeds: Sequence[Mapping[str, np.ndarray]], n: int = 8) -> list:
    """``n`` feeds spread over the calibration set (over timesteps, since feeds are recorded in order)."""
    if len(feeds) <= n:
        return list(feeds)
    index = np.linspace(0, len(feeds) - 1, n).round().astype(int)
    return [feeds[i] for i in index]


# --- one component ---------------------------------------------------------------------------


def quantize_component(spec, module, model: onnx.ModelProto, precision: str, options, workdir: Path,
                       log: Callable[[str], None] | None = None) -> tuple[onnx.ModelProto, str, dict]:
    """Apply ``precision``'s plan for this component's role to its cleaned fp32 graph.

    Returns the model to save, the precision it really has ("fp32" when the plan keeps it float) and
    the details for the manifest: recipe, what stayed in higher precision, calibration, sizes, PSNR
    against fp32 on calibration inputs.
    """
    plan = ROLE_PLANS[precision][spec.role]
    if plan in ("static", "mixed") and spec.role not in STATIC_ROLES:
        plan = "weights"
    model = name_nodes(model)
    fp32_path = save_model(model, workdir / "fp32" / "model.onnx")
    fp32_bytes = model_bytes(fp32_path)
    fp16_bytes = fp32_bytes - float_weight_bytes(model) // 2
    details: dict[str, Any] = {"plan": plan, "requested": precision, "fp32_bytes": fp32_bytes, "fp16_bytes_estimate": fp16_bytes}
    del model
    if plan == "weights":
        dynamic, weight_only = WEIGHT_OP_TYPES[spec.role]
        out = workdir / "dynamic" / "model.onnx"
        details["recipe"] = quantize_weights_int8(fp32_path, out, dynamic, weight_only)
        feeds = _dynamic_eval_feeds(spec, options)
        result = compare(run_outputs(fp32_path, feeds), run_outputs(out, feeds))
        details.update(measured_on=f"{len(feeds)} example inputs", psnr_db=result["psnr_db"],
                       psnr_db_worst_input=result["psnr_db_worst_input"], bytes=model_bytes(out))
        return onnx.load(str(out)), "int8", {"quantization": details}

    feeds, calibration = calibration_feeds(spec, module, options)
    evals = eval_subset(feeds, options.quantize.eval_samples)
    recipe = static_recipe(options)
    quantizer = StaticQuantizer(fp32_path, feeds, evals, recipe, workdir, log)
    full = quantizer.build("int8-static")
    details.update(recipe=recipe.describe(), calibration=calibration, measured_on=f"{len(evals)} calibration inputs")
    best, kept_blocks = full, []
    if plan == "mixed":
        target = min_psnr(options)
        details["min_psnr_db"] = target
        if _db(full.psnr_db) < target:
            try:
                best, report = search_mixed(quantizer, quantizer.candidates, target, fp16_bytes, full)
            except ExportError as e:
                raise ExportError(f"{spec.name}: {e}") from None
            kept_blocks = report["kept_float_blocks"]
            details["sensitivity"] = report
        details["kept_float"] = {"blocks": kept_blocks, "storage": "fp16 weights, fp32 compute" if kept_blocks else None}
        details["int8_static_psnr_db"] = full.psnr_db
    details.update(psnr_db=best.psnr_db, psnr_db_worst_input=best.psnr_db_worst_input, bytes=best.bytes)
    precision_out = "mixed" if kept_blocks else "int8-static"
    return onnx.load(str(best.path)), precision_out, {"quantization": details}


# int8 without calibration, per role: (op types quantized dynamically, op types weight-only)
WEIGHT_OP_TYPES = {
    "text_encoder": (("MatMul", "Gemm", "Gather"), ()),  # Gather: the token embedding table, a third of its weights
    "unet": (("MatMul", "Gemm"), ("Conv",)),
    "controlnet": (("MatMul", "Gemm"), ("Conv",)),
    "vae_encoder": ((), ("Conv", "MatMul", "Gemm")),
    "vae_decoder": ((), ("Conv", "MatMul", "Gemm")),
}


def _dynamic_eval_feeds(spec, options, n: int = 2) -> list[dict]:
    """Example inputs at the export's trace shape (dynamic int8 has no calibration set)."""
    import torch

    shape = options.trace_shape(spec)
    if not options.static:
        shape = dataclasses.replace(shape, height=shape.height - getattr(spec, "trace_pad", 0))
    gen = torch.Generator().manual_seed(1)
    return [{t.name: x.numpy() for t, x in zip(spec.inputs, spec.example(shape, gen))} for _ in range(n)]
