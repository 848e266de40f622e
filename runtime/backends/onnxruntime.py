"""ONNX Runtime backend: one InferenceSession per component, provider chosen from the options."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import onnxruntime as ort

from runtime.backends.base import BackendError, SessionOptions, check_feeds
from runtime.manifest import Component

# device name -> execution providers to try, best first (CPU is always appended as the fallback).
DEVICE_PROVIDERS = {
    "cpu": ("CPUExecutionProvider",),
    "cuda": ("CUDAExecutionProvider",),
    "tensorrt": ("TensorrtExecutionProvider", "CUDAExecutionProvider"),
    "coreml": ("CoreMLExecutionProvider",),
    "dml": ("DmlExecutionProvider",),
    "openvino": ("OpenVINOExecutionProvider",),
    "auto": ("CUDAExecutionProvider", "CoreMLExecutionProvider", "DmlExecutionProvider"),
}
# Providers that keep tensors in their own memory: outputs are bound there and copied back once.
_DEVICE_MEMORY = {"CUDAExecutionProvider": "cuda", "DmlExecutionProvider": "dml", "TensorrtExecutionProvider": "cuda"}


def resolve_providers(options: SessionOptions) -> list[str]:
    available = ort.get_available_providers()
    if options.providers:
        wanted = list(options.providers)
        missing = [p for p in wanted if p not in available]
        if missing:
            raise BackendError(
                f"ONNX Runtime here has no {', '.join(missing)} (available: {', '.join(available)})"
            )
        return wanted
    device = (options.device or "cpu").lower()
    if device not in DEVICE_PROVIDERS:
        raise BackendError(f"unknown ONNX Runtime device {device!r}; use one of {', '.join(DEVICE_PROVIDERS)}")
    chosen = [p for p in DEVICE_PROVIDERS[device] if p in available]
    if device not in ("cpu", "auto") and not chosen:
        hint = {"cuda": "; install onnxruntime-gpu (pip install onnxruntime-gpu) on a machine with an NVIDIA GPU and CUDA",
                "tensorrt": "; install onnxruntime-gpu built with TensorRT"}.get(device, "")
        raise BackendError(
            f"device {device!r} needs {' or '.join(DEVICE_PROVIDERS[device])}, which this onnxruntime "
            f"build lacks (available: {', '.join(available)}){hint}, or run with --device cpu"
        )
    return chosen + ["CPUExecutionProvider"] if "CPUExecutionProvider" not in chosen else chosen


class OnnxRuntimeSession:
    def __init__(self, component: Component, root: Path, options: SessionOptions):
        self.component = component
        path = root / component.main_file.path
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        if options.threads:
            so.intra_op_num_threads = int(options.threads)
        self.providers = resolve_providers(options)
        if component.details.get("requires") == "CUDAExecutionProvider" and "CUDAExecutionProvider" not in self.providers:
            ops = ", ".join(component.details.get("cuda_only_ops", ())) or "its fused ops"
            raise BackendError(
                f"{component.name} was exported with --optimize gpu ({ops} run only on ONNX Runtime's CUDA provider): "
                f"run it with onnxruntime-gpu on an NVIDIA GPU (--device cuda), or re-export without --optimize gpu"
            )
        try:
            self._session = ort.InferenceSession(str(path), so, providers=self.providers)
        except Exception as e:  # ORT raises its own exception types for bad files
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BackendError(f"{path}: ONNX Runtime cannot load this model ({first_line[:300]})") from None
        self._output_names = [o.name for o in self._session.get_outputs()]
        active = self._session.get_providers()[0]
        self._device = _DEVICE_MEMORY.get(active)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = check_feeds(self.component, feeds)
        if self._device is None:
            outputs = self._session.run(self._output_names, feeds)
            return dict(zip(self._output_names, outputs))
        # On a GPU provider, bind inputs and outputs explicitly: one upload per input and one
        # download per output, instead of the extra staging copies of Session.run.
        binding = self._session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        for name in self._output_names:
            binding.bind_output(name, self._device)
        self._session.run_with_iobinding(binding)
        return dict(zip(self._output_names, binding.copy_outputs_to_cpu()))


def open_session(component: Component, root: Path, options: SessionOptions) -> OnnxRuntimeSession:
    return OnnxRuntimeSession(component, root, options)
