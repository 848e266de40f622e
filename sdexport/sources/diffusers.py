"""Diffusers folders as sources: a pipeline saved with ``save_pretrained`` (:class:`DiffusersSource`,
a :class:`sdexport.sources.base.Source`) and ControlNet folders (:class:`ControlNetSource`)."""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

from sdexport.errors import SourceError

REQUIRED_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# An SDXL refiner has only the second (OpenCLIP bigG) text encoder and its tokenizer.
FIRST_ENCODER, SECOND_ENCODER = ("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")


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
        if set(missing) == set(FIRST_ENCODER) and all((path / p).is_dir() for p in SECOND_ENCODER):
            missing = []  # an SDXL refiner
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

    # -- SDXL: the second text encoder (absent from SD 1.x/2.x folders; the only one of a refiner) --

    @property
    def has_text_encoder(self) -> bool:
        return (self.path / "text_encoder").is_dir()

    @functools.cached_property
    def text_encoder_2_config(self) -> dict | None:
        return self._config("text_encoder_2") if (self.path / "text_encoder_2").is_dir() else None

    @property
    def tokenizer_2_dir(self) -> Path | None:
        return self.path / "tokenizer_2" if (self.path / "tokenizer_2").is_dir() else None

    def load_text_encoder_2(self):
        from transformers import CLIPTextModelWithProjection

        return self._load(CLIPTextModelWithProjection.from_pretrained, "text_encoder_2")

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
