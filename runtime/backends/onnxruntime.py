"""ONNX Runtime backend: one InferenceSession per component, provider chosen from the options.

:func:`create_session` is the one place in the project that sets up an ONNX Runtime session (thread
count, graph optimization, logging, providers); the device loop, the quantizer, the GPU optimizer's
checks and the GPU benchmark all call it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import onnxruntime as ort

from runtime.backends.base import BackendError, SessionOptions, check_feeds
from runtime.manifest import Component
from runtime.resources import bounded_threads, usable_cpus  # noqa: F401  (usable_cpus re-exported)

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


_OPTIMIZATION = {
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
}


def session_options(threads: int = 0, optimization: str = "all", log_severity: int = 3) -> ort.SessionOptions:
    """``threads`` 0 keeps ONNX Runtime's default; more threads than usable CPUs only oversubscribe.
    ``optimization`` "none" keeps every intermediate tensor observable (for probing a graph)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = _OPTIMIZATION[optimization]
    so.log_severity_level = log_severity
    if threads:
        so.intra_op_num_threads = bounded_threads(threads)
    return so


def cuda_provider(device_id: int = 0, cuda_graph: bool = False) -> tuple[str, dict[str, str]]:
    """The CUDA provider entry for ``providers=``.

    ``device_id`` is named only when it is not the default device. Since ONNX Runtime 1.26, a provider
    given by name whose options carry ``device_id`` is first looked up among the registered *plugin*
    EP devices (onnxruntime_pybind_state.cc, CreateExecutionProviderFactoryInstance), and when none
    matches ONNX Runtime logs "No registered plugin EP device found for 'CUDAExecutionProvider' with
    device_id=0" before falling back to the built-in provider -- on every session (seen with
    onnxruntime-gpu 1.31.1 on an H200). Without the key there is no lookup and no warning; the
    built-in provider runs on device 0 anyway, and a wheel whose CUDA provider is the bundled plugin
    (auto-registered as "CUDAExecutionProvider", build info ``cuda-plugin-ep=1``) resolves the name to
    its device as ONNX Runtime's own plugin tests do. The plugin-native route,
    ``get_ep_devices`` + ``SessionOptions.add_provider_for_devices``, would reach the same provider;
    the name keeps one path for every build. Not verified on a GPU here (no CUDA build on this CPU
    machine): tests/test_ort_session.py checks the entries on CPU.
    """
    options: dict[str, str] = {}
    if device_id:
        options["device_id"] = str(int(device_id))
    if cuda_graph:
        options["enable_cuda_graph"] = "1"
    return ("CUDAExecutionProvider", options)


def provider_entries(providers: Sequence[Any], device_id: int = 0, cuda_graph: bool = False) -> list:
    """Provider names (or (name, options) pairs, kept as given) -> ``providers=`` entries; CUDA gets
    :func:`cuda_provider`'s options."""
    out: list = []
    for p in providers:
        out.append(cuda_provider(device_id, cuda_graph) if p == "CUDAExecutionProvider" else p)
    return out


