"""Single-file checkpoints (A1111 / ComfyUI / CompVis layout) as model sources, and writing them.

:class:`SingleFileSource` opens a checkpoint (``sdexport.sources.checkpoint``), tells which model it
holds (``sdexport.sources.detect``), takes the architecture from a config folder shipped under
``sdexport/sources/configs/<family>`` (diffusers ``config.json`` files, no weights) or from ``config=``
(any diffusers folder: the tiny test models use this), and converts the tensor names
(``sdexport.sources.convert``). Every check runs on shapes at open time (tensors on the meta device),
before any weight is read; weights are read one component at a time, tensor by tensor.

The reverse direction, :func:`write_single_file`, writes an opened source in the original layout
(tests and benchmarks build their checkpoints with it), one component in memory at a time.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Mapping

import torch

from sdexport.errors import SourceError
from sdexport.sources.base import Source, sample_names
from sdexport.sources.checkpoint import Checkpoint, SafetensorsWriter
from sdexport.sources.clip_vocab import write_clip_vocab
from sdexport.sources.convert import (
    model_parts,
    original_plan,
    text_encoder_layout,
    text_kind_of,
    to_diffusers,
    to_original,
)
from sdexport.sources.detect import (
    DIFFUSERS_PREFIX,
    FAMILY_DESCRIPTIONS,
    LDM_PREFIX,
    PREDICTION_TYPES,
    Detected,
    detect,
    sidecar_prediction_type,
)
from sdexport.sources.models import TEXT_PARTS, empty_model, expected_shapes, family_config_dir, fill_model, read_configs

_TOKENIZER_OF = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}


def _copy_configs(src: Path, dst: Path, family: str, parts: tuple[str, ...]) -> None:
    for part in parts + ("scheduler",):
        name = "scheduler_config.json" if part == "scheduler" else "config.json"
        (dst / part).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / part / name, dst / part / name)
    index = src / "model_index.json"
    if index.is_file():
        shutil.copyfile(index, dst / "model_index.json")
    else:
        inpaint = json.loads((src / "unet" / "config.json").read_text()).get("in_channels") == 9
        (dst / "model_index.json").write_text(json.dumps({
            "_class_name": "StableDiffusionInpaintPipeline" if inpaint else "StableDiffusionPipeline"}))
    for part in parts:
        if part in TEXT_PARTS:
            _copy_tokenizer(src / _TOKENIZER_OF[part], dst / _TOKENIZER_OF[part], family)


def _copy_tokenizer(src_tok: Path, tokenizer: Path, family: str) -> None:
    tokenizer.mkdir()
    has_vocab = (src_tok / "vocab.json").is_file() or (src_tok / "tokenizer.json").is_file()
    if src_tok.is_dir():
        for f in src_tok.iterdir():
            if f.is_file():
                shutil.copyfile(f, tokenizer / f.name)
    if not has_vocab:
        write_clip_vocab(tokenizer)
        if not (tokenizer / "tokenizer_config.json").is_file():
            shipped = family_config_dir(family) / tokenizer.name / "tokenizer_config.json"
            shutil.copyfile(shipped, tokenizer / "tokenizer_config.json")


class SingleFileSource:
    """A single-file checkpoint presented with DiffusersSource's interface.

    ``path`` is a temporary folder holding what the export copies (model_index.json, the configs,
    ``scheduler/scheduler_config.json``, ``tokenizer/``); the weights stay in the checkpoint and are
    converted when ``load_unet`` / ``load_vae`` / ``load_text_encoder`` is called.
    """

    def __init__(self, file: Path, checkpoint: Checkpoint, detected: Detected, family: str, folder: Path,
                 tmp: tempfile.TemporaryDirectory, config_origin: str, prediction: tuple[str, str]):
        self.file, self.checkpoint, self.detected, self.family = file, checkpoint, detected, family
        self.path, self._tmp, self.config_origin = folder, tmp, config_origin
        self.prediction_type, self.prediction_from = prediction
        self.few_step: str | None = None  # set by open_source: "lcm" / "turbo" sampler and defaults
        self.configs = read_configs(folder)
        self.index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))

    # -- opening ---------------------------------------------------------------------------------

    @classmethod
    def open(cls, file: str | Path, config: str | Path | None = None, prediction_type: str | None = None,
             scheduler_overrides: Mapping | None = None) -> "SingleFileSource":
        if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
            raise SourceError(f"prediction type {prediction_type!r}: use {' or '.join(PREDICTION_TYPES)}")
        return cls.from_checkpoint(Checkpoint.open(file), config, prediction_type, scheduler_overrides)

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint, config: str | Path | None = None,
                        prediction_type: str | None = None, scheduler_overrides: Mapping | None = None
                        ) -> "SingleFileSource":
        """As :meth:`open`, from an opened checkpoint (its shapes suffice until weights are loaded)."""
        tmp = None
        try:
            file = checkpoint.path
            detected = detect(checkpoint.tensors, file)
            config_dir = Path(config) if config is not None else None
            if config_dir is not None and not (config_dir / "unet" / "config.json").is_file():
                raise SourceError(f"{config_dir}: not a diffusers model or config folder (no unet/config.json)")
            if config_dir is not None and detected.layout == "diffusers" and not detected.text_encoder.startswith("sdxl"):
                # diffusers names do not tell CLIP from OpenCLIP; the config does (tiny models have no telling widths).
                configs = read_configs(config_dir)
                detected = dataclasses.replace(detected, text_encoder=text_kind_of(configs["text_encoder"], configs["unet"]))

            # The prediction type: the hint, a .yaml beside the file, the config folder's, the family's default.
            prediction, origin = prediction_type, "hint"
            if prediction is None:
                prediction, origin = sidecar_prediction_type(file), "yaml"
            if prediction is None and config_dir is not None:
                prediction, origin = read_configs(config_dir)["scheduler"].get("prediction_type", "epsilon"), "config"
            family = detected.family(prediction)
            if prediction is None:
                prediction, origin = read_configs(family_config_dir(family))["scheduler"].get("prediction_type"), "default"

            tmp = tempfile.TemporaryDirectory(prefix="sdexport-single-file-")
            folder = Path(tmp.name)
            _copy_configs(config_dir or family_config_dir(family), folder, family, detected.parts)
            sched_path = folder / "scheduler" / "scheduler_config.json"
            sched = json.loads(sched_path.read_text(encoding="utf-8"))
            sched["prediction_type"] = prediction
            sched.update(scheduler_overrides or {})
            sched_path.write_text(json.dumps(sched, indent=2) + "\n", encoding="utf-8")
            source = cls(file, checkpoint, detected, family, folder, tmp,
                         str(config_dir) if config_dir else f"sdexport/sources/configs/{family}", (prediction, origin))
            source.check()
            return source
        except BaseException:
            if tmp is not None:
                tmp.cleanup()
            checkpoint.close()
            raise

    # -- configs, as DiffusersSource ------------------------------------------------------------

    @property
    def unet_config(self) -> dict:
        return self.configs["unet"]

    @property
    def vae_config(self) -> dict:
        return self.configs["vae"]

    @property
    def text_encoder_config(self) -> dict | None:
        return self.configs.get("text_encoder")  # None: an SDXL refiner (only text_encoder_2)

    @property
    def text_encoder_2_config(self) -> dict | None:
        return self.configs.get("text_encoder_2") if "text_encoder_2" in self.parts else None

    @property
    def parts(self) -> tuple[str, ...]:
        return self.detected.parts

    @property
    def scheduler_config(self) -> dict:
        return self.configs["scheduler"]

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / "tokenizer"

    @property
    def tokenizer_2_dir(self) -> Path | None:
        return self.path / "tokenizer_2" if "text_encoder_2" in self.parts else None

    @property
    def pipeline_class(self) -> str:
        return str(self.index.get("_class_name", ""))

    def describe(self) -> dict:
        return {
            "format": self.checkpoint.kind,
            "file": str(self.file),
            "layout": self.detected.layout,
            "family": self.family,
            "text_encoder": self.detected.text_encoder,
            "config": self.config_origin,
            "prediction_type": self.prediction_type,
            "prediction_type_from": self.prediction_from,
        }

    # -- shapes, then weights -------------------------------------------------------------------

    def _part_names(self, part: str) -> list[str]:
        if self.detected.layout == "diffusers":
            prefix = DIFFUSERS_PREFIX[part]
        elif part in TEXT_PARTS:
            prefix = text_encoder_layout(self.detected.text_encoder, part)[1]
        else:
            prefix = LDM_PREFIX[part]
        return [k for k in self.checkpoint.keys() if k.startswith(prefix)]

    def _convert(self, part: str, tensors: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
        try:
            return to_diffusers(part, tensors, self.detected.layout, self.detected.text_encoder, self.configs[part],
                                text_model=model if part in TEXT_PARTS else None)
        except (KeyError, IndexError, ValueError, RuntimeError, TypeError) as e:
            raise SourceError(f"{self.file}: the {part} weights do not follow the {self._what()} layout "
                              f"({type(e).__name__}: {str(e)[:120]}){self._config_hint()}") from None

    def _what(self) -> str:
        return FAMILY_DESCRIPTIONS.get(self.family, self.family)

    def _config_hint(self) -> str:
        if self.config_origin.startswith("sdexport/sources/configs/"):
            return "; for a non-standard architecture pass --config DIR (a diffusers folder describing it)"
        return f" (config from {self.config_origin})"

    def check(self) -> None:
        """Convert every component on the meta device and compare with the architecture's shapes."""
        for part in self.parts:
            if part not in self.configs:
                raise SourceError(f"{self.file}: detected {self._what()}, but the config folder has no {part}/config.json"
                                  f"{self._config_hint()}")
            model = empty_model(part, self.configs[part])
            expected = expected_shapes(model)
            names = self._part_names(part)
            if not names:
                raise SourceError(f"{self.file}: no {part} weights in the checkpoint")
            converted = self._convert(part, {k: self.checkpoint.tensors[k].meta() for k in names}, model)
            missing = [k for k in expected if k not in converted]
            unexpected = [k for k in converted if k not in expected]
            wrong = [f"{k} is {list(converted[k].shape)} in the file but {list(expected[k])} in the model"
                     for k in expected if k in converted and tuple(converted[k].shape) != expected[k]]
            if missing or unexpected or wrong:
                details = "; ".join(filter(None, [
                    wrong[0] if wrong else "",
                    f"missing {sample_names(missing)}" if missing else "",
                    f"unexpected {sample_names(unexpected)}" if unexpected else "",
                ]))
                raise SourceError(f"{self.file}: detected {self._what()} but its {part} does not fit that "
                                  f"architecture ({details}){self._config_hint()}")

    def load_part(self, part: str):
        model = empty_model(part, self.configs[part])
        names = self._part_names(part)
        tensors = {k: self.checkpoint.get(k) for k in names}
        converted = self._convert(part, tensors, model)
        del tensors
        return fill_model(model, converted, f"{self.file} ({part})")

    def load_unet(self):
        return self.load_part("unet")

    def load_vae(self):
        return self.load_part("vae")

    def load_text_encoder(self):
        return self.load_part("text_encoder")

    def load_text_encoder_2(self):
        return self.load_part("text_encoder_2")

    def close(self) -> None:
        self.checkpoint.close()
        self._tmp.cleanup()


