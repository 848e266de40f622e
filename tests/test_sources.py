"""Single-file checkpoints as sources: detection, conversion bitwise equal to the diffusers folder (and to
diffusers' own from_single_file), the same ONNX initializers as the folder's export, SD 2.x v-prediction with
a 1024-wide OpenCLIP text encoder against diffusers, and bad files failing with one clear message.

The checkpoints are written here from the tiny pipelines with ``sdexport.sources.single_file.write_single_file``
(original A1111/CompVis names, or diffusers names with component prefixes; ``.safetensors`` and ``.ckpt``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import types
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

from runtime.metrics import psnr
from sdexport.errors import SourceError
from sdexport.sources.base import Source
from sdexport.sources.checkpoint import Checkpoint, TensorInfo
from sdexport.sources.convert import original_plan
from sdexport.sources.diffusers import DiffusersSource
from sdexport.sources.models import CONFIGS_DIR, read_configs
from sdexport.sources.open import open_source
from sdexport.sources.single_file import SingleFileSource, write_single_file

PARTS = ("unet", "vae", "text_encoder")
MIN_PSNR = 45.0


# --- helpers shared with test_lora.py / test_merge.py -----------------------------------------


def run_export(source_path, out, *, loras=(), config=None, prediction_type=None, validate=True):
    """``sdexport.export.run.export`` on any source. Once ExportOptions carries loras / source_config /
    prediction_type (the proposed export.py change), through them; until then by handing export() the
    source that ``open_source`` makes."""
    import sdexport.export.run as ex
    from sdexport.export.targets.base import ExportOptions

    specs = tuple(f"{path}:{scale}" for path, scale in loras)
    fields = {f.name for f in dataclasses.fields(ExportOptions)}
    if {"loras", "source_config", "prediction_type"} <= fields:
        options = ExportOptions(validate=validate, loras=specs, prediction_type=prediction_type,
                                source_config=str(config) if config else None)
        return ex.export(source_path, out, options, progress=False)
    source = open_source(source_path, loras=specs, config=config, prediction_type=prediction_type)
    with mock.patch.object(ex, "DiffusersSource", types.SimpleNamespace(open=lambda path: source)):
        return ex.export(source_path, out, ExportOptions(validate=validate), progress=False)


def runtime_image(artifact: Path, prompt: str, steps: int = 8, size: int = 64, seed: int = 3, **kwargs) -> np.ndarray:
    from runtime import Pipeline

    pipe = Pipeline.from_dir(artifact)
    result = pipe.generate(prompt, steps=steps, height=size, width=size, seed=seed, rng="torch", **kwargs)
    return np.asarray(result.images[0].convert("RGB"), np.float64)


def diffusers_txt2img(pipe, prompt: str, steps: int = 8, size: int = 64, seed: int = 3, **kwargs) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        image = pipe(prompt, num_inference_steps=steps, height=size, width=size,
                     generator=torch.Generator().manual_seed(seed), **kwargs).images[0]
    return np.asarray(image.convert("RGB"), np.float64)


def state_dicts(source) -> dict[str, dict[str, torch.Tensor]]:
    return {part: getattr(source, f"load_{part}")().state_dict() for part in PARTS}


def assert_bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str = "") -> None:
    assert a.keys() == b.keys(), (what, sorted(set(a) ^ set(b))[:5])
    bad = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not bad, (what, bad[:5])


def onnx_initializers(path: Path) -> dict[str, bytes]:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    return {init.name: numpy_helper.to_array(init).tobytes() for init in model.graph.initializer}


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_sd1, tiny_sd2v, tiny_inpaint) -> dict[str, tuple[Path, Path]]:
    """(single file, diffusers folder) per case."""
    root = tmp_path_factory.mktemp("single-files")
    cases = {
        "sd1-ldm.safetensors": (tiny_sd1, "ldm"),
        "sd1-ldm.ckpt": (tiny_sd1, "ldm"),
        "sd1-diffusers.safetensors": (tiny_sd1, "diffusers"),
        "sd2v-ldm.safetensors": (tiny_sd2v, "ldm"),
        "sd2v-diffusers.safetensors": (tiny_sd2v, "diffusers"),
        "inpaint-ldm.safetensors": (tiny_inpaint, "ldm"),
    }
    return {name: (write_single_file(DiffusersSource.open(folder), root / name, layout=layout), folder)
            for name, (folder, layout) in cases.items()}


@pytest.fixture(scope="module")
def references(tiny_sd1, tiny_sd2v, tiny_inpaint) -> dict[Path, dict]:
    return {folder: state_dicts(DiffusersSource.open(folder)) for folder in (tiny_sd1, tiny_sd2v, tiny_inpaint)}


# --- conversion --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sd1-ldm.safetensors", "sd1-ldm.ckpt", "sd1-diffusers.safetensors",
                                  "sd2v-ldm.safetensors", "sd2v-diffusers.safetensors", "inpaint-ldm.safetensors"])
def test_single_file_loads_bitwise_equal_to_folder(files, references, name):
    file, folder = files[name]
    source = open_source(file, config=folder)
    ours = state_dicts(source)
    for part in PARTS:
        assert_bitwise(ours[part], references[folder][part], f"{name} {part}")
    assert source.scheduler_config == DiffusersSource.open(folder).scheduler_config
    assert source.describe()["format"] == ("ckpt" if name.endswith(".ckpt") else "safetensors")


@pytest.mark.parametrize("name", ["sd1-ldm.safetensors", "sd2v-ldm.safetensors"])
def test_conversion_equals_diffusers_from_single_file(files, name):
    """diffusers' own single-file loader (config= the folder, offline) is the oracle for the renaming."""
    from diffusers import StableDiffusionPipeline

    file, folder = files[name]
    pipe = StableDiffusionPipeline.from_single_file(str(file), config=str(folder), local_files_only=True,
                                                    safety_checker=None)
    ours = state_dicts(open_source(file, config=folder))
    for part in PARTS:
        assert_bitwise(ours[part], getattr(pipe, part).state_dict(), part)


