"""ONNX for NVIDIA GPUs (``--optimize gpu``): onnxruntime.transformers fusions, then fp16 with fp32 islands.

ONNX Runtime's CUDA provider is fast on Stable Diffusion only with the fused kernels its transformer
optimizer inserts (ANCHORS.md, H100: 22.6 ms per U-Net call plain, 9.6 ms fused): multi-head attention
(flash / memory-efficient kernels), GroupNorm and SkipGroupNorm in NHWC, NHWC convolutions, BiasSplitGelu,
SkipLayerNorm. The fusions match fp32 patterns, so the order is fixed:

1. the cleaned fp32 export (``sdexport.export.targets.onnx``) is fused, with ``opt_level=0`` (Python fusions
   only; ONNX Runtime applies its own graph optimisations when the session opens);
2. BiasSplitGelu is fused once more for graphs whose slice bounds were constant-folded (our exporter's
   clean-up folds the Shape/Gather/Div chain that onnxruntime's pattern looks for);
3. the fused graph is converted to fp16, keeping in fp32 the op types a component lists and every node
   that reads or writes a tensor whose magnitude overflows fp16 on example inputs (measured on the fp32
   graph: the "fp32 islands"); inputs and outputs stay float32, as the runtime feeds them.

Several fused ops (NhwcConv, GroupNorm, SkipGroupNorm, BiasSplitGelu, BiasAdd) exist only in the CUDA
provider: a GPU-optimised component loads only where onnxruntime-gpu runs, and its parity against torch
can only be measured there (:func:`validation_providers`). ``cuda_ops=False`` keeps to the fusions that
also have CPU kernels (attention, LayerNorm, Gelu), which is how the tests check the numerics on a CPU.

onnxruntime.transformers' fusions fail with numpy >= 2.5 (ANCHORS.md): :func:`check_numpy` says so
in one line before any work starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import tempfile
import warnings
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from sdexport.errors import ExportError

__all__ = [
    "MODEL_TYPES",
    "CUDA_ONLY_OPS",
    "FUSED_OPS",
    "GpuOptimization",
    "check_numpy",
    "model_type_for",
    "fusion_options",
    "fuse",
    "fuse_bias_split_gelu",
    "overflow_tensors",
    "to_fp16",
    "unique_names",
    "declare_domains",
    "check_loadable",
    "optimize_for_gpu",
    "fused_op_counts",
    "cuda_only_ops",
    "validation_providers",
]

#: component role -> onnxruntime.transformers model type
MODEL_TYPES = {"unet": "unet", "controlnet": "unet", "text_encoder": "clip", "vae_encoder": "vae", "vae_decoder": "vae"}
#: fused ops with CUDA kernels only (no CPU implementation in onnxruntime)
CUDA_ONLY_OPS = ("NhwcConv", "GroupNorm", "SkipGroupNorm", "BiasSplitGelu", "BiasAdd")
#: the contrib ops the fusions produce, as reported in the manifest
FUSED_OPS = ("MultiHeadAttention", "Attention", "GroupNorm", "SkipGroupNorm", "NhwcConv", "BiasSplitGelu", "BiasAdd",
             "SkipLayerNormalization", "LayerNormalization", "Gelu", "QuickGelu", "FastGelu", "BiasGelu")
#: hidden sizes (before the split) that onnxruntime's CUDA BiasSplitGelu kernel accepts
BIAS_SPLIT_GELU_SIZES = (2560, 5120, 10240)
FP16_MAX = 65504.0
NUMPY_LIMIT = (2, 5)


@dataclasses.dataclass(frozen=True)
class GpuOptimization:
    """How a component is optimised for the CUDA provider."""

    cuda_ops: bool = True  # False: only fusions that also run on the CPU provider
    fp16: bool = True
    overflow_headroom: float = 0.5  # a tensor above headroom x 65504 on the probe inputs becomes an fp32 island
    probe_chunk: int = 256  # intermediate tensors read back per probe run (bounds the probe's memory)


def check_numpy(version: str | None = None) -> None:
    """onnxruntime.transformers' fusions fail under numpy 2.5: refuse early, in one line."""
    version = version or np.__version__
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if parts >= NUMPY_LIMIT:
        raise ExportError(
            f"--optimize gpu: onnxruntime.transformers' fusions fail with numpy {version}; "
            f"install numpy<{'.'.join(map(str, NUMPY_LIMIT))} (for example pip install 'numpy==2.3.5')"
        )


