"""The manifest's weight map: for each adaptable layer of a component, where its weight is in the graph.

Written at export (``sdexport.export.weight_map`` matches every Linear / Conv2d weight of the torch model
to the stored initializer or constant by value) and read by the runtime to apply LoRAs. Keys are the
layers' module names in diffusers / transformers (``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``,
``text_model.encoder.layers.0.self_attn.q_proj``), the names LoRA files use.

In the manifest, per component, ``"weights": {module: [graph name, transposed, shape, dtype, ldm alias]}``:
a list rather than an object keeps the SD 1.5 U-Net's ~700 entries to one line each.
"""

from __future__ import annotations

import dataclasses
import math

WEIGHT_DTYPES = ("float32", "float16")


@dataclasses.dataclass(frozen=True)
class WeightRef:
    name: str  # ONNX initializer name / OpenVINO Constant friendly name
    transposed: bool  # stored as [in, out] (a MatMul's right-hand side), not torch's [out, in]
    shape: tuple[int, ...]  # as stored
    dtype: str  # as stored: float32 or float16
    ldm: str = ""  # the U-Net layer's original LDM name (kohya files may use it), when it differs

    @property
    def torch_shape(self) -> tuple[int, ...]:
        """The layer's weight shape as torch has it: [out, in(, kh, kw)]."""
        return (self.shape[1], self.shape[0]) if self.transposed else self.shape

    def to_json(self) -> list:
        return [self.name, self.transposed, list(self.shape), self.dtype] + ([self.ldm] if self.ldm else [])

    @classmethod
    def from_json(cls, module: str, data) -> "WeightRef":
        if not isinstance(data, list) or len(data) not in (4, 5):
            raise ValueError(f"weights.{module}: expected [name, transposed, shape, dtype(, ldm name)]")
        name, transposed, shape, dtype = data[:4]
        if not isinstance(name, str) or not isinstance(transposed, bool) or dtype not in WEIGHT_DTYPES:
            raise ValueError(f"weights.{module}: bad entry {str(data)[:80]}")
        if not isinstance(shape, list) or len(shape) not in (2, 4) or not all(type(d) is int and d > 0 for d in shape):
            raise ValueError(f"weights.{module}: shape {str(shape)[:40]} is not a 2-d or 4-d size list")
        if transposed and len(shape) != 2:
            raise ValueError(f"weights.{module}: only 2-d weights are stored transposed")
        ldm = data[4] if len(data) == 5 else ""
        if not isinstance(ldm, str):
            raise ValueError(f"weights.{module}: ldm name {ldm!r} is not a string")
        return cls(name, transposed, tuple(shape), dtype, ldm)

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def weights_to_json(weights: dict[str, WeightRef]) -> dict[str, list]:
    return {module: ref.to_json() for module, ref in weights.items()}


def weights_from_json(data) -> dict[str, WeightRef]:
    if not isinstance(data, dict):
        raise ValueError(f"weights: expected an object (module -> entry), got {type(data).__name__}")
    return {str(module): WeightRef.from_json(module, entry) for module, entry in data.items()}
