"""OpenVINO target and backend: tiny pipelines exported to IR with the CLI, run by the runtime.

- fp32 IR with the f32 precision hint gives diffusers' image for the same seed (``--rng torch``):
  PSNR >= 45 dB on the 8-bit PNG for txt2img (SD1-like and SD2-v-like), img2img, inpainting (9-channel
  model and SD1 with a mask), ControlNet, and a static-shape export;
- fp16 / int8 / int4 / hybrid / int8-static exports record what they did (component precision, sizes, parity against
  torch) and their image PSNR against the fp32 export's image is measured and printed;
- the backend: device and hint handling, the compiled-model cache, reused infer requests;
- calibration data: deterministic, cached, bounded, keyed by the ComponentSpec input names;
- bad input ends in one clear line and a non-zero exit.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runtime.metrics import psnr
from sdexport.cli import main
from tests.reference import diffusers_image, sample_image, sample_mask
from tests.test_cli_errors import assert_one_line_error, run_cli

MIN_PSNR = 45.0
SIZE = 64
STEPS = 8
PROMPT = "a red circle in the top left on a blue background"


# Hybrid quantization calibrates on pipeline runs; the default (16 prompts x 20 steps) is what users
# get, a smaller set keeps this file's run time in budget.
SMALL_CALIBRATION = ("--calibration-prompts", "4", "--calibration-steps", "8")  # 16 U-Net feeds


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """``export(src, *flags)`` -> artifact directory, each (source, flags) exported once per module."""
    done: dict = {}

    def get(src: Path, *flags: str) -> Path:
        key = (str(src), flags)
        if key not in done:
            out = tmp_path_factory.mktemp("openvino") / "out"
            if "hybrid" in flags or "int8-static" in flags:
                flags = (*flags, *SMALL_CALIBRATION)
            assert main(["export", str(src), "--target", "openvino", "--out", str(out), "--quiet", *flags]) == 0
            done[key] = out
        return done[key]

    return get


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    sample_image(SIZE).save(d / "image.png")
    sample_mask(SIZE).save(d / "mask.png")
    sample_image(SIZE, seed=5).save(d / "control.png")
    return d


@pytest.fixture(scope="module")
def tiny_controlnet(tmp_path_factory, tiny_sd1) -> Path:
    """A ControlNet of the tiny U-Net's layout with its zero convolutions randomised (so it acts)."""
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    torch.manual_seed(11)
    cn = ControlNetModel.from_unet(UNet2DConditionModel.from_pretrained(str(tiny_sd1), subfolder="unet"))
    with torch.no_grad():
        for block in list(cn.controlnet_down_blocks) + [cn.controlnet_mid_block]:
            torch.nn.init.normal_(block.weight, std=0.05)
            torch.nn.init.normal_(block.bias, std=0.05)
    path = tmp_path_factory.mktemp("controlnet") / "edges"
    cn.eval().save_pretrained(str(path))
    return path


def _generate(tmp_path: Path, artifact: Path, *extra: str) -> Image.Image:
    out = tmp_path / "out.png"
    args = ["generate", str(artifact), "--seed", "3", "--rng", "torch", "--steps", str(STEPS), "--height", str(SIZE),
            "--width", str(SIZE), "--output", str(out), "--quiet", "--overwrite", *extra]
    assert main(args) == 0
    return Image.open(out).convert("RGB")


def _psnr(a: Image.Image, b: Image.Image) -> float:
    return psnr(np.asarray(a, np.float64), np.asarray(b, np.float64), peak=255.0)


def _check(ours: Image.Image, theirs: Image.Image) -> float:
    value = _psnr(theirs, ours)
    assert value >= MIN_PSNR, f"PSNR {value:.1f} dB < {MIN_PSNR} dB"
    return value


def _manifest(artifact: Path) -> dict:
    return json.loads((artifact / "sdexport.json").read_text())


# --- fp32 parity with diffusers ------------------------------------------------------------------


@pytest.mark.parametrize("model, scheduler, negative", [
    ("sd1", "euler-a", None), ("sd1", "dpmpp-2m", "blurry, low quality"),
    ("sd2-v", "ddim", None), ("sd2-v", "unipc", "blurry, low quality"),
])
def test_txt2img_equals_diffusers(export, tmp_path, tiny_sd1, tiny_sd2v, model, scheduler, negative):
    src = {"sd1": tiny_sd1, "sd2-v": tiny_sd2v}[model]
    extra = ["--prompt", PROMPT, "--scheduler", scheduler] + (["--negative-prompt", negative] if negative else [])
    ours = _generate(tmp_path, export(src), *extra)
    theirs = diffusers_image(src, "txt2img", scheduler, 3, prompt=PROMPT, negative_prompt=negative,
                             num_inference_steps=STEPS, height=SIZE, width=SIZE)
    _check(ours, theirs)