def model_type_for(role: str) -> str:
    if role not in MODEL_TYPES:
        raise ExportError(f"--optimize gpu has no fusions for a {role!r} component")
    return MODEL_TYPES[role]


def fusion_options(model_type: str, cuda_ops: bool = True):
    """onnxruntime.transformers FusionOptions for a Stable Diffusion part.

    Packed QKV/KV layouts and the NHWC/GroupNorm/BiasSplitGelu/BiasAdd kernels are CUDA-only; without
    ``cuda_ops`` they are switched off and attention fuses into ops the CPU provider also runs.
    """
    from onnxruntime.transformers.fusion_options import FusionOptions

    options = FusionOptions(model_type)
    if not cuda_ops:
        for name in ("enable_nhwc_conv", "enable_group_norm", "enable_skip_group_norm", "enable_bias_splitgelu",
                     "enable_packed_qkv", "enable_packed_kv", "enable_bias_add"):
            if hasattr(options, name):
                setattr(options, name, False)
    return options


def _save(model: onnx.ModelProto, path: Path) -> Path:
    if not _fits_proto(model):
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))
    return path


def _fits_proto(model: onnx.ModelProto) -> bool:
    """ByteSize() itself fails on some protobuf builds past 2 GB; summing initializers does not."""
    return sum(init.ByteSize() for init in model.graph.initializer) < 2**31 - 2**24


def fuse(model: onnx.ModelProto, model_type: str, workdir: Path, cuda_ops: bool = True):
    """The fp32 graph fused by onnxruntime.transformers (an ``OnnxModel``), plus our BiasSplitGelu pass."""
    from onnxruntime.transformers import optimizer

    check_numpy()
    path = _save(model, Path(workdir) / "fp32.onnx")
    chatter = io.StringIO()  # the optimizer prints progress bars and shape-inference notes
    try:
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter), warnings.catch_warnings():
            # int(array) on 1-element arrays: deprecated in numpy 1.25, an error from numpy 2.5 on
            warnings.simplefilter("ignore", DeprecationWarning)
            fused = optimizer.optimize_model(
                str(path), model_type=model_type, num_heads=0, hidden_size=0, opt_level=0,
                optimization_options=fusion_options(model_type, cuda_ops), use_gpu=True,
            )
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ExportError(f"onnxruntime.transformers could not fuse this {model_type} ({type(e).__name__}: {first[:200]})") from None
    if cuda_ops and model_type == "unet":
        fuse_bias_split_gelu(fused)
    return fused


def _constant(model, name: str) -> np.ndarray | None:
    init = model.get_initializer(name)
    if init is not None:
        return numpy_helper.to_array(init)
    node = model.output_name_to_node().get(name)
    if node is not None and node.op_type == "Constant":
        return numpy_helper.to_array(node.attribute[0].t)
    return None


def _slice_bounds(model, node) -> tuple[int, int] | None:
    """(start, end) of a Slice over the last axis with constant bounds, unit steps."""
    if node.op_type != "Slice" or len(node.input) < 4:
        return None
    values = [_constant(model, name) for name in node.input[1:]]
    if any(v is None or v.size != 1 for v in values[:3]):
        return None
    if len(values) > 3 and values[3] is not None and int(values[3].reshape(-1)[0]) != 1:
        return None
    start, end, axis = (int(v.reshape(-1)[0]) for v in values[:3])
    return (start, end) if axis in (-1, 2) else None


