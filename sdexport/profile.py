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
from typing import Any, Mapping

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from sdexport import options
from sdexport.errors import OptionError

PROFILE_DIR = Path(__file__).resolve().parent / "profiles"
TARGETS, PRECISIONS = options.TARGETS, options.PRECISIONS


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


def validate(data: dict, source: str) -> dict:
    """Every table and field known and of the right type (sdexport.options declares them); a
    message names the offending field."""
    tables = [k for k in options.SECTIONS if k]
    head = {k: v for k, v in data.items() if not isinstance(v, dict)}
    for key, value in data.items():
        if isinstance(value, dict) and key not in tables:
            raise OptionError(f"{source}: unknown table [{key}] (known: {', '.join(tables)})")
        if key in tables and not isinstance(value, dict):
            raise OptionError(f"{source}: {key} must be a table ([{key}] with its fields), got {value!r}")
    options.Head.from_table(head, source)
    for key in tables:
        if isinstance(data.get(key), dict):
            options.SECTIONS[key].from_table(data[key], source)
    for required in ("target", "precision"):
        if required not in data:
            raise OptionError(f"{source}: missing field {required!r}")
    shapes = data.get("shapes", {})
    if shapes.get("static") and not ("height" in shapes and "width" in shapes) and not shapes.get("sizes"):
        raise OptionError(f"{source}: shapes.static needs shapes.height and shapes.width, or shapes.sizes per model family")
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
    except RecursionError:  # tomllib parses nested arrays recursively
        raise OptionError(f"{path}: not a profile (TOML nested too deeply)") from None
    return Profile(path.stem, path, validate(data, str(path)))


def listing() -> str:
    lines = []
    for name, path in available().items():
        p = load(str(path))
        shapes = p.data.get("shapes", {})
        shape = _shape_listing(shapes)
        lines.append(f"{name:<20} {p.data['target']:<9} {p.data['precision']:<7} {shape:<16} {p.description}")
    return "\n".join(lines)


def _shape_listing(shapes: Mapping[str, Any]) -> str:
    if not shapes.get("static"):
        return "dynamic"
    if "height" in shapes and "width" in shapes:
        return f"static {shapes['width']}x{shapes['height']}"
    return "static by family"


def _model_family(model, flags: Mapping[str, Any]):
    """A ModelFamily from what ``resolve`` was given: one, a model path (its configs read, or the single
    file opened as its export opens it: no weights are read, errors are the export's), or None."""
    if model is None or hasattr(model, "name"):
        return model
    from sdexport.sources.family import family_of_folder, family_of_source
    from sdexport.sources.open import open_source

    config = flags.get("source_config")
    found = family_of_folder(Path(model)) if config is None else None
    if found is not None:
        return found
    source = open_source(model, config=config, prediction_type=flags.get("prediction_type"))
    try:
        return family_of_source(source)
    finally:
        getattr(source, "close", lambda: None)()


def resolve(profile: str | None, *, target=None, precision=None, height=None, width=None, batch=None, cfg=None,
            sections: Mapping[str, Mapping[str, Any]] | None = None, model=None, **flags):
    """ExportOptions from a profile (if any) with command-line flags on top: the keyword arguments
    for the head, shapes and cfg, ``sections`` ({section: {field: value}}) for the other tables.
    ``model`` (a model path or a sdexport.sources.family.ModelFamily) picks a static profile's size
    for the model's family (``[shapes] sizes``; SDXL 1024, SD 1.x 512 in the shipped profiles)."""
    from sdexport.export.targets.base import ExportOptions

    p = load(profile) if profile else Profile("custom", None, {})
    shapes = options.ShapesOptions.from_table(p.data.get("shapes", {}))
    if height is None and width is None and shapes.static:
        needs_family = bool(shapes.sizes) or shapes.height is None or shapes.width is None
        size = shapes.size_for(_model_family(model, flags) if needs_family else None)
        if size is None:
            raise OptionError(f"profile {p.name}: no static size for a model of unknown family (no shapes.sizes sd1 "
                              f"entry, no shapes.height and width); pass --height and --width")
        height, width = size
    if batch is None and shapes.static:
        batch = shapes.batch
    sections = sections or {}
    typed = {}
    for name in ("backend", "coreml", "tensorrt", "onnx", "openvino", "quantize", "validation"):
        typed[name] = options.SECTIONS[name].from_table({**p.data.get(name, {}), **sections.get(name, {})})
    resolved = ExportOptions(
        target=target if target is not None else p.data.get("target", "onnx"),  # "" is an unknown target, not the default
        precision=precision if precision is not None else p.data.get("precision", "fp32"),
        height=height,
        width=width,
        batch=batch,
        cfg=cfg or p.get("cfg", "mode", "batched"),
        profile_name=p.name,
        description=p.description,
        **typed,
        **flags,
    )
    options.check_flags_for_target(sections, resolved.target)
    return resolved