@pytest.mark.parametrize("model, scheduler", [("sd1", "ddim"), ("sd2-v", "dpmpp-2m")])
def test_img2img_equals_diffusers(export, inputs, tmp_path, tiny_sd1, tiny_sd2v, model, scheduler):
    src = {"sd1": tiny_sd1, "sd2-v": tiny_sd2v}[model]
    prompt = "a watercolor of shapes"
    ours = _generate(tmp_path, export(src), "--prompt", prompt, "--scheduler", scheduler,
                     "--image", str(inputs / "image.png"), "--strength", "0.6", "--negative-prompt", "dark")
    theirs = diffusers_image(src, "img2img", scheduler, 3, prompt=prompt, negative_prompt="dark",
                             image=Image.open(inputs / "image.png"), strength=0.6, num_inference_steps=STEPS)
    _check(ours, theirs)


@pytest.mark.parametrize("model, strength, scheduler", [
    ("inpaint", "1.0", "ddim"), ("inpaint", "0.75", "dpmpp-2m"), ("sd1", "0.7", "euler-a"),
])
def test_inpaint_equals_diffusers(export, inputs, tmp_path, tiny_sd1, tiny_inpaint, model, strength, scheduler):
    src = {"sd1": tiny_sd1, "inpaint": tiny_inpaint}[model]
    prompt = "a yellow star"
    ours = _generate(tmp_path, export(src), "--prompt", prompt, "--scheduler", scheduler, "--image",
                     str(inputs / "image.png"), "--mask", str(inputs / "mask.png"), "--strength", strength)
    theirs = diffusers_image(src, "inpaint", scheduler, 3, prompt=prompt, image=Image.open(inputs / "image.png"),
                             mask_image=Image.open(inputs / "mask.png"), strength=float(strength),
                             num_inference_steps=STEPS, height=SIZE, width=SIZE)
    _check(ours, theirs)


@pytest.mark.slow
def test_controlnet_export_and_parity(export, inputs, tmp_path, tiny_sd1, tiny_controlnet):
    from diffusers import ControlNetModel

    artifact = export(tiny_sd1, "--controlnet", f"edges={tiny_controlnet}")
    manifest = _manifest(artifact)
    for name in ("unet_control", "controlnet/edges"):
        component = manifest["components"][name]
        assert component["backend"] == "openvino" and component["precision"] == "fp32"
        assert component["parity"]["psnr_db"] is None or component["parity"]["psnr_db"] >= 60.0, component["parity"]
    control = str(inputs / "control.png")
    ours = _generate(tmp_path, artifact, "--prompt", PROMPT, "--scheduler", "ddim", "--control", f"edges={control}")
    net = ControlNetModel.from_pretrained(str(tiny_controlnet)).eval()
    theirs = diffusers_image(tiny_sd1, "control", "ddim", 3, controlnets=[net], prompt=PROMPT,
                             image=Image.open(control), num_inference_steps=STEPS, height=SIZE, width=SIZE)
    uncontrolled = _generate(tmp_path, artifact, "--prompt", PROMPT, "--scheduler", "ddim")
    assert _psnr(uncontrolled, theirs) < MIN_PSNR  # the ControlNet changes the image, so parity means something
    _check(ours, theirs)


@pytest.mark.slow
def test_static_export(export, tmp_path, tiny_sd1):
    import openvino as ov

    artifact = export(tiny_sd1, "--height", str(SIZE), "--width", str(SIZE), "--batch", "1")
    unet = ov.Core().read_model(str(artifact / "unet" / "model.xml"))
    assert [str(p.get_partial_shape()) for p in unet.inputs][:1] == ["[2,4,8,8]"]
    dynamic = ov.Core().read_model(str(export(tiny_sd1) / "unet" / "model.xml"))
    assert str(dynamic.inputs[0].get_partial_shape()) == "[?,4,?,?]"
    ours = _generate(tmp_path, artifact, "--prompt", PROMPT, "--scheduler", "euler")
    theirs = diffusers_image(tiny_sd1, "txt2img", "euler", 3, prompt=PROMPT, num_inference_steps=STEPS,
                             height=SIZE, width=SIZE)
    _check(ours, theirs)