def test_original_layout_names(files):
    """The writer uses the real A1111 names (spot checks against SD 1.5 / 2.1 checkpoints' keys)."""
    with Checkpoint.open(files["sd1-ldm.safetensors"][0]) as ck:
        for key in ("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
                    "model.diffusion_model.output_blocks.1.1.conv.weight",  # upsampler after a plain up block (1 layer)
                    "model.diffusion_model.middle_block.1.proj_in.weight",
                    "first_stage_model.decoder.up.1.block.0.nin_shortcut.weight",
                    "first_stage_model.encoder.mid.attn_1.q.weight",
                    "cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc2.weight",
                    "cond_stage_model.transformer.text_model.embeddings.position_ids"):
            assert key in ck, key
        assert ck.tensors["first_stage_model.encoder.mid.attn_1.q.weight"].shape[2:] == (1, 1)
    with Checkpoint.open(files["sd2v-ldm.safetensors"][0]) as ck:
        # OpenCLIP keeps one more layer than diffusers uses (SD 2.x takes the penultimate layer's output)
        assert "cond_stage_model.model.transformer.resblocks.2.attn.in_proj_weight" in ck
        assert ck.tensors["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (96, 32)


# --- detection on full-size architectures (shapes only: no weights are made) -------------------


def _virtual(family: str, drop: tuple[str, ...] = ()) -> Checkpoint:
    plan = original_plan(read_configs(CONFIGS_DIR / family))
    return Checkpoint(Path(f"/virtual/{family}.safetensors"), "safetensors",
                      {k: TensorInfo(tuple(v.shape), v.dtype) for k, v in plan.items() if not k.startswith(drop)}, {})


@pytest.mark.parametrize("family, hint, expected, prediction, size", [
    ("sd1", None, "sd1", "epsilon", 64),
    ("sd1-inpainting", None, "sd1-inpainting", "epsilon", 64),
    ("sd2-v", None, "sd2-v", "v_prediction", 96),  # SD 2.x without a hint: v, as diffusers and A1111 assume
    ("sd2-v", "epsilon", "sd2-base", "epsilon", 64),
    ("sd2-inpainting", None, "sd2-inpainting", "epsilon", 64),
])
def test_detects_full_size_families(family, hint, expected, prediction, size):
    source = SingleFileSource.from_checkpoint(_virtual(family), prediction_type=hint)
    assert (source.family, source.prediction_type, source.unet_config["sample_size"]) == (expected, prediction, size)
    assert source.scheduler_config["prediction_type"] == prediction
    assert source.describe()["prediction_type_from"] == ("hint" if hint else "default")
    assert (source.tokenizer_dir / "vocab.json").is_file()
    pad = json.loads((source.tokenizer_dir / "tokenizer_config.json").read_text())["pad_token"]
    assert pad == ("!" if family.startswith("sd2") else "<|endoftext|>")


def test_shipped_tokenizer_passes_the_exports_parity_check(tmp_path):
    """The vocabulary rebuilt for single files gives transformers' ids (the export's own tokenizer check)."""
    from sdexport.export.run import write_tokenizer

    source = SingleFileSource.from_checkpoint(_virtual("sd2-v"))
    assert write_tokenizer(source, tmp_path / "tokenizer")["identical"] is True
    assert json.loads((tmp_path / "tokenizer" / "tokenizer_config.json").read_text())["pad_token"] == "!"


def test_shipped_configs_are_the_real_architectures():
    from sdexport.sources.models import empty_model

    counts = {family: {part: sum(p.numel() for p in empty_model(part, cfg).parameters())
                       for part, cfg in read_configs(CONFIGS_DIR / family).items() if part != "scheduler"}
              for family in ("sd1", "sd2-v")}
    assert counts["sd1"] == {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}
    assert counts["sd2-v"]["unet"] == 865_910_724 and counts["sd2-v"]["text_encoder"] == 340_387_840
    assert read_configs(CONFIGS_DIR / "sd2-v")["unet"]["upcast_attention"] is True


def test_sidecar_yaml_sets_prediction_type(tmp_path, files):
    file, folder = files["sd1-ldm.safetensors"]
    copy = tmp_path / "model.safetensors"
    copy.write_bytes(file.read_bytes())
    (tmp_path / "model.yaml").write_text("model:\n  params:\n    parameterization: \"v\"\n")
    source = open_source(copy, config=folder)
    assert (source.prediction_type, source.describe()["prediction_type_from"]) == ("v_prediction", "yaml")
    assert open_source(copy, config=folder, prediction_type="epsilon").prediction_type == "epsilon"


def test_tiny_file_without_config_is_refused_clearly(files):
    with pytest.raises(SourceError, match=r"detected SD 1.x but its \w+ does not fit .*--config DIR"):
        open_source(files["sd1-ldm.safetensors"][0])


# --- few-step models ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind, cls, steps, guidance", [
    ("lcm", "LCMScheduler", 4, 1.0),
    ("turbo", "EulerDiscreteScheduler", 1, 0.0),
    (None, "PNDMScheduler", None, None),
])
def test_few_step_sampler_and_defaults(files, tiny_sd1, kind, cls, steps, guidance):
    """LCM / SD-Turbo-style models: the scheduler the export writes and the manifest's recommended defaults;
    the runtime's scheduler gives diffusers' timesteps for that config."""
    import diffusers

    from runtime.schedulers import scheduler_from_config
    from sdexport.sources.open import recommended_settings

    file, folder = files["sd1-ldm.safetensors"]
    for source in (open_source(tiny_sd1, few_step=kind), open_source(file, config=folder, few_step=kind)):
        assert isinstance(source, Source)
        config = source.scheduler_config
        written = json.loads((Path(source.path) / "scheduler" / "scheduler_config.json").read_text())
        assert config["_class_name"] == written["_class_name"] == cls
        assert config["beta_schedule"] == "scaled_linear" and config["prediction_type"] == "epsilon"
        expected = {"scheduler": cls} | ({"steps": steps, "guidance_scale": guidance} if kind else {})
        assert recommended_settings(source) == expected
        ours, theirs = scheduler_from_config(config), getattr(diffusers, cls).from_config(config)
        ours.set_timesteps(steps or 20)
        theirs.set_timesteps(steps or 20)
        assert [float(t) for t in np.asarray(ours.timesteps)] == [float(t) for t in theirs.timesteps]


