"""LoRA files: diffusers/PEFT and kohya (A1111) layouts read into one form, fused into weights, merged.

The math. A LoRA module adapts one layer's weight W [out, in] (a convolution's [out, in, kh, kw]) with
a down matrix A [r, in(, kh, kw)] and an up matrix B [out, r(, 1, 1)]:

    W' = W + s * (alpha / r) * (B @ A)        convolutions: A flattened to [r, in*kh*kw], the product reshaped

s is the scale the user gives (``--lora FILE:0.7``), alpha the file's (kohya ``.alpha`` tensors, diffusers'
``lora_adapter_metadata`` with PEFT's ``lora_alpha``/``alpha_pattern``; none means alpha = r), r the rank
(rsLoRA: sqrt(r)). Several LoRAs are added one after the other, in the order given, as PEFT fuses them.

Merging LoRAs i = 1..n with weights w_i into one, per module, with c_i = w_i * alpha_i / r_i:

    sum_i c_i * (B_i @ A_i) = [c_1 B_1 | ... | c_n B_n] @ [A_1; ...; A_n]

so the merged module has rank r_1 + ... + r_n, its up matrix is the scaled B's side by side, its down
matrix the A's stacked, and its alpha equals its rank (factor 1). Applied at scale s it equals applying
every input at s * w_i; a module that only some inputs adapt gets only their blocks. Exact in real
arithmetic; in float32 the two orders of summation differ by rounding only.

Names. diffusers/PEFT files name modules with dots (``unet.down_blocks.0....to_q.lora_A.weight``); kohya
files flatten them with underscores (``lora_unet_down_blocks_0_..._to_q.lora_down.weight``), sometimes
after the original LDM names (``lora_unet_input_blocks_1_1_proj_in``). Flattened names are resolved by
looking them up among the model's own module names flattened the same way, so no name is guessed.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch

from runtime.lora import keys as lora_keys
from sdexport.errors import OptionError, SourceError
from sdexport.sources.base import sample_names
from sdexport.sources.checkpoint import Checkpoint, save_safetensors
from sdexport.sources.convert import unet_name_to_ldm
from sdexport.sources.models import CONFIGS_DIR, empty_model, read_configs

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")  # SDXL has the second text encoder
TEXT_COMPONENTS = COMPONENTS[1:]


# ---------------------------------------------------------------------------------------------
# FILE[:SCALE]
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LoraRef:
    path: Path
    scale: float = 1.0

    @classmethod
    def parse(cls, spec: "str | Path | tuple | LoraRef") -> "LoraRef":
        """``FILE[:SCALE]`` (a colon followed by a number; a path's own colons stay), a (file, scale) pair, or a LoraRef."""
        if isinstance(spec, LoraRef):
            return spec
        if isinstance(spec, tuple):
            path, scale = spec
            return cls(Path(path), float(scale))
        if isinstance(spec, Path):
            return cls(spec)
        head, sep, tail = spec.rpartition(":")
        if sep and head and not re.search(r"[\\/]", tail):
            try:
                return cls(Path(head), float(tail))
            except ValueError:
                if not Path(spec).exists():
                    raise SourceError(f"--lora {spec}: scale {tail!r} is not a number (expected FILE[:SCALE])") from None
        return cls(Path(spec))


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class LoraModule:
    """One adapted layer as a file describes it."""

    component: str  # "unet", "text_encoder" (or another model's part, e.g. "text_encoder_2")
    name: str  # dotted diffusers name, or kohya's flattened one (flat=True)
    flat: bool
    down: torch.Tensor  # A [r, in(, kh, kw)]
    up: torch.Tensor  # B [out, r(, 1, 1)]
    alpha: float
    rslora: bool = False
    bias: torch.Tensor | None = None  # PEFT lora_bias: B's bias [out]
    key: str = ""  # a key of the file, for messages

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def scaling(self, scale: float) -> float:
        """PEFT's ``scaling``: scale * alpha / r (rsLoRA: / sqrt(r)), computed in that order."""
        return scale * self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def delta(self, shape: Sequence[int], scale: float) -> torch.Tensor:
        up, down = self.up.float().flatten(1), self.down.float().flatten(1)
        return (up @ down).reshape(tuple(shape)) * self.scaling(scale)


@dataclasses.dataclass
class LoraFile:
    path: Path
    layout: str  # "peft" (diffusers/PEFT), "diffusers-old", "kohya"
    modules: list[LoraModule]

    def describe(self) -> dict:
        return {"file": str(self.path), "layout": self.layout, "modules": len(self.modules),
                "ranks": sorted({m.rank for m in self.modules})}


# Key layouts are shared with the runtime's run-time LoRAs (runtime.lora.keys, torch-free).
_UNSUPPORTED = lora_keys.UNSUPPORTED
_split_component = lora_keys.split_component


def _peft_metadata(metadata: Mapping[str, str], path: Path) -> dict[str, dict]:
    """Per component LoraConfig fields: diffusers' ``lora_adapter_metadata`` or a PEFT adapter_config.json."""
    raw = metadata.get("lora_adapter_metadata")
    try:
        out = lora_keys.adapter_metadata(raw) if raw else {}
    except ValueError as e:
        raise SourceError(f"{path}: {e}") from None
    config = path.parent / "adapter_config.json"
    if config.is_file() and not out:
        try:
            out[""] = json.loads(config.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            raise SourceError(f"{config}: not valid JSON") from None
    return out


_pattern_value = lora_keys.pattern_value


def read_lora(path: str | Path) -> LoraFile:
    """Read a LoRA file (.safetensors, or a .ckpt/.pt/.bin state dict) into :class:`LoraModule` entries."""
    path = Path(path)
    tensors, metadata = _read_tensors(path)
    groups, layouts = _group_by_module(tensors, path)
    config = _peft_metadata(metadata, path)
    modules = [m for key, group in groups.items() if (m := _module(key, group, config, path)) is not None]
    if not modules:
        raise SourceError(f"{path}: a LoRA file without any complete module")
    layout = lora_keys.layout_of(layouts)
    return LoraFile(path, layout, modules)


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of the file and its metadata, after refusing full models and other adapter kinds."""
    with Checkpoint.open(path) as checkpoint:
        keys = checkpoint.keys()
        if not keys:
            raise SourceError(f"{path}: no tensors in this file")
        if any(k.startswith(("model.diffusion_model.", "first_stage_model.", "unet.conv_in.")) for k in keys):
            raise SourceError(f"{path}: a full model checkpoint, not a LoRA")
        diffs = [k for k in keys if k.endswith((".diff", ".diff_b"))]
        if diffs:
            raise SourceError(f"{path}: a LyCORIS full-difference file ({diffs[0]}): only LoRA / LoCon files "
                              "(lora_A/lora_B, lora_down/lora_up) can be fused")
        for marker, what in _UNSUPPORTED.items():
            hits = [k for k in keys if marker in k]
            if hits:
                raise SourceError(f"{path}: {what} ({hits[0]}): only LoRA / LoCon files (lora_A/lora_B, "
                                  "lora_down/lora_up) can be fused")
        return {k: checkpoint.get(k) for k in keys}, checkpoint.metadata


_GroupKey = tuple[str | None, str, bool]  # (component, module name, kohya-flattened name)
_classify = lora_keys.classify


def _group_by_module(tensors: Mapping[str, torch.Tensor], path: Path) -> tuple[dict[_GroupKey, dict], set[str]]:
    """The file's tensors grouped per adapted module ({"down", "up", "alpha", "bias", "key"}), and its layouts."""
    groups: dict[_GroupKey, dict] = {}
    layouts: set[str] = set()
    unknown: list[str] = []
    for key, value in tensors.items():
        found = _classify(key)
        if found is None:
            unknown.append(key)
            continue
        group_key, part, layout = found
        if part == "A.bias":
            unknown.append(key)
            part = "bias"
        group = groups.setdefault(group_key, {})
        group[part] = value
        if layout is not None:
            group.setdefault("key", key)
            layouts.add(layout)
    if not layouts:
        raise SourceError(f"{path}: not a LoRA file (no lora_A/lora_B or lora_down/lora_up tensors; "
                          f"keys like {sample_names(sorted(tensors))})")
    if unknown:
        raise SourceError(f"{path}: tensors that are not LoRA weights: {sample_names(unknown)}")
    return groups, layouts


def _module(key: _GroupKey, group: dict, config: Mapping[str, dict], path: Path) -> LoraModule | None:
    """One module from its group of tensors; None for an alpha without weights (some trainers keep
    them for frozen modules)."""
    component, name, flat = key
    if "down" not in group or "up" not in group:
        if set(group) <= {"alpha"}:
            return None
        raise SourceError(f"{path}: module {name} has a lora {'down' if 'down' in group else 'up'} matrix "
                          "but not its partner")
    down, up = group["down"], group["up"]
    if down.ndim not in (2, 4) or up.ndim != down.ndim or up.shape[1] != down.shape[0]:
        raise SourceError(f"{path}: module {name}: down {list(down.shape)} and up {list(up.shape)} do not "
                          "form a low-rank pair")
    fields = config.get(component or "", config.get("", {}))
    rank = int(down.shape[0])
    _check_values(path, name, group, rank)
    if "alpha" in group:
        alpha = float(group["alpha"].float().item())
    elif fields:
        found = _pattern_value(fields.get("alpha_pattern") or {}, name)
        alpha = float(found if found is not None else fields.get("lora_alpha", rank))
    else:
        alpha = float(rank)
    return LoraModule(component or "", name, flat, down, up, alpha,
                      rslora=bool(fields.get("use_rslora", False)) if fields else False,
                      bias=group.get("bias"), key=group.get("key", name))


def _check_values(path: Path, name: str, group: dict, rank: int) -> None:
    """A rank of 0 divides by zero and a NaN spreads through every weight it touches: refused here,
    where a dry run also sees them, rather than as an internal error deep in the export."""
    if rank < 1:
        raise SourceError(f"{path}: module {name} has rank 0 (its down matrix has no rows)")
    if "alpha" in group and group["alpha"].numel() != 1:
        raise SourceError(f"{path}: module {name}: alpha has {group['alpha'].numel()} elements, expected one number")
    for part in ("down", "up", "alpha", "bias"):
        tensor = group.get(part)
        if tensor is not None and not bool(torch.isfinite(tensor.float()).all()):
            raise SourceError(f"{path}: module {name}: its {part} tensor holds NaN or infinite values")


# ---------------------------------------------------------------------------------------------
# The model's adaptable layers, and matching a LoRA against them
# ---------------------------------------------------------------------------------------------


_flat = lora_keys.flat


@dataclasses.dataclass
class ModelLayers:
    """Per component: every Linear / Conv2d module name with its weight shape, and kohya-name lookups."""

    shapes: dict[str, dict[str, tuple[int, ...]]]
    flat: dict[str, dict[str, str]]
    description: str = "this model"
    sdxl: bool | None = None  # the model is SDXL (None: any family, e.g. the known architectures)

    @classmethod
    def from_modules(cls, modules: Mapping[str, torch.nn.Module], unet_config: Mapping | None = None,
                     description: str = "this model") -> "ModelLayers":
        shapes: dict[str, dict[str, tuple[int, ...]]] = {}
        flat: dict[str, dict[str, str]] = {}
        for component, model in modules.items():
            table = {name: tuple(m.weight.shape) for name, m in model.named_modules()
                     if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
            shapes[component] = table
            lookup: dict[str, str] = {}
            for name in table:
                lookup[_flat(name)] = name
                if component in TEXT_COMPONENTS:
                    lookup[_flat("text_model." + name.removeprefix("text_model."))] = name
                elif component == "unet" and unet_config is not None:
                    try:
                        lookup.setdefault(_flat(unet_name_to_ldm(name + ".weight", unet_config)[: -len(".weight")]), name)
                    except (KeyError, ValueError):
                        pass
            flat[component] = lookup
        return cls(shapes, flat, description)

    @classmethod
    def of(cls, source) -> "ModelLayers":
        """From a source's configs, on the meta device (no weights are read). SDXL sources also have
        ``text_encoder_2_config``; an SDXL refiner has no ``text_encoder``."""
        configs = {"unet": source.unet_config, "text_encoder": source.text_encoder_config,
                   "text_encoder_2": getattr(source, "text_encoder_2_config", None)}
        modules = {part: empty_model(part, config) for part, config in configs.items() if config}
        layers = cls.from_modules(modules, source.unet_config, describe_model(source.unet_config))
        layers.sdxl = source.unet_config.get("addition_embed_type") == "text_time"
        return layers

    @classmethod
    @functools.cache
    def known(cls) -> "ModelLayers":
        """Every layer name of the SD 1.x and SD 2.x architectures (configs shipped with sdexport)."""
        merged = cls({c: {} for c in COMPONENTS}, {c: {} for c in COMPONENTS}, "SD 1.x / 2.x / XL")
        for family in ("sd1", "sd2-v", "sdxl-base"):
            configs = read_configs(CONFIGS_DIR / family)
            modules = {c: empty_model(c, configs[c]) for c in COMPONENTS if c in configs}
            layers = cls.from_modules(modules, configs["unet"])
            for c in modules:
                merged.shapes[c].update(layers.shapes[c])
                merged.flat[c].update(layers.flat[c])
        return merged

    def target(self, module: LoraModule) -> tuple[str, str] | None:
        """(component, module name) of the layer a LoRA module adapts, or None."""
        # A raw PEFT adapter (base_model.model.*) does not say its component: try each.
        for component in (module.component,) if module.component else tuple(self.shapes):
            table = self.shapes.get(component)
            if table is None:
                continue
            if module.flat:
                name = self.flat[component].get(module.name)
                if name is not None:
                    return component, name
                continue
            for name in (module.name, module.name.removeprefix("text_model."), "text_model." + module.name):
                if name in table:
                    return component, name
        return None


def describe_model(unet_config: Mapping) -> str:
    cross = unet_config.get("cross_attention_dim")
    cross = cross[0] if isinstance(cross, (list, tuple)) else cross
    if unet_config.get("addition_embed_type") == "text_time":  # added text/time conditioning: SDXL at any width
        family = "SDXL"
    else:
        family = {768: "SD 1.x", 1024: "SD 2.x"}.get(cross, "this model")
    return f"{family} (cross-attention width {cross})"


def guess_family(lora: LoraFile) -> str | None:
    """Which model family a LoRA was trained for: SDXL if it adapts a second text encoder or the
    added-conditioning embedding, else from its cross-attention key/value input width."""
    if any(m.component == "text_encoder_2" or re.search(r"(add_embedding|label_emb)[._]", m.name)
           for m in lora.modules):
        return "SDXL"
    for m in lora.modules:
        if m.component == "unet" and re.search(r"attn2[._]to_[kv]$", m.name):
            return {768: "SD 1.x", 1024: "SD 2.x", 1280: "SDXL", 2048: "SDXL"}.get(int(m.down.flatten(1).shape[1]))
    return None


def is_sdxl_lora(lora: LoraFile) -> bool | None:
    """Whether a LoRA was trained for SDXL (True) or SD 1.x/2.x (False), where its modules tell: a second
    text encoder, the added-conditioning embedding or a 1280/2048-wide cross-attention input say SDXL;
    attention in the U-Net's first level (SDXL's has none), a fourth level or a 768/1024-wide
    cross-attention input say SD 1.x/2.x."""
    guess = guess_family(lora)
    if guess is not None:
        return guess == "SDXL"
    sd_only = re.compile(r"(down_blocks[._]0[._]attentions|up_blocks[._]3[._]attentions|input_blocks[._][12][._]1[._]"
                         r"|output_blocks[._](9|10|11)[._]1[._])")
    if any(m.component == "unet" and sd_only.search(m.name) for m in lora.modules):
        return False
    return None


def _check_family(lora: LoraFile, layers: ModelLayers) -> None:
    lora_sdxl = is_sdxl_lora(lora)
    if layers.sdxl is None or lora_sdxl is None or lora_sdxl == layers.sdxl:
        return
    what = {True: "SDXL", False: "SD 1.x/2.x"}
    raise SourceError(f"{lora.path}: a LoRA for {what[lora_sdxl]}, but the model is {what[layers.sdxl]} "
                      f"({layers.description}): a LoRA fits only the model family it was trained for")


def _fits(module: LoraModule, shape: tuple[int, ...]) -> bool:
    if module.up.shape[0] != shape[0]:
        return False
    if math.prod(module.down.shape[1:]) != math.prod(shape[1:]):
        return False
    kernel = tuple(module.down.shape[2:])
    return not kernel or kernel == tuple(shape[2:]) or (len(shape) == 2 and kernel == (1, 1))


def _io(shape: Sequence[int]) -> str:
    return f"{math.prod(shape[1:])}->{shape[0]}"


@dataclasses.dataclass(frozen=True)
class Applied:
    """A LoRA module matched to a layer of the model, with the user's scale."""

    component: str
    target: str  # the model's module name
    module: LoraModule
    scale: float


def resolve(lora: LoraFile, layers: ModelLayers, scale: float = 1.0) -> list[Applied]:
    """Match every module of a LoRA to a layer of the model; SourceError on anything that does not fit."""
    _check_family(lora, layers)
    unmatched, wrong = [], []
    applied: list[Applied] = []
    for module in lora.modules:
        found = layers.target(module)
        if found is None:
            unmatched.append(module.key)
            continue
        component, target = found
        shape = layers.shapes[component][target]
        if not _fits(module, shape):
            wrong.append((module, target, shape))
            continue
        applied.append(Applied(component, target, module, scale))
    guess = guess_family(lora)
    other = f" (it looks like a LoRA for {guess})" if guess and guess not in layers.description else ""
    if unmatched and not applied and not wrong:
        raise SourceError(f"{lora.path}: none of its {len(lora.modules)} LoRA modules match {layers.description}"
                          f"{other}, e.g. {sample_names(unmatched)}")
    if wrong:
        module, target, shape = wrong[0]
        lora_shape = (module.up.shape[0], *module.down.shape[1:])
        raise SourceError(f"{lora.path}: a LoRA for another model family{other}: {module.key} adapts a "
                          f"{_io(lora_shape)} layer but {target} of {layers.description} is {_io(shape)}")
    if unmatched:
        raise SourceError(f"{lora.path}: {len(unmatched)} of its {len(lora.modules)} LoRA modules match nothing in "
                          f"{layers.description}{other}, e.g. {sample_names(unmatched)}")
    return applied


# ---------------------------------------------------------------------------------------------
# Fusing
# ---------------------------------------------------------------------------------------------


def fuse_into(model: torch.nn.Module, applied: Iterable[Applied]) -> torch.nn.Module:
    """W += scale * alpha / r * (B @ A) for each applied module, in order (in place)."""
    with torch.no_grad():
        for a in applied:
            layer = model.get_submodule(a.target)
            layer.weight += a.module.delta(layer.weight.shape, a.scale).to(layer.weight.dtype)
            if a.module.bias is not None:
                layer.bias += (a.module.bias.float() * a.module.scaling(a.scale)).to(layer.bias.dtype)
    return model


def load_loras(refs: Iterable, layers: ModelLayers) -> tuple[list[LoraFile], list[Applied]]:
    """Read and match LoRAs (``FILE[:SCALE]`` strings, (file, scale) pairs or LoraRefs) before any weight loads."""
    files, applied = [], []
    for spec in refs:
        ref = LoraRef.parse(spec)
        if not ref.path.exists():
            raise SourceError(f"{ref.path}: no such LoRA file")
        lora = read_lora(ref.path)
        files.append(lora)
        applied += resolve(lora, layers, ref.scale)
    return files, applied


# ---------------------------------------------------------------------------------------------
# Refit sets: the fused weights that differ from the base model, for engines that refit in place
# ---------------------------------------------------------------------------------------------


def refit_set(source) -> dict[str, torch.Tensor]:
    """``{"<component>.<parameter name>": fused tensor}`` for every parameter the source's LoRAs change.

    ``source`` is what :func:`sdexport.sources.open.open_source` returns with ``loras``; names are diffusers
    parameter names (the U-Net's as in ``UNet2DConditionModel.state_dict()``) behind the component name.
    """
    out: dict[str, torch.Tensor] = {}
    for component in COMPONENTS:
        entries = [a for a in getattr(source, "applied", ()) if a.component == component]
        if not entries:
            continue
        model = getattr(source, f"load_{component}")()
        for target in sorted({a.target for a in entries}):
            layer = model.get_submodule(target)
            out[f"{component}.{target}.weight"] = layer.weight.detach().clone()
            if any(a.module.bias is not None for a in entries if a.target == target):
                out[f"{component}.{target}.bias"] = layer.bias.detach().clone()
        del model
    return out


def write_refit_set(source, out: str | Path) -> Path:
    """Write :func:`refit_set` as a safetensors file (written beside and renamed: never half-written)."""
    tensors = refit_set(source)
    if not tensors:
        raise SourceError("no LoRA given: a refit set holds the weights that LoRAs change")
    loras = [{"file": str(f.path), "layout": f.layout} for f in getattr(source, "lora_files", ())]
    scales = [a.scale for a in getattr(source, "applied", ())]
    meta = {"format": "pt", "sdexport_refit": json.dumps({"loras": loras, "scales": sorted(set(scales))})}
    return save_safetensors(out, tensors, meta)


# ---------------------------------------------------------------------------------------------
# Merging LoRAs into one
# ---------------------------------------------------------------------------------------------


def _kohya_name(component: str, name: str) -> str:
    if component == "unet":
        return "lora_unet_" + _flat(name)
    prefix = {"text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}[component]
    return prefix + _flat("text_model." + name.removeprefix("text_model."))


def merge_loras(inputs: Sequence, out: str | Path, layout: str = "diffusers", model=None,
                dtype: torch.dtype = torch.float32, overwrite: bool = False) -> Path:
    """LoRA + LoRA -> one LoRA file (see the module docstring for the math).

    ``inputs``: ``FILE[:WEIGHT]`` strings, (file, weight) pairs or LoraRefs. ``layout``: ``"diffusers"``
    (PEFT keys ``unet.<module>.lora_A.weight``, ``text_encoder.text_model.<module>...``; alpha = rank, so no
    metadata is needed) or ``"kohya"`` (``lora_unet_*``/``lora_te_*`` with ``.alpha`` = rank). Kohya names are
    resolved against ``model`` (a model source) or, by default, the SD 1.x/2.x/XL architectures.
    """
    if layout not in ("diffusers", "kohya"):
        raise OptionError(f"layout {layout!r}: use diffusers or kohya")
    refs = [LoraRef.parse(i) for i in inputs]
    if len(refs) < 1:
        raise SourceError("merge-lora needs at least one LoRA")
    out = Path(out)
    if any(out.resolve() == r.path.resolve() for r in refs if r.path.exists()):
        raise OptionError(f"{out}: the output would overwrite an input")
    if out.exists() and not overwrite:
        raise OptionError(f"{out}: already exists; pass --overwrite to replace it")
    if not out.resolve().parent.is_dir():
        raise OptionError(f"{out.resolve().parent}: directory does not exist")
    layers = ModelLayers.of(model) if model is not None else ModelLayers.known()
    tensors: dict[str, torch.Tensor] = {}
    for (component, target), parts in _modules_per_layer(refs, layers, model is not None).items():
        tensors.update(_merged_module(component, target, parts, layout, dtype))
    meta = {"format": "pt", "sdexport_merge_lora": json.dumps(
        [{"file": r.path.name, "weight": r.scale} for r in refs])}
    return save_safetensors(out, tensors, meta)


def _modules_per_layer(refs: Sequence[LoraRef], layers: ModelLayers, for_model: bool
                       ) -> dict[tuple[str, str], list[tuple[LoraModule, float]]]:
    """Per adapted layer, the modules of every input that adapt it, with the input's weight."""
    blocks: dict[tuple[str, str], list[tuple[LoraModule, float]]] = {}
    for ref in refs:
        if not ref.path.exists():
            raise SourceError(f"{ref.path}: no such LoRA file")
        lora = read_lora(ref.path)
        unmatched = []
        for module in lora.modules:
            found = layers.target(module)
            if found is None:
                unmatched.append(module.key)
                continue
            blocks.setdefault(found, []).append((module, ref.scale))
        if unmatched:
            hint = "" if for_model else "; pass the model the LoRAs are for"
            raise SourceError(f"{ref.path}: {len(unmatched)} LoRA modules match no SD 1.x/2.x/XL layer, "
                              f"e.g. {sample_names(unmatched)}{hint}")
    return blocks


def _merged_module(component: str, target: str, parts: list[tuple[LoraModule, float]], layout: str,
                   dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One layer's merged LoRA tensors: the scaled up matrices side by side, the down matrices stacked."""
    first = parts[0][0]
    kernel = tuple(first.down.shape[1:])
    downs, ups, bias = [], [], None
    for module, weight in parts:
        c = module.scaling(weight)
        if math.prod(module.down.shape[1:]) != math.prod(kernel) or module.up.shape[0] != first.up.shape[0]:
            raise SourceError(f"{module.key}: its shape does not fit the other LoRAs' {target}")
        downs.append(module.down.float().reshape(module.rank, *kernel))
        ups.append(module.up.float().reshape(module.up.shape[0], module.rank, *([1] * (len(kernel) - 1))) * c)
        if module.bias is not None:
            bias = module.bias.float() * c + (bias if bias is not None else 0)
    down, up = torch.cat(downs, 0).to(dtype), torch.cat(ups, 1).to(dtype)
    if layout == "diffusers":
        prefix = f"{component}.{target if component == 'unet' else 'text_model.' + target.removeprefix('text_model.')}"
        out = {f"{prefix}.lora_A.weight": down.contiguous(), f"{prefix}.lora_B.weight": up.contiguous()}
        if bias is not None:
            out[f"{prefix}.lora_B.bias"] = bias.to(dtype)
        return out
    if bias is not None:
        raise SourceError(f"{target}: LoRA biases have no kohya layout; write the diffusers layout")
    prefix = _kohya_name(component, target)
    return {f"{prefix}.lora_down.weight": down.contiguous(), f"{prefix}.lora_up.weight": up.contiguous(),
            f"{prefix}.alpha": torch.tensor(float(down.shape[0]), dtype=dtype)}