def fuse_bias_split_gelu(model) -> int:
    """Add(bias) -> Slice[:D/2] * Gelu(Slice[D/2:]) becomes one BiasSplitGelu, for constant bounds.

    diffusers' GEGLU feed-forward exports to this pattern; onnxruntime's own fusion expects the
    bounds computed from Shape/Gather/Div, which our clean-up folds into constants. Only hidden
    sizes the CUDA kernel accepts are fused (2560, 5120, 10240: SD's 320/640/1280 channels).
    Returns the number of fused nodes.
    """
    consumers = model.input_name_to_nodes()
    producers = model.output_name_to_node()
    removed, added = [], []
    for gelu in model.get_nodes_by_op_type("Gelu"):
        slice_hi = producers.get(gelu.input[0])
        after = consumers.get(gelu.output[0], [])
        if slice_hi is None or len(after) != 1 or after[0].op_type != "Mul":
            continue
        mul = after[0]
        other = mul.input[1] if mul.input[0] == gelu.output[0] else mul.input[0]
        slice_lo = producers.get(other)
        add = producers.get(slice_hi.input[0])
        if slice_lo is None or add is None or add.op_type != "Add" or slice_lo.input[0] != add.output[0]:
            continue
        hi, lo = _slice_bounds(model, slice_hi), _slice_bounds(model, slice_lo)
        bias_index = next((i for i, name in enumerate(add.input) if model.get_initializer(name) is not None), None)
        if hi is None or lo is None or bias_index is None:
            continue
        bias = numpy_helper.to_array(model.get_initializer(add.input[bias_index]))
        d = int(bias.shape[0]) if bias.ndim == 1 else -1
        if d not in BIAS_SPLIT_GELU_SIZES or lo != (0, d // 2) or hi[0] != d // 2 or hi[1] < d:
            continue
        if {n.name for n in consumers.get(add.output[0], [])} != {slice_hi.name, slice_lo.name}:
            continue
        if len(consumers.get(slice_hi.output[0], [])) != 1 or len(consumers.get(slice_lo.output[0], [])) != 1:
            continue
        fused = helper.make_node("BiasSplitGelu", [add.input[1 - bias_index], add.input[bias_index]], [mul.output[0]],
                                 name=model.create_node_name("BiasSplitGelu", "BiasSplitGelu"), domain="com.microsoft")
        removed += [add, slice_hi, slice_lo, gelu, mul]
        added.append(fused)
    if added:
        model.remove_nodes(removed)
        model.add_nodes(added)
        model.prune_graph()
    return len(added)


def _float_tensor_names(model: onnx.ModelProto) -> list[str]:
    """Every float intermediate tensor of the graph, in node order (types from ONNX shape inference)."""
    if _fits_proto(model):
        inferred = onnx.shape_inference.infer_shapes(model)
    else:  # past 2 GB shape inference only works from a file
        with tempfile.TemporaryDirectory(prefix="sdexport-infer-") as scratch:
            path = _save(model, Path(scratch) / "infer.onnx")
            onnx.shape_inference.infer_shapes_path(str(path), str(path))
            inferred = onnx.load(str(path), load_external_data=False)
    float_types = {onnx.TensorProto.FLOAT}
    typed = {vi.name for vi in inferred.graph.value_info if vi.type.tensor_type.elem_type in float_types}
    outputs = {o.name for o in model.graph.output}
    names = []
    for node in model.graph.node:
        for name in node.output:
            if name and name in typed and name not in outputs:
                names.append(name)
    return names


def overflow_tensors(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], headroom: float = 0.5,
                     chunk: int = 256) -> dict[str, float]:
    """Tensors of the fp32 graph whose largest magnitude on ``feeds`` exceeds ``headroom`` x 65504
    (or is not finite), with that magnitude. Runs on ONNX Runtime's CPU provider, ``chunk``
    intermediate tensors per run so memory stays bounded on a full-size U-Net."""
    from runtime.backends.onnxruntime import create_session

    limit = headroom * FP16_MAX
    names = _float_tensor_names(model)
    found: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="sdexport-probe-") as scratch:
        for start in range(0, len(names), chunk):
            part = names[start:start + chunk]
            probe = onnx.ModelProto()
            probe.CopyFrom(model)
            del probe.graph.output[:]
            probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in part)
            path = _save(probe, Path(scratch) / "probe.onnx")
            session = create_session(path, optimization="none")  # every tensor stays observable
            for name, value in zip(part, session.run(part, dict(feeds))):
                value = np.asarray(value)
                peak = float(np.max(np.abs(value))) if value.size else 0.0
                if not np.isfinite(peak) or peak > limit:
                    found[name] = peak
            del session
    return found