def create_session(model: str | Path | bytes, providers: Sequence[Any] = ("CPUExecutionProvider",), *,
                   threads: int = 0, optimization: str = "all", device_id: int = 0, cuda_graph: bool = False,
                   fixed_sizes: Mapping[str, int] | None = None, profiling: bool = False,
                   external_initializers: Mapping[str, np.ndarray] | None = None,
                   external_folder: Path | None = None) -> ort.InferenceSession:
    """An InferenceSession from a file path or serialized model bytes, set up the project's one way.

    ``fixed_sizes``: symbolic dimension -> size, so ONNX Runtime can fold the shape computations away
    (what a CUDA graph needs). ``profiling``: record a profile (``end_profiling`` returns its path)."""
    so = session_options(threads, optimization)
    for name, size in (fixed_sizes or {}).items():
        so.add_free_dimension_override_by_name(name, int(size))
    so.enable_profiling = profiling
    # external_initializers: name -> array replacing a weight stored as external data (run-time LoRAs);
    # ONNX Runtime may read the OrtValues' memory for the session's lifetime, so the session keeps them.
    values = [(a, ort.OrtValue.ortvalue_from_numpy(a)) for a in (external_initializers or {}).values()]
    if values:
        so.add_external_initializers(list(external_initializers), [v for _, v in values])
    if external_folder is not None:  # a model given as bytes finds its external data here
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(external_folder))
    source = model if isinstance(model, bytes) else str(model)
    session = ort.InferenceSession(source, so, providers=provider_entries(providers, device_id, cuda_graph))
    session.sdexport_initializers = values
    return session


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
    def __init__(self, component: Component, root: Path, options: SessionOptions, lora: Mapping | None = None):
        self.component = component
        path = root / component.main_file.path
        patched = _lora_model(path, lora) if lora else None
        self.providers = resolve_providers(options)
        if component.details.get("requires") == "CUDAExecutionProvider" and "CUDAExecutionProvider" not in self.providers:
            ops = ", ".join(component.details.get("cuda_only_ops", ())) or "its fused ops"
            raise BackendError(
                f"{component.name} was exported with --optimize gpu ({ops} run only on ONNX Runtime's CUDA provider): "
                f"run it with onnxruntime-gpu on an NVIDIA GPU (--device cuda), or re-export without --optimize gpu"
            )
        try:
            self._session = create_session(
                patched.model or path if patched else path, self.providers, threads=options.threads,
                external_initializers=patched.external if patched else None,
                external_folder=path.parent if patched and patched.model else None)
        except Exception as e:  # ORT raises its own exception types for bad files
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BackendError(f"{path}: ONNX Runtime cannot load this model ({first_line[:300]})") from None
        _check_input_types(component, self._session, path)
        self._output_names = [o.name for o in self._session.get_outputs()]
        active = self._session.get_providers()[0]
        self._device = _DEVICE_MEMORY.get(active)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = check_feeds(self.component, feeds)
        try:
            return self._run(feeds)
        except Exception as e:  # ORT's own exception types; only an allocation failure is the request's fault
            if not _out_of_memory(e):
                raise
            shape = "x".join(str(d) for d in np.shape(next(iter(feeds.values()))))
            raise BackendError(f"{self.component.name}: out of memory running this request (first input {shape}): "
                               "ask for a smaller size or batch") from None

    def _run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
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


_ORT_TYPES = {"float": "float32", "double": "float64"}  # tensor(X) names that differ from numpy's


def _check_input_types(component: Component, session, path: Path) -> None:
    """The manifest's input dtypes against the model's: a mismatch would fail inside the first run."""
    declared = {t.name: t.dtype for t in component.inputs}
    for arg in session.get_inputs():
        kind = arg.type[len("tensor("):-1] if arg.type.startswith("tensor(") else arg.type
        want = declared.get(arg.name)
        if want is not None and want != _ORT_TYPES.get(kind, kind):
            raise BackendError(f"{path}: input {arg.name!r} is {_ORT_TYPES.get(kind, kind)} in the model but {want} "
                               f"in the manifest of {component.name}; the artifact is inconsistent")


_OOM_MESSAGES = ("failed to allocate memory", "bad_alloc", "bad allocation", "out of memory")


def _out_of_memory(error: BaseException) -> bool:
    text = str(error).lower()
    return isinstance(error, MemoryError) or any(m in text for m in _OOM_MESSAGES)


def _lora_model(path: Path, lora: Mapping):
    from runtime.lora.onnx_weights import OnnxWeightError, patched_model

    try:
        return patched_model(path, dict(lora))
    except (OnnxWeightError, OSError) as e:
        raise BackendError(f"run-time LoRA: {e}") from None


def open_session(component: Component, root: Path, options: SessionOptions, lora: Mapping | None = None) -> OnnxRuntimeSession:
    return OnnxRuntimeSession(component, root, options, lora)