def _imports(path: Path, package: str) -> set[str]:
    """The modules of ``package`` that a file imports, at its top or inside functions."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}  # from package import module
    return {name for name in found if name.startswith(package + ".")}


def test_sources_import_no_cycle():
    """The modules of sdexport.sources import each other as a DAG (imports inside functions count)."""
    import graphlib

    import sdexport.sources

    folder = Path(sdexport.sources.__file__).parent
    modules = {f"sdexport.sources.{p.stem}": p for p in folder.glob("*.py") if p.stem != "__init__"}
    graph = {name: _imports(path, "sdexport.sources") & set(modules) for name, path in modules.items()}
    order = list(graphlib.TopologicalSorter(graph).static_order())  # CycleError names the loop
    assert set(order) == set(modules)
    assert "sdexport.sources.open" not in set().union(*graph.values())  # nothing below depends on the opener


def test_prediction_hint_on_a_folder(tiny_sd2v):
    assert open_source(tiny_sd2v, prediction_type="v_prediction").scheduler_config["prediction_type"] == "v_prediction"
    with pytest.raises(SourceError, match="its scheduler says prediction_type 'v_prediction'"):
        open_source(tiny_sd2v, prediction_type="epsilon")


# --- bad input ---------------------------------------------------------------------------------


def _bad_files(tmp: Path, good: Path) -> dict[str, Path]:
    data = good.read_bytes()
    out = {
        "text.bin": b"this is not a model\n" * 10,
        "empty.safetensors": b"",
        "truncated.safetensors": data[: len(data) // 2],
        "header-cut.safetensors": data[:100],
        "png.safetensors": b"\x89PNG\r\n\x1a\n" + bytes(100),
    }
    paths = {}
    for name, content in out.items():
        (tmp / name).write_bytes(content)
        paths[name] = tmp / name
    return paths


@pytest.mark.parametrize("name, needle", [
    ("text.bin", "neither a safetensors file nor a PyTorch checkpoint"),
    ("empty.safetensors", "empty file"),
    ("truncated.safetensors", "truncated file"),
    ("header-cut.safetensors", "truncated"),
    ("png.safetensors", "neither a safetensors file nor a PyTorch checkpoint"),
])
def test_bad_files(tmp_path, files, name, needle):
    path = _bad_files(tmp_path, files["sd1-ldm.safetensors"][0])[name]
    with pytest.raises(SourceError, match=needle) as e:
        open_source(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_truncated_ckpt(tmp_path, files):
    data = files["sd1-ldm.ckpt"][0].read_bytes()
    bad = tmp_path / "cut.ckpt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(SourceError, match="truncated or corrupt PyTorch checkpoint"):
        open_source(bad)


def _save_with_module(obj_factory, path: Path, module_name: str) -> None:
    """torch.save an object whose class lives in a module that does not exist at load time."""
    parts = module_name.split(".")
    modules = [types.ModuleType(".".join(parts[: i + 1])) for i in range(len(parts))]
    for m in modules:
        sys.modules[m.__name__] = m
    try:
        torch.save(obj_factory(modules[-1]), path)
    finally:
        for m in modules:
            del sys.modules[m.__name__]


def test_ckpt_with_training_objects_loads_via_stubs(tmp_path, files, references):
    """A Lightning checkpoint (callbacks, numpy step counters) loads without the classes and without running them."""
    file, folder = files["sd1-ldm.ckpt"]
    state = torch.load(file, weights_only=True)["state_dict"]

    def make(module):
        cls = type("ModelCheckpoint", (), {"__module__": module.__name__})
        setattr(module, "ModelCheckpoint", cls)
        return {"state_dict": state, "callbacks": {cls: cls()}, "global_step": np.int64(470000), "epoch": 2}

    path = tmp_path / "lightning.ckpt"
    _save_with_module(make, path, "pytorch_lightning.callbacks.model_checkpoint")
    assert_bitwise(open_source(path, config=folder).load_unet().state_dict(), references[folder]["unet"])


def test_ckpt_that_runs_code_is_refused(tmp_path, files):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.ones(1)}, "payload": Payload()}, path)
    with pytest.raises(SourceError, match=r"refusing to load: its pickle calls \w+\.system"):
        open_source(path)
    assert not marker.exists()


def _safetensors(path: Path, tensors: dict) -> Path:
    from safetensors.torch import save_file

    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize("keys, needle", [
    ({"conditioner.embedders.1.model.positional_embedding": (77, 1280),
      "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}, "an SDXL checkpoint without its text encoders"),
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 32)}, "this is a LoRA, not a model: pass it"),
    ({"encoder.down.0.block.0.conv1.weight": (8, 3, 3, 3)}, "a standalone VAE"),
    ({"double_blocks.0.img_attn.qkv.weight": (9, 3)}, "SD3 / Flux"),
    ({"foo.weight": (3, 3), "bar.bias": (3,)}, "unknown checkpoint layout: no Stable Diffusion U-Net .* e.g. bar.bias, foo.weight"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (320, 5, 3, 3),
      "cond_stage_model.model.token_embedding.weight": (10, 8), "first_stage_model.quant_conv.weight": (8, 8, 1, 1)},
     "depth-conditioned SD 2 model"),
])
def test_other_kinds_of_file_are_named(tmp_path, keys, needle):
    path = _safetensors(tmp_path / "x.safetensors", {k: torch.zeros(s) for k, s in keys.items()})
    with pytest.raises(SourceError, match=needle):
        open_source(path)


def test_missing_component_is_named(tmp_path, files):
    file, folder = files["sd1-ldm.safetensors"]
    with Checkpoint.open(file) as ck:
        kept = {k: ck.get(k) for k in ck.keys() if not k.startswith("first_stage_model.")}
    path = _safetensors(tmp_path / "novae.safetensors", kept)
    with pytest.raises(SourceError, match="no VAE"):
        open_source(path, config=folder)


# --- export ------------------------------------------------------------------------------------


def test_single_file_exports_same_initializers_as_folder(tmp_path, files, tiny_sd1):
    file, folder = files["sd1-ldm.safetensors"]
    a = run_export(folder, tmp_path / "from-folder", validate=False)
    b = run_export(file, tmp_path / "from-file", config=folder, validate=False)
    assert a.model == b.model
    for name in a.components:
        ours, theirs = (onnx_initializers(m.root / m.components[name].files[0].path) for m in (b, a))
        assert ours.keys() == theirs.keys() and all(ours[k] == theirs[k] for k in ours), name
    for rel in ("tokenizer/vocab.json", "tokenizer/merges.txt", "scheduler/scheduler_config.json"):
        assert json.loads((a.root / rel).read_text()) == json.loads((b.root / rel).read_text()) \
            if rel.endswith(".json") else (a.root / rel).read_text() == (b.root / rel).read_text()


@pytest.fixture(scope="module")
def tiny_sd2v_1024(tmp_path_factory) -> Path:
    """SD 2.x v-prediction at toy width with the real text width: a 1024-wide (gelu, OpenCLIP-style) text encoder."""
    from sdexport.demo.tiny import TINY_SPECS, save_tiny_pipeline

    spec = dataclasses.replace(TINY_SPECS["sd2-v"], name="sd2-v-1024", text_hidden=1024)
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd2v-1024") / "model", spec)


def test_sd2v_1024_single_file_matches_diffusers(tmp_path, tiny_sd2v_1024):
    from diffusers import StableDiffusionPipeline

    file = write_single_file(DiffusersSource.open(tiny_sd2v_1024), tmp_path / "sd2v.safetensors")
    with Checkpoint.open(file) as ck:
        assert ck.tensors["cond_stage_model.model.token_embedding.weight"].shape == (49408, 1024)
    # validate=False: the image comparison below checks the whole chain (and keeps this test short)
    manifest = run_export(file, tmp_path / "onnx", config=tiny_sd2v_1024, prediction_type="v_prediction",
                          validate=False)
    info = manifest.model
    assert (info.family, info.prediction_type, info.text_hidden_size) == ("sd2-v", "v_prediction", 1024)
    prompt = "a red circle on a blue background"
    ours = runtime_image(manifest.root, prompt, negative_prompt="blurry")
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd2v_1024), safety_checker=None)
    theirs = diffusers_txt2img(pipe, prompt, negative_prompt="blurry")
    value = psnr(theirs, ours, peak=255.0)
    print(f"SD2-v 1024 single file vs diffusers: PSNR {value:.1f} dB")
    assert value >= MIN_PSNR, f"PSNR {value:.1f} dB"


# --- the command line (runs once cli.py / export.py take single files) --------------------------


def _cli_supports(*flags: str) -> bool:
    from sdexport.cli import build_parser

    text = build_parser()._subparsers._group_actions[0].choices["export"].format_help()
    return all(f in text for f in flags)


@pytest.mark.skipif(not _cli_supports("--config", "--prediction-type"), reason="cli.py does not take single files yet")
def test_cli_single_file_errors_are_one_line(tmp_path, capsys, files):
    from sdexport.cli import main

    bad = _bad_files(tmp_path, files["sd1-ldm.safetensors"][0])
    for name in ("text.bin", "truncated.safetensors"):
        out = tmp_path / f"out-{name}"
        code = main(["export", str(bad[name]), "--out", str(out), "--quiet"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("sdexport: error: ") and str(bad[name]) in err[0]
        assert not out.exists() and not [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    file, folder = files["sd1-ldm.safetensors"]
    out = tmp_path / "ok"
    assert main(["export", str(file), "--config", str(folder), "--out", str(out), "--quiet", "--no-validate"]) == 0
    assert json.loads((out / "sdexport.json").read_text())["model"]["family"] == "sd1"
