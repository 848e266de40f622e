"""OpenVINO backend: one compiled model and one reused infer request per component.

Settings come from :class:`SessionOptions`:

- ``device``: cpu, gpu (or gpu.N), npu, auto. A device this machine lacks is an error that lists
  what OpenVINO does see, never a silent fallback to another device.
- ``precision_hint``: OpenVINO's ``INFERENCE_PRECISION_HINT``. The default is f32, because the CPU
  plugin otherwise runs bf16 on CPUs with AVX-512 BF16 / AMX (and GPUs run f16): parity with torch
  first, bf16 / f16 only when asked for.
- ``performance_hint``: LATENCY (default; one image at a time) or THROUGHPUT.
- ``threads``: ``INFERENCE_NUM_THREADS`` of the CPU plugin (0: OpenVINO's choice).
- ``cache_dir``: compiled-model cache, so that the second start of a process skips compilation.
  Default: ``$XDG_CACHE_HOME/sdexport/openvino`` (``~/.cache/...``); an empty string disables it.
  Each device / precision / hint combination gets its own subdirectory (see :func:`compile_config`).
- ``winograd``: ``auto`` (default) rewrites the 3x3 convolutions that the export measured to be faster
  as Winograd F(2)/F(4) (manifest ``details["winograd"]``), when compiling for the CPU at f32;
  ``off`` compiles the graph as stored. See :mod:`runtime.backends.openvino_winograd`.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Mapping

import numpy as np
import openvino as ov

from runtime.backends.base import BackendError, SessionOptions, check_feeds
from runtime.backends.openvino_winograd import apply_plan, plan_tiles
from runtime.manifest import Component
from runtime.resources import bounded_threads

DEVICES = ("cpu", "gpu", "npu", "auto")
PRECISION_HINTS = {"f32": "f32", "fp32": "f32", "bf16": "bf16", "f16": "f16", "fp16": "f16"}
PERFORMANCE_HINTS = ("LATENCY", "THROUGHPUT", "CUMULATIVE_THROUGHPUT")
WINOGRAD = ("auto", "off")
_CANCEL_GRACE_S = 5.0  # how long Ctrl-C waits for a cancelled request to return

_CORE: ov.Core | None = None


def core() -> ov.Core:
    """One ``ov.Core`` per process: it holds the plugins, which are expensive to load twice."""
    global _CORE
    if _CORE is None:
        _CORE = ov.Core()
    return _CORE


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sdexport" / "openvino"


def resolve_device(options: SessionOptions, available: list[str]) -> str:
    """Our device name -> OpenVINO's (``gpu.1`` -> ``GPU.1``), checked against what this machine has."""
    name = (options.device or "cpu").strip().lower()
    kind, _, index = name.partition(".")
    if kind not in DEVICES or (index and (kind in ("cpu", "auto") or not index.isdigit())):
        raise BackendError(f"unknown OpenVINO device {options.device!r}; use one of {', '.join(DEVICES)} (or gpu.N)")
    have = ", ".join(available) or "none"
    if kind == "auto":
        if not available:
            raise BackendError("OpenVINO sees no device on this machine for 'auto'")
        return "AUTO"
    device = kind.upper() + (f".{index}" if index else "")
    present = device in available or (not index and any(d.split(".")[0] == device for d in available))
    if not present:
        raise BackendError(f"OpenVINO device {options.device!r} is not available on this machine (available: {have})")
    return device


def compile_config(options: SessionOptions, device: str, available: list[str], content: str = "") -> dict:
    """The properties ``compile_model`` gets. For AUTO, hardware settings go to each candidate device."""
    hint = options.precision_hint or "f32"
    precision = PRECISION_HINTS.get(str(hint).lower())
    if precision is None:
        raise BackendError(f"unknown OpenVINO precision hint {hint!r}; use f32, bf16 or f16")
    performance = str(options.performance_hint or "LATENCY").upper()
    if performance not in PERFORMANCE_HINTS:
        raise BackendError(f"unknown OpenVINO performance hint {options.performance_hint!r}; use {', '.join(PERFORMANCE_HINTS)}")

    def hardware(dev: str) -> dict:
        props = {"INFERENCE_PRECISION_HINT": precision}
        if dev.startswith("CPU") and options.threads:
            props["INFERENCE_NUM_THREADS"] = bounded_threads(options.threads)  # more only thrash
        return props

    config: dict = {"PERFORMANCE_HINT": performance}
    if device == "AUTO":
        config["DEVICE_PROPERTIES"] = {d: hardware(d) for d in available if d.split(".")[0] in ("CPU", "GPU", "NPU")}
    else:
        config.update(hardware(device))
    cache = default_cache_dir() if options.cache_dir is None else options.cache_dir
    if cache:
        # One subdirectory per configuration. OpenVINO 2026.4's CPU plugin names the cached blob by
        # the model alone: a bf16 compile that imports a blob an f32 compile wrote runs, but gives
        # wrong results (max error 1.1 on the tiny U-Net, measured), so configurations never share one.
        # The files' content hash is part of the key too: compiled from a path, OpenVINO keys on the
        # .xml, so a .bin replaced in place was served from the stale blob.
        digest = hashlib.sha256((json.dumps(config, sort_keys=True) + content).encode()).hexdigest()[:10]
        path = Path(cache) / f"{device.lower()}-{precision}-{digest}"
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError:
            if options.cache_dir is not None:
                raise BackendError(f"OpenVINO cache_dir {cache}: cannot create {path}") from None
            return config  # an unwritable default cache: compile every time rather than fail
        config["CACHE_DIR"] = str(path)
    return config