def _island_nodes(model: onnx.ModelProto, tensors: Sequence[str]) -> list[str]:
    """Nodes that produce or read an overflowing tensor: kept in fp32 so the value never becomes fp16."""
    hot = set(tensors)
    return [n.name for n in model.graph.node if n.name and (hot & set(n.output) or hot & set(n.input))]


def to_fp16(fused, op_block: Sequence[str] = (), node_block: Sequence[str] = ()) -> onnx.ModelProto:
    """fp16 with fp32 islands; graph inputs and outputs stay float32; node and value names unique."""
    from onnxruntime.transformers import float16

    with contextlib.redirect_stdout(io.StringIO()):
        fused.convert_float_to_float16(
            keep_io_types=True,
            op_block_list=list(float16.DEFAULT_OP_BLOCK_LIST) + list(op_block),
            node_block_list=list(node_block),
        )
    unique_names(fused.model)
    fused.topological_sort()  # the converter appends its Casts at the end; onnx.checker wants node order
    declare_domains(fused.model)
    return fused.model


def declare_domains(model: onnx.ModelProto) -> None:
    """An opset import for every domain the nodes use: the fusions add com.microsoft ops without one,
    which ONNX Runtime tolerates and onnx.checker (rightly) refuses."""
    declared = {o.domain for o in model.opset_import}
    for domain in sorted({n.domain for n in model.graph.node} - declared - {"ai.onnx"}):
        model.opset_import.append(helper.make_opsetid(domain, 1))


def unique_names(model: onnx.ModelProto) -> int:
    """Make node names and produced tensor names unique in the main graph; returns the nodes changed.

    onnxruntime <= 1.31's fp16 converter inserts one Cast per fp32-kept consumer of a tensor, named
    after the tensor only: a constant read by two Resize scales (or two blocked nodes) gets two
    identical ``<tensor>_cast_to_fp32_node`` Casts writing the same output, which ONNX Runtime refuses
    to load. Identical nodes compute the same value, so all but the first are dropped; nodes that only
    share a name are renamed. Two different nodes writing one tensor cannot be repaired here.
    """
    graph = model.graph
    seen: set[bytes] = set()
    kept, dropped = [], 0
    for node in graph.node:
        key = node.SerializeToString(deterministic=True)
        if key in seen:
            dropped += 1
            continue
        seen.add(key)
        kept.append(node)
    producers: dict[str, str] = {}
    for node in kept:
        for out in filter(None, node.output):
            if out in producers:
                raise ExportError(f"--optimize gpu: nodes {producers[out]!r} and {node.name!r} both write {out!r}")
            producers[out] = node.name
    taken = {n.name for n in kept}
    used: set[str] = set()
    renamed = 0
    for node in kept:
        if node.name and node.name in used:
            k = 1
            while f"{node.name}_{k}" in taken:
                k += 1
            node.name = f"{node.name}_{k}"
            taken.add(node.name)
            renamed += 1
        used.add(node.name)
    if dropped:
        del graph.node[:]
        graph.node.extend(kept)
        infos = {}
        for info in graph.value_info:  # the dropped Casts' outputs were described twice
            infos.setdefault(info.name, info)
        if len(infos) != len(graph.value_info):
            kept_infos = [onnx.ValueInfoProto.FromString(i.SerializeToString()) for i in infos.values()]
            del graph.value_info[:]
            graph.value_info.extend(kept_infos)
    return dropped + renamed


#: what a CPU session may answer for a graph with CUDA-only ops; anything else is an invalid graph
_CUDA_ONLY_REFUSALS = ("NOT_IMPLEMENTED", "Could not find an implementation")


