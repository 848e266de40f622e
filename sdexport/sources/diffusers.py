"""Model sources: a diffusers folder or a single-file checkpoint in (with LoRAs fused on load), torch
modules and the files the runtime needs out.

Every source has the same interface, DiffusersSource's: ``path`` (a folder with model_index.json,
``scheduler/scheduler_config.json`` and ``tokenizer/``), ``unet_config`` / ``vae_config`` /
``text_encoder_config`` / ``scheduler_config``, ``tokenizer_dir``, ``load_unet()`` / ``load_vae()`` /
``load_text_encoder()`` (float32 modules in eval mode) and ``describe()`` (a JSON-able dict for the
manifest). :func:`open_source` picks the kind and checks everything it can (layout, architecture,
LoRA keys and shapes) before any weight is read, so a bad input fails before an export writes anything.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Iterable, Mapping

from sdexport.errors import SourceError

REQUIRED_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclasses.dataclass
class DiffusersSource:
    """A Stable Diffusion pipeline saved with ``save_pretrained`` (model_index.json + subfolders)."""

    path: Path

    @classmethod
    def open(cls, path: str | Path) -> "DiffusersSource":
        path = Path(path)
        if not path.exists():
            raise SourceError(f"{path}: no such file or directory")
        if not path.is_dir():
            raise SourceError(f"{path}: not a diffusers model folder (expected a directory with model_index.json)")
        index_path = path / "model_index.json"
        if not index_path.is_file():
            raise SourceError(f"{path}: not a diffusers model folder (no model_index.json)")
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SourceError(f"{index_path}: not valid JSON ({e})") from None
        missing = [p for p in REQUIRED_PARTS if not (path / p).is_dir()]
        if missing:
            raise SourceError(f"{path}: diffusers folder lacks {', '.join(missing)}")
        source = cls(path)
        source.index = index
        return source

    @property
    def pipeline_class(self) -> str:
        return str(getattr(self, "index", {}).get("_class_name", ""))

    def _config(self, part: str, name: str = "config.json") -> dict:
        config_path = self.path / part / name
        try:
            return json.loads(config_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SourceError(f"{config_path}: missing") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SourceError(f"{config_path}: not valid JSON ({e})") from None

    @functools.cached_property
    def unet_config(self) -> dict:
        return self._config("unet")

    @functools.cached_property
    def vae_config(self) -> dict:
        return self._config("vae")

    @functools.cached_property
    def text_encoder_config(self) -> dict:
        return self._config("text_encoder")

    @functools.cached_property
    def scheduler_config(self) -> dict:
        return self._config("scheduler", "scheduler_config.json")

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / "tokenizer"

    def _load(self, loader, part: str):
        try:
            return loader(str(self.path), subfolder=part).eval()
        except Exception as e:  # diffusers/transformers raise many types for bad weights
            raise SourceError(f"{self.path / part}: cannot load ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None

    def load_unet(self):
        from diffusers import UNet2DConditionModel

        return self._load(UNet2DConditionModel.from_pretrained, "unet")

    def load_vae(self):
        from diffusers import AutoencoderKL

        return self._load(AutoencoderKL.from_pretrained, "vae")

    def load_text_encoder(self):
        from transformers import CLIPTextModel

        return self._load(CLIPTextModel.from_pretrained, "text_encoder")

    def describe(self) -> dict:
        return {"format": "diffusers", "path": str(self.path), "pipeline": self.pipeline_class}


class LoraSource:
    """A source with LoRAs fused into its U-Net and text encoder as they load (W += s * alpha/r * B @ A).

    The LoRA files are read and matched against the model's layers (on the meta device) when the
    source is made, so an unknown key, a LoRA for another model family or a damaged file is reported
    before any export work.
    """

    def __init__(self, base, loras: Iterable):
        from sdexport.sources.lora import LoraRef, ModelLayers, load_loras

        loras = list(loras)
        self.base = base
        self.refs = [LoraRef.parse(spec) for spec in loras]
        self.lora_files, self.applied = load_loras(self.refs, ModelLayers.of(base))

    # The interface, delegated.
    path = property(lambda self: self.base.path)
    unet_config = property(lambda self: self.base.unet_config)
    vae_config = property(lambda self: self.base.vae_config)
    text_encoder_config = property(lambda self: self.base.text_encoder_config)
    scheduler_config = property(lambda self: self.base.scheduler_config)
    tokenizer_dir = property(lambda self: self.base.tokenizer_dir)
    pipeline_class = property(lambda self: self.base.pipeline_class)
    few_step = property(lambda self: getattr(self.base, "few_step", None))

    def _fused(self, component: str, model):
        from sdexport.sources.lora import fuse_into

        return fuse_into(model, [a for a in self.applied if a.component == component])

    def load_unet(self):
        return self._fused("unet", self.base.load_unet())

    def load_text_encoder(self):
        return self._fused("text_encoder", self.base.load_text_encoder())

    def load_vae(self):
        return self.base.load_vae()

    def describe(self) -> dict:
        loras = []
        for ref, lora in zip(self.refs, self.lora_files):
            loras.append({**lora.describe(), "scale": ref.scale, "sha256": _sha256(ref.path)})
        return {**self.base.describe(), "loras": loras}


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


FEW_STEP = ("lcm", "turbo")


def few_step_scheduler(config: Mapping, kind: str) -> dict:
    """The scheduler config a few-step model samples with, keeping the model's training betas:
    LCM (latent consistency distillation, LCM-LoRA) or SD-Turbo's Euler with trailing timesteps."""
    keep = {k: config[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                                   "prediction_type", "steps_offset") if k in config}
    if kind == "lcm":
        return {**keep, "_class_name": "LCMScheduler", "original_inference_steps": 50, "timestep_spacing": "leading",
                "clip_sample": False, "set_alpha_to_one": True}
    if kind == "turbo":
        return {**keep, "_class_name": "EulerDiscreteScheduler", "timestep_spacing": "trailing",
                "interpolation_type": "linear", "use_karras_sigmas": False}
    raise SourceError(f"few-step kind {kind!r}: use {' or '.join(FEW_STEP)}")


