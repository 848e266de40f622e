"""Export targets, one module each. A target turns a torch component into files a backend runs."""

from __future__ import annotations

import importlib

from sdexport.errors import OptionError

TARGETS = {
    "onnx": ("sdexport.export.targets.onnx", "OnnxTarget"),
    "openvino": ("sdexport.export.targets.openvino", "OpenVinoTarget"),
    "coreml": ("sdexport.export.targets.coreml", "CoreMLTarget"),
    "tensorrt": ("sdexport.export.targets.tensorrt", "TensorRTTarget"),
}


def get_target(name: str):
    if name not in TARGETS:
        raise OptionError(f"unknown target {name!r}; choose one of {', '.join(TARGETS)}")
    module_name, cls = TARGETS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("sdexport"):
            raise OptionError(f"target {name!r} is not available in this version of sdexport") from None
        raise OptionError(f"target {name!r} needs the {e.name} package: pip install 'sdexport[{name}]'") from None
    return getattr(module, cls)()