# --- reduced precisions ----------------------------------------------------------------------------

# component precision each --precision gives (the text encoder and the VAE stay int8 under int4/hybrid)
EXPECTED = {
    "fp16": dict.fromkeys(("text_encoder", "unet", "vae_encoder", "vae_decoder"), "fp16"),
    "int8": dict.fromkeys(("text_encoder", "unet", "vae_encoder", "vae_decoder"), "int8"),
    "int4": {"text_encoder": "int8", "unet": "int4", "vae_encoder": "int8", "vae_decoder": "int8"},
    "hybrid": {"text_encoder": "int8", "unet": "hybrid", "vae_encoder": "int8", "vae_decoder": "int8"},
    "int8-static": {"text_encoder": "int8", "unet": "int8-static", "vae_encoder": "int8", "vae_decoder": "int8"},
}


@pytest.mark.parametrize("precision", list(EXPECTED))
@pytest.mark.slow
def test_reduced_precision(export, tmp_path, tiny_sd1, precision):
    fp32, reduced = export(tiny_sd1), export(tiny_sd1, "--precision", precision)
    full, small = _manifest(fp32)["components"], _manifest(reduced)["components"]
    report = []
    for name, expected in EXPECTED[precision].items():
        c = small[name]
        assert c["precision"] == expected, (name, c["precision"])
        size = sum(f["bytes"] for f in c["files"])
        assert size < sum(f["bytes"] for f in full[name]["files"]), name
        assert c["parity"]["reference"] == "torch fp32" and c["parity"]["psnr_db"] >= 30.0, (name, c["parity"])
        assert c["details"]["file_bytes"]["model.bin"] == next(f["bytes"] for f in c["files"] if f["path"].endswith(".bin"))
        assert c["details"]["weights"]["format"]
        report.append(f"{name} {expected} {size / 1e6:.2f} MB {c['parity']['psnr_db']:.1f} dB")
    if precision == "int8-static":
        # int8 activations in front of the weighted MatMuls as well, unlike hybrid
        quantizers = small["unet"]["details"]["activation_quantizers"]
        assert quantizers.get("Convolution", 0) > 0 and quantizers.get("MatMul", 0) > 0, quantizers
        assert small["unet"]["details"]["calibration"]["samples"] == 16
    if precision == "hybrid":
        calibration = small["unet"]["details"]["calibration"]
        assert calibration["samples"] == 16 and calibration["prompts"] == 4 and calibration["steps"] == 8
        assert calibration["seed"] == 0 and calibration["bytes"] > 0
        # int8 activations in front of the convolutions, float activations in front of the weighted MatMuls
        assert small["unet"]["details"]["activation_quantizers"].get("Convolution", 0) > 0
        formats = small["unet"]["details"]["weight_formats"]
        assert set(formats["Convolution"]) == {"i8"} and set(formats["MatMul"]) == {"u8"}  # quantized vs weight-only
    if precision == "int4":
        assert "u4" in small["unet"]["details"]["weight_formats"]["MatMul"]
        assert small["text_encoder"]["details"]["weights"]["requested"] == "int4"
    args = ["--prompt", PROMPT, "--scheduler", "dpmpp-2m"]
    reference = _generate(tmp_path, fp32, *args)
    image = _generate(tmp_path, reduced, *args)
    value = _psnr(reference, image)
    print(f"\n{precision}: image PSNR vs fp32 IR {value:.1f} dB; components: " + "; ".join(report))
    assert value >= 25.0, f"{precision}: image PSNR {value:.1f} dB vs fp32"  # sanity: the same picture, not noise


# --- the backend ---------------------------------------------------------------------------------


def _unet_feeds(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"sample": rng.standard_normal((2, 4, 8, 8), np.float32), "timestep": np.full((2,), 500.0, np.float32),
            "encoder_hidden_states": rng.standard_normal((2, 77, 32), np.float32)}


def _session(artifact: Path, name: str = "unet", **options):
    from runtime.backends import open_session
    from runtime.manifest import Manifest

    manifest = Manifest.load(artifact, check_files=False)  # the backend's own checks are under test
    return open_session(manifest.component(name), artifact, options)


