"""Device profiles: one TOML file per target device, checked against a schema, resolved with flags.

A profile says how to export for a device (target, precision, static or dynamic shapes, CFG batching,
target-specific settings such as Core ML attention and palettization), how the runtime should run
it there (backend options: providers, threads, compute units, inference precision) and how strict the
export's parity gate is. Command-line flags override profile fields; the resolved profile is written
into the manifest, and the runtime applies its backend options.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from sdexport.errors import OptionError

PROFILE_DIR = Path(__file__).resolve().parent / "profiles"
TARGETS = ("onnx", "openvino", "coreml", "tensorrt")
PRECISIONS = ("fp32", "fp16", "int8", "int4", "hybrid", "int8-static", "mixed")

# table -> field -> allowed type(s); a tuple of strings instead of a type lists the allowed values
SCHEMA: dict[str, dict[str, Any]] = {
    "": {"description": str, "target": TARGETS, "precision": PRECISIONS},
    "shapes": {"static": bool, "height": int, "width": int, "batch": int},
    "cfg": {"mode": ("batched", "sequential")},
    "backend": {
        "device": str, "providers": list, "threads": int, "precision_hint": ("f32", "bf16", "f16"),
        "performance_hint": ("LATENCY", "THROUGHPUT"), "cache_dir": str, "winograd": ("auto", "off"),
        "compute_units": ("all", "cpu-and-gpu", "cpu-and-ne", "cpu-only"),
    },
    "coreml": {
        "attention": ("original", "split-einsum"),
        "compress": ("none", "palettize4", "palettize6", "palettize8", "linear8"),
        "minimum_deployment_target": str,
    },
    "tensorrt": {"optimization_level": int, "timing_cache": str, "refittable": bool, "builder_batch": list,
                 "builder_size": list, "hardware_compatibility": ("none", "ampere_plus"), "qdq_onnx": str,
                 "workspace_mb": int},
    "onnx": {"optimize": ("none", "gpu")},
    "openvino": {"frontend": ("torch", "onnx"), "int4_group_size": int, "winograd": ("auto", "off", "f2", "f4")},
    "quantize": {"min_psnr": float, "calibration_prompts": int, "calibration_steps": int},
    "validation": {"min_psnr_fp32": float, "min_psnr_reduced": float},
}


@dataclasses.dataclass(frozen=True)
class Profile:
    name: str
    path: Path | None
    data: dict[str, Any]

    @property
    def description(self) -> str:
        return self.data.get("description", "")

    def get(self, table: str, key: str, default=None):
        return (self.data if not table else self.data.get(table, {})).get(key, default)

    def to_json(self) -> dict:
        return {"name": self.name, **self.data}


def available() -> dict[str, Path]:
    return {p.stem: p for p in sorted(PROFILE_DIR.glob("*.toml"))}


def _check_value(where: str, value, allowed) -> None:
    if isinstance(allowed, tuple):
        if value not in allowed:
            raise OptionError(f"{where}: {value!r} is not one of {', '.join(map(str, allowed))}")
        return
    if allowed is float and isinstance(value, int) and not isinstance(value, bool):
        return
    if allowed is int and isinstance(value, bool) or not isinstance(value, allowed):
        raise OptionError(f"{where}: expected {allowed.__name__}, got {type(value).__name__} {value!r}")


def validate(data: dict, source: str) -> dict:
    """Every table and field known and of the right type; a message names the offending field."""
    for key, value in data.items():
        if isinstance(value, dict):
            if key not in SCHEMA or key == "":
                raise OptionError(f"{source}: unknown table [{key}] (known: {', '.join(k for k in SCHEMA if k)})")
            for field, inner in value.items():
                if field not in SCHEMA[key]:
                    raise OptionError(f"{source}: unknown field {key}.{field} (known: {', '.join(SCHEMA[key])})")
                _check_value(f"{source}: {key}.{field}", inner, SCHEMA[key][field])
        else:
            if key not in SCHEMA[""]:
                raise OptionError(f"{source}: unknown field {key!r} (known: {', '.join(SCHEMA[''])})")
            _check_value(f"{source}: {key}", value, SCHEMA[""][key])
    for required in ("target", "precision"):
        if required not in data:
            raise OptionError(f"{source}: missing field {required!r}")
    shapes = data.get("shapes", {})
    if shapes.get("static") and not ("height" in shapes and "width" in shapes):
        raise OptionError(f"{source}: shapes.static needs shapes.height and shapes.width")
    return data


def load(name_or_path: str) -> Profile:
    """A profile by name (one of the shipped ones) or by path to a .toml file."""
    path = Path(name_or_path)
    if not (path.suffix == ".toml" and path.is_file()):
        known = available()
        if name_or_path not in known:
            raise OptionError(f"unknown profile {name_or_path!r}; known profiles: {', '.join(known)}")
        path = known[name_or_path]
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise OptionError(f"{path}: not valid TOML ({e})") from None
    return Profile(path.stem, path, validate(data, str(path)))


def listing() -> str:
    lines = []
    for name, path in available().items():
        p = load(str(path))
        shapes = p.data.get("shapes", {})
        shape = f"static {shapes['width']}x{shapes['height']}" if shapes.get("static") else "dynamic"
        lines.append(f"{name:<20} {p.data['target']:<9} {p.data['precision']:<7} {shape:<16} {p.description}")
    return "\n".join(lines)


# Backend options that describe the target device rather than the export machine: validation at
# export time runs on this machine, so they are left out of the validation sessions.
_DEVICE_ONLY = ("device", "providers", "compute_units", "cache_dir")


def resolve(profile: str | None, *, target=None, precision=None, height=None, width=None, batch=None, cfg=None,
            **flags):
    """ExportOptions from a profile (if any) with command-line flags on top."""
    from sdexport.export.targets.base import ExportOptions

    p = load(profile) if profile else Profile("custom", None, {})
    shapes = p.data.get("shapes", {})
    static = shapes.get("static", False)
    if height is None and width is None and static:
        height, width = shapes["height"], shapes["width"]
    if batch is None and static:
        batch = shapes.get("batch")
    backend = dict(p.data.get("backend", {}))
    options = ExportOptions(
        target=target or p.data.get("target", "onnx"),
        precision=precision or p.data.get("precision", "fp32"),
        height=height,
        width=width,
        batch=batch,
        cfg=cfg or p.get("cfg", "mode", "batched"),
        min_psnr_fp32=p.get("validation", "min_psnr_fp32"),
        min_psnr_reduced=p.get("validation", "min_psnr_reduced"),
        backend_options={k: v for k, v in backend.items() if k not in _DEVICE_ONLY},
        profile={
            "name": p.name,
            **{k: v for k, v in p.data.items() if k != "backend"},
            "backend_options": backend,
        },
        **flags,
    )
    return options