def winograd_tiles(component: Component, options: SessionOptions, device: str, config: dict) -> dict:
    """The export's Winograd plan if it applies to this session: CPU, f32 compute, option not off.
    (Under bf16 the rewrite is slower and loses accuracy; other devices have their own convolutions.)"""
    mode = str(options.winograd or "auto").lower()
    if mode not in WINOGRAD:
        raise BackendError(f"unknown winograd option {options.winograd!r}; use {' or '.join(WINOGRAD)}")
    plan = component.details.get("winograd") or {}
    if mode == "off" or device != "CPU" or config.get("INFERENCE_PRECISION_HINT") != "f32":
        return {}
    return plan_tiles(plan.get("layers", ()))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    # OpenVINO prefixes messages with "Exception from src/...cpp:N:" lines; keep the first real one.
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith(("Exception from", "Check "))]
    return (lines[0] if lines else text.splitlines()[0] if text else type(e).__name__)[:300]


class OpenVinoSession:
    def __init__(self, component: Component, root: Path, options: SessionOptions, lora: Mapping | None = None):
        self.component = component
        xml = root / component.main_file.path
        weights = root / component.files[1].path if len(component.files) > 1 else xml.with_suffix(".bin")
        for path in (xml, weights):
            if not path.is_file():
                raise BackendError(f"{path}: missing file of component {component.name!r}")
        ov_core = core()
        available = list(ov_core.available_devices)
        self.device = resolve_device(options, available)
        content = "".join(f.sha256 for f in component.files)
        self.config = compile_config(options, self.device, available, content)
        if lora:  # one compiled blob per LoRA combination would fill the cache; patched models compile fresh
            self.config.pop("CACHE_DIR", None)
        self.winograd_convolutions = 0
        tiles = winograd_tiles(component, options, self.device, self.config)
        if tiles or weights != xml.with_suffix(".bin") or lora:
            model = self._read(ov_core, xml, weights)
            self._check_names(xml, model)
            if lora:  # before the Winograd rewrite, which transforms the (patched) 3x3 weights
                _patch(model, lora, xml)
            self.winograd_convolutions = apply_plan(model, tiles) if tiles else 0
            source = model
        else:
            # Compiled from the path, OpenVINO keys its cache on the file and, when the cache is warm,
            # never loads the IR's weights: SD 1.5 U-Net fp32, 2.3 s and 6.7 GB peak instead of 3.1 s
            # and 10.0 GB when compiled from a read ov.Model (whose weights it hashes, then keeps).
            source = str(xml)
        try:
            self._compiled = ov_core.compile_model(source, self.device, self.config)
        except Exception as e:
            if isinstance(source, str):
                self._read(ov_core, xml, weights)  # an unreadable IR gets its own message
            raise BackendError(f"{xml}: OpenVINO cannot compile this model for {self.device} ({_first_line(e)})") from None
        if isinstance(source, str):
            self._check_names(xml, self._compiled)
        self._request = self._compiled.create_infer_request()
        self._outputs = [(t.name, self._compiled.output(t.name)) for t in component.outputs]

    @staticmethod
    def _read(ov_core: ov.Core, xml: Path, weights: Path) -> ov.Model:
        try:
            return ov_core.read_model(str(xml), str(weights))
        except Exception as e:  # OpenVINO raises RuntimeError subclasses for unreadable IR
            raise BackendError(f"{xml}: OpenVINO cannot read this model ({_first_line(e)})") from None

    def _check_names(self, xml: Path, model) -> None:
        """The manifest's input and output names exist in the model (an ov.Model or a CompiledModel)."""
        names = {n for p in list(model.inputs) + list(model.outputs) for n in p.get_names()}
        missing = [t.name for t in self.component.inputs + self.component.outputs if t.name not in names]
        if missing:
            raise BackendError(f"{xml}: the model lacks {', '.join(missing)} that the manifest lists")

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = check_feeds(self.component, feeds)
        try:
            # share_inputs: the request reads our (contiguous, checked) arrays in place;
            # share_outputs=False: results are copies, since the next call overwrites the request's tensors.
            results = self._infer(feeds)
        except KeyboardInterrupt:
            raise
        except Exception as e:
            raise BackendError(f"{self.component.name}: OpenVINO inference failed ({_first_line(e)})") from None
        return {name: results[port] for name, port in self._outputs}


    def _infer(self, feeds):
        """Inference on a worker thread while this one waits in short slices: OpenVINO's blocking
        calls (``infer``, even ``wait_for`` while a new shape is prepared) hold back Python's signal
        handling for minutes at 2048x2048, so Ctrl-C would not stop a generation."""
        done = threading.Event()
        outcome: list = []

        def work():
            try:
                self._request.infer(feeds, share_inputs=True)
                outcome.append({port: self._request.get_tensor(port).data.copy() for _, port in self._outputs})
            except BaseException as e:  # handed to the waiting thread
                outcome.append(e)
            finally:
                done.set()

        threading.Thread(target=work, name=f"openvino-{self.component.name}", daemon=True).start()
        try:
            while not done.wait(0.1):
                pass
        except KeyboardInterrupt:
            self._request.cancel()
            # The worker must leave OpenVINO before the interpreter exits: tearing the plugin down under
            # a running request aborts the process ("terminate called without an active exception",
            # exit -6 instead of 130). A cancelled CPU request returns at its next node.
            done.wait(_CANCEL_GRACE_S)
            raise
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
        return outcome[0]


def _patch(model, lora: Mapping, xml: Path) -> None:
    from runtime.lora.openvino_patch import patch_model

    try:
        patch_model(model, dict(lora), str(xml))
    except ValueError as e:
        raise BackendError(f"run-time LoRA: {e}") from None


def open_session(component: Component, root: Path, options: SessionOptions, lora: Mapping | None = None) -> OpenVinoSession:
    return OpenVinoSession(component, root, options, lora)
