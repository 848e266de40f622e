"""LoRA modules matched to an artifact's weights: per component, the weights to patch and with what.

Every module of every LoRA must land on a layer the manifest's weight map lists, with the layer's
shape; the first one that does not stops everything with one line naming its key, before any session
is touched. Components are patched only where their precision keeps weights as floats (fp32, fp16):
an int8 / int4 / palettized weight is a quantized code, not a matrix a delta can be added to.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from runtime.lora.keys import flat
from runtime.lora.read import LoraError, LoraFile, LoraModule, read_lora
from runtime.lora.weights import WeightRef

PATCHABLE_PRECISIONS = ("fp32", "fp16")
PATCHABLE_BACKENDS = ("onnxruntime", "openvino")
_COMPONENT_ROLES = {"unet": "unet", "text_encoder": "text_encoder", "text_encoder_2": "text_encoder"}


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    path: Path
    scale: float = 1.0

    @classmethod
    def parse(cls, spec) -> "LoraSpec":
        """``FILE[:SCALE]`` (a colon and a number at the end; a path's own colons stay), (file, scale), or a LoraSpec."""
        if isinstance(spec, LoraSpec):
            return spec
        if isinstance(spec, (tuple, list)):
            path, scale = spec
            return cls(Path(path), _finite(scale, str(path)))
        if isinstance(spec, Path):
            return cls(spec)
        head, sep, tail = str(spec).rpartition(":")
        if sep and head and not re.search(r"[\\/]", tail):
            try:
                return cls(Path(head), _finite(float(tail), head))
            except ValueError:
                if not Path(spec).exists():
                    raise LoraError(f"--lora {spec}: scale {tail!r} is not a number (expected FILE[:SCALE])") from None
        return cls(Path(spec))


def _finite(value, where: str) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise LoraError(f"{where}: LoRA scale {value} is not a finite number")
    return value


@dataclasses.dataclass(frozen=True)
class Term:
    """One LoRA module's contribution to one weight: factor * (up @ down)."""

    module: LoraModule
    factor: float
    source: str  # file and key, for identity and messages

    def delta(self, torch_shape: Sequence[int]) -> np.ndarray:
        up = self.module.up.reshape(self.module.up.shape[0], -1)
        down = self.module.down.reshape(self.module.rank, -1)
        return (up @ down).reshape(tuple(torch_shape)) * np.float32(self.factor)


@dataclasses.dataclass
class WeightPatch:
    ref: WeightRef
    terms: list[Term]

    def patched(self, base: np.ndarray) -> np.ndarray:
        """base + the terms' deltas, summed in float32 in the order given, stored back in base's dtype."""
        out = np.array(base, dtype=np.float32)
        for term in self.terms:
            delta = term.delta(self.ref.torch_shape)
            out += delta.T if self.ref.transposed else delta
        return out.astype(base.dtype)


@dataclasses.dataclass
class ComponentPatch:
    component: str
    weights: dict[str, WeightPatch]  # graph weight name -> patch
    identity: tuple  # equal identities: the same patched weights (the session can stay)


def plan_patches(manifest, specs: Iterable) -> dict[str, ComponentPatch]:
    """Component name -> its patch, for every component the LoRAs touch; LoraError on the first misfit."""
    per_component: dict[str, dict[str, WeightPatch]] = {}
    stamps = []
    for spec in map(LoraSpec.parse, specs):
        lora = read_lora(spec.path)
        stat = os.stat(spec.path)
        stamps.append((str(spec.path.resolve()), stat.st_mtime_ns, stat.st_size))
        for module in lora.modules:
            for component, module_name, ref in _targets(manifest, lora, module):
                patch = per_component.setdefault(component, {}).setdefault(ref.name, WeightPatch(ref, []))
                patch.terms.append(Term(module, module.scaling(spec.scale), f"{lora.path}:{module.key}"))
    out = {}
    for component, weights in per_component.items():
        identity = tuple(sorted((name, tuple((t.source, t.factor) for t in p.terms)) for name, p in weights.items()))
        out[component] = ComponentPatch(component, weights, (identity, tuple(stamps)))
    return out


def changed(old: dict[str, ComponentPatch], new: dict[str, ComponentPatch]) -> set[str]:
    """Components whose patched weights differ between two plans (their sessions must be re-created)."""
    return {c for c in set(old) | set(new)
            if (old[c].identity if c in old else None) != (new[c].identity if c in new else None)}


def _components_for(manifest, module: LoraModule) -> list:
    wanted = [module.component] if module.component else ["unet", "text_encoder"]
    out = []
    for name in wanted:
        role = _COMPONENT_ROLES.get(name)
        if role == "unet":
            out += [c for c in manifest.components.values() if c.role == "unet"]
        elif role is not None and name in manifest.components:
            out.append(manifest.components[name])
    return out


def _targets(manifest, lora: LoraFile, module: LoraModule) -> list[tuple[str, str, WeightRef]]:
    """(component, module name, weight) for each component this module adapts (the U-Net and its
    ControlNet-input twin share one module)."""
    where = f"{lora.path}: {module.key}"
    components = _components_for(manifest, module)
    if not components:
        raise LoraError(f"{where}: this export has no {module.component or 'U-Net or text encoder'} component to adapt")
    found = []
    for component in components:
        _check_patchable(component)
        name = _lookup(component, module)
        if name is None:
            if found or _past_exported_layers(component, module):
                continue
            raise LoraError(f"{where}: adapts {module.name}, which the {component.name} of this export does not have "
                            "(or does not store as a patchable weight)")
        ref = component.weights[name]
        _check_shape(where, module, name, ref)
        found.append((component.name, name, ref))
    return found


def _check_patchable(component) -> None:
    if component.backend not in PATCHABLE_BACKENDS:
        raise LoraError(f"{component.name}: run-time LoRAs patch ONNX Runtime and OpenVINO exports, this one is "
                        f"{component.backend}; fuse the LoRA at export (sdexport export --lora)")
    if component.precision not in PATCHABLE_PRECISIONS:
        raise LoraError(f"{component.name} of this export is {component.precision}: export with --precision fp16 "
                        "or fp32 to use run-time LoRAs (or fuse the LoRA at export with --lora)")
    if not component.weights:
        raise LoraError(f"{component.name}: this export has no weight map for run-time LoRAs (made by an older "
                        "sdexport); export it again")


def _flat_index(weights: dict[str, WeightRef]) -> dict[str, str]:
    """kohya's flattened names (diffusers', without text_model., and LDM's) -> module name."""
    index: dict[str, str] = {}
    for name, ref in weights.items():
        index.setdefault(flat(name), name)
        index.setdefault(flat(name.removeprefix("text_model.")), name)
        if ref.ldm:
            index.setdefault(flat(ref.ldm), name)
    return index


def _lookup(component, module: LoraModule) -> str | None:
    table = component.weights
    if module.flat:
        index = _flat_index(table)
        return index.get(module.name) or index.get(module.name.removeprefix("text_model_"))
    for name in (module.name, "text_model." + module.name.removeprefix("text_model."), module.name.removeprefix("text_model.")):
        if name in table:
            return name
    return None


_ENCODER_LAYER = re.compile(r"(?:^|[._])encoder[._]layers[._](\d+)[._]")


def _past_exported_layers(component, module: LoraModule) -> bool:
    """A text encoder layer above every layer the export holds: the graph stops before it (SDXL's first
    encoder returns the penultimate hidden state, so its last layer is not exported) and a LoRA on it
    cannot change what the export computes, as in diffusers, whose output does not depend on it either."""
    if component.role != "text_encoder" or not (m := _ENCODER_LAYER.search(module.name)):
        return False
    held = [int(h.group(1)) for name in component.weights if (h := _ENCODER_LAYER.search(name))]
    return bool(held) and int(m.group(1)) > max(held)


def _check_shape(where: str, module: LoraModule, name: str, ref: WeightRef) -> None:
    shape = ref.torch_shape
    kernel = tuple(module.down.shape[2:])
    fits = (module.up.shape[0] == shape[0] and math.prod(module.down.shape[1:]) == math.prod(shape[1:])
            and (not kernel or kernel == tuple(shape[2:]) or (len(shape) == 2 and kernel == (1, 1))))
    if not fits:
        lora_io = f"{math.prod(module.down.shape[1:])}->{module.up.shape[0]}"
        raise LoraError(f"{where}: adapts a {lora_io} layer but {name} of this export is "
                        f"{math.prod(shape[1:])}->{shape[0]} (a LoRA for another model?)")
