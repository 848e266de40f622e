"""Depth-to-image and the depth preprocessor against diffusers and transformers, same seed and image.

- numpy pieces: torch's bicubic interpolation; DPTImageProcessor's preprocessing (several configs).
- the exported DPT + numpy preprocessing against transformers' processor + model (PSNR >= 45 dB),
  and the latent-size depth condition against diffusers' prepare_depth_map.
- StableDiffusionDepth2ImgPipeline, depth estimated by the exported DPT, on ONNX Runtime and
  OpenVINO (rng torch): image PSNR >= 45 dB; and with a depth map the user gives.
- the depth control image against transformers' depth-estimation pipeline (``--preprocess depth``
  end to end with a depth ControlNet is in test_controlnet.py, on its export).
- bad inputs: one line, nothing written.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from runtime.depth import DptProcessorConfig, bicubic_resize, dpt_pixel_values
from runtime.metrics import psnr
from runtime.pipeline import Pipeline
from sdexport.cli import main
from tests.reference import sample_image
from tests.test_cli_errors import assert_one_line_error, run_cli

MIN_PSNR = 45.0
SIZE = 64
STEPS = 3
PROMPT = "a room with a chair"


@pytest.fixture(scope="module")
def reference(tiny_depth):
    import diffusers

    pipe = diffusers.StableDiffusionDepth2ImgPipeline.from_pretrained(str(tiny_depth))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tiny_depth):
    """target -> artifact, each exported once, without the export's per-component check against torch
    (the depth estimator's is run in test_depth_estimator_component; the images are compared here)."""
    from sdexport.export.run import export
    from sdexport.export.targets.base import ExportOptions

    made = {}

    def get(target):
        if target not in made:
            out = tmp_path_factory.mktemp(f"depth-{target}") / "out"
            export(tiny_depth, out, ExportOptions(target=target, validate=False), progress=False)
            made[target] = out
        return made[target]

    return get


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("depth-inputs") / "photo.png"
    sample_image(SIZE, seed=3).save(path)
    return path


def _image_psnr(a: Image.Image, b: Image.Image) -> float:
    return psnr(np.asarray(a, np.float64), np.asarray(b, np.float64), peak=255.0)


# --- numpy pieces ------------------------------------------------------------------------------


@pytest.mark.parametrize("shape, size", [((2, 1, 64, 64), (8, 8)), ((1, 1, 32, 24), (96, 100)),
                                         ((3, 1, 7, 5), (13, 3)), ((1, 1, 384, 384), (96, 72))])
def test_bicubic_matches_torch(shape, size):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32) * 3
    ref = torch.nn.functional.interpolate(torch.from_numpy(x), size=size, mode="bicubic", align_corners=False).numpy()
    got = bicubic_resize(x, *size)
    assert got.shape == ref.shape and got.dtype == np.float32
    # float32 rounding of the weights and sums only: ~1e-6 of the range
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(x).max()


@pytest.mark.parametrize("kwargs", [
    dict(size={"height": 32, "width": 32}),
    dict(size={"height": 48, "width": 40}, resample=2),
    dict(size={"height": 32, "width": 32}, keep_aspect_ratio=True, ensure_multiple_of=8),
    dict(size={"height": 384, "width": 384}, keep_aspect_ratio=True, ensure_multiple_of=32,
         image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]),
])
def test_dpt_preprocessing_matches_transformers(kwargs):
    from transformers import DPTImageProcessor

    image = sample_image(64, seed=1).resize((80, 56))
    processor = DPTImageProcessor(**kwargs)
    ref = processor(images=image, return_tensors="np").pixel_values
    got = dpt_pixel_values(image, DptProcessorConfig.from_preprocessor_config(processor.to_dict()))
    assert got.shape == ref.shape
    np.testing.assert_array_equal(got, ref)


# --- the exported depth estimator ----------------------------------------------------------------


def test_depth_estimator_component(artifacts, tiny_depth):
    """The component as the manifest records it, and the export's own parity check on it (two batch sizes)."""
    from runtime.manifest import Manifest
    from sdexport.export.components import Shape
    from sdexport.export.depth import depth_estimator_spec
    from sdexport.export.validate import measure
    from sdexport.sources.depth import DepthEstimatorSource

    m = Manifest.load(artifacts("onnx"))
    assert m.model.family == "depth" and m.model.unet_in_channels == 5
    c = m.component("depth_estimator")
    assert c.role == "depth_estimator" and [t.shape for t in c.inputs] == [("B", 3, 32, 32)]
    assert c.details["image_processor"]["height"] == 32 and c.details["image_processor"]["resample"] == 3
    spec = depth_estimator_spec(DepthEstimatorSource.find(tiny_depth))
    module = spec.module()
    for batch in (1, 2):
        result = measure(c, m.root, spec, module, Shape(batch, SIZE, SIZE))
        assert result["finite"] and (result["psnr_db"] is None or result["psnr_db"] >= 60), result


