"""Core ML backend: one ``MLModel`` per component, on the compute units the export chose (or the options say).

Core ML predicts on macOS only. Elsewhere opening a session fails at once with one line saying so,
before coremltools is imported (on Linux its import only logs that its native library is missing).

What is opened: the ``.mlpackage`` folder that holds the component's main file. A compiled
``model.mlmodelc`` beside it (``xcrun coremlcompiler compile unet/model.mlpackage unet/``) is opened
instead: it loads without compiling. With ``cache_dir`` set, a package is compiled once into the cache
(named by its manifest sha256) and later sessions open the compiled copy.
"""

from __future__ import annotations

import contextlib
import io
import logging
import platform
import shutil
import sys
from pathlib import Path
from typing import Mapping

import numpy as np

from runtime.backends.base import BackendError, SessionOptions, check_feeds
from runtime.manifest import Component

COMPUTE_UNITS = {"all": "ALL", "cpu-and-gpu": "CPU_AND_GPU", "cpu-and-ne": "CPU_AND_NE", "cpu-only": "CPU_ONLY"}
DEFAULT_COMPUTE_UNITS = "all"
MODEL_SUFFIXES = (".mlpackage", ".mlmodelc")


def model_path(component: Component, root: Path) -> Path:
    """The package (or compiled model) folder that holds the component's main file."""
    main = root / component.main_file.path
    for folder in (main, *main.parents):
        if folder.suffix in MODEL_SUFFIXES:
            return folder
        if folder == root:
            break
    raise BackendError(f"{main}: not inside a .mlpackage or .mlmodelc folder; is this a Core ML export?")


def compute_units(component: Component, options: SessionOptions) -> str:
    """Options first (``compute_units``), then what the export recorded, then ``all``."""
    name = options.compute_units or component.details.get("compute_units") or DEFAULT_COMPUTE_UNITS
    if name not in COMPUTE_UNITS:
        raise BackendError(f"Core ML compute units {name!r}: use one of {', '.join(COMPUTE_UNITS)}")
    return name


def _coremltools():
    logger = logging.getLogger("coremltools")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            import coremltools
    except ImportError as e:
        raise BackendError(f"the Core ML backend needs coremltools: pip install 'sdexport[coreml]' ({e})") from None
    finally:
        logger.setLevel(level)
    return coremltools


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


class CoreMLSession:
    def __init__(self, component: Component, root: Path, options: SessionOptions):
        self.component = component
        ct = _coremltools()
        self.compute_units = compute_units(component, options)
        units = ct.ComputeUnit[COMPUTE_UNITS[self.compute_units]]
        path = model_path(component, root)
        compiled = path.with_suffix(".mlmodelc")
        target = component.details.get("minimum_deployment_target", "?")
        try:
            if path.suffix == ".mlmodelc" or compiled.is_dir():
                self.path = compiled
                self._model = ct.models.CompiledMLModel(str(compiled), units)
            elif options.cache_dir:
                self.path = self._cached(ct, path, Path(options.cache_dir), units)
                self._model = ct.models.CompiledMLModel(str(self.path), units)
            else:
                self.path = path
                self._model = ct.models.MLModel(str(path), compute_units=units)
        except Exception as e:  # Core ML raises generic exceptions for files it cannot load
            raise BackendError(
                f"{path}: Core ML cannot load this model ({_first_line(e)}); it needs {target} or newer"
            ) from None

    def _cached(self, ct, package: Path, cache_dir: Path, units) -> Path:
        """Compile once into ``cache_dir/<sha256 of the package manifest>.mlmodelc``."""
        key = self.component.main_file.sha256[:16]
        cached = cache_dir / f"{self.component.name.replace('/', '_')}-{key}.mlmodelc"
        if not cached.is_dir():
            cache_dir.mkdir(parents=True, exist_ok=True)
            model = ct.models.MLModel(str(package), compute_units=units)
            staging = cached.with_name(cached.name + ".partial")
            shutil.rmtree(staging, ignore_errors=True)
            shutil.copytree(model.get_compiled_model_path(), staging)
            staging.rename(cached)
        return cached

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = check_feeds(self.component, feeds)
        try:
            outputs = self._model.predict(feeds)
        except Exception as e:
            raise BackendError(f"{self.component.name}: Core ML prediction failed ({_first_line(e)})") from None
        return {t.name: np.asarray(outputs[t.name]) for t in self.component.outputs}


def open_session(component: Component, root: Path, options: SessionOptions) -> CoreMLSession:
    if sys.platform != "darwin":
        raise BackendError(
            f"{component.name}: Core ML models run only on macOS; this is {platform.system() or sys.platform}. "
            f"Copy the export to a Mac (see docs/coreml.md), or export with --target onnx or openvino to run here"
        )
    return CoreMLSession(component, Path(root), options)
