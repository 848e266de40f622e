"""Device profiles that know the model family (a static profile's size is per family, or the model's own:
SDXL 1024, SD 2.x-v 768, SD 1.x 512), and ControlNets of the other family refused in one line."""

from __future__ import annotations

import json

import pytest

from sdexport import profile
from sdexport.errors import OptionError, SourceError
from sdexport.sources.family import ModelFamily, check_controlnet_family, family_of_configs, family_of_source
from sdexport.sources.models import CONFIGS_DIR, read_configs
from tests.sdxl_tiny import PipelineSource, build_tiny_sdxl

SD1, SD2V, SDXL = ModelFamily("sd1", 512, 512), ModelFamily("sd2-v", 768, 768), ModelFamily("sdxl", 1024, 1024)


@pytest.mark.parametrize("folder, expected", [
    ("sd1", SD1), ("sd2-base", ModelFamily("sd2", 512, 512)), ("sd2-v", SD2V), ("sd1-inpainting", SD1),
    ("sdxl-base", SDXL), ("sdxl-refiner", SDXL), ("sdxl-inpainting", SDXL),
])
def test_family_and_own_size_of_the_real_architectures(folder, expected):
    configs = read_configs(CONFIGS_DIR / folder)
    assert family_of_configs(configs["unet"], configs["vae"], configs["scheduler"]) == expected


@pytest.mark.parametrize("name, sizes", [
    ("laptop-cpu-x86", {"sd1": 512, "sd2-v": 768, "sdxl": 1024}),
    ("jetson-orin", {"sd1": 512, "sd2-v": 768, "sdxl": 1024}),
    ("apple-silicon-ane", {"sd1": 512, "sd2-v": 768, "sdxl": 1024}),
    ("arm64-cpu", {"sd1": 256, "sd2-v": 384, "sdxl": 512}),
    ("laptop-cpu-onnx", {"sd1": None, "sd2-v": None, "sdxl": None}),  # dynamic: no static size
])
def test_shipped_profiles_size_per_family(name, sizes):
    for family in (SD1, SD2V, SDXL):
        options = profile.resolve(name, model=family)
        assert (options.height, options.width) == (sizes[family.name], sizes[family.name]), (name, family)
    # flags still win, whatever the family
    assert profile.resolve(name, height=64, width=128, model=SDXL).width == 128


def test_sdxl_model_gets_1024_by_default(tmp_path):
    """From a model path, as the CLI resolves it: an SDXL single file (tiny, its config folder beside)."""
    from sdexport.sources.single_file import write_single_file

    pipe = build_tiny_sdxl()
    pipe.save_pretrained(str(tmp_path / "model"))
    file = write_single_file(PipelineSource(pipe), tmp_path / "model.safetensors")
    options = profile.resolve("laptop-cpu-x86", model=str(file), source_config=str(tmp_path / "model"))
    assert (options.height, options.width) == (1024, 1024)
    options = profile.resolve("laptop-cpu-x86", model=str(tmp_path / "model"))  # the diffusers folder
    assert (options.height, options.width) == (1024, 1024)


def test_profile_without_the_family_takes_the_models_own_size(tmp_path):
    custom = tmp_path / "sd1-only.toml"
    custom.write_text('target = "onnx"\nprecision = "fp32"\n[shapes]\nstatic = true\nsizes = { sd1 = 384 }\n')
    assert profile.resolve(str(custom), model=SD1).height == 384
    assert (profile.resolve(str(custom), model=SDXL).height, profile.resolve(str(custom), model=SD2V).width) == (1024, 768)
    landscape = tmp_path / "landscape.toml"
    landscape.write_text('target = "onnx"\nprecision = "fp32"\n[shapes]\nstatic = true\nsizes = { sdxl = [768, 1344] }\n')
    options = profile.resolve(str(landscape), model=SDXL)
    assert (options.height, options.width) == (768, 1344)
    with pytest.raises(OptionError, match="no static size for a model of unknown family"):
        profile.resolve(str(landscape))


@pytest.mark.parametrize("content, needle", [
    ('sizes = { sd3 = 1024 }', "shapes.sizes has 'sd3': families are sd1, sd2, sd2-v, sdxl"),
    ('sizes = { sdxl = 1020 }', "sdxl: expected a size in pixels"),
    ('sizes = { sdxl = [1024] }', "sdxl: expected a size in pixels"),
])
def test_bad_family_sizes_are_named(tmp_path, content, needle):
    bad = tmp_path / "bad.toml"
    bad.write_text(f'target = "onnx"\nprecision = "fp32"\n[shapes]\nstatic = true\n{content}\n')
    with pytest.raises(OptionError, match=needle):
        profile.load(str(bad))


@pytest.fixture(scope="module")
def unets(tmp_path_factory):
    """U-Net and ControlNet configs of both families (tiny SD 1.x from its folder, tiny SDXL in memory)."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    from sdexport.demo.tiny import build_tiny_components

    sd1 = build_tiny_components("sd1")["unet"]
    sdxl = build_tiny_sdxl().unet
    return {name: (dict(unet.config), dict(ControlNetModel.from_unet(unet).config))
            for name, unet in (("sd1", sd1), ("sdxl", sdxl))}


@pytest.mark.parametrize("controlnet, model, needle", [
    ("sdxl", "sd1", r"is an SDXL \(cross-attention width 80\) ControlNet but the model is SD 1.x/2.x \(cross-attention width 32\)"),
    ("sd1", "sdxl", r"is an SD 1.x/2.x \(cross-attention width 32\) ControlNet but the model is SDXL"),
    ("sdxl", "sdxl", None),
    ("sd1", "sd1", None),
])
def test_controlnet_of_the_other_family_is_one_line(unets, controlnet, model, needle):
    cn_config, unet_config = unets[controlnet][1], unets[model][0]
    if needle is None:
        check_controlnet_family("edges", "/cn", cn_config, unet_config)
        return
    with pytest.raises(SourceError, match=needle) as e:
        check_controlnet_family("edges", "/cn", cn_config, unet_config)
    assert "\n" not in str(e.value) and "'edges' (/cn)" in str(e.value)


def test_family_of_full_size_sdxl_single_file():
    from tests.test_sdxl_sources import _virtual
    from sdexport.sources.single_file import SingleFileSource

    source = SingleFileSource.from_checkpoint(_virtual("sdxl-refiner"))
    assert family_of_source(source) == SDXL
    assert json.loads((source.path / "model_index.json").read_text())["requires_aesthetics_score"] is True


def test_cli_sizes_a_static_profile_for_the_model(tmp_path, tiny_sd1):
    """The CLI hands the model to the profile: the tiny SD 1.x model gets the profile's sd1 size."""
    from runtime.manifest import Manifest
    from sdexport.cli import main

    out = tmp_path / "plan"
    assert main(["export", str(tiny_sd1), "--profile", "jetson-orin", "--out", str(out), "--dry-run", "--quiet"]) == 0
    shape = Manifest.load(out, check_files=False).runtime.static_shape
    assert (shape.height, shape.width) == (512, 512)