def test_session_reuses_its_request_and_returns_copies(export, tiny_sd1):
    session = _session(export(tiny_sd1))
    request = session._request
    first = session.run(_unet_feeds(0))["out_sample"]
    kept = first.copy()
    second = session.run(_unet_feeds(1))["out_sample"]
    assert session._request is request
    assert np.array_equal(first, kept) and not np.array_equal(first, second)
    assert first.dtype == np.float32 and first.shape == (2, 4, 8, 8)


def test_device_and_precision_hint(export, tiny_sd1):
    artifact = export(tiny_sd1)
    feeds = _unet_feeds()
    cpu = _session(artifact, cache_dir="").run(feeds)["out_sample"]
    auto = _session(artifact, device="auto", cache_dir="").run(feeds)["out_sample"]
    bf16 = _session(artifact, precision_hint="bf16", cache_dir="").run(feeds)["out_sample"]
    assert np.array_equal(cpu, auto)  # AUTO passes the f32 hint on to the device it picks
    assert _session(artifact, cache_dir="").config["INFERENCE_PRECISION_HINT"] == "f32"  # parity first
    import openvino as ov

    if "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        assert not np.array_equal(cpu, bf16)  # the hint reaches the plugin
    np.testing.assert_allclose(bf16, cpu, atol=0.1)


def test_model_cache(export, tiny_sd1, tmp_path):
    artifact = export(tiny_sd1)
    feeds = _unet_feeds()
    cache = tmp_path / "cache"
    f32 = _session(artifact, cache_dir=str(cache)).run(feeds)["out_sample"]
    blobs = list(cache.rglob("*.blob"))
    assert blobs, "the compiled model was not cached"
    again = _session(artifact, cache_dir=str(cache)).run(feeds)["out_sample"]
    assert np.array_equal(f32, again) and sorted(cache.rglob("*.blob")) == sorted(blobs)
    # bf16 after f32 in the same cache must not reuse the f32 blob (OpenVINO names blobs by model only)
    bf16_cached = _session(artifact, cache_dir=str(cache), precision_hint="bf16").run(feeds)["out_sample"]
    bf16_fresh = _session(artifact, cache_dir="", precision_hint="bf16").run(feeds)["out_sample"]
    assert np.array_equal(bf16_cached, bf16_fresh)
    assert "CACHE_DIR" not in _session(artifact, cache_dir="").config  # "" disables the cache


# --- bad input -----------------------------------------------------------------------------------


def test_missing_bin(capsys, export, tiny_sd1, tmp_path):
    from runtime.backends import BackendError

    copy = tmp_path / "copy"
    shutil.copytree(export(tiny_sd1), copy)
    (copy / "unet" / "model.bin").unlink()
    code, err = run_cli(capsys, "generate", copy, "--prompt", "x", "--steps", "1", "--output", tmp_path / "o.png")
    assert_one_line_error(code, err, "unet/model.bin", "missing")
    assert not (tmp_path / "o.png").exists()
    with pytest.raises(BackendError, match=r"unet/model\.bin: missing file"):
        _session(copy)


