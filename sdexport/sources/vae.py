"""Another VAE for a model (``sdexport export MODEL --vae DIR_OR_FILE``, ``sdexport export-vae``).

A VAE comes as a diffusers ``AutoencoderKL`` folder (``config.json`` + safetensors weights), or as one
``.safetensors`` file in diffusers names or in the original LDM names (``encoder.down.0.block.0...``,
the layout of Stability's ``vae-ft-mse-840000-ema-pruned.safetensors``; a ``first_stage_model.`` or
``vae.`` prefix is accepted), converted with diffusers' ``convert_ldm_vae_checkpoint``. A single file
carries no config: it takes the model's VAE config (as ``from_single_file`` does), and its tensor
shapes must fit it. Pickles (``.ckpt``, ``.bin``, ``.pt``) are refused: a VAE is never loaded by
running code.

Before any weight is read, the VAE must fit the U-Net: the same number of latent channels and the
same down-sampling factor (a mismatch would export fine and then make noise).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path

from sdexport.errors import SourceError
from sdexport.sources.base import Source, sample_names

LDM_PREFIXES = ("first_stage_model.", "vae.")
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclasses.dataclass
class VaeWeights:
    """A VAE to swap in: where it is, its layout, its config, and the file its weights come from."""

    path: Path
    layout: str  # "diffusers-folder" | "diffusers" | "ldm"
    config: dict
    weights: Path
    prefix: str = ""  # single files: the prefix stripped from every tensor name

    @classmethod
    def open(cls, spec: str | Path, model_vae_config: dict | None) -> "VaeWeights":
        path = Path(spec)
        if not path.exists():
            raise SourceError(f"--vae {path}: no such file or directory")
        if path.is_dir():
            return cls._folder(path)
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise SourceError(f"--vae {path}: a pickle file; give the VAE as .safetensors (pickles can run code)")
        if model_vae_config is None:
            raise SourceError(f"--vae {path}: a single-file VAE takes the model's VAE config, and this artifact "
                              "does not record one; give a diffusers VAE folder (config.json + safetensors)")
        return cls._single_file(path, model_vae_config)

    @classmethod
    def _folder(cls, path: Path) -> "VaeWeights":
        folder = path / "vae" if (path / "vae" / "config.json").is_file() else path  # a pipeline folder's VAE too
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise SourceError(f"--vae {path}: not a diffusers VAE folder (no config.json)")
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SourceError(f"{config_path}: not valid JSON ({e})") from None
        if not isinstance(config, dict) or config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
            raise SourceError(f"{config_path}: not an AutoencoderKL config")
        weights = next((folder / n for n in WEIGHT_NAMES if (folder / n).is_file()), None)
        if weights is None:
            raise SourceError(f"--vae {path}: no {WEIGHT_NAMES[0]} in {folder} (pickled .bin weights are refused)")
        return cls(path, "diffusers-folder", config, weights)

    @classmethod
    def _single_file(cls, path: Path, model_vae_config: dict) -> "VaeWeights":
        from sdexport.sources.checkpoint import Checkpoint

        with Checkpoint.open(path) as ckpt:
            if ckpt.kind != "safetensors":
                raise SourceError(f"--vae {path}: not a safetensors file")
            keys = ckpt.keys()
        prefix = next((p for p in LDM_PREFIXES if any(k.startswith(p + "decoder.") for k in keys)), "")
        names = {k[len(prefix):] for k in keys if k.startswith(prefix)}
        if "encoder.down_blocks.0.resnets.0.conv1.weight" in names:
            layout = "diffusers"
        elif "encoder.down.0.block.0.conv1.weight" in names:
            layout = "ldm"
        else:
            raise SourceError(f"--vae {path}: not a VAE (no encoder in diffusers or LDM names; it has "
                              f"{sample_names(sorted(keys))})")
        return cls(path, layout, dict(model_vae_config), path, prefix)

    # -- what the U-Net needs -------------------------------------------------------------------

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Tensor names (diffusers layout) and shapes, read from the header only."""
        from sdexport.sources.checkpoint import Checkpoint

        with Checkpoint.open(self.weights) as ckpt:
            return self._convert({k[len(self.prefix):]: ckpt.tensors[k].meta() for k in ckpt.keys()
                                  if k.startswith(self.prefix)}, meta=True)

    def _convert(self, tensors: dict, meta: bool = False) -> dict:
        if self.layout != "ldm":
            return {k: (tuple(v.shape) if meta else v) for k, v in tensors.items()}
        from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

        out = convert_ldm_vae_checkpoint(tensors, self.config)
        return {k: (tuple(v.shape) if meta else v) for k, v in out.items()}

    def latent_channels(self) -> int:
        shape = self.shapes().get("decoder.conv_in.weight")
        if shape is None or len(shape) != 4:
            raise SourceError(f"--vae {self.path}: no decoder.conv_in weight; not a complete VAE")
        return int(shape[1])

    def scale_factor(self) -> int:
        blocks = {int(m.group(1)) for k in self.shapes() if (m := re.match(r"^encoder\.down_blocks\.(\d+)\.", k))}
        return 2 ** (len(blocks) - 1) if blocks else 0

    def check_fits(self, latent_channels: int, scale_factor: int, what: str) -> None:
        """One line if this VAE cannot decode the U-Net's latents."""
        have = self.latent_channels()
        if have != latent_channels:
            raise SourceError(f"--vae {self.path}: its latents have {have} channels, the U-Net of {what} takes "
                              f"{latent_channels}; this VAE is for another model family")
        if self.layout == "diffusers-folder":
            configured = int(self.config.get("latent_channels", 4))
            if configured != have:
                raise SourceError(f"--vae {self.path}: config.json says {configured} latent channels, the weights {have}")
        factor = self.scale_factor()
        if factor != scale_factor:
            raise SourceError(f"--vae {self.path}: it scales images by 1/{factor}, the model's VAE by 1/{scale_factor}; "
                              "the U-Net's latents would be the wrong size")
        self._check_shapes()

    def _check_shapes(self) -> None:
        from sdexport.sources.models import empty_model, expected_shapes

        expected, have = expected_shapes(empty_model("vae", self.config)), self.shapes()
        missing = sorted(set(expected) - set(have))
        wrong = sorted(k for k in set(expected) & set(have) if expected[k] != have[k])
        if missing or wrong:
            detail = f"missing {sample_names(missing)}" if missing else \
                f"{wrong[0]} is {list(have[wrong[0]])}, the config wants {list(expected[wrong[0]])}"
            raise SourceError(f"--vae {self.path}: weights do not fit the VAE config ({detail})")

    # -- loading --------------------------------------------------------------------------------

    def load(self):
        """The AutoencoderKL in float32 (every parameter from the file; shapes checked against the config)."""
        from sdexport.sources.checkpoint import Checkpoint
        from sdexport.sources.models import empty_model, fill_model

        with Checkpoint.open(self.weights) as ckpt:
            tensors = {k[len(self.prefix):]: ckpt.get(k) for k in ckpt.keys() if k.startswith(self.prefix)}
        state = self._convert(tensors)
        model = empty_model("vae", self.config)
        try:
            return fill_model(model, state, f"--vae {self.path}")
        except RuntimeError as e:  # a shape that does not fit the config
            raise SourceError(f"--vae {self.path}: weights do not fit the VAE config ({str(e).splitlines()[-1].strip()[:160]})") from None

    def describe(self) -> dict:
        return {"path": str(self.path), "layout": self.layout, "file": self.weights.name,
                "sha256": sha256_of(self.weights), "bytes": self.weights.stat().st_size,
                "scaling_factor": self.config.get("scaling_factor")}


