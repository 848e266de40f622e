"""The artifact contract: ``sdexport.json``, written by the exporter and read by the runtime.

An artifact directory holds one manifest, the tokenizer files, the scheduler config and one folder
per component. The manifest says, for every component, which backend runs it, which files it is
made of (with sizes and sha256), its precision, its input/output names, dtypes and shapes (symbolic
where dynamic) and the parity measured against torch at export; and, for the model, everything the
denoising loop needs to know (latent channels, VAE scale, prediction type, ControlNet residual layout).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Iterable

from runtime.files import ArtifactFileError, HashCache, inside
from runtime.lora.weights import WeightRef, weights_from_json, weights_to_json

__all__ = [
    "SCHEMA_VERSION",
    "MANIFEST_NAME",
    "ManifestError",
    "TensorSpec",
    "FileRef",
    "Component",
    "ModelInfo",
    "StaticShape",
    "RunSettings",
    "Manifest",
    "sha256_file",
]

SCHEMA_VERSION = 2  # 2: what the runtime reads is the typed ``runtime`` section (RunSettings)
CFG_MODES = ("batched", "sequential")
DEVICE_LOOP_MODES = ("auto", "on", "off")
MANIFEST_NAME = "sdexport.json"

DTYPES = ("float32", "float16", "bfloat16", "int64", "int32", "int8", "uint8", "bool")
FEEDABLE_DTYPES = tuple(d for d in DTYPES if d != "bfloat16")  # numpy has no bfloat16 to feed or read
ROLES = ("text_encoder", "unet", "vae_encoder", "vae_decoder", "controlnet", "depth_estimator")


class ManifestError(ValueError):
    """The artifact directory or its manifest cannot be used; the message says why."""


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int | str, ...]  # ints are fixed, strings name a dynamic axis

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, data: dict) -> "TensorSpec":
        dtype = data["dtype"]
        if dtype not in DTYPES:
            raise ManifestError(f"tensor {data.get('name')!r}: unknown dtype {dtype!r}")
        if dtype not in FEEDABLE_DTYPES:
            raise ManifestError(f"tensor {data.get('name')!r}: dtype {dtype!r} has no numpy type; the runtime "
                                f"exchanges {', '.join(FEEDABLE_DTYPES)}")
        shape = data["shape"]
        if not isinstance(shape, list) or not all(isinstance(d, str) or (type(d) is int and d >= 0) for d in shape):
            raise ManifestError(f"tensor {data.get('name')!r}: shape {str(shape)[:80]} is not a list of sizes and axis names")
        return cls(str(data["name"]), dtype, tuple(shape))

    def describe(self) -> str:
        return f"{self.name}: {self.dtype}[{', '.join(str(d) for d in self.shape)}]"


@dataclasses.dataclass(frozen=True)
class FileRef:
    path: str  # relative to the artifact directory, "/"-separated
    sha256: str
    bytes: int

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "FileRef":
        return cls(str(data["path"]), str(data["sha256"]), int(data["bytes"]))

    @classmethod
    def of(cls, root: Path, path: Path) -> "FileRef":
        return cls(path.relative_to(root).as_posix(), sha256_file(path), path.stat().st_size)


@dataclasses.dataclass(frozen=True)
class Component:
    name: str  # "text_encoder", "unet", "unet_control", "controlnet/canny", ...
    role: str
    backend: str  # "onnxruntime" | "openvino" | "coreml" | "tensorrt"
    files: tuple[FileRef, ...]  # the first file is the one a backend opens
    precision: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    parity: dict[str, Any] = dataclasses.field(default_factory=dict)
    details: dict[str, Any] = dataclasses.field(default_factory=dict)  # e.g. ops kept in fp32, control inputs
    # module name -> its weight in the graph, for run-time LoRAs (runtime.lora.weights); empty in older exports
    weights: dict[str, WeightRef] = dataclasses.field(default_factory=dict)

    @property
    def main_file(self) -> FileRef:
        return self.files[0]

    @property
    def size_bytes(self) -> int:
        return sum(f.bytes for f in self.files)

    def input(self, name: str) -> TensorSpec:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        raise KeyError(name)

    def to_json(self) -> dict:
        return {
            "role": self.role,
            "backend": self.backend,
            "files": [f.to_json() for f in self.files],
            "precision": self.precision,
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            "parity": self.parity,
            "details": self.details,
        } | ({"weights": weights_to_json(self.weights)} if self.weights else {})

    @classmethod
    def from_json(cls, name: str, data: dict) -> "Component":
        role = data["role"]
        if role not in ROLES:
            raise ManifestError(f"component {name!r}: unknown role {role!r}")
        files = tuple(FileRef.from_json(f) for f in data["files"])
        if not files:
            raise ManifestError(f"component {name!r} lists no files")
        inputs = tuple(TensorSpec.from_json(t) for t in data["inputs"])
        if role in ("unet", "controlnet") and (not inputs or len(inputs[0].shape) != 4):
            raise ManifestError(f"component {name!r}: its first input is not a 4-d sample (batch, channels, height, width)")
        return cls(
            name=name,
            role=role,
            backend=str(data["backend"]),
            files=files,
            precision=str(data["precision"]),
            inputs=inputs,
            outputs=tuple(TensorSpec.from_json(t) for t in data["outputs"]),
            parity=dict(data.get("parity") or {}),
            details=dict(data.get("details") or {}),
            weights=weights_from_json(data.get("weights") or {}),
        )


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What the denoising loop needs to know about the model, independent of any backend."""

    family: str  # "sd1", "sd2", "sd2-v", "inpainting", ...
    prediction_type: str  # "epsilon" | "v_prediction" | "sample"
    latent_channels: int
    unet_in_channels: int  # 9 for inpainting U-Nets
    vae_scale_factor: int  # pixels per latent cell (8 for SD)
    vae_scaling_factor: float  # latents are multiplied by this before the U-Net
    vae_shift_factor: float | None
    text_hidden_size: int
    max_length: int
    default_height: int
    default_width: int
    time_cond_proj_dim: int | None = None  # guidance-embedding U-Nets (LCM distilled)
    # ControlNet residuals the U-Net takes: per residual, [channels, downsampling relative to latents].
    control_residuals: tuple[tuple[int, int], ...] = ()
    recommended: dict[str, Any] = dataclasses.field(default_factory=dict)  # default steps/guidance/scheduler
    # The x4 upscaler: the highest noise level (class label) it takes; its DDPM config for noising the
    # low-resolution input is runtime.upscale.LOW_RES_SCHEDULER in the artifact.
    max_noise_level: int | None = None
    # SDXL (family "sdxl" / "sdxl-refiner"); the defaults describe SD 1.x/2.x, so older manifests load as they were.
    text_encoder_2_hidden_size: int | None = None  # OpenCLIP bigG's width (its penultimate states are concatenated)
    projection_dim: int | None = None  # width of text_encoder_2's pooled, projected text_embeds
    addition_time_embed_dim: int | None = None  # the U-Net's per-number embedding of time_ids
    requires_aesthetics_score: bool = False  # refiner: time_ids end in an aesthetic score, not the target size
    force_zeros_for_empty_prompt: bool = False  # no negative prompt: zero embeddings, not those of ""
    vae_force_upcast: bool = False  # the VAE overflows in fp16: the export keeps it fp32

    @property
    def is_sdxl(self) -> bool:
        return self.addition_time_embed_dim is not None

    @property
    def time_ids_length(self) -> int:
        """(original h, w, crop top, left, target h, w), or the aesthetic score in place of the target size."""
        return 5 if self.requires_aesthetics_score else 6

    @property
    def is_inpainting(self) -> bool:
        return self.unet_in_channels == 2 * self.latent_channels + 1

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["control_residuals"] = [list(r) for r in self.control_residuals]
        for name in _SDXL_FIELDS:  # written only for SDXL: an SD 1.x/2.x manifest stays as it was
            if data[name] is None or data[name] is False:
                del data[name]
        return data

    @classmethod
    def from_json(cls, data: dict) -> "ModelInfo":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise ManifestError(f"model section has unknown keys: {', '.join(sorted(unknown))}")
        data = dict(data)
        data["control_residuals"] = tuple(tuple(r) for r in data.get("control_residuals", ()))
        info = cls(**data)
        info.check_values()
        return info

    _POSITIVE_INTS = ("latent_channels", "unet_in_channels", "vae_scale_factor", "text_hidden_size", "max_length",
                      "default_height", "default_width")

    def check_values(self) -> None:
        """Sizes are positive integers and scaling factors finite: a NaN or 0 here gives garbage
        images with exit 0, a string an internal error far from its cause."""
        for name in self._POSITIVE_INTS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ManifestError(f"model.{name} {value!r}: expected a positive integer")
        if self.max_length < 2:
            raise ManifestError(f"model.max_length {self.max_length}: expected at least 2")
        for name in _SDXL_FIELDS:
            value = getattr(self, name)
            if name in _SDXL_FLAGS and not isinstance(value, bool):
                raise ManifestError(f"model.{name} {str(value)[:40]}: expected true or false")
            if name not in _SDXL_FLAGS and value is not None and (
                    isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ManifestError(f"model.{name} {str(value)[:40]}: expected a positive integer or null")
        scaling = self.vae_scaling_factor
        if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling) or scaling <= 0:
            raise ManifestError(f"model.vae_scaling_factor {scaling!r}: expected a finite number above 0")
        shift = self.vae_shift_factor
        if shift is not None and (isinstance(shift, bool) or not isinstance(shift, (int, float)) or not math.isfinite(shift)):
            raise ManifestError(f"model.vae_shift_factor {shift!r}: expected a finite number or null")
        level = self.max_noise_level
        if level is not None and (isinstance(level, bool) or not isinstance(level, int) or level < 0):
            raise ManifestError(f"model.max_noise_level {level!r}: expected an integer >= 0 or null")
        self._check_recommended()

    def _check_recommended(self) -> None:
        """The defaults a generate without --steps/--guidance-scale/--scheduler takes from the export."""
        rec = {} if self.recommended is None else self.recommended
        if not isinstance(rec, dict):
            raise ManifestError(f"model.recommended {str(rec)[:40]}: expected a table of defaults")
        steps, scale, scheduler = rec.get("steps", 1), rec.get("guidance_scale", 1.0), rec.get("scheduler", "")
        if type(steps) is not int or steps < 1:
            raise ManifestError(f"model.recommended.steps {str(steps)[:40]}: expected a positive integer")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ManifestError(f"model.recommended.guidance_scale {str(scale)[:40]}: expected a finite number")
        if scheduler is not None and not isinstance(scheduler, str):  # None: the scheduler config's class
            raise ManifestError(f"model.recommended.scheduler {str(scheduler)[:40]}: expected a scheduler name")


