"""LoRA key layouts: which adapted module, which of its tensors, and which file layout a key shows.

diffusers/PEFT files name modules with dots (``unet.down_blocks.0....to_q.lora_A.weight``); kohya files
flatten them with underscores (``lora_unet_down_blocks_0_..._to_q.lora_down.weight``), sometimes after
the original LDM names (``lora_unet_input_blocks_1_1_proj_in``). Flattened names are resolved by
looking them up among the model's own module names flattened the same way, so no name is guessed.

Pure functions on strings: the export side (``sdexport.sources.lora``) and the runtime share them.
"""

from __future__ import annotations

import json
import re

UNSUPPORTED = {
    "hada_w1_a": "a LoHa (LyCORIS) file",
    "lokr_w1": "a LoKr (LyCORIS) file",
    "lora_mid": "a LoCon with Tucker decomposition (LyCORIS lora_mid)",
    "dora_scale": "a DoRA file",
    "lora_magnitude_vector": "a DoRA file",
    "lora_embedding_A": "an embedding LoRA",
}
KOHYA = re.compile(r"^(lora_unet|lora_te|lora_te1|lora_te2)_(.+?)\.(lora_down\.weight|lora_up\.weight|alpha)$")
PEFT = re.compile(r"^(.+?)\.lora_(A|B)(?:\.[A-Za-z0-9_-]+)?\.(weight|bias)$")
OLD = re.compile(r"^(.+?)\.(?:lora|lora_linear_layer)\.(down|up)\.weight$")
OLD_PROC = re.compile(r"^(.+?)\.(?:processor\.)?(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
ALPHA = re.compile(r"^(.+)\.alpha$")
KOHYA_COMPONENT = {"lora_unet": "unet", "lora_te": "text_encoder", "lora_te1": "text_encoder", "lora_te2": "text_encoder_2"}
TEXT_OLD = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}

GroupKey = tuple  # (component or None, module name, kohya-flattened name): tuple[str | None, str, bool]


def flat(name: str) -> str:
    """A dotted module name as kohya writes it."""
    return name.replace(".", "_")


def split_component(name: str) -> tuple[str | None, str]:
    for prefix in ("unet.", "text_encoder_2.", "text_encoder."):
        if name.startswith(prefix):
            return prefix[:-1], name[len(prefix):]
    if name.startswith("base_model.model."):
        return None, name[len("base_model.model."):]
    return None, name


def classify(key: str) -> tuple[GroupKey, str, str | None] | None:
    """(the module's group, which of its tensors this key is, the file layout it shows) or None.

    The tensor is "down", "up", "alpha", "bias", or "A.bias" (a bias on PEFT's down matrix, which no
    layer can take); alpha keys alone do not show a layout.
    """
    if m := KOHYA.match(key):
        part = {"lora_down": "down", "lora_up": "up", "alpha": "alpha"}[m.group(3).split(".")[0]]
        return (KOHYA_COMPONENT[m.group(1)], m.group(2), True), part, "kohya"
    if m := PEFT.match(key):
        component, name = split_component(m.group(1))
        down = m.group(2) == "A"
        part = ("A.bias" if down else "bias") if m.group(3) == "bias" else ("down" if down else "up")
        return (component, name, False), part, "peft"
    if m := OLD_PROC.match(key):  # to_q_lora style: the projection is in the name
        component, name = split_component(m.group(1))
        which, component = m.group(2), component or "unet"
        name = f"{name}.{TEXT_OLD[which]}" if component == "text_encoder" else \
            f"{name}.{'to_out.0' if which == 'to_out' else which}"
        return (component, name, False), m.group(3), "diffusers-old"
    if m := OLD.match(key):
        component, name = split_component(m.group(1))
        return (component or "unet", name, False), m.group(2), "diffusers-old"
    if m := ALPHA.match(key):
        component, name = split_component(m.group(1))
        return (component or "unet", name, False), "alpha", None
    return None


def unsupported_kind(keys) -> tuple[str, str] | None:
    """(what the file is, its first key showing it) for adapter kinds that are not LoRA / LoCon."""
    for marker, what in UNSUPPORTED.items():
        for k in keys:
            if marker in k:
                return what, k
    return None


def pattern_value(patterns, name: str):
    """PEFT's get_pattern_key: the first pattern that matches the end of the module name."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            return value
    return None


def layout_of(layouts: set[str]) -> str:
    return "kohya" if layouts == {"kohya"} else ("peft" if "peft" in layouts else "diffusers-old")


def adapter_metadata(raw: str) -> dict[str, dict]:
    """Per component LoraConfig fields from diffusers' ``lora_adapter_metadata`` JSON ("unet.r": 4, ...).
    ValueError saying what is wrong with it; callers add the file's name and their own error type."""
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError:
        raise ValueError("lora_adapter_metadata is not valid JSON") from None
    if not isinstance(flat, dict):
        raise ValueError("lora_adapter_metadata is not a JSON object")
    out: dict[str, dict] = {}
    for key, value in flat.items():
        component, _, field = str(key).partition(".")
        out.setdefault(component, {})[field] = value
    return out
