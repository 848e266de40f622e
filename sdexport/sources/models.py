"""Empty diffusers/transformers models built from configs (parameters on the meta device), filled
with converted weights; the config folders shipped under ``sdexport/sources/configs/<family>``."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sdexport.errors import SourceError
from sdexport.sources.base import sample_names

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
PARTS = ("unet", "vae", "text_encoder")
TEXT_PARTS = ("text_encoder", "text_encoder_2")  # SDXL has both; its refiner only the second


def family_config_dir(family: str) -> Path:
    return CONFIGS_DIR / family


def read_configs(folder: Path) -> dict[str, dict]:
    """unet, vae, text_encoder and scheduler configs (and text_encoder_2's where the folder has one;
    an SDXL refiner's folder has text_encoder_2 but no text_encoder)."""
    configs = {}
    has_second = (folder / "text_encoder_2" / "config.json").is_file()
    for part, name in (("unet", "config.json"), ("vae", "config.json"), ("text_encoder", "config.json"),
                       ("text_encoder_2", "config.json"), ("scheduler", "scheduler_config.json")):
        path = folder / part / name
        if part == "text_encoder_2" and not has_second or part == "text_encoder" and has_second and not path.is_file():
            continue
        try:
            configs[part] = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SourceError(f"{path}: missing (a config folder needs unet/, vae/, text_encoder/ and scheduler/ configs)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SourceError(f"{path}: not valid JSON ({e})") from None
    return configs


def empty_model(part: str, config: dict):
    """The component's module with parameters on the meta device (buffers real), from its config."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        if part == "unet":
            from diffusers import UNet2DConditionModel

            return UNet2DConditionModel.from_config(config)
        if part == "vae":
            from diffusers import AutoencoderKL

            return AutoencoderKL.from_config(config)
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        fields = {k: v for k, v in config.items() if not k.startswith("_") and k not in ("architectures", "transformers_version")}
        # SDXL's second encoder (OpenCLIP bigG) also gives the pooled, projected text embedding.
        cls = CLIPTextModelWithProjection if part == "text_encoder_2" else CLIPTextModel
        return cls(CLIPTextConfig(**fields))


def expected_shapes(model) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def fill_model(model, state: dict[str, torch.Tensor], where: str):
    """Load converted tensors (as float32 where floating) into an empty model; every parameter must come."""
    for k in list(state):  # one tensor at a time: an fp16 file never sits in memory twice
        if state[k].is_floating_point() and state[k].dtype != torch.float32:
            state[k] = state[k].float()
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise SourceError(f"{where}: weights do not fit the architecture (missing {sample_names(result.missing_keys)}; "
                          f"unexpected {sample_names(result.unexpected_keys)})")
    return model.eval()