def test_unreadable_ir(capsys, export, tiny_sd1, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(export(tiny_sd1), copy)
    xml = copy / "vae_decoder" / "model.xml"
    xml.write_bytes(b"\0" * xml.stat().st_size)  # same size, and the manifest's hash made to match:
    manifest = json.loads((copy / "sdexport.json").read_text())  # only the reader notices
    for ref in manifest["components"]["vae_decoder"]["files"]:
        if ref["path"].endswith(".xml"):
            ref["sha256"] = hashlib.sha256(xml.read_bytes()).hexdigest()
    (copy / "sdexport.json").write_text(json.dumps(manifest))
    code, err = run_cli(capsys, "generate", copy, "--prompt", "x", "--steps", "1", "--output", tmp_path / "o.png")
    assert_one_line_error(code, err, "vae_decoder/model.xml", "OpenVINO cannot read this model")


def test_names_the_model_lacks(export, tiny_sd1, tmp_path):
    from runtime.backends import BackendError

    copy = tmp_path / "copy"
    shutil.copytree(export(tiny_sd1), copy)
    manifest = json.loads((copy / "sdexport.json").read_text())
    manifest["components"]["unet"]["inputs"][0]["name"] = "latents"
    (copy / "sdexport.json").write_text(json.dumps(manifest))
    # no Winograd plan here: the session compiles from the path and checks the compiled model's names
    # (tests/test_openvino_winograd.py checks the read-and-rewrite path)
    with pytest.raises(BackendError, match=r"unet/model\.xml: the model lacks latents that the manifest lists"):
        _session(copy, cache_dir="")


def test_device_the_machine_lacks(capsys, export, tiny_sd1, tmp_path):
    import openvino as ov

    if "NPU" in ov.Core().available_devices:
        pytest.skip("this machine has an NPU")
    code, err = run_cli(capsys, "generate", export(tiny_sd1), "--prompt", "x", "--steps", "1", "--device", "npu",
                        "--output", tmp_path / "o.png")
    assert_one_line_error(code, err, "OpenVINO device 'npu' is not available", "available: CPU")
    assert not (tmp_path / "o.png").exists()


def test_unsupported_precision(capsys, tiny_sd1, tmp_path):
    code, err = run_cli(capsys, "export", tiny_sd1, "--target", "openvino", "--precision", "int2", "--out", tmp_path / "o")
    assert_one_line_error(code, err, "int2", "fp32, fp16, int8, int4, hybrid, int8-static")
    assert not (tmp_path / "o").exists()


# --- calibration data ----------------------------------------------------------------------------


def test_prompt_set():
    from sdexport.quantize.calibration import load_prompts

    prompts = load_prompts()
    assert len(prompts) >= 64 and len(set(prompts)) == len(prompts)


def test_calibration_is_deterministic_cached_and_named(tiny_sd1, tmp_path):
    from sdexport.quantize.calibration import CalibrationSettings, collect
    from sdexport.export.components import Shape, model_info, unet_spec
    from sdexport.sources.diffusers import DiffusersSource

    settings = CalibrationSettings(samples=6, per_prompt=2, steps=6, scheduler="euler")
    names = ("text_encoder", "unet", "unet_control", "vae_encoder", "vae_decoder")
    first = collect(tiny_sd1, names, height=SIZE, width=SIZE, settings=settings, cache_dir=tmp_path)
    again = collect(tiny_sd1, names, height=SIZE, width=SIZE, settings=settings, cache_dir=tmp_path)
    fresh = collect(tiny_sd1, names, height=SIZE, width=SIZE, settings=settings, cache_dir="")
    assert not first.info["cached"] and again.info["cached"] and not fresh.info["cached"]
    assert first.info["counts"]["unet"] == 6 and first.info["counts"]["vae_decoder"] == 3
    for other in (again, fresh):
        for name in names:
            for a, b in zip(first.feeds[name], other.feeds[name]):
                assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    source = DiffusersSource.open(tiny_sd1)
    info = model_info(source)
    spec = unet_spec(source, info, control=True)
    feed = first.feeds["unet_control"][0]
    assert list(feed) == [t.name for t in spec.inputs]
    sizes = spec.sizes(Shape(1, SIZE, SIZE))
    for t in spec.inputs:
        assert feed[t.name].shape == tuple(d if isinstance(d, int) else sizes[d] for d in t.shape), t.name
    timesteps = {float(f["timestep"][0]) for f in first.feeds["unet"]}
    assert len(timesteps) >= 5  # spread over the trajectory, not one step
    assert first.feeds["vae_encoder"][0]["sample"].min() >= -1.0
    assert len(list(tmp_path.glob("*.npz"))) == 1


def test_calibration_size_bound_and_rebatch(tiny_sd1):
    from sdexport.quantize.calibration import CalibrationSettings, collect, rebatch
    from sdexport.errors import ExportError

    one = 2 * 4 * 8 * 8 * 4 + 2 * 4 + 2 * 77 * 32 * 4  # bytes of one U-Net feed at 64x64
    settings = CalibrationSettings(samples=8, per_prompt=4, steps=4, max_bytes=3 * one)
    data = collect(tiny_sd1, ["unet"], height=SIZE, width=SIZE, settings=settings, cache_dir="")
    assert data.nbytes <= 3 * one and data.info["counts"]["unet"] == 2 and data.info["dropped_for_size"] == 6
    with pytest.raises(ExportError, match="max_bytes"):
        collect(tiny_sd1, ["unet"], height=SIZE, width=SIZE, cache_dir="",
                settings=CalibrationSettings(samples=2, per_prompt=2, steps=2, max_bytes=one // 2))
    batched = rebatch(data.feeds["unet"], 4)  # two CFG pairs -> one static batch of 4
    assert len(batched) == 1 and batched[0]["sample"].shape == (4, 4, 8, 8) and batched[0]["timestep"].shape == (4,)
    assert len(rebatch(data.feeds["unet"], 1)) == 4  # sequential CFG: one row per call
