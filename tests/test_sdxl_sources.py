"""SDXL single-file checkpoints (A1111 / ComfyUI layout) as sources: base and refiner detected from their
text encoders, every tensor equal to the diffusers pipeline's and to diffusers' own ``from_single_file``;
the full-size architectures checked on shapes; incomplete files refused with one line.

The files are written from tiny SDXL pipelines (tests/sdxl_tiny.py) by ``write_single_file``, whose
reverse mapping (q/k/v fused into OpenCLIP's ``in_proj``, ``text_projection`` transposed, ``label_emb``)
is checked here against both loaders.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sdexport.errors import SourceError
from sdexport.sources.checkpoint import Checkpoint, TensorInfo
from sdexport.sources.convert import original_plan
from sdexport.sources.models import CONFIGS_DIR, read_configs
from sdexport.sources.open import open_source
from sdexport.sources.single_file import SingleFileSource, write_single_file
from tests.sdxl_tiny import PipelineSource, build_tiny_sdxl


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory) -> dict[str, tuple]:
    """Per model ("base", "refiner"): (pipeline, its diffusers folder, its single file)."""
    root = tmp_path_factory.mktemp("sdxl-single-files")
    out = {}
    for name in ("base", "refiner"):
        pipe = build_tiny_sdxl(refiner=name == "refiner")
        pipe.save_pretrained(str(root / name), safe_serialization=True)
        out[name] = (pipe, root / name, write_single_file(PipelineSource(pipe), root / f"{name}.safetensors"))
    return out


def _assert_equal(ours: dict, theirs: dict, what: str) -> None:
    assert ours.keys() == theirs.keys(), (what, sorted(set(ours) ^ set(theirs))[:5])
    bad = [k for k in ours if ours[k].dtype != theirs[k].dtype or not torch.equal(ours[k], theirs[k])]
    assert not bad, (what, bad[:5])


@pytest.mark.parametrize("name, family, parts", [
    ("base", "sdxl-base", ("unet", "vae", "text_encoder", "text_encoder_2")),
    ("refiner", "sdxl-refiner", ("unet", "vae", "text_encoder_2")),
])
def test_sdxl_single_file_equals_pipeline_and_diffusers_loader(sdxl, name, family, parts):
    import diffusers

    pipe, folder, file = sdxl[name]
    source = open_source(file, config=folder)
    assert (source.family, source.parts, source.describe()["text_encoder"]) == (
        family, parts, "sdxl-refiner" if name == "refiner" else "sdxl")
    cls = diffusers.StableDiffusionXLImg2ImgPipeline if name == "refiner" else diffusers.StableDiffusionXLPipeline
    oracle = cls.from_single_file(str(file), config=str(folder), local_files_only=True)
    for part in parts:
        ours = getattr(source, f"load_{part}")().state_dict()
        _assert_equal(ours, getattr(pipe, part).state_dict(), f"{name} {part} vs the pipeline")
        _assert_equal(ours, getattr(oracle, part).state_dict(), f"{name} {part} vs from_single_file")
    assert (source.tokenizer_2_dir / "vocab.json").is_file()
    assert (source.text_encoder_config is None) == (name == "refiner")


def test_sdxl_original_layout_names(sdxl):
    """The names and shapes of A1111/ComfyUI SDXL files: bigG's fused q/k/v and [width, embed] projection."""
    with Checkpoint.open(sdxl["base"][2]) as base, Checkpoint.open(sdxl["refiner"][2]) as refiner:
        keys = base.tensors
        assert keys["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (144, 48)
        assert keys["conditioner.embedders.1.model.text_projection"].shape == (48, 32)
        assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in keys
        assert keys["model.diffusion_model.label_emb.0.0.weight"].shape[1] == 32 + 6 * 8
        assert "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight" in keys
        assert refiner.tensors["conditioner.embedders.0.model.text_projection"].shape == (48, 32)
        assert not any(k.startswith("conditioner.embedders.1.") for k in refiner.tensors)


def _virtual(family: str, drop: tuple[str, ...] = ()) -> Checkpoint:
    plan = original_plan(read_configs(CONFIGS_DIR / family))
    return Checkpoint(Path(f"/virtual/{family}.safetensors"), "safetensors",
                      {k: TensorInfo(tuple(v.shape), v.dtype) for k, v in plan.items() if not k.startswith(drop)}, {})


@pytest.mark.parametrize("family, tensors, parts", [
    ("sdxl-base", 2515, 4),  # with CLIP-L's position_ids and bigG's logit_scale, as SGM writes them
    ("sdxl-refiner", 1858, 3),
])
def test_detects_full_size_sdxl(family, tensors, parts):
    checkpoint = _virtual(family)
    assert len(checkpoint.tensors) == tensors
    source = SingleFileSource.from_checkpoint(checkpoint)
    assert (source.family, len(source.parts), source.unet_config["sample_size"]) == (family, parts, 128)
    assert source.scheduler_config["_class_name"] == "EulerDiscreteScheduler"
    assert source.vae_config["scaling_factor"] == 0.13025 and source.vae_config["force_upcast"] is True
    tokenizers = {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"} if parts == 4 else {"tokenizer_2": "!"}
    for folder, pad in tokenizers.items():
        assert json.loads((source.path / folder / "tokenizer_config.json").read_text())["pad_token"] == pad


def test_shipped_sdxl_configs_are_the_real_architectures():
    from sdexport.sources.models import empty_model

    counts = {part: sum(p.numel() for p in empty_model(part, cfg).parameters())
              for part, cfg in read_configs(CONFIGS_DIR / "sdxl-base").items() if part != "scheduler"}
    assert counts == {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
                      "text_encoder_2": 694_659_840}


@pytest.mark.parametrize("drop, needle", [
    (("conditioner.embedders.1.",), "an SDXL checkpoint without its text encoders"),
    (("model.diffusion_model.label_emb.",), "the U-Net has no added conditioning"),
    (("conditioner.embedders.1.model.text_projection",), "text_encoder_2 weights do not follow the SDXL base layout"),
])
def test_incomplete_sdxl_files_are_named(drop, needle):
    with pytest.raises(SourceError, match=needle) as e:
        SingleFileSource.from_checkpoint(_virtual("sdxl-base", drop))
    assert "\n" not in str(e.value)


def test_sdxl_checkpoints_merge(tmp_path, sdxl):
    """Checkpoint merging (names-based, streamed) takes SDXL files now that they are recognised as models."""
    from sdexport.sources.merge import merge_checkpoints

    pipe_a, folder, file_a = sdxl["base"]
    pipe_b = build_tiny_sdxl(seed=5)
    file_b = write_single_file(PipelineSource(pipe_b), tmp_path / "b.safetensors")
    merge_checkpoints(file_a, file_b, 0.25, tmp_path / "merged.safetensors")
    merged = open_source(tmp_path / "merged.safetensors", config=folder).load_text_encoder_2().state_dict()
    a, b = pipe_a.text_encoder_2.state_dict(), pipe_b.text_encoder_2.state_dict()
    for k in merged:
        if a[k].is_floating_point():
            torch.testing.assert_close(merged[k], 0.75 * a[k] + 0.25 * b[k], rtol=1e-6, atol=1e-6)
    with pytest.raises(SourceError, match="merge models of the same family"):
        merge_checkpoints(file_a, sdxl["refiner"][2], 0.5, tmp_path / "mixed.safetensors")


def test_sdxl_under_diffusers_names_is_named(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "x.safetensors"
    save_file({"unet.conv_in.weight": torch.zeros(8, 4, 3, 3), "unet.add_embedding.linear_1.weight": torch.zeros(8, 8),
               "vae.decoder.conv_in.weight": torch.zeros(8, 4, 3, 3), "text_encoder.final_layer_norm.weight": torch.zeros(8),
               "text_encoder_2.text_projection.weight": torch.zeros(8, 8)}, str(path))
    with pytest.raises(SourceError, match="an SDXL checkpoint under diffusers names"):
        open_source(path)