def recommended_settings(source, info=None, few_step: str | None = None) -> dict:
    """Default steps / guidance / scheduler for the manifest's ``model.recommended``.

    Latent-consistency models (LCMScheduler, an LCM-LoRA, or a U-Net with a guidance embedding) sample
    in 4 steps without classifier-free guidance (scale 1); SD-Turbo-style adversarially distilled
    models in 1 step with guidance 0. Other models keep the runtime's defaults (50 steps, 7.5).
    """
    few_step = few_step or getattr(source, "few_step", None)
    scheduler = source.scheduler_config.get("_class_name")
    time_cond = (info.time_cond_proj_dim if info is not None else source.unet_config.get("time_cond_proj_dim"))
    out: dict = {"scheduler": scheduler}
    if few_step == "turbo":
        out.update(steps=1, guidance_scale=0.0)
    elif few_step == "lcm" or scheduler == "LCMScheduler" or time_cond:
        out.update(steps=4, guidance_scale=1.0)
    return out


class _Overlay:
    """A source whose scheduler config is replaced (prediction type or few-step sampler)."""

    def __init__(self, base, scheduler_config: dict, few_step: str | None):
        import tempfile

        self.base, self._scheduler, self.few_step = base, scheduler_config, few_step
        self._tmp = tempfile.TemporaryDirectory(prefix="sdexport-overlay-")
        root = Path(self._tmp.name)
        # The export copies path/scheduler/scheduler_config.json: a folder where that is the new one.
        # (Weights load from the base; the tokenizer is the base's tokenizer_dir.)
        index = Path(base.path) / "model_index.json"
        if index.is_file():
            (root / "model_index.json").write_bytes(index.read_bytes())
        (root / "scheduler").mkdir()
        (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config, indent=2) + "\n")
        self.path = root

    unet_config = property(lambda self: self.base.unet_config)
    vae_config = property(lambda self: self.base.vae_config)
    text_encoder_config = property(lambda self: self.base.text_encoder_config)
    scheduler_config = property(lambda self: self._scheduler)
    tokenizer_dir = property(lambda self: self.base.tokenizer_dir)
    pipeline_class = property(lambda self: self.base.pipeline_class)

    def load_unet(self):
        return self.base.load_unet()

    def load_vae(self):
        return self.base.load_vae()

    def load_text_encoder(self):
        return self.base.load_text_encoder()

    def describe(self) -> dict:
        return {**self.base.describe(), "scheduler_override": self._scheduler.get("_class_name"),
                "few_step": self.few_step}


