"""Opening any model source: :func:`open_source` picks the kind (a diffusers folder or a single-file
checkpoint) and lays LoRAs (:class:`LoraSource`, fused as the weights load) or a few-step scheduler
(:class:`SchedulerOverlay`) over it. Everything that can be checked (layout, architecture, LoRA keys
and shapes) is checked before any weight is read, so a bad input fails before an export writes anything.
Every result is a :class:`sdexport.sources.base.Source`.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Iterable, Mapping

from sdexport.errors import SourceError
from sdexport.sources.base import Source
from sdexport.sources.diffusers import DiffusersSource
from sdexport.sources.lora import LoraRef, ModelLayers, fuse_into, load_loras
from sdexport.sources.single_file import SingleFileSource


class LoraSource:
    """A source with LoRAs fused into its U-Net and text encoder as they load (W += s * alpha/r * B @ A).

    The LoRA files are read and matched against the model's layers (on the meta device) when the
    source is made, so an unknown key, a LoRA for another model family or a damaged file is reported
    before any export work.
    """

    def __init__(self, base: Source, loras: Iterable):
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
    # SDXL's second text encoder (None where the base has none).
    text_encoder_2_config = property(lambda self: getattr(self.base, "text_encoder_2_config", None))
    tokenizer_2_dir = property(lambda self: getattr(self.base, "tokenizer_2_dir", None))

    def _fused(self, component: str, model):
        return fuse_into(model, [a for a in self.applied if a.component == component])

    def load_unet(self):
        return self._fused("unet", self.base.load_unet())

    def load_text_encoder(self):
        return self._fused("text_encoder", self.base.load_text_encoder())

    def load_text_encoder_2(self):
        return self._fused("text_encoder_2", self.base.load_text_encoder_2())

    def load_vae(self):
        return self.base.load_vae()

    def describe(self) -> dict:
        loras = []
        for ref, lora in zip(self.refs, self.lora_files):
            loras.append({**lora.describe(), "scale": ref.scale, "sha256": _sha256(ref.path)})
        return {**self.base.describe(), "loras": loras}


def _sha256(path: Path) -> str:
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


def recommended_settings(source: Source, info=None, few_step: str | None = None) -> dict:
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


class SchedulerOverlay:
    """A source whose scheduler config is replaced (a few-step sampler)."""

    def __init__(self, base: Source, scheduler_config: dict, few_step: str | None):
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
    # SDXL's second text encoder, where the base has one
    has_text_encoder = property(lambda self: getattr(self.base, "has_text_encoder", None))
    text_encoder_2_config = property(lambda self: getattr(self.base, "text_encoder_2_config", None))
    tokenizer_2_dir = property(lambda self: getattr(self.base, "tokenizer_2_dir", None))

    def load_text_encoder_2(self):
        return self.base.load_text_encoder_2()

    def load_unet(self):
        return self.base.load_unet()

    def load_vae(self):
        return self.base.load_vae()

    def load_text_encoder(self):
        return self.base.load_text_encoder()

    def load_text_encoder_2(self):
        return self.base.load_text_encoder_2()

    def describe(self) -> dict:
        return {**self.base.describe(), "scheduler_override": self._scheduler.get("_class_name"),
                "few_step": self.few_step}


def open_source(path: str | Path, loras: Iterable = (), config: str | Path | None = None,
                prediction_type: str | None = None, few_step: str | None = None) -> Source:
    """A model source with DiffusersSource's interface, from a diffusers folder or a single-file checkpoint.

    ``loras``: ``FILE[:SCALE]`` strings, (file, scale) pairs or LoraRefs, fused in that order.
    ``config``: for single files, a diffusers folder (weights not needed) whose configs describe the
    architecture (default: detected, from ``sdexport/sources/configs``). ``prediction_type``: ``epsilon`` or
    ``v_prediction`` (single files; SD 2.x v-models cannot be told from their weights). ``few_step``:
    ``lcm`` or ``turbo`` (LCM-LoRA / LCM-distilled or SD-Turbo-style models): their sampler and defaults.
    """
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
            scheduler = few_step_scheduler(source.scheduler_config, few_step)
            if few_step == "turbo" and source.unet_config.get("addition_embed_type") == "text_time":
                scheduler["_class_name"] = "EulerAncestralDiscreteScheduler"  # SDXL-Turbo's own scheduler config
            source = SchedulerOverlay(source, scheduler, few_step)
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
