"""Winograd F(2)/F(4) convolutions for OpenVINO's CPU plugin at f32.

- the rewrite gives the direct convolution's result up to f32 rounding (measured relative error bounds
  per tile), for square and non-square inputs, C != K, and leaves what it cannot take alone;
- an export forced to F(4) / F(2) everywhere still matches diffusers' images at >= 45 dB (txt2img,
  img2img), and its manifest records the plan; the export's own parity check ran with it applied;
- ``auto`` records what it measured and picks a tile only when it beat the direct convolution;
- the runtime applies the plan only on the CPU at f32 and when not switched off;
- bad input: a one-line error.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import openvino as ov
import openvino.opset13 as ops
import pytest
from PIL import Image

from runtime.backends.openvino_winograd import apply_plan, conv_shape, eligible_convs, winograd_conv3x3
from runtime.metrics import psnr
from sdexport.cli import main
from tests.reference import diffusers_image, sample_image
from tests.test_cli_errors import assert_one_line_error, run_cli

SIZE, STEPS, MIN_PSNR = 64, 8, 45.0
PROMPT = "a red circle in the top left on a blue background"
# max |winograd - direct| / max |direct|, f32; measured on SD 1.5 layers 2e-6 (F(2)) and 2e-5 (F(4))
REL_ERROR = {2: 1e-5, 4: 1e-4}
F32 = {"INFERENCE_PRECISION_HINT": "f32"}


def _conv_model(shape, seed=0, stride=1, pad=1, kernel=3, dynamic=False):
    n, c, k, h, w = shape
    rng = np.random.default_rng(seed)
    weights = (rng.standard_normal((k, c, kernel, kernel)) / np.sqrt(c * kernel * kernel)).astype(np.float32)
    x = ops.parameter([-1, c, -1, -1] if dynamic else [n, c, h, w], np.float32)
    y = ops.convolution(x, ops.constant(weights), [stride] * 2, [pad] * 2, [pad] * 2, [1, 1])
    y = ops.add(y, ops.constant(rng.standard_normal((1, k, 1, 1)).astype(np.float32)))  # the bias stays outside
    return ov.Model([y], [x])


def _run(model, x, config=F32):
    return ov.Core().compile_model(model, "CPU", config)([x])[0]


@pytest.mark.parametrize("shape", [(2, 8, 16, 8, 8), (1, 3, 5, 12, 8), (2, 32, 24, 16, 16)])
@pytest.mark.parametrize("tile", [2, 4])
def test_rewrite_matches_direct_convolution(shape, tile):
    x = np.random.default_rng(1).standard_normal(shape[:2] + shape[3:]).astype(np.float32)
    direct = _run(_conv_model(shape), x)
    model = _conv_model(shape)
    assert [s for _, s in eligible_convs(model)] == [shape]
    assert apply_plan(model, {shape: tile}) == 1
    types = {op.get_type_name() for op in model.get_ordered_ops()}
    assert "Convolution" not in types and {"GroupConvolution", "MatMul", "DepthToSpace"} <= types
    ours = _run(model, x)
    error = np.abs(ours - direct).max() / np.abs(direct).max()
    assert ours.shape == direct.shape and error <= REL_ERROR[tile], error
    assert error > 0  # a different algorithm, not the same kernel under another name


def test_what_the_rewrite_leaves_alone():
    assert conv_shape(next(iter(_conv_model((1, 4, 4, 8, 8), stride=2).get_ordered_ops()))) is None
    for model in (_conv_model((1, 4, 4, 8, 8), stride=2), _conv_model((1, 4, 4, 8, 8), kernel=1, pad=0),
                  _conv_model((1, 4, 4, 8, 8), dynamic=True)):
        assert list(eligible_convs(model)) == []
    model = _conv_model((1, 4, 4, 6, 6))  # 6 is no multiple of 4
    assert apply_plan(model, {(1, 4, 4, 6, 6): 4}) == 0 and apply_plan(model, {(1, 4, 4, 8, 8): 2}) == 0


def test_dynamic_models_get_no_plan():
    from sdexport.export.targets.winograd_tuning import plan

    assert plan(_conv_model((1, 4, 4, 8, 8), dynamic=True)) is None
    assert plan(_conv_model((1, 4, 4, 8, 8)), "off") is None


def test_auto_plan_is_measured():
    from sdexport.export.targets.winograd_tuning import MIN_GAIN, plan

    result = plan(_conv_model((2, 64, 64, 16, 16)), "auto", threads=1)
    (layer,) = result["layers"]
    assert layer["shape"] == [2, 64, 64, 16, 16] and set(layer["ms"]) == {"direct", "f2", "f4"}
    best = min(layer["ms"], key=layer["ms"].get)
    if layer["tile"]:
        assert f"f{layer['tile']}" == best and layer["ms"][best] * MIN_GAIN <= layer["ms"]["direct"]
    else:
        assert best == "direct" or layer["ms"][best] * MIN_GAIN > layer["ms"]["direct"]
    assert result["tuned_on"]["threads"] == 1 and result["of_eligible"] == 1


# --- through the pipeline ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def forced(tmp_path_factory, tiny_sd1):
    """Static exports of the tiny SD1 pipeline with every eligible convolution in F(4) / F(2)."""
    done = {}

    def get(mode: str) -> Path:
        if mode not in done:
            out = tmp_path_factory.mktemp("winograd") / mode
            assert main(["export", str(tiny_sd1), "--target", "openvino", "--out", str(out), "--height", str(SIZE),
                         "--width", str(SIZE), "--batch", "1", "--winograd", mode, "--quiet"]) == 0
            done[mode] = out
        return done[mode]

    return get


def _generate(tmp_path: Path, artifact: Path, *extra: str) -> Image.Image:
    out = tmp_path / "out.png"
    assert main(["generate", str(artifact), "--seed", "3", "--rng", "torch", "--steps", str(STEPS), "--height",
                 str(SIZE), "--width", str(SIZE), "--output", str(out), "--quiet", "--overwrite", *extra]) == 0
    return Image.open(out).convert("RGB")


def _psnr(a, b) -> float:
    return psnr(np.asarray(a, np.float64), np.asarray(b, np.float64), peak=255.0)


@pytest.mark.parametrize("mode", ["f4", "f2"])
def test_forced_winograd_matches_diffusers(forced, tmp_path, tiny_sd1, mode):
    artifact = forced(mode)
    components = json.loads((artifact / "sdexport.json").read_text())["components"]
    for name in ("unet", "vae_encoder", "vae_decoder"):
        plan = components[name]["details"]["winograd"]
        assert plan["mode"] == mode and plan["convolutions"] == plan["of_eligible"] > 0, (name, plan)
        assert all(layer["tile"] == int(mode[1]) for layer in plan["layers"])
        assert components[name]["parity"]["psnr_db"] >= 60.0  # the export's check ran on the rewritten graph
    assert "winograd" not in components["text_encoder"]["details"]  # no convolutions
    ours = _generate(tmp_path, artifact, "--prompt", PROMPT, "--scheduler", "dpmpp-2m")
    theirs = diffusers_image(tiny_sd1, "txt2img", "dpmpp-2m", 3, prompt=PROMPT, num_inference_steps=STEPS,
                             height=SIZE, width=SIZE)
    assert _psnr(ours, theirs) >= MIN_PSNR
    image = tmp_path / "image.png"
    sample_image(SIZE).save(image)
    ours = _generate(tmp_path, artifact, "--prompt", PROMPT, "--scheduler", "ddim", "--image", str(image),
                     "--strength", "0.6")
    theirs = diffusers_image(tiny_sd1, "img2img", "ddim", 3, prompt=PROMPT, image=Image.open(image), strength=0.6,
                             num_inference_steps=STEPS)
    assert _psnr(ours, theirs) >= MIN_PSNR


def test_runtime_applies_the_plan_on_cpu_f32_only(forced):
    from runtime.backends import open_session
    from runtime.manifest import Manifest

    artifact = forced("f4")
    component = Manifest.load(artifact).component("unet")
    rng = np.random.default_rng(0)
    feeds = {"sample": rng.standard_normal((2, 4, 8, 8), np.float32), "timestep": np.full((2,), 500.0, np.float32),
             "encoder_hidden_states": rng.standard_normal((2, 77, 32), np.float32)}

    def session(**options):
        return open_session(component, artifact, {"cache_dir": "", **options})

    on, off = session(), session(winograd="off")
    assert on.winograd_convolutions == component.details["winograd"]["convolutions"] and off.winograd_convolutions == 0
    assert session(precision_hint="bf16").winograd_convolutions == 0  # slower and less exact under bf16
    a, b = on.run(feeds)["out_sample"], off.run(feeds)["out_sample"]
    assert not np.array_equal(a, b)
    assert np.abs(a - b).max() / np.abs(b).max() <= REL_ERROR[4] * 10  # 10: errors of ~19 layers add up


def test_names_checked_on_the_rewritten_model(forced, tmp_path):
    import shutil

    from runtime.backends import BackendError, open_session
    from runtime.manifest import Manifest

    copy = tmp_path / "copy"
    shutil.copytree(forced("f4"), copy)
    manifest = json.loads((copy / "sdexport.json").read_text())
    manifest["components"]["unet"]["outputs"][0]["name"] = "noise"
    (copy / "sdexport.json").write_text(json.dumps(manifest))
    component = Manifest.load(copy, check_files=False).component("unet")
    with pytest.raises(BackendError, match=r"the model lacks noise that the manifest lists"):
        open_session(component, copy, {"cache_dir": ""})


def test_bad_winograd_options(capsys, tiny_sd1, forced, tmp_path):
    code, err = run_cli(capsys, "export", tiny_sd1, "--target", "onnx", "--winograd", "f4", "--out", tmp_path / "o")
    assert_one_line_error(code, err, "--winograd applies to --target openvino")
    assert not (tmp_path / "o").exists()
    from runtime.backends import BackendError, open_session
    from runtime.manifest import Manifest

    artifact = forced("f4")
    with pytest.raises(BackendError, match="unknown winograd option 'fast'"):
        open_session(Manifest.load(artifact).component("unet"), artifact, {"winograd": "fast"})
    profile = tmp_path / "p.toml"
    profile.write_text('target = "openvino"\nprecision = "fp32"\n[openvino]\nwinograd = "f6"\n')
    code, err = run_cli(capsys, "export", tiny_sd1, "--profile", profile, "--out", tmp_path / "o")
    assert_one_line_error(code, err, "openvino.winograd", "'f6'")