class VaeSource:
    """A source whose VAE is replaced: everything else delegated to ``base``."""

    def __init__(self, base: Source, vae: VaeWeights):
        self.base, self.vae = base, vae

    @classmethod
    def open(cls, base: Source, spec: str | Path) -> "VaeSource":
        vae = VaeWeights.open(spec, base.vae_config)
        latent = int(base.unet_config.get("out_channels", base.vae_config.get("latent_channels", 4)))
        factor = 2 ** (len(base.vae_config.get("block_out_channels", [1, 1, 1, 1])) - 1)
        vae.check_fits(latent, factor, str(base.path))
        return cls(base, vae)

    path = property(lambda self: self.base.path)
    unet_config = property(lambda self: self.base.unet_config)
    vae_config = property(lambda self: self.vae.config)
    text_encoder_config = property(lambda self: self.base.text_encoder_config)
    scheduler_config = property(lambda self: self.base.scheduler_config)
    tokenizer_dir = property(lambda self: self.base.tokenizer_dir)
    pipeline_class = property(lambda self: self.base.pipeline_class)
    few_step = property(lambda self: getattr(self.base, "few_step", None))

    def load_unet(self):
        return self.base.load_unet()

    def load_text_encoder(self):
        return self.base.load_text_encoder()

    def load_vae(self):
        return self.vae.load()

    def describe(self) -> dict:
        return {**self.base.describe(), "vae": self.vae.describe()}