def test_depth_map_matches_transformers(artifacts, reference, photo):
    """Exported DPT + numpy preprocessing vs transformers' processor + model, then the condition the
    U-Net sees vs diffusers' prepare_depth_map."""
    image = Image.open(photo)
    pipe = Pipeline.from_dir(artifacts("onnx"))
    ours = pipe.estimate_depth(image)
    with torch.no_grad():
        pixels = reference.feature_extractor(images=image, return_tensors="pt").pixel_values
        theirs = reference.depth_estimator(pixels).predicted_depth.numpy()
    assert ours.shape == theirs.shape == (1, 64, 64) and theirs.std() > 0
    value = psnr(theirs, ours)
    print(f"depth map PSNR {value:.1f} dB")
    assert value >= MIN_PSNR
    from runtime.depth import depth_condition

    with torch.no_grad():
        expected = reference.prepare_depth_map(image, None, 1, False, torch.float32, torch.device("cpu")).numpy()
    got = depth_condition(ours, SIZE // 8, SIZE // 8)
    assert got.shape == expected.shape == (1, 1, 8, 8)
    assert psnr(expected, got) >= MIN_PSNR


@pytest.fixture(scope="module")
def depth2img_reference(reference, photo):
    with torch.no_grad():
        return reference(PROMPT, image=Image.open(photo), num_inference_steps=STEPS, strength=0.8,
                         generator=torch.Generator().manual_seed(4)).images[0]


@pytest.mark.parametrize("target, loop", [("onnx", "off"), ("onnx", "on"), ("openvino", "off")])
def test_depth2img_equals_diffusers(artifacts, depth2img_reference, photo, target, loop):
    """Depth estimated by the exported DPT; on ONNX Runtime also through the device loop (CPU provider),
    which feeds the depth channel as its extra input."""
    options = {"device": "cpu", "device_loop": "on"} if loop == "on" else None
    result = Pipeline.from_dir(artifacts(target), options=options).generate(PROMPT, image=photo, steps=STEPS,
                                                                            strength=0.8, seed=4, rng="torch")
    assert result.settings["loop"] == ("device" if loop == "on" else "numpy")
    value = _image_psnr(depth2img_reference, result.image)
    print(f"depth2img {target} loop {loop}: PSNR {value:.1f} dB, depth estimator "
          f"{result.timings['depth_estimator'] * 1e3:.1f} ms")
    assert value >= MIN_PSNR
    assert result.calls["depth_estimator"] == 1


def test_depth2img_with_given_depth_map(artifacts, reference, photo, tmp_path):
    """--depth-map: a 16-bit map of the image's size replaces the estimator, as diffusers' depth_map."""
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    depth = (x * 700 + (y - 20) ** 2 * 30).astype(np.uint16)
    Image.fromarray(depth).save(tmp_path / "depth.png")
    assert Image.open(tmp_path / "depth.png").mode.startswith("I")
    with torch.no_grad():
        theirs = reference(PROMPT, image=Image.open(photo), depth_map=torch.from_numpy(depth.astype(np.float32))[None],
                           num_inference_steps=STEPS, strength=0.9, generator=torch.Generator().manual_seed(2)).images[0]
    out = tmp_path / "out.png"
    code = main(["generate", str(artifacts("onnx")), "--prompt", PROMPT, "--image", str(photo), "--depth-map",
                 str(tmp_path / "depth.png"), "--steps", str(STEPS), "--strength", "0.9", "--seed", "2", "--rng", "torch",
                 "--output", str(out), "--quiet"])
    assert code == 0
    value = _image_psnr(theirs, Image.open(out).convert("RGB"))
    print(f"depth2img with a given depth map: PSNR {value:.1f} dB")
    assert value >= MIN_PSNR
    # the depth channel matters: the estimated depth gives another image
    estimated = Pipeline.from_dir(artifacts("onnx")).generate(PROMPT, image=photo, steps=STEPS, strength=0.9, seed=2,
                                                              rng="torch").image
    assert _image_psnr(estimated, Image.open(out).convert("RGB")) < 40


# --- the depth preprocessor for ControlNets -----------------------------------------------------


def test_depth_control_image_matches_transformers_pipeline(artifacts, reference, photo):
    """Pipeline.depth_control_image (what --preprocess depth runs) vs transformers' depth-estimation
    pipeline's "depth" image, replicated to RGB as diffusers' depth ControlNet example does."""
    from transformers import pipeline

    estimator = pipeline("depth-estimation", model=reference.depth_estimator, image_processor=reference.feature_extractor)
    expected = np.asarray(estimator(Image.open(photo))["depth"])
    ours = Pipeline.from_dir(artifacts("onnx")).depth_control_image(photo)
    assert ours.mode == "RGB" and ours.size == (SIZE, SIZE)
    got = np.asarray(ours)
    assert (got[..., 0] == got[..., 1]).all() and (got[..., 0] == got[..., 2]).all()
    value = psnr(expected.astype(np.float64), got[..., 0].astype(np.float64), peak=255.0)
    print(f"depth control image PSNR {value:.1f} dB")
    assert value >= MIN_PSNR


# --- bad inputs: one line, nothing written --------------------------------------------------------


def _generate_args(artifact, out, *extra):
    return ["generate", artifact, "--prompt", PROMPT, "--steps", "2", "--output", out, *extra]


@pytest.mark.parametrize("case", ["wrong-size", "rgb", "unreadable-depth", "unreadable-image", "no-image", "constant"])
def test_bad_depth_inputs(artifacts, photo, tmp_path, capsys, case):
    artifact, out = artifacts("onnx"), tmp_path / "out.png"
    depth = tmp_path / "depth.png"
    image = photo
    needles = {"wrong-size": ("is 32x48 but the image is 64x64",), "rgb": ("mode RGB has 3 channel(s)",),
               "unreadable-depth": ("depth map", "cannot read it as an image"),
               "unreadable-image": ("input image", "cannot read it as an image"),
               "no-image": ("depth-to-image model: give an input image",), "constant": ("is constant",)}[case]
    if case == "wrong-size":
        Image.new("L", (32, 48), 9).save(depth)
    elif case == "rgb":
        Image.new("RGB", (SIZE, SIZE), (9, 9, 9)).save(depth)
    elif case == "constant":
        Image.new("L", (SIZE, SIZE), 9).save(depth)
    else:
        depth.write_bytes(b"not an image")
    if case == "unreadable-image":
        image, depth = depth, None
    extra = [] if case == "no-image" else ["--image", image] + (["--depth-map", depth] if depth else [])
    code, err = run_cli(capsys, *_generate_args(artifact, out, *extra))
    assert_one_line_error(code, err, *needles)
    assert code == 2 and not out.exists()


@pytest.fixture
def without_estimator(artifacts, tmp_path):
    """The depth artifact with its depth_estimator taken out of the manifest."""
    import json
    import shutil

    copy = tmp_path / "no-estimator"
    shutil.copytree(artifacts("onnx"), copy)
    manifest = json.loads((copy / "sdexport.json").read_text())
    del manifest["components"]["depth_estimator"]
    (copy / "sdexport.json").write_text(json.dumps(manifest))
    return copy


@pytest.mark.parametrize("flags, needle", [
    (["--control", "depth=PHOTO", "--preprocess", "depth"], "--preprocess depth needs a depth estimator"),
    (["--image", "PHOTO"], "no depth estimator: give a depth map (--depth-map)"),
])
def test_no_depth_estimator(without_estimator, photo, tmp_path, capsys, flags, needle):
    out = tmp_path / "out.png"
    flags = [str(photo) if f == "PHOTO" else f.replace("PHOTO", str(photo)) for f in flags]
    code, err = run_cli(capsys, *_generate_args(without_estimator, out, *flags))
    assert_one_line_error(code, err, needle)
    assert not out.exists()


def test_export_depth_estimator_option(tmp_path, capsys, tiny_sd1, tiny_depth):
    """--depth-estimator: a folder without a DPT is one line and nothing written; a depth-to-image
    folder's estimator is planned as the depth_estimator component (dry run)."""
    code, err = run_cli(capsys, "export", tiny_sd1, "--out", tmp_path / "bad", "--quiet", "--depth-estimator", tiny_sd1)
    assert_one_line_error(code, err, "--depth-estimator", "neither a depth-to-image model")
    assert not (tmp_path / "bad").exists()
    from runtime.manifest import Manifest

    assert main(["export", str(tiny_sd1), "--out", str(tmp_path / "plan"), "--dry-run", "--quiet",
                 "--depth-estimator", str(tiny_depth)]) == 0
    plan = Manifest.load(tmp_path / "plan", check_files=False)
    assert plan.component("depth_estimator").inputs[0].shape == ("B", 3, 32, 32)


def test_bench_shows_the_depth_step(artifacts, tiny_depth, tmp_path):
    """sdexport bench on a depth-to-image export: the estimator's latency against transformers' DPT, its
    time in every end-to-end run, parity with StableDiffusionDepth2ImgPipeline, the depth line in the report."""
    import json

    assert main(["bench", str(artifacts("onnx")), "--reference", str(tiny_depth), "--height", str(SIZE), "--width",
                 str(SIZE), "--steps", "2", "--prompt", PROMPT, "--seeds", "1", "--repeats", "2", "--no-cold-start",
                 "--out", str(tmp_path / "b"), "--quiet"]) == 0
    data = json.loads((tmp_path / "b" / "bench.json").read_text())
    depth = data["components"]["depth_estimator"]
    assert depth["runtime"]["median_ms"] > 0 and depth["pytorch"]["median_ms"] > 0 and depth["batch"] == 1
    (run,) = data["runs"]
    assert run["depth_estimator_ms"] > 0
    assert run["image_psnr_db"] is None or run["image_psnr_db"] >= MIN_PSNR
    assert "Depth step (depth estimator, once per image)" in (tmp_path / "b" / "bench.md").read_text()