_SDXL_FLAGS = ("requires_aesthetics_score", "force_zeros_for_empty_prompt", "vae_force_upcast")
_SDXL_FIELDS = ("text_encoder_2_hidden_size", "projection_dim", "addition_time_embed_dim") + _SDXL_FLAGS


@dataclasses.dataclass(frozen=True)
class StaticShape:
    height: int
    width: int
    batch: int | None = None  # None: the batch stays dynamic
    prompt_chunks: int = 1  # the U-Net's text length in 75-token chunks (77 * chunks positions); 1 before long prompts


WRITE_LOCATIONS = ("cache_dir",)  # backend options the artifact may not set


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """What the runtime reads from the export besides the components: how the profile said to run it."""

    cfg: str = "batched"  # "batched" (the U-Net sees 2B) or "sequential" (two calls on B)
    backend_options: dict[str, Any] = dataclasses.field(default_factory=dict)  # SessionOptions.from_mapping
    device_loop: str = "auto"  # the device-resident denoising loop: auto (on CUDA), on, off
    static_shape: StaticShape | None = None
    guess_mode_scales: tuple[float, ...] = ()  # ControlNet guess mode: per-residual scales (diffusers' logspace)

    def __post_init__(self):
        if self.cfg not in CFG_MODES:
            raise ManifestError(f"runtime.cfg {self.cfg!r}: use {' or '.join(CFG_MODES)}")
        if self.device_loop not in DEVICE_LOOP_MODES:
            raise ManifestError(f"runtime.device_loop {self.device_loop!r}: use one of {', '.join(DEVICE_LOOP_MODES)}")

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["guess_mode_scales"] = list(self.guess_mode_scales)
        return data

    @staticmethod
    def _untrusted(backend: Any) -> dict[str, Any]:
        """Backend options as the artifact may set them: never where the runtime writes (a manifest
        is untrusted; write locations come from the user's flags, environment or Python call)."""
        if not isinstance(backend, dict):
            raise ManifestError(f"runtime.backend_options: expected an object, got {type(backend).__name__}")
        threads = backend.get("threads")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 0):
            raise ManifestError(f"runtime.backend_options.threads {threads!r}: expected an integer >= 0 (0: the default)")
        providers = backend.get("providers")
        if providers is not None and (not isinstance(providers, list) or not all(isinstance(p, str) for p in providers)):
            # a string would be read letter by letter as provider names
            raise ManifestError(f"runtime.backend_options.providers {providers!r}: expected a list of provider names")
        return {k: v for k, v in backend.items() if k not in WRITE_LOCATIONS}

    @classmethod
    def from_json(cls, data: dict) -> "RunSettings":
        if not isinstance(data, dict):
            raise ManifestError(f"runtime section: expected an object, got {type(data).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise ManifestError(f"runtime section has unknown keys: {', '.join(sorted(unknown))}")
        data = dict(data)
        data["static_shape"] = StaticShape(**data["static_shape"]) if data.get("static_shape") else None
        data["guess_mode_scales"] = tuple(float(v) for v in data.get("guess_mode_scales") or ())
        data["backend_options"] = cls._untrusted(data.get("backend_options") or {})
        return cls(**data)

    @classmethod
    def from_v1(cls, exporter: dict, profile: dict) -> "RunSettings":
        """Schema 1 kept these in the free-form exporter and profile sections."""
        backend = cls._untrusted(profile.get("backend_options") or {})
        static = exporter.get("static_shape")
        return cls(
            cfg=profile.get("cfg", "batched"),
            backend_options={k: v for k, v in backend.items() if k != "device_loop"},
            device_loop=str(backend.get("device_loop", "auto")),
            static_shape=StaticShape(**static) if static else None,
            guess_mode_scales=tuple(float(v) for v in (exporter.get("controlnet") or {}).get("guess_mode_scales") or ()),
        )


@dataclasses.dataclass(frozen=True)
class Manifest:
    model: ModelInfo
    components: dict[str, Component]
    tokenizer_dir: str = "tokenizer"
    scheduler_config: str = "scheduler/scheduler_config.json"
    tokenizer_2_dir: str | None = None  # SDXL: the second text encoder's tokenizer (pads with "!")
    exporter: dict[str, Any] = dataclasses.field(default_factory=dict)  # provenance, for people
    profile: dict[str, Any] = dataclasses.field(default_factory=dict)  # the resolved profile, for people
    runtime: RunSettings = RunSettings()
    schema_version: int = SCHEMA_VERSION
    root: Path | None = dataclasses.field(default=None, compare=False)

    # -- queries -------------------------------------------------------------------------------

    def component(self, name: str) -> Component:
        try:
            return self.components[name]
        except KeyError:
            have = ", ".join(sorted(self.components)) or "none"
            raise ManifestError(f"this export has no {name!r} component (it has: {have})") from None

    def controlnets(self) -> dict[str, Component]:
        return {c.name.split("/", 1)[1]: c for c in self.components.values() if c.role == "controlnet"}

    def by_role(self, role: str) -> list[Component]:
        return [c for c in self.components.values() if c.role == role]

    # -- (de)serialisation ---------------------------------------------------------------------

    def to_json(self) -> dict:
        return {
            "schema_version": self.schema_version,
            "model": self.model.to_json(),
            "tokenizer": self.tokenizer_dir,
            **({"tokenizer_2": self.tokenizer_2_dir} if self.tokenizer_2_dir is not None else {}),
            "scheduler_config": self.scheduler_config,
            "components": {name: c.to_json() for name, c in self.components.items()},
            "runtime": self.runtime.to_json(),
            "exporter": self.exporter,
            "profile": self.profile,
        }

    def write(self, directory: Path) -> Path:
        path = Path(directory) / MANIFEST_NAME
        path.write_text(json.dumps(self.to_json(), indent=2, sort_keys=False) + "\n", encoding="utf-8")
        return path

    @classmethod
    def from_json(cls, data: dict, root: Path | None = None) -> "Manifest":
        version = data.get("schema_version")
        if not isinstance(version, int):
            raise ManifestError("manifest has no integer schema_version")
        if version > SCHEMA_VERSION:
            raise ManifestError(
                f"manifest schema version {version} is newer than this runtime understands "
                f"({SCHEMA_VERSION}); upgrade sdexport to use this export"
            )
        if version < 1:
            raise ManifestError(f"manifest schema version {version} is not one this runtime reads (1..{SCHEMA_VERSION})")
        try:
            exporter, profile = dict(data.get("exporter") or {}), dict(data.get("profile") or {})
            run = RunSettings.from_json(data["runtime"]) if version >= 2 else RunSettings.from_v1(exporter, profile)
            return cls(
                model=ModelInfo.from_json(data["model"]),
                components={n: Component.from_json(n, c) for n, c in _mapping(data["components"], "components").items()},
                tokenizer_dir=data.get("tokenizer", "tokenizer"),
                tokenizer_2_dir=data.get("tokenizer_2"),
                scheduler_config=data.get("scheduler_config", "scheduler/scheduler_config.json"),
                exporter=exporter,
                profile=profile,
                runtime=run,
                schema_version=SCHEMA_VERSION,  # read as (and written back as) this version
                root=root,
            )
        except ManifestError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ManifestError(f"malformed manifest: {type(e).__name__}: {e}") from None

    @classmethod
    def load(cls, directory: str | Path, check_files: bool = True) -> "Manifest":
        """Read ``DIR/sdexport.json``; with ``check_files``, every listed file must exist with its size."""
        directory = Path(directory)
        path = directory / MANIFEST_NAME
        if not directory.is_dir():
            raise ManifestError(f"{directory}: not a directory")
        if not path.is_file():
            raise ManifestError(f"{directory}: no {MANIFEST_NAME} here; is this an sdexport output directory?")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ManifestError(f"{path}: not valid JSON ({e})") from None
        except RecursionError:
            raise ManifestError(f"{path}: not a manifest (JSON nested too deeply)") from None
        if _depth(data) > MAX_DEPTH:  # printing or copying it would recurse as deep
            raise ManifestError(f"{path}: not a manifest (JSON nested more than {MAX_DEPTH} levels deep)")
        if not isinstance(data, dict):
            raise ManifestError(f"{path}: expected a JSON object")
        try:
            manifest = cls.from_json(data, root=directory)
        except ManifestError as e:
            raise ManifestError(f"{path}: {e}") from None
        manifest.check_paths()  # even for inspect: an artifact never names a file outside itself
        if check_files:
            if manifest.exporter.get("dry_run"):
                raise ManifestError(f"{path}: a dry-run plan, not an export; run sdexport export without --dry-run")
            manifest.check_files(verify_hashes=False)
        return manifest

    def path(self, relative: str, what: str = "file") -> Path:
        """An artifact path resolved (symlinks too) and refused unless it stays inside the artifact."""
        try:
            return inside(self.root or Path("."), relative, what)
        except ArtifactFileError as e:
            raise ManifestError(str(e)) from None

    def check_paths(self) -> None:
        self.path(self.tokenizer_dir, "tokenizer")
        if self.tokenizer_2_dir is not None:
            self.path(self.tokenizer_2_dir, "tokenizer_2")
        self.path(self.scheduler_config, "scheduler config")
        for name, component in self.components.items():
            for ref in component.files:
                self.path(ref.path, f"component {name!r} file")

    def check_files(self, verify_hashes: bool | str = "cached", components: Iterable[str] | None = None) -> None:
        """Every file inside the artifact, present with its recorded size and sha256.

        ``verify_hashes``: True hashes every file; "cached" (the default, what opening a session does)
        skips files this user already verified unchanged (same size, mtime and inode); False checks sizes.
        """
        cache = HashCache() if verify_hashes == "cached" else None
        try:
            for name in components or self.components:
                for ref in self.components[name].files:
                    path = self.path(ref.path, f"component {name!r} file")
                    self._check_file(name, ref, path, verify_hashes, cache)
        finally:
            if cache is not None:
                cache.save()  # one write for all files verified now, not one per file

    @staticmethod
    def _check_file(name: str, ref: FileRef, path: Path, verify_hashes, cache) -> None:
        if not path.is_file():
            raise ManifestError(f"{path}: missing file of component {name!r}")
        size = path.stat().st_size
        if size != ref.bytes:
            raise ManifestError(f"{path}: {size} bytes, the manifest says {ref.bytes}; the file is damaged or was replaced")
        if not verify_hashes or (cache is not None and cache.known(path, ref.sha256)):
            return
        if sha256_file(path) != ref.sha256:
            raise ManifestError(f"{path}: sha256 differs from the manifest; the file is damaged or was replaced")
        if cache is not None:
            cache.remember(path, ref.sha256)


def _mapping(value: Any, what: str) -> dict:
    if not isinstance(value, dict):
        raise ManifestError(f"{what}: expected an object (name -> entry), got {type(value).__name__}")
    return value


MAX_DEPTH = 32  # a real manifest is about 6 levels deep


def _depth(data) -> int:
    """How deeply JSON containers nest (iteratively: the point is to refuse what recursion cannot handle)."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