def write_single_file(source: Source, out: str | Path, layout: str = "ldm", dtype: torch.dtype | None = None,
                      text_kind: str | None = None) -> Path:
    """Write an opened source as one ``.safetensors`` (``layout="ldm"``: A1111 / CompVis names;
    ``"diffusers"``: ``unet.``/``vae.``/``text_encoder.`` prefixes) or ``.ckpt`` file (by suffix; a plain
    ``torch.save`` of ``{"state_dict": ...}``). One component is in memory at a time for safetensors output."""
    if layout not in ("ldm", "diffusers"):
        raise ValueError(f"layout {layout!r}: use 'ldm' or 'diffusers'")
    out = Path(out)
    configs = {"unet": source.unet_config, "vae": source.vae_config, "text_encoder": source.text_encoder_config,
               "text_encoder_2": getattr(source, "text_encoder_2_config", None)}
    text_kind = text_kind or text_kind_of(configs["text_encoder"], configs["unet"])
    parts = model_parts(text_kind)
    configs = {part: configs[part] for part in parts}

    def convert(part: str) -> dict[str, torch.Tensor]:
        module = getattr(source, f"load_{part}")()
        state = module.state_dict()
        if layout == "ldm":
            state = to_original(part, state, configs[part], text_kind)
        else:
            state = {DIFFUSERS_PREFIX[part] + k: v for k, v in state.items()}
        if dtype is not None:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        return state

    if out.suffix == ".ckpt":
        state = {}
        for part in parts:
            state.update({k: v.clone() for k, v in convert(part).items()})
        tmp = out.with_name(f".{out.name}.partial")
        torch.save({"state_dict": state}, tmp)
        os.replace(tmp, out)
        return out
    plan = original_plan(configs, text_kind, layout)
    if dtype is not None:
        plan = {k: v.to(dtype) if v.is_floating_point() else v for k, v in plan.items()}
    with SafetensorsWriter(out, [(k, v.dtype, tuple(v.shape)) for k, v in plan.items()], {"format": "pt"}) as w:
        done: dict[str, torch.Tensor] = {}
        for part in parts:
            done = convert(part)
            for k in [k for k in plan if k in done]:
                w.write(k, done[k])
            del done
    return out
