"""A LoRA file read with numpy: its modules (down A [r, in(, kh, kw)], up B [out, r(, 1, 1)], alpha).

The math, as PEFT fuses and diffusers' ``set_adapters`` computes it: a module adapts a layer's weight
W [out, in(, kh, kw)] by  W' = W + s * (alpha / r) * (B @ A)  (convolutions: A flattened to
[r, in*kh*kw]), with s the user's scale, alpha the file's (kohya ``.alpha`` tensors, PEFT's
``lora_alpha`` / ``alpha_pattern`` in diffusers' ``lora_adapter_metadata``; none means alpha = r) and
r the rank (rsLoRA: sqrt(r)).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Mapping

import numpy as np

from runtime.lora import keys
from runtime.safetensors import SafetensorsError, SafetensorsFile


class LoraError(ValueError):
    """A LoRA cannot be applied to this artifact; the message (one line) says which key and why."""


@dataclasses.dataclass
class LoraModule:
    component: str  # "unet", "text_encoder", "text_encoder_2", or "" (a raw PEFT adapter does not say)
    name: str  # dotted module name, or kohya's flattened one (flat=True)
    flat: bool
    down: np.ndarray  # A, float32
    up: np.ndarray  # B, float32
    alpha: float
    rslora: bool
    key: str  # the file's first key of this module, for messages

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def scaling(self, scale: float) -> float:
        """PEFT's ``scaling``: scale * alpha / r (rsLoRA: / sqrt(r)), in that order."""
        return scale * self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


@dataclasses.dataclass
class LoraFile:
    path: Path
    layout: str  # "peft", "diffusers-old", "kohya"
    modules: list[LoraModule]


def read_lora(path: str | Path) -> LoraFile:
    """Read a ``.safetensors`` LoRA (other formats could run code or need torch: refused)."""
    path = Path(path)
    if not path.is_file():
        raise LoraError(f"{path}: no such LoRA file")
    if path.suffix.lower() != ".safetensors":
        raise LoraError(f"{path}: run-time LoRAs are read from .safetensors files only")
    try:
        with SafetensorsFile(path) as f:
            tensors = {k: f.array(k).astype(np.float32) for k in f.keys()}
            metadata = dict(f.metadata)
    except SafetensorsError as e:
        raise LoraError(str(e)) from None
    if not tensors:
        raise LoraError(f"{path}: no tensors in this file")
    if (found := keys.unsupported_kind(tensors)) is not None:
        raise LoraError(f"{path}: {found[0]} ({found[1]}): only LoRA / LoCon files (lora_A/lora_B, lora_down/lora_up) apply")
    groups, layouts = _group(tensors, path)
    config = _peft_metadata(metadata, path)
    modules = [m for key, group in groups.items() if (m := _module(key, group, config, path)) is not None]
    if not modules:
        raise LoraError(f"{path}: a LoRA file without any complete module")
    return LoraFile(path, keys.layout_of(layouts), modules)


def _group(tensors: Mapping[str, np.ndarray], path: Path) -> tuple[dict, set[str]]:
    groups: dict = {}
    layouts: set[str] = set()
    for key, value in tensors.items():
        found = keys.classify(key)
        if found is None or found[1] == "A.bias":
            raise LoraError(f"{path}: {key}: not a LoRA weight")
        group_key, part, layout = found
        if part == "bias":
            raise LoraError(f"{path}: {key}: LoRA biases are not applied at run time; fuse this LoRA at export (--lora)")
        group = groups.setdefault(group_key, {})
        group[part] = value
        if layout is not None:
            group.setdefault("key", key)
            layouts.add(layout)
    if not layouts:
        raise LoraError(f"{path}: not a LoRA file (no lora_A/lora_B or lora_down/lora_up tensors)")
    return groups, layouts


def _peft_metadata(metadata: Mapping[str, str], path: Path) -> dict[str, dict]:
    """Per component LoraConfig fields from diffusers' ``lora_adapter_metadata``."""
    raw = metadata.get("lora_adapter_metadata")
    try:
        return keys.adapter_metadata(raw) if raw else {}
    except ValueError as e:
        raise LoraError(f"{path}: {e}") from None


def _module(key, group: dict, config: Mapping[str, dict], path: Path) -> LoraModule | None:
    component, name, flat = key
    if "down" not in group or "up" not in group:
        if set(group) <= {"alpha"}:
            return None  # some trainers keep alphas of frozen modules
        raise LoraError(f"{path}: {group.get('key', name)}: a lora {'down' if 'down' in group else 'up'} matrix without its partner")
    down, up = group["down"], group["up"]
    where = f"{path}: {group['key']}"
    if down.ndim not in (2, 4) or up.ndim != down.ndim or up.shape[1] != down.shape[0] or down.shape[0] < 1:
        raise LoraError(f"{where}: down {list(down.shape)} and up {list(up.shape)} do not form a low-rank pair")
    if not (np.isfinite(down).all() and np.isfinite(up).all()):
        raise LoraError(f"{where}: NaN or infinite values")
    fields = config.get(component or "", {})
    rank = int(down.shape[0])
    if "alpha" in group:
        if group["alpha"].size != 1 or not np.isfinite(group["alpha"]).all():
            raise LoraError(f"{where}: alpha is not one finite number")
        alpha = float(group["alpha"].reshape(-1)[0])
    else:
        found = keys.pattern_value(fields.get("alpha_pattern") or {}, name)
        alpha = float(found if found is not None else fields.get("lora_alpha", rank))
    return LoraModule(component or "", name, flat, down, up, alpha, bool(fields.get("use_rslora", False)), group["key"])
