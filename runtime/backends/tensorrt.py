"""TensorRT backend: serialized engines (``model.plan``) run with cuda-python, no PyTorch.

* Before TensorRT is even imported, the manifest says whether the engine can run here: engines are
  bound to the TensorRT version that built them and to the GPU's compute capability (unless built
  hardware- or version-compatible); a mismatch is one line that says to rebuild on this machine.
* Inputs are checked against the engine's optimization profile (recorded in the manifest at export):
  a size or batch outside it is one line naming the accepted range, in pixels where it can.
* All engines of a process share one scratch allocation (TensorRT's activation memory), sized by the
  largest ``device_memory_size``: the pipeline runs its components one after the other on one stream.
* Each input shape gets fixed device buffers and, after a first plain run, a CUDA graph that replays
  the engine with one launch.
* Refittable engines take new weights without a rebuild (:meth:`TensorRTSession.refit`, e.g. a LoRA's
  fused weights from a refit set keyed by diffusers parameter names, mapped through the
  ``weights.json`` written next to the engine). Engines built weight-stripped are refitted from their
  ONNX file when they open.

Everything that does not need TensorRT or a GPU (compatibility, profile checks, refit-set mapping)
is plain numpy/json code in this module and tested on any machine; refit sets are read with
``runtime.safetensors``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from runtime.backends.base import BackendError, SessionOptions, check_feeds
from runtime.manifest import MANIFEST_NAME, Component, TensorSpec
from runtime.safetensors import SafetensorsError
from runtime.safetensors import load as load_safetensors

__all__ = [
    "EngineRecord",
    "check_compatible",
    "check_profile",
    "describe_profile",
    "read_safetensors",
    "refit_arrays",
    "local_platform",
    "TensorRTSession",
    "open_session",
]

REBUILD = "rebuild the engines on this machine (sdexport export SOURCE --target tensorrt)"


# =============================================================================================
# What the manifest records about an engine, and whether it runs here
# =============================================================================================


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in str(version).split(".")[:3] if p.isdigit())


class EngineRecord(dict):
    """``component.details["tensorrt"]``: version, gpu, compute_capability, hardware_compatibility,
    version_compatible, typing."""

    @classmethod
    def of(cls, component: Component) -> "EngineRecord":
        record = component.details.get("tensorrt")
        if not isinstance(record, Mapping) or "version" not in record:
            raise BackendError(f"{component.name}: the manifest does not say which TensorRT built this engine; {REBUILD}")
        return cls(record)

    def describe(self) -> str:
        return f"{self.get('gpu', 'an unknown GPU')} (compute capability {self.get('compute_capability', '?')}) with TensorRT {self['version']}"


def local_platform() -> dict:
    """This machine's TensorRT version, GPU name and compute capability (needs tensorrt and cuda-python)."""
    import tensorrt as trt

    cuda = _Cuda.get()
    return {"version": trt.__version__, **cuda.device_info()}


def check_compatible(component: Component, here: Mapping[str, Any], path: str | None = None) -> None:
    """Raise one line when the engine was built for another TensorRT version or GPU architecture."""
    built = EngineRecord.of(component)
    where = path or component.main_file.path
    here_desc = (f"{here.get('gpu', 'this GPU')} (compute capability {here.get('compute_capability', '?')}) "
                 f"with TensorRT {here.get('version', '?')}")
    mismatch = None
    b_ver, h_ver = _version_tuple(built["version"]), _version_tuple(here.get("version", "0"))
    if built.get("version_compatible"):
        if not h_ver or h_ver[0] != b_ver[0] or h_ver < b_ver:
            mismatch = "TensorRT version"
    elif b_ver != h_ver:
        mismatch = "TensorRT version"
    level = str(built.get("hardware_compatibility", "none")).lower()
    b_cc, h_cc = str(built.get("compute_capability", "")), str(here.get("compute_capability", ""))
    if mismatch is None:
        if level == "ampere_plus":
            if _version_tuple(h_cc) < (8, 0):
                mismatch = "GPU architecture (the engine needs Ampere or newer)"
        elif b_cc != h_cc:
            mismatch = "GPU architecture"
    if mismatch:
        raise BackendError(f"{where} was built for {built.describe()}; this machine has {here_desc} "
                           f"(different {mismatch}): {REBUILD}")


