"""Inference backends behind one small protocol.

A backend module exposes ``open_session(component, root, options) -> Session``. Backends are
imported on first use, so a machine needs only the package of the backend it runs.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Mapping

from runtime.backends.base import BackendError, Session, SessionOptions

__all__ = ["BACKENDS", "BackendError", "Session", "SessionOptions", "open_session"]

BACKENDS = {
    "onnxruntime": "runtime.backends.onnxruntime",
    "openvino": "runtime.backends.openvino",
    "coreml": "runtime.backends.coreml",
    "tensorrt": "runtime.backends.tensorrt",
}


def open_session(component, root: Path, options: SessionOptions | Mapping[str, Any] | None = None,
                 lora: Mapping[str, Any] | None = None) -> Session:
    """``lora``: graph weight name -> runtime.lora.resolve.WeightPatch, applied as the session is created."""
    module_name = BACKENDS.get(component.backend)
    if module_name is None:
        raise BackendError(f"component {component.name!r}: unknown backend {component.backend!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise BackendError(
            f"component {component.name!r} needs the {component.backend} backend, which cannot be loaded here ({e})"
        ) from None
    if not isinstance(options, SessionOptions):
        options = SessionOptions.from_mapping(options or {})
    if lora:
        if component.backend not in ("onnxruntime", "openvino"):
            raise BackendError(f"{component.name}: run-time LoRAs need an ONNX Runtime or OpenVINO export, not {component.backend}")
        return module.open_session(component, Path(root), options, lora=lora)
    return module.open_session(component, Path(root), options)
