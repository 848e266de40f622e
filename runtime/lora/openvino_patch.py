"""Run-time LoRAs on OpenVINO: the read model's weight Constants replaced before it is compiled.

Chosen over exporting the patchable weights as model inputs: the IR stays the one every other run
uses (no extra inputs to feed on every call, no second export format), OpenVINO folds and repacks the
new constants at compile exactly as it does the stored ones, and an fp16 IR keeps its
Constant(f16) -> Convert chain (the patched weight is stored in fp16 like the original).
"""

from __future__ import annotations

import numpy as np
import openvino as ov

from runtime.lora.read import LoraError


def patch_model(model: ov.Model, patches: dict, where: str) -> int:
    """Replace each patched weight's Constant; returns how many were replaced."""
    constants = {op.get_friendly_name(): op for op in model.get_ops() if op.get_type_name() == "Constant"}
    for name, patch in patches.items():
        const = constants.get(name)
        if const is None:
            raise LoraError(f"{where}: no constant {name!r}, which the manifest's weight map names")
        base = const.data
        if tuple(base.shape) != patch.ref.shape or str(base.dtype) != patch.ref.dtype:
            raise LoraError(f"{where}: constant {name!r} is {base.dtype}{list(base.shape)}, the manifest says "
                            f"{patch.ref.dtype}{list(patch.ref.shape)}")
        replacement = ov.op.Constant(np.ascontiguousarray(patch.patched(base)))
        replacement.set_friendly_name(name)
        const.output(0).replace(replacement.output(0))
    return len(patches)
