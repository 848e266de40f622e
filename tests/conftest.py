"""Shared fixtures: the real CLIP vocabulary and tiny diffusers pipelines saved to disk.

Each fixture builds its model from a config with fixed seeds, so every test run sees the same
weights; nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def private_caches(tmp_path_factory):
    """Compiled-model and calibration caches in a temporary home, never the user's ~/.cache."""
    patch = pytest.MonkeyPatch()
    patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
    yield
    patch.undo()


@pytest.fixture(scope="session")
def clip_vocab_dir(tmp_path_factory) -> Path:
    from sdexport.sources.clip_vocab import write_clip_vocab

    directory = tmp_path_factory.mktemp("clip-vocab")
    write_clip_vocab(directory)
    return directory


@pytest.fixture(scope="session")
def hf_clip_tokenizer(clip_vocab_dir):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(clip_vocab_dir))


def _tiny(tmp_path_factory, kind: str) -> Path:
    from sdexport.demo.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp(f"tiny-{kind}") / "model", kind)


@pytest.fixture(scope="session")
def tiny_sd1(tmp_path_factory) -> Path:
    return _tiny(tmp_path_factory, "sd1")


@pytest.fixture(scope="session")
def tiny_sd2v(tmp_path_factory) -> Path:
    return _tiny(tmp_path_factory, "sd2-v")


@pytest.fixture(scope="session")
def tiny_inpaint(tmp_path_factory) -> Path:
    return _tiny(tmp_path_factory, "inpaint")


@pytest.fixture(scope="session")
def tiny_depth(tmp_path_factory) -> Path:
    """A depth-to-image pipeline (5-channel U-Net, tiny DPT depth estimator)."""
    from sdexport.demo.tiny import save_tiny_depth_pipeline

    return save_tiny_depth_pipeline(tmp_path_factory.mktemp("tiny-depth") / "model")


def save_tiny_controlnet(unet_dir: Path, out: Path, seed: int) -> Path:
    """A ControlNet copied from the tiny U-Net, with its zero-initialised convolutions randomised
    (a fresh ``from_unet`` ControlNet outputs exact zeros, and a parity test with it proves nothing)."""
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    torch.manual_seed(seed)
    cn = ControlNetModel.from_unet(UNet2DConditionModel.from_pretrained(str(unet_dir), subfolder="unet"))
    zero_convs = list(cn.controlnet_down_blocks) + [cn.controlnet_mid_block, cn.controlnet_cond_embedding.conv_out]
    with torch.no_grad():
        for conv in zero_convs:
            torch.nn.init.normal_(conv.weight, std=0.3)
            torch.nn.init.normal_(conv.bias, std=0.1)
    cn.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def tiny_controlnets(tmp_path_factory, tiny_sd1) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("controlnets")
    return {name: save_tiny_controlnet(tiny_sd1, root / name, seed) for name, seed in (("edges", 11), ("depth", 12))}