def _profile(component: Component) -> dict[str, dict[str, list[int]]]:
    profiles = component.details.get("profiles")
    if not isinstance(profiles, Mapping):
        raise BackendError(f"{component.name}: the manifest has no optimization profile for this engine; {REBUILD}")
    return profiles


def describe_profile(spec: TensorSpec, bounds: Mapping[str, Sequence[int]], vae_scale: int | None = None) -> str:
    """The accepted range of one input, readable: '1..2 x 4 x 256..512 px x 256..512 px'."""
    parts = []
    for axis, (lo, hi) in enumerate(zip(bounds["min"], bounds["max"])):
        symbol = spec.shape[axis] if axis < len(spec.shape) else None
        scale, unit = 1, ""
        if symbol in ("h", "w") and vae_scale:
            scale, unit = vae_scale, " px"
        elif symbol in ("H", "W"):
            unit = " px"
        parts.append(f"{lo * scale}{unit}" if lo == hi else f"{lo * scale}..{hi * scale}{unit}")
    return " x ".join(parts)


def check_profile(component: Component, feeds: Mapping[str, np.ndarray], vae_scale: int | None = None) -> None:
    """Every input's shape within the engine's optimization profile, else one line saying what to do."""
    profiles = _profile(component)
    for spec in component.inputs:
        if spec.name not in feeds or spec.name not in profiles:
            continue
        bounds = profiles[spec.name]
        shape = tuple(np.shape(feeds[spec.name]))
        lo, hi = tuple(bounds["min"]), tuple(bounds["max"])
        if len(shape) == len(lo) and all(a <= s <= b for a, s, b in zip(lo, shape, hi)):
            continue
        got = describe_profile(spec, {"min": shape, "max": shape}, vae_scale)
        accepted = describe_profile(spec, bounds, vae_scale)
        raise BackendError(
            f"{component.name}: input {spec.name} is {got}, outside this engine's profile ({accepted}); "
            f"use a size and batch within it, or re-export with [tensorrt] builder_size / builder_batch covering it"
        )


# =============================================================================================
# Refit sets: safetensors keyed by diffusers names -> engine weights
# =============================================================================================

def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """A refit set's arrays (bf16 widened to float32), read with the runtime's safetensors reader."""
    try:
        return load_safetensors(path)
    except SafetensorsError as e:
        raise BackendError(str(e)) from None


def refit_arrays(refit_set: Mapping[str, np.ndarray], weight_map: Mapping[str, Any],
                 prototypes: Mapping[str, tuple[str, int]] | None = None) -> dict[str, np.ndarray]:
    """The refit set's tensors that belong to this engine, keyed by engine weight name, in the
    engine's layout (transposed where the ONNX export transposed) and dtype.

    ``weight_map`` is the ``weights.json`` written next to the engine; ``prototypes`` (engine name ->
    (dtype, element count), from TensorRT's ``get_weights_prototype``) double-checks the result.
    Keys of other components are ignored; a key of this one that the engine cannot refit (folded
    into another weight at export, or shared by several parameters) is one line.
    """
    prefix = weight_map.get("prefix", "")
    entries = weight_map.get("weights", {})
    shared = {name: set(keys) for name, keys in weight_map.get("shared", {}).items()}
    mine = {k: v for k, v in refit_set.items() if not prefix or k.startswith(prefix + ".")}
    out: dict[str, np.ndarray] = {}
    problems = []
    for key, value in sorted(mine.items()):
        entry = entries.get(key)
        if entry is None or not entry.get("engine"):
            problems.append(key)
            continue
        init = entry["initializer"]
        if init in shared and not shared[init] <= set(mine):
            problems.append(f"{key} (stored once for {', '.join(sorted(shared[init]))})")
            continue
        array = np.asarray(value)
        if entry.get("transform") == "transpose":
            array = array.T
        array = np.ascontiguousarray(array.astype(np.dtype(entry["dtype"])).reshape(entry["shape"]))
        name = entry["engine"]
        if name in out and not np.array_equal(out[name], array):
            problems.append(f"{key} (differs from another parameter stored in the same weight)")
            continue
        if prototypes is not None:
            dtype, count = prototypes.get(name, (None, -1))
            if count != array.size or (dtype is not None and np.dtype(dtype) != array.dtype):
                problems.append(f"{key} (engine expects {count} x {dtype})")
                continue
        out[name] = array
    if problems:
        shown = ", ".join(problems[:3]) + (f" (+{len(problems) - 3} more)" if len(problems) > 3 else "")
        raise BackendError(f"this engine cannot refit {shown}: re-export with the LoRA fused instead "
                           f"(sdexport export SOURCE --lora FILE --target tensorrt)")
    return out


