"""Which stored weight each adaptable layer became: the manifest's weight map for run-time LoRAs.

Exporters rename and reshape weights (the TorchScript ONNX exporter folds a Linear's transpose into an
anonymous ``onnx::MatMul_123`` initializer; OpenVINO's torch frontend names constants after the traced
module), so names are not trusted: every Linear / Conv2d weight of the torch model is matched to the
written graph's weights by value, in torch's [out, in] layout or transposed, at the stored precision
(fp16 files are compared with the torch weight rounded to fp16). A layer whose weight is not found
exactly once (shared by deduplication, folded into another op, quantized) is left out of the map, and
the runtime refuses a LoRA on it by name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
import torch

from runtime.lora.weights import WeightRef

ADAPTABLE_ROLES = {"unet": "unet", "text_encoder": "model"}  # role -> the wrapper's attribute holding the model
MAPPED_PRECISIONS = ("fp32", "fp16")
_SAMPLES = 16


def _fingerprint(array: np.ndarray) -> tuple:
    """Shape and a few values rounded to fp16 (tiny ones as 0: fp16 conversion clamps them)."""
    flat = array.reshape(-1)
    picks = flat[np.linspace(0, flat.size - 1, _SAMPLES).astype(np.int64)].astype(np.float16).astype(np.float32)
    picks[np.abs(picks) < 1e-4] = 0.0
    return tuple(array.shape), picks.tobytes()


def _same(stored: np.ndarray, weight: np.ndarray) -> bool:
    a = stored.astype(np.float32)
    b = weight.astype(stored.dtype).astype(np.float32)
    small = np.abs(b) < 1e-4
    return bool(np.array_equal(np.where(small, 0, a), np.where(small, 0, b)))


def torch_layers(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """Module name -> weight (float32 numpy, torch layout) of every Linear and Conv2d."""
    return {name: m.weight.detach().float().numpy() for name, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


def onnx_weights(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    from runtime.lora.onnx_weights import OnnxWeights

    weights = OnnxWeights(path)
    for name in weights.names():
        try:
            array = weights[name]
        except ValueError:
            continue  # ints, scalars: no layer weight
        if array.ndim in (2, 4):
            yield name, array


def openvino_weights(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    import openvino as ov

    from runtime.backends.openvino import core

    model = core().read_model(str(path))
    for op in model.get_ops():
        if op.get_type_name() == "Constant" and op.get_element_type() in (ov.Type.f32, ov.Type.f16):
            if len(op.get_output_shape(0)) in (2, 4):
                yield op.get_friendly_name(), op.data


def match(layers: Mapping[str, np.ndarray], stored: Iterator[tuple[str, np.ndarray]]) -> dict[str, WeightRef]:
    """Module name -> WeightRef for every layer found exactly once, and alone, among the stored weights."""
    candidates: dict[tuple, list[tuple[str, bool]]] = {}
    for name, weight in layers.items():
        candidates.setdefault(_fingerprint(weight), []).append((name, False))
        if weight.ndim == 2:
            candidates.setdefault(_fingerprint(weight.T), []).append((name, True))
    found: dict[str, list[WeightRef]] = {}
    users: dict[str, int] = {}
    for graph_name, array in stored:
        for module, transposed in candidates.get(_fingerprint(array), ()):
            weight = layers[module].T if transposed else layers[module]
            if _same(array, weight):
                found.setdefault(module, []).append(
                    WeightRef(graph_name, transposed, tuple(array.shape), str(array.dtype)))
                users[graph_name] = users.get(graph_name, 0) + 1
    return {m: refs[0] for m, refs in found.items() if len(refs) == 1 and users[refs[0].name] == 1}


def weight_map(role: str, module: torch.nn.Module, files: list[Path], backend: str, precision: str,
               unet_config: Mapping | None = None) -> dict[str, WeightRef]:
    """The weight map of one converted component (empty where run-time LoRAs do not apply)."""
    attribute = ADAPTABLE_ROLES.get(role)
    if attribute is None or precision not in MAPPED_PRECISIONS or backend not in ("onnxruntime", "openvino"):
        return {}
    layers = torch_layers(getattr(module, attribute))
    stored = onnx_weights(files[0]) if backend == "onnxruntime" else openvino_weights(files[0])
    mapped = match(layers, stored)
    if role == "unet" and unet_config is not None:
        mapped = {name: _with_ldm(name, ref, unet_config) for name, ref in mapped.items()}
    if role == "text_encoder":  # LoRA files name CLIP's layers text_model.*, whichever transformers nests them
        mapped = {"text_model." + name.removeprefix("text_model."): ref for name, ref in mapped.items()}
    return dict(sorted(mapped.items()))


def _with_ldm(name: str, ref: WeightRef, unet_config: Mapping) -> WeightRef:
    """Record the LDM name where it differs (kohya files trained on the original code use it)."""
    import dataclasses

    from sdexport.sources.convert import unet_name_to_ldm

    try:
        ldm = unet_name_to_ldm(name + ".weight", unet_config)[: -len(".weight")]
    except (KeyError, ValueError):
        return ref
    return dataclasses.replace(ref, ldm=ldm) if ldm != name else ref