def check_loadable(model: onnx.ModelProto, workdir: Path | None = None) -> str:
    """The checks ONNX Runtime makes when it loads a model, on this machine's CPU: onnx.checker, then a
    CPU session, which may stop only at a missing kernel (the CUDA-only fused ops). Returns "loads"
    or "loads up to CUDA-only kernels"; raises ExportError naming what ONNX Runtime refused."""
    from runtime.backends.onnxruntime import create_session

    with tempfile.TemporaryDirectory(prefix="sdexport-check-", dir=workdir) as scratch:
        source = model.SerializeToString() if _fits_proto(model) else str(_save(model, Path(scratch) / "check.onnx"))
        try:
            onnx.checker.check_model(model if isinstance(source, bytes) else source)
            create_session(source, optimization="none")  # only loading is checked
        except Exception as e:
            message = str(e).strip()
            if isinstance(e, onnx.checker.ValidationError) or not any(s in message for s in _CUDA_ONLY_REFUSALS):
                first = (message.splitlines() or [type(e).__name__])[0]
                raise ExportError(f"--optimize gpu wrote a graph ONNX Runtime cannot load: {first[:300]}") from None
            return "loads up to CUDA-only kernels"
    return "loads"


def fused_op_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in FUSED_OPS and node.domain == "com.microsoft":
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def cuda_only_ops(model: onnx.ModelProto) -> list[str]:
    return sorted({n.op_type for n in model.graph.node if n.domain == "com.microsoft" and n.op_type in CUDA_ONLY_OPS})


def optimize_for_gpu(model: onnx.ModelProto, role: str, precision: str, workdir: Path, *,
                     probe_feeds: Mapping[str, np.ndarray] | None = None, block_ops: Sequence[str] = (),
                     options: GpuOptimization = GpuOptimization()) -> tuple[onnx.ModelProto, dict]:
    """The clean fp32 export of one component -> the graph for the CUDA provider, and what was done.

    ``precision``: "fp32" (fusions only) or "fp16"; ``probe_feeds``: example inputs for the overflow
    probe (none: no probe, only ``block_ops`` stay fp32); ``block_ops``: op types kept in fp32 (the
    component spec's ``fp16_block_ops``).
    """
    if precision not in ("fp32", "fp16"):
        raise ExportError(f"--optimize gpu supports fp32 and fp16, not {precision!r}")
    model_type = model_type_for(role)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    islands: dict = {"op_types": sorted(set(block_ops))}
    hot: dict[str, float] = {}
    if precision == "fp16" and probe_feeds is not None:
        hot = overflow_tensors(model, probe_feeds, options.overflow_headroom, options.probe_chunk)
        islands["overflow_probe"] = {
            "limit": options.overflow_headroom * FP16_MAX,
            "tensors": len(hot),
            # masks hold -inf / float32 min on purpose: reported as "inf", islanded all the same
            "max_abs": (max(hot.values()) if math.isfinite(max(hot.values())) else "inf") if hot else None,
        }
    fused = fuse(model, model_type, workdir, cuda_ops=options.cuda_ops)
    counts = fused_op_counts(fused.model)
    if precision == "fp16" and options.fp16:
        nodes = _island_nodes(fused.model, list(hot))
        islands["nodes"] = len(nodes)
        result = to_fp16(fused, block_ops, nodes)
    else:
        result = fused.model
        unique_names(result)
        declare_domains(result)
    details = {
        "optimize": "gpu" if options.cuda_ops else "gpu-portable",
        "model_type": model_type,
        "fused_ops": counts,
        "cuda_only_ops": cuda_only_ops(result),
        "load_check": check_loadable(result, workdir),
    }
    if precision == "fp16":
        details["fp32_islands"] = islands
    if details["cuda_only_ops"]:
        details["requires"] = "CUDAExecutionProvider"
    return result, details


def validation_providers(details: Mapping, available: Sequence[str] | None = None) -> tuple[list[str] | None, str | None]:
    """(providers to validate a component with, or None; the reason when it cannot be validated here).

    A graph with CUDA-only ops loads only on the CUDA provider: validate there when onnxruntime has
    it, otherwise record the skip and its reason instead of failing the export.
    """
    if details.get("requires") != "CUDAExecutionProvider":
        return None, None
    if available is None:
        import onnxruntime as ort

        available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"], None
    ops = ", ".join(details.get("cuda_only_ops", ())) or "CUDA-only ops"
    return None, (f"not validated here: the fused graph uses {ops}, which only ONNX Runtime's CUDA provider runs; "
                  f"export on a machine with onnxruntime-gpu and an NVIDIA GPU to measure parity")