# =============================================================================================
# CUDA through cuda-python
# =============================================================================================


class _Cuda:
    """The few CUDA runtime calls this backend needs (cuda-python's ``cuda.bindings.runtime``)."""

    _instance: "_Cuda | None" = None

    def __init__(self):
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            try:
                from cuda import cudart  # cuda-python < 12.6
            except ImportError as e:
                raise BackendError(f"TensorRT engines need cuda-python (pip install cuda-python): {e}") from None
        self.rt = cudart
        count = self.call(cudart.cudaGetDeviceCount(), "cudaGetDeviceCount", quiet=True)
        if not count:
            raise BackendError("TensorRT engines need an NVIDIA GPU with CUDA, and none is visible here; "
                               "export with --target onnx to run on this machine")
        self.stream = self.call(cudart.cudaStreamCreate(), "cudaStreamCreate")

    @classmethod
    def get(cls) -> "_Cuda":
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def call(self, result, what: str, quiet: bool = False):
        err, *rest = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            if quiet:
                return None
            name = self.rt.cudaGetErrorName(err)[1]
            raise BackendError(f"CUDA error in {what}: {name.decode() if isinstance(name, bytes) else name}")
        return rest[0] if len(rest) == 1 else (rest or None)

    def device_info(self, device: int = 0) -> dict:
        props = self.call(self.rt.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
        name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
        return {"gpu": name.strip("\x00 "), "compute_capability": f"{props.major}.{props.minor}"}

    def malloc(self, nbytes: int) -> int:
        return int(self.call(self.rt.cudaMalloc(max(int(nbytes), 1)), "cudaMalloc"))

    def free(self, ptr: int) -> None:
        self.call(self.rt.cudaFree(ptr), "cudaFree")

    def to_device(self, ptr: int, array: np.ndarray) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self.call(self.rt.cudaMemcpyAsync(ptr, array.ctypes.data, array.nbytes, kind, self.stream), "cudaMemcpyAsync")

    def to_host(self, array: np.ndarray, ptr: int) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self.call(self.rt.cudaMemcpyAsync(array.ctypes.data, ptr, array.nbytes, kind, self.stream), "cudaMemcpyAsync")

    def synchronize(self) -> None:
        self.call(self.rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def capture(self, enqueue) -> Any:
        """A CUDA graph of what ``enqueue()`` puts on the stream, instantiated (or None if capture fails)."""
        rt = self.rt
        mode = rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        self.call(rt.cudaStreamBeginCapture(self.stream, mode), "cudaStreamBeginCapture")
        ok = False
        try:
            ok = bool(enqueue())
        finally:
            err, graph = rt.cudaStreamEndCapture(self.stream)
        if not ok or int(err) != 0:
            return None
        err, graph_exec = rt.cudaGraphInstantiate(graph, 0)
        return graph_exec if int(err) == 0 else None

    def launch(self, graph_exec) -> None:
        self.call(self.rt.cudaGraphLaunch(graph_exec, self.stream), "cudaGraphLaunch")


class _Scratch:
    """One device allocation for the activation memory of every engine in the process.

    Components run one after the other on one stream, so they can share it. It grows to the largest
    request; contexts are re-pointed then, and their captured CUDA graphs (which hold the old address)
    dropped.
    """

    _instance: "_Scratch | None" = None

    def __init__(self, cuda: _Cuda):
        self.cuda, self.ptr, self.size = cuda, None, 0
        self.users: list["TensorRTSession"] = []

    @classmethod
    def get(cls, cuda: _Cuda) -> "_Scratch":
        if cls._instance is None:
            cls._instance = cls(cuda)
        return cls._instance

    def reserve(self, nbytes: int) -> None:
        if nbytes <= self.size and self.ptr is not None:
            return
        self.cuda.synchronize()
        if self.ptr is not None:
            self.cuda.free(self.ptr)
        self.size = max(int(nbytes), 256)
        self.ptr = self.cuda.malloc(self.size)
        for user in self.users:
            user._attach_scratch()

    def register(self, session: "TensorRTSession", nbytes: int) -> None:
        self.users.append(session)
        if self.ptr is None or nbytes > self.size:
            self.reserve(nbytes)  # (re)allocates and points every user at it, this one included
        else:
            session._attach_scratch()


def _manifest_info(root: Path) -> tuple[int | None, int]:
    """(VAE scale factor, the largest device_memory_size of the export's engines) from the manifest."""
    try:
        data = json.loads((root / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, 0
    sizes = [int(c.get("details", {}).get("device_memory_size", 0) or 0)
             for c in data.get("components", {}).values() if c.get("backend") == "tensorrt"]
    return data.get("model", {}).get("vae_scale_factor"), max(sizes, default=0)


# =============================================================================================
# The session
# =============================================================================================


class TensorRTSession:
    def __init__(self, component: Component, root: Path, options: SessionOptions):
        self.component = component
        self.root = Path(root)
        self.path = self.root / component.main_file.path
        self.vae_scale, largest = _manifest_info(self.root)
        _profile(component)  # a manifest without a profile is refused before TensorRT loads
        try:
            import tensorrt as trt
        except Exception as e:  # the PyPI stub raises on import, not only ImportError
            raise BackendError(f"{component.name} is a TensorRT engine, and TensorRT's Python package cannot be "
                               f"loaded here ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
                               f"install TensorRT {EngineRecord.of(component)['version']} or export with --target onnx") from None
        self.trt = trt
        self.cuda = _Cuda.get()
        check_compatible(component, {"version": trt.__version__, **self.cuda.device_info()}, str(self.path))
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise BackendError(f"{self.path}: TensorRT could not deserialize this engine; {REBUILD}")
        self._buffers: dict[tuple, dict] = {}  # shape key -> device pointers, host outputs, graph
        self._current: tuple | None = None
        refit = component.details.get("refit", {})
        if refit.get("stripped"):
            self._refit({}, from_onnx=True)  # weight-stripped: the weights come from the ONNX next to it
        strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
        self.context = self.engine.create_execution_context(strategy)
        self.use_graphs = str(options.extra.get("cuda_graph", "on")).lower() not in ("off", "0", "false")
        self._io = {self.engine.get_tensor_name(i): self.engine.get_tensor_mode(self.engine.get_tensor_name(i))
                    for i in range(self.engine.num_io_tensors)}
        self.inputs = [n for n, mode in self._io.items() if mode == trt.TensorIOMode.INPUT]
        self.outputs = [n for n, mode in self._io.items() if mode == trt.TensorIOMode.OUTPUT]
        need = getattr(self.engine, "device_memory_size_v2", None) or self.engine.device_memory_size
        self.scratch = _Scratch.get(self.cuda)
        self.scratch.register(self, max(int(need), largest))

    # -- memory -----------------------------------------------------------------------------------

    def _attach_scratch(self) -> None:
        if hasattr(self.context, "set_device_memory"):
            self.context.set_device_memory(self.scratch.ptr, self.scratch.size)
        else:
            self.context.device_memory = self.scratch.ptr
        for io in self._buffers.values():
            io["graph"] = None  # captured with the old scratch address
        self._current = None

    def _dtype(self, name: str):
        return np.dtype(self.trt.nptype(self.engine.get_tensor_dtype(name)))

    def _bind(self, feeds: Mapping[str, np.ndarray]) -> dict:
        key = tuple((name, feeds[name].shape) for name in self.inputs)
        io = self._buffers.get(key)
        if io is None:
            for name in self.inputs:
                self.context.set_input_shape(name, feeds[name].shape)
            io = {"ptr": {}, "host": {}, "graph": None, "runs": 0}
            for name in self.inputs:
                io["ptr"][name] = self.cuda.malloc(feeds[name].size * self._dtype(name).itemsize)
            for name in self.outputs:
                shape = tuple(self.context.get_tensor_shape(name))
                io["host"][name] = np.empty(shape, self._dtype(name))
                io["ptr"][name] = self.cuda.malloc(io["host"][name].nbytes)
            self._buffers[key] = io
        if self._current != key:  # the context holds one set of shapes and addresses at a time
            for name in self.inputs:
                self.context.set_input_shape(name, feeds[name].shape)
            for name, ptr in io["ptr"].items():
                self.context.set_tensor_address(name, ptr)
            self._current = key
        return io

    # -- running ----------------------------------------------------------------------------------

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = check_feeds(self.component, feeds)
        check_profile(self.component, feeds, self.vae_scale)
        feeds = {name: np.ascontiguousarray(feeds[name], self._dtype(name)) for name in self.inputs}
        io = self._bind(feeds)
        for name in self.inputs:
            self.cuda.to_device(io["ptr"][name], feeds[name])
        stream = int(self.cuda.stream)
        if io["graph"] is not None:
            self.cuda.launch(io["graph"])
        else:
            if not self.context.execute_async_v3(stream):
                raise BackendError(f"{self.component.name}: TensorRT failed to run the engine")
            io["runs"] += 1
            if self.use_graphs and io["runs"] == 1:
                # after one plain run (lazy initialisation done), capture the next enqueue
                io["graph"] = self.cuda.capture(lambda: self.context.execute_async_v3(stream))
                if io["graph"] is None:
                    self.use_graphs = False
        for name in self.outputs:
            self.cuda.to_host(io["host"][name], io["ptr"][name])
        self.cuda.synchronize()
        return {name: io["host"][name].copy() for name in self.outputs}

    # -- refit ------------------------------------------------------------------------------------

    def refit(self, weights: Mapping[str, np.ndarray] | str | Path) -> int:
        """New weights without a rebuild: engine-name arrays, or a refit-set .safetensors keyed by
        diffusers names (mapped through weights.json). Returns the number of weights set."""
        if isinstance(weights, (str, Path)):
            refit_set = read_safetensors(weights)
            weights = refit_arrays(refit_set, self._weight_map(), self._prototypes())
        return self._refit(weights, from_onnx=bool(self.component.details.get("refit", {}).get("stripped")))

    def _weight_map(self) -> dict:
        name = self.component.details.get("refit", {}).get("weights")
        if not name:
            raise BackendError(f"{self.component.name}: this engine was not built refittable; "
                               f"re-export with [tensorrt] refittable = true")
        path = self.path.parent / name
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise BackendError(f"{path}: cannot read the weight map ({e})") from None

    def _prototypes(self) -> dict[str, tuple[str, int]]:
        refitter = self.trt.Refitter(self.engine, self.logger)
        if not hasattr(refitter, "get_weights_prototype"):
            return {}
        out = {}
        for name in refitter.get_all_weights():
            proto = refitter.get_weights_prototype(name)
            out[name] = (np.dtype(self.trt.nptype(proto.dtype)).name, int(proto.size))
        return out

    def _refit(self, weights: Mapping[str, np.ndarray], from_onnx: bool) -> int:
        trt = self.trt
        if not self.engine.refittable:
            raise BackendError(f"{self.component.name}: this engine was not built refittable; "
                               f"re-export with [tensorrt] refittable = true")
        refitter = trt.Refitter(self.engine, self.logger)
        keep = []  # trt.Weights point into these arrays until refit_cuda_engine returns
        if from_onnx:
            source = self.path.parent / self.component.details["refit"]["source"]
            parser = trt.OnnxParserRefitter(refitter, self.logger)
            if not parser.refit_from_file(str(source)):
                errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
                raise BackendError(f"{source}: TensorRT could not read the engine's weights from it ({errors[:200]})")
        for name, array in weights.items():
            array = np.ascontiguousarray(array)
            keep.append(array)
            if not refitter.set_named_weights(name, trt.Weights(array)):
                raise BackendError(f"{self.component.name}: TensorRT rejected new weights for {name}")
        missing = [m for m in refitter.get_missing_weights() if m]
        if missing:
            raise BackendError(f"{self.component.name}: refitting also needs {', '.join(missing[:3])}"
                               f"{' ...' if len(missing) > 3 else ''} (combined with the new weights in the engine); "
                               f"include them in the refit set")
        self.cuda.synchronize()
        if not refitter.refit_cuda_engine():
            raise BackendError(f"{self.component.name}: TensorRT could not refit the engine")
        del keep
        for io in self._buffers.values():
            io["graph"] = None  # graphs may hold constants folded from the old weights
        return len(weights)


def open_session(component: Component, root: Path, options: SessionOptions) -> TensorRTSession:
    return TensorRTSession(component, root, options)