def open_source(path: str | Path, loras: Iterable = (), config: str | Path | None = None,
                prediction_type: str | None = None, few_step: str | None = None):
    """A model source with DiffusersSource's interface, from a diffusers folder or a single-file checkpoint.

    ``loras``: ``FILE[:SCALE]`` strings, (file, scale) pairs or LoraRefs, fused in that order.
    ``config``: for single files, a diffusers folder (weights not needed) whose configs describe the
    architecture (default: detected, from ``sdexport/sources/configs``). ``prediction_type``: ``epsilon`` or
    ``v_prediction`` (single files; SD 2.x v-models cannot be told from their weights). ``few_step``:
    ``lcm`` or ``turbo`` (LCM-LoRA / LCM-distilled or SD-Turbo-style models): their sampler and defaults.
    """
    from sdexport.sources.single_file import SingleFileSource

    path = Path(path)
    if few_step is not None and few_step not in FEW_STEP:
        raise SourceError(f"few-step kind {few_step!r}: use {' or '.join(FEW_STEP)}")
    if not path.exists():
        raise SourceError(f"{path}: no such file or directory")
    if path.is_dir():
        if config is not None:
            raise SourceError(f"{path}: --config describes single-file checkpoints; a diffusers folder has its own")
        source = DiffusersSource.open(path)
        current = source.scheduler_config.get("prediction_type", "epsilon")
        if prediction_type is not None and prediction_type != current:
            raise SourceError(f"{path}: its scheduler says prediction_type {current!r}; edit "
                              f"scheduler/scheduler_config.json to use {prediction_type!r}")
        if few_step is not None:
            source = _Overlay(source, few_step_scheduler(source.scheduler_config, few_step), few_step)
    else:
        overrides = None
        if few_step is not None:
            overrides = few_step_scheduler({}, few_step)
        source = SingleFileSource.open(path, config=config, prediction_type=prediction_type,
                                       scheduler_overrides=overrides)
        source.few_step = few_step
    loras = list(loras)
    if loras:
        source = LoraSource(source, loras)
    return source


@dataclasses.dataclass
class ControlNetSource:
    name: str
    path: Path

    @classmethod
    def parse(cls, spec: str) -> "ControlNetSource":
        """``NAME=PATH`` or ``PATH`` (the name is then the folder name)."""
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).name, spec
        path_obj = Path(path)
        if not (path_obj / "config.json").is_file():
            raise SourceError(f"{path}: not a diffusers ControlNet folder (no config.json)")
        if not name or "/" in name or name.startswith("."):
            raise SourceError(f"{spec}: bad ControlNet name {name!r}")
        return cls(name, path_obj)

    @functools.cached_property
    def config(self) -> dict:
        try:
            return json.loads((self.path / "config.json").read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SourceError(f"{self.path / 'config.json'}: not valid JSON ({e})") from None

    def load(self):
        from diffusers import ControlNetModel

        try:
            return ControlNetModel.from_pretrained(str(self.path)).eval()
        except Exception as e:
            raise SourceError(f"{self.path}: cannot load ControlNet ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
