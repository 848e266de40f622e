"""The device-resident denoising loop (runtime.device_loop) against the numpy loop.

On ONNX Runtime's CPU provider the device loop runs the same code as on CUDA: OrtValues bound to the
U-Net, the step's arithmetic in two small ONNX graphs. Its final latents must equal the numpy loop's
(``Pipeline.generate``) on the tiny export to float32 rounding (relative 1e-5 of the latents' range),
and no latent may cross to the host between steps. The CUDA-graph variant runs where onnxruntime has
the CUDA provider and is skipped, with the reason, elsewhere.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest

from runtime.device_loop import (
    DeviceLoop,
    DeviceLoopUnsupported,
    PlanError,
    combine_graph,
    linear_plan,
    nonlinear_reason,
    prepare_graph,
)
from runtime.rng import make_rng
from runtime.schedulers import SCHEDULER_NAMES, scheduler_from_config

ort = pytest.importorskip("onnxruntime")

F32 = np.float32
REL = 1e-5  # of the reference latents' largest magnitude
HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()
NO_CUDA = "onnxruntime here has no CUDAExecutionProvider (install onnxruntime-gpu on a machine with an NVIDIA GPU)"

# SD 1.5's scheduler_config.json values (its PNDM config; other schedulers take its betas).
SD_CONFIG = {
    "_class_name": "PNDMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "steps_offset": 1, "skip_prk_steps": True, "set_alpha_to_one": False,
    "clip_sample": False, "prediction_type": "epsilon",
}

_EXPORTS: dict = {}


def tiny_onnx_export(tmp_path_factory, source) -> Path:
    """The tiny SD1 pipeline exported to ONNX fp32 (no validation), once per test session."""
    from sdexport.cli import main

    key = str(source)
    if key not in _EXPORTS:
        out = tmp_path_factory.mktemp("onnx-tiny-shared") / "out"
        assert main(["export", str(source), "--target", "onnx", "--out", str(out), "--quiet", "--no-validate"]) == 0
        _EXPORTS[key] = out
    return _EXPORTS[key]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tiny_sd1):
    return tiny_onnx_export(tmp_path_factory, tiny_sd1)


@pytest.fixture(scope="module")
def pipe(artifact):
    from runtime import Pipeline

    p = Pipeline.from_dir(artifact, options={"device": "cpu"})
    # the tiny model's PNDM config has no clip_sample; diffusers' DDIM default (True) is not linear
    p.scheduler_config = {**p.scheduler_config, "clip_sample": False}
    return p


@pytest.fixture(scope="module")
def loop(artifact, pipe):
    return DeviceLoop.open(pipe.manifest.component("unet"), pipe.root, {"device": "cpu"})


# --- linear plans (numpy only) -------------------------------------------------------------------


def _reference_run(sched, timesteps, x, outputs, seed=5):
    rng = make_rng(seed, "numpy")
    draws = []

    class Recorder:
        def randn(self, shape):
            draws.append(rng.randn(shape))
            return draws[-1]

    rec = Recorder()
    for i, t in enumerate(timesteps):
        sched.scale_model_input(x, t)
        x = np.asarray(sched.step(outputs[i], t, x, rng=rec), F32)
    return x, draws


LINEAR = list(SCHEDULER_NAMES)


@pytest.mark.parametrize("steps", [1, 4, 13])
@pytest.mark.parametrize("name", LINEAR)
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_plan_reproduces_every_scheduler(name, steps, prediction):
    """The plan read off the numpy scheduler gives the scheduler's own result on random data."""
    config = {**SD_CONFIG, "prediction_type": prediction}
    sched = scheduler_from_config(config, name)
    if name == "lcm" and steps > 1:
        steps = min(steps, 4)
    sched.set_timesteps(steps)
    plan = linear_plan(sched, sched.timesteps)
    assert len(plan.steps) == len(sched.timesteps)
    gen = np.random.default_rng(0)
    x0 = gen.standard_normal((1, 4, 5, 3)).astype(F32) * F32(sched.init_noise_sigma)
    outputs = [gen.standard_normal(x0.shape).astype(F32) for _ in sched.timesteps]
    expected, draws = _reference_run(copy.deepcopy(sched), sched.timesteps, x0, outputs)
    noise = iter(draws)
    noise_at = {i: next(noise) for i, s in enumerate(plan.steps) if s.noise}
    assert len(noise_at) == len(draws) == plan.noise_draws
    got = plan.emulate(x0, lambda i, _: outputs[i], lambda i: noise_at[i])
    scale = float(np.max(np.abs(expected)))
    assert np.max(np.abs(got.astype(np.float64) - expected)) <= REL * max(scale, 1.0)


@pytest.mark.parametrize("name", ["dpmpp-2m", "unipc", "euler", "heun"])
def test_plan_starts_mid_schedule_like_img2img(name):
    sched = scheduler_from_config(SD_CONFIG, name)
    sched.set_timesteps(10)
    start = 4 * sched.order
    timesteps = sched.timesteps[start:]
    sched.set_begin_index(start)
    plan = linear_plan(sched, timesteps)
    gen = np.random.default_rng(1)
    x0 = gen.standard_normal((1, 4, 2, 2)).astype(F32)
    outputs = [gen.standard_normal(x0.shape).astype(F32) for _ in timesteps]
    expected, _ = _reference_run(copy.deepcopy(sched), timesteps, x0, outputs)
    got = plan.emulate(x0, lambda i, _: outputs[i], lambda i: None)
    np.testing.assert_allclose(got, expected, rtol=0, atol=REL * max(1.0, float(np.abs(expected).max())))


def test_plan_scales_model_input_like_the_scheduler():
    sched = scheduler_from_config(SD_CONFIG, "euler")
    sched.set_timesteps(5)
    plan = linear_plan(sched, sched.timesteps)
    x = np.random.default_rng(2).standard_normal((1, 4, 2, 2)).astype(F32)
    real = copy.deepcopy(sched)
    for step, t in zip(plan.steps, sched.timesteps):
        np.testing.assert_array_equal(x / F32(step.divisor), real.scale_model_input(x, t))
        real.step(np.zeros_like(x), t, x)


def test_plan_keeps_only_the_state_later_steps_read():
    sched = scheduler_from_config(SD_CONFIG, "lcm")
    sched.set_timesteps(4)
    assert linear_plan(sched, sched.timesteps).slots == 1  # LCM's stored x0 estimate is never read back
    sched = scheduler_from_config(SD_CONFIG, "dpmpp-2m")
    sched.set_timesteps(10)
    assert linear_plan(sched, sched.timesteps).slots == 2  # the sample and the previous x0 prediction


@pytest.mark.parametrize("changes, needle", [
    ({}, "clip_sample"),  # diffusers' DDIM default
    ({"clip_sample": False, "thresholding": True}, "thresholding"),
])
def test_nonlinear_steps_are_refused_with_the_reason(changes, needle):
    config = {k: v for k, v in SD_CONFIG.items() if k != "clip_sample"} | changes
    sched = scheduler_from_config(config, "ddim")
    sched.set_timesteps(4)
    assert needle in nonlinear_reason(sched)
    with pytest.raises(PlanError, match=needle):
        linear_plan(sched, sched.timesteps)


def test_plan_leaves_the_scheduler_untouched():
    sched = scheduler_from_config(SD_CONFIG, "unipc")
    sched.set_timesteps(6)
    before = copy.deepcopy(vars(sched))
    linear_plan(sched, sched.timesteps)
    assert sched.step_index is None and set(vars(sched)) == set(before)


# --- the device graphs -----------------------------------------------------------------------------


def _session(model: bytes):
    return ort.InferenceSession(model, providers=["CPUExecutionProvider"])


def test_graphs_are_valid_onnx():
    onnx = pytest.importorskip("onnx")
    for model in (prepare_graph(1, (4, 8, 8), 2, np.float16, F32, extra_channels=5),
                  combine_graph(2, (4, 8, 8), "batched", np.float16, 3),
                  combine_graph(1, (4, 8, 8), "sequential", F32, 1),
                  combine_graph(1, (4, 8, 8), "off", F32, 2)):
        proto = onnx.load_from_string(model)
        onnx.checker.check_model(proto, full_check=True)


def test_prepare_graph_scales_duplicates_and_appends_channels():
    gen = np.random.default_rng(3)
    x = gen.standard_normal((1, 4, 3, 5)).astype(F32)
    extra = gen.standard_normal((2, 5, 3, 5)).astype(F32)
    timesteps, divisors = np.array([999, 500, 1], F32), np.array([14.6, 3.0, 1.0], F32)
    sample, t = _session(prepare_graph(1, (4, 3, 5), 2, np.float16, F32, extra_channels=5)).run(
        None, {"x": x, "step": np.array([1], np.int64), "timesteps": timesteps, "divisors": divisors, "extra": extra})
    expected = np.concatenate([np.concatenate([x, x]) / divisors[1], extra], axis=1)
    assert sample.dtype == np.float16 and t.tolist() == [500.0, 500.0]
    np.testing.assert_array_equal(sample, expected.astype(np.float16))


@pytest.mark.parametrize("cfg", ["batched", "sequential", "off"])
def test_combine_graph_guides_then_combines(cfg):
    gen = np.random.default_rng(4)
    b, shape, r = 2, (4, 3, 3), 3
    out = gen.standard_normal((2 * b if cfg == "batched" else b, *shape)).astype(F32)
    out2 = gen.standard_normal((b, *shape)).astype(F32)
    noise, s = gen.standard_normal((b, *shape)).astype(F32), [gen.standard_normal((b, *shape)).astype(F32) for _ in range(r)]
    coeffs = gen.standard_normal((2, r, 2 + r)).astype(F32)
    feeds = {"noise": noise, "guidance": np.array([7.5], F32), "step": np.array([1], np.int64), "coeffs": coeffs,
             **{f"s{j}": v for j, v in enumerate(s)}}
    if cfg == "batched":
        feeds["unet_out"] = out
        u, t = out[:b], out[b:]
    elif cfg == "sequential":
        feeds["unet_out_uncond"], feeds["unet_out_text"] = out, out2
        u, t = out, out2
    else:
        feeds["unet_out"] = out
    got = _session(combine_graph(b, shape, cfg, F32, r)).run(None, feeds)
    m = out if cfg == "off" else u + F32(7.5) * (t - u)
    operands = [m, noise, *s]
    for j in range(r):
        expected = sum(np.float64(coeffs[1, j, k]) * operands[k] for k in range(2 + r))
        np.testing.assert_allclose(got[j], expected, rtol=1e-5, atol=1e-5)


# --- the loop on the tiny export, against Pipeline.generate ----------------------------------------

PROMPT, NEGATIVE, SEED, STEPS = "a red circle in the top left", "blurry", 3, 8


def _device_txt2img(pipe, loop, scheduler, guidance=7.5, cfg="batched", steps=STEPS):
    """What Pipeline.generate does before its loop (txt2img), then the device loop."""
    sched = pipe.make_scheduler(scheduler)
    sched.set_timesteps(steps)
    embeddings = pipe.encode_prompts([PROMPT])
    if guidance > 1:
        embeddings = np.concatenate([pipe.encode_prompts([NEGATIVE]), embeddings])
    rng = make_rng(SEED, "torch")
    latents = rng.randn((1, 4, 8, 8)) * F32(sched.init_noise_sigma)
    return loop.denoise(sched, sched.timesteps, latents.astype(F32), embeddings, guidance_scale=guidance,
                        rng=rng, cfg=cfg if guidance > 1 else "off")


def _numpy_txt2img(pipe, scheduler, guidance=7.5, steps=STEPS):
    return pipe.generate(PROMPT, NEGATIVE, steps=steps, scheduler=scheduler, seed=SEED, rng="torch", height=64,
                         width=64, guidance_scale=guidance, return_latents=True).latents


def _assert_close(got, ref):
    scale = float(np.max(np.abs(ref)))
    diff = float(np.max(np.abs(got.astype(np.float64) - ref)))
    assert diff <= REL * scale, f"max diff {diff:.3g} > {REL} x {scale:.3g}"


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "euler-a", "dpmpp-2m", "unipc"])
def test_device_loop_equals_numpy_loop(pipe, loop, scheduler):
    pipe.cfg = "batched"
    _assert_close(_device_txt2img(pipe, loop, scheduler), _numpy_txt2img(pipe, scheduler))


@pytest.mark.parametrize("cfg, guidance", [("sequential", 7.5), ("off", 1.0)])
def test_device_loop_cfg_modes(pipe, loop, cfg, guidance):
    pipe.cfg = cfg if cfg != "off" else "batched"
    try:
        _assert_close(_device_txt2img(pipe, loop, "dpmpp-2m", guidance, cfg), _numpy_txt2img(pipe, "dpmpp-2m", guidance))
    finally:
        pipe.cfg = "batched"


def test_device_loop_img2img_starts_mid_schedule(pipe, loop):
    from runtime import image as imgproc
    from tests.reference import sample_image

    pipe.cfg = "batched"
    image, strength = sample_image(64), 0.6
    ref = pipe.generate(PROMPT, NEGATIVE, steps=STEPS, scheduler="dpmpp-2m", seed=SEED, rng="torch", image=image,
                        strength=strength, return_latents=True).latents
    sched = pipe.make_scheduler("dpmpp-2m")
    sched.set_timesteps(STEPS)
    start = STEPS - int(STEPS * strength)
    timesteps = np.asarray(sched.timesteps)[start:]
    sched.set_begin_index(start)
    rng = make_rng(SEED, "torch")
    embeddings = np.concatenate([pipe.encode_prompts([NEGATIVE]), pipe.encode_prompts([PROMPT])])
    image_latents = pipe._encode_image(imgproc.to_model_input(image, 64, 64), rng)
    latents = sched.add_noise(image_latents, rng.randn(image_latents.shape), timesteps[:1])
    got = loop.denoise(sched, timesteps, latents.astype(F32), embeddings, guidance_scale=7.5, rng=rng)
    _assert_close(got, ref)


class _Spy:
    """Counts host transfers made through ONNX Runtime's own Python API while it is installed."""

    def __init__(self, monkeypatch):
        self.calls: dict[str, list] = {"OrtValue.numpy": [], "copy_outputs_to_cpu": [], "bind_cpu_input": [],
                                       "InferenceSession.run": [], "update_inplace": []}
        for owner, name, key in ((ort.OrtValue, "numpy", "OrtValue.numpy"),
                                 (ort.IOBinding, "copy_outputs_to_cpu", "copy_outputs_to_cpu"),
                                 (ort.IOBinding, "bind_cpu_input", "bind_cpu_input"),
                                 (ort.InferenceSession, "run", "InferenceSession.run"),
                                 (ort.OrtValue, "update_inplace", "update_inplace")):
            original = getattr(owner, name)

            def wrapper(self_, *args, _original=original, _key=key, **kwargs):
                size = int(np.asarray(args[0]).size) if _key == "update_inplace" else None
                self.calls[_key].append(size)
                return _original(self_, *args, **kwargs)

            monkeypatch.setattr(owner, name, wrapper)


@pytest.mark.parametrize("scheduler", ["euler-a", "dpmpp-2m"])
def test_no_latent_round_trip_per_step(pipe, loop, monkeypatch, scheduler):
    sched = pipe.make_scheduler(scheduler)
    sched.set_timesteps(STEPS)
    embeddings = np.concatenate([pipe.encode_prompts([NEGATIVE]), pipe.encode_prompts([PROMPT])])
    rng = make_rng(SEED, "torch")
    latents = (rng.randn((1, 4, 8, 8)) * F32(sched.init_noise_sigma)).astype(F32)
    plan = linear_plan(sched, sched.timesteps)
    loop.transfers.clear()
    spy = _Spy(monkeypatch)
    loop.denoise(sched, sched.timesteps, latents, embeddings, guidance_scale=7.5, rng=rng, plan=plan)
    log = loop.transfers
    # one download, at the end; per step only the step index and (euler-a) the host-drawn noise go up
    assert dict(log.downloads) == {"latents": 1}
    assert log.uploads["step"] == STEPS + 1  # + the initial zero
    assert log.uploads["noise"] == plan.noise_draws == (STEPS if scheduler == "euler-a" else 0)
    assert log.uploads["latents"] == 1 and log.uploads["embeddings"] == 1
    setup = {"latents", "state init", "noise init", "plan", "embeddings", "step", "noise"}
    assert set(log.uploads) <= setup
    assert log.upload_bytes["step"] == 8 * (STEPS + 1)
    # ... and ONNX Runtime saw the same: one read back, no host-bound inputs, no Session.run
    assert len(spy.calls["OrtValue.numpy"]) == 1
    assert spy.calls["copy_outputs_to_cpu"] == spy.calls["bind_cpu_input"] == spy.calls["InferenceSession.run"] == []
    latent_size = latents.size
    per_step = [s for s in spy.calls["update_inplace"] if s == latent_size]
    # latent-sized writes: the initial latents, the zeroed state/noise buffers, and euler-a's noise
    assert len(per_step) == 1 + (2 * plan.slots - 1) + 1 + plan.noise_draws


def test_callback_sees_every_step(pipe, loop):
    sched = pipe.make_scheduler("euler")
    sched.set_timesteps(4)
    embeddings = np.concatenate([pipe.encode_prompts([NEGATIVE]), pipe.encode_prompts([PROMPT])])
    seen = []
    rng = make_rng(1, "numpy")
    loop.transfers.clear()
    out = loop.denoise(sched, sched.timesteps, rng.randn((1, 4, 8, 8)) * F32(sched.init_noise_sigma), embeddings,
                       guidance_scale=5.0, rng=rng, callback=lambda i, t, x: seen.append((i, t, x.copy())))
    assert [s[0] for s in seen] == [0, 1, 2, 3]
    np.testing.assert_array_equal(seen[-1][2], out)
    assert loop.transfers.downloads["latents (callback)"] == 4


def test_unsupported_provider_says_so(artifact):
    with pytest.raises(DeviceLoopUnsupported, match="DmlExecutionProvider"):
        DeviceLoop(artifact / "unet" / "model.onnx", ["DmlExecutionProvider", "CPUExecutionProvider"])


def test_open_requires_onnxruntime_component(pipe):
    import dataclasses

    component = dataclasses.replace(pipe.manifest.component("unet"), backend="tensorrt")
    with pytest.raises(DeviceLoopUnsupported, match="tensorrt"):
        DeviceLoop.open(component, pipe.root, {"device": "cpu"})


@pytest.mark.skipif(not hasattr(__import__("runtime.pipeline").pipeline.Pipeline, "device_loop"),
                    reason="Pipeline does not delegate to the device loop yet (the proposed runtime/pipeline.py change)")
@pytest.mark.parametrize("scheduler, extra", [("dpmpp-2m", {}), ("euler-a", {"guidance_scale": 1.0})])
def test_pipeline_delegates_to_the_device_loop(artifact, scheduler, extra):
    from runtime import Pipeline

    numpy_pipe = Pipeline.from_dir(artifact, options={"device": "cpu", "device_loop": "off"})
    device_pipe = Pipeline.from_dir(artifact, options={"device": "cpu", "device_loop": "on"})
    kwargs = dict(steps=STEPS, scheduler=scheduler, seed=SEED, rng="torch", height=64, width=64, return_latents=True, **extra)
    ref = numpy_pipe.generate(PROMPT, NEGATIVE, **kwargs)
    got = device_pipe.generate(PROMPT, NEGATIVE, **kwargs)
    assert ref.settings["loop"] == "numpy" and got.settings["loop"] == "device"
    assert "CUDA graph off" in got.loop_reason  # the CPU provider has none: said, not silent
    _assert_close(got.latents, ref.latents)
    assert got.calls["unet"] == ref.calls["unet"]


# --- CUDA -------------------------------------------------------------------------------------------


@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA)
@pytest.mark.parametrize("scheduler", ["euler-a", "dpmpp-2m"])
def test_cuda_graph_loop_matches_numpy_loop(pipe, artifact, scheduler):
    cuda = DeviceLoop.open(pipe.manifest.component("unet"), pipe.root, {"device": "cuda"})
    first = _device_txt2img(pipe, cuda, scheduler)
    second = _device_txt2img(pipe, cuda, scheduler)  # replays the captured graph
    ref = _numpy_txt2img(pipe, scheduler)
    scale = float(np.abs(ref).max())
    # cuDNN convolutions differ from the CPU's in the last bits; 20 steps amplify that a little
    assert np.max(np.abs(first - ref)) <= 2e-3 * scale
    np.testing.assert_allclose(second, first, rtol=0, atol=1e-5 * scale)
    assert cuda.cuda_graph_status.startswith("on"), cuda.cuda_graph_status
    assert dict(cuda.transfers.downloads) == {"latents": 2}


# --- fp16 safety (issue 17, item 4) -----------------------------------------------------------------


def _overflowing_fp16_model(path: Path, inputs: dict, output: tuple, upscale: int = 1) -> Path:
    """A graph with an fp16 activation (float32 at its boundary, as --precision fp16 writes it) that
    overflows: first input x 1e6 stored as fp16 is inf where the input is not small. (ONNX Runtime's CPU
    provider computes fp16 Mul in float32, so the overflow is made where the value is stored.)"""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    first = next(iter(inputs))
    k = numpy_helper.from_array(np.array([1e6], np.float32), "k")
    nodes = [helper.make_node("Mul", [first, "k"], ["h"]),
             helper.make_node("Cast", ["h"], ["h16"], to=TensorProto.FLOAT16),
             helper.make_node("Cast", ["h16"], ["y"], to=TensorProto.FLOAT)]
    inits = [k]
    if upscale > 1:  # a "VAE decoder": latents [B, 4, h, w] -> pixels [B, 3, 8h, 8w]
        inits += [numpy_helper.from_array(np.array([1, 1, upscale, upscale], np.float32), "scales"),
                  numpy_helper.from_array(np.array([0], np.int64), "c0"),
                  numpy_helper.from_array(np.array([3], np.int64), "c3"),
                  numpy_helper.from_array(np.array([1], np.int64), "ax")]
        nodes[-1].output[0] = "y0"
        nodes += [helper.make_node("Resize", ["y0", "", "scales"], ["y1"], mode="nearest"),
                  helper.make_node("Slice", ["y1", "c0", "c3", "ax"], ["y"])]
    nodes[-1].output[0] = output[0]
    graph = helper.make_graph(nodes, "overflow", [helper.make_tensor_value_info(n, t, s) for n, (t, s) in inputs.items()],
                              [helper.make_tensor_value_info(output[0], TensorProto.FLOAT, output[1])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


def test_check_finite_names_the_component_and_the_remedy():
    from runtime.numerics import NumericsError, check_finite

    check_finite("unet", np.ones((1, 4, 2, 2), F32), "fp16")
    check_finite("text_encoder", np.array([1, 2], np.int64))
    bad = np.ones((1, 3, 2, 2), F32)
    bad[0, 0, 0, 0], bad[0, 1, 0, 0] = np.nan, np.inf
    with pytest.raises(NumericsError, match=r"^vae_decoder \(fp16\) produced 1 NaN and 1 inf of 12 values; "
                                            r"no image written: re-export vae_decoder with --precision fp32 \(an fp32 VAE"):
        check_finite("vae_decoder", bad, "fp16")
    with pytest.raises(NumericsError, match=r"unet \(fp32\) .* the component is fp32"):
        check_finite("unet", bad, "fp32")


def test_fp16_overflow_stops_the_device_loop(tmp_path):
    from onnx import TensorProto

    from runtime.numerics import NumericsError

    path = _overflowing_fp16_model(tmp_path / "unet.onnx", {
        "sample": (TensorProto.FLOAT, ["N", 4, 8, 8]), "timestep": (TensorProto.FLOAT, ["N"]),
        "encoder_hidden_states": (TensorProto.FLOAT, ["N", 77, 32])}, ("out_sample", ["N", 4, 8, 8]))
    loop = DeviceLoop(path, ["CPUExecutionProvider"], precision="fp16")
    sched = scheduler_from_config(SD_CONFIG, "euler")
    sched.set_timesteps(2)
    gen = np.random.default_rng(0)
    latents = gen.standard_normal((1, 4, 8, 8)).astype(F32) * F32(sched.init_noise_sigma)
    embeddings = gen.standard_normal((2, 77, 32)).astype(F32)
    with pytest.raises(NumericsError, match=r"^unet \(fp16\) produced .*re-export unet with --precision fp32"):
        loop.denoise(sched, sched.timesteps, latents, embeddings, guidance_scale=7.5, rng=make_rng(0, "numpy"))


@pytest.mark.skipif(not hasattr(__import__("runtime.pipeline").pipeline, "check_finite"),
                    reason="runtime/pipeline.py does not call runtime.numerics.check_finite yet")
def test_fp16_vae_overflow_stops_the_pipeline_before_any_image(artifact, tmp_path):
    import dataclasses
    import shutil

    from onnx import TensorProto

    from runtime import Pipeline
    from runtime.manifest import FileRef, Manifest
    from runtime.numerics import NumericsError

    root = tmp_path / "artifact"
    shutil.copytree(artifact, root)
    manifest = Manifest.load(root)
    decoder = manifest.component("vae_decoder")
    shutil.rmtree(root / "vae_decoder")
    (root / "vae_decoder").mkdir()
    path = _overflowing_fp16_model(root / "vae_decoder" / "model.onnx", {"latent_sample": (TensorProto.FLOAT, ["B", 4, "h", "w"])},
                                   ("sample", ["B", 3, "H", "W"]), upscale=8)
    components = {**manifest.components, "vae_decoder": dataclasses.replace(
        decoder, files=(FileRef.of(root, path),), precision="fp16")}
    dataclasses.replace(manifest, components=components).write(root)
    pipe = Pipeline.from_dir(root, options={"device": "cpu"})
    with pytest.raises(NumericsError, match=r"^vae_decoder \(fp16\) produced .*inf.*fp32 VAE"):
        pipe.generate(PROMPT, NEGATIVE, steps=2, seed=SEED, height=64, width=64)


# --- CUDA graphs never fail a generation (issue 17, item 2) ----------------------------------------------


def _graphs():
    return (prepare_graph(1, (4, 8, 8), 2, np.float16, F32, extra_channels=5), prepare_graph(2, (4, 8, 8), 1, F32, np.int64),
            combine_graph(2, (4, 8, 8), "batched", np.float16, 3), combine_graph(1, (4, 8, 8), "sequential", F32, 1),
            combine_graph(1, (4, 8, 8), "off", F32, 2))


def test_step_graphs_use_only_cuda_kernels_and_constant_shapes():
    """Every op has a CUDA kernel, and every shape/axes operand is an initializer: nothing the CUDA
    provider would hand to the CPU (which would put host copies into the step)."""
    from runtime.device_loop import CUDA_KERNEL_OPS

    onnx = pytest.importorskip("onnx")
    shape_operands = {"Reshape": (1,), "Expand": (1,), "ReduceSum": (1,), "Squeeze": (1,), "Unsqueeze": (1,)}
    for model in _graphs():
        graph = onnx.load_from_string(model).graph
        inits = {i.name for i in graph.initializer}
        assert {n.op_type for n in graph.node} <= CUDA_KERNEL_OPS
        for node in graph.node:
            for i in shape_operands.get(node.op_type, ()):
                assert node.input[i] in inits, (node.op_type, node.input[i])
            assert node.op_type != "Shape"


def test_capture_blockers_follow_onnxruntimes_rule():
    from runtime.device_loop import graph_capture_blockers

    cuda, cpu = "CUDAExecutionProvider", "CPUExecutionProvider"
    assert graph_capture_blockers([("conv", "Conv", cuda), ("mul", "Mul", cuda)]) is None
    # a shape subgraph on the CPU with no copy to the device is allowed
    assert graph_capture_blockers([("shape", "Shape", cuda), ("gather", "Gather", cpu), ("reshape", "Reshape", cuda)]) is None
    reason = graph_capture_blockers([("gather", "Gather", cpu), ("Memcpy_token_1", "MemcpyFromHost", cuda),
                                     ("sqrt", "Sqrt", cuda)])
    assert reason == "1 host/device copies around 1 CPU node(s) such as gather (Gather)"
    reason = graph_capture_blockers([("trt", "TRTKernel", "TensorrtExecutionProvider"), ("mul", "Mul", cuda)])
    assert reason == "1 node(s) on other providers: trt (TRTKernel) on TensorrtExecutionProvider"


def test_node_placements_read_from_the_profile(artifact):
    from runtime.device_loop import graph_capture_blockers, node_placements

    feeds = {"sample": np.zeros((2, 4, 8, 8), F32), "timestep": np.array([10.0, 10.0], F32),
             "encoder_hidden_states": np.zeros((2, 77, 32), F32)}
    placements = node_placements(str(artifact / "unet" / "model.onnx"), ["CPUExecutionProvider"], feeds)
    assert len(placements) > 50 and {p[2] for p in placements} == {"CPUExecutionProvider"}
    assert any(op == "Conv" for _, op, _ in placements)
    assert graph_capture_blockers(placements, target="CPUExecutionProvider") is None


def test_fixed_sizes_fold_the_unet_shape_computations(artifact, tmp_path):
    """The tiny export computes shapes at run time (the attention scale: Shape -> Gather -> Cast ->
    Sqrt); on CUDA those run on the CPU with host copies, and ORT refused the CUDA graph (the H200
    run). With the sizes fixed, as the device loop opens a graph session per shape, ORT folds them."""
    import onnx

    from runtime.device_loop import symbolic_sizes

    path = str(artifact / "unet" / "model.onnx")
    shapes = {"sample": (2, 4, 8, 8), "timestep": (2,), "encoder_hidden_states": (2, 77, 32)}
    plain = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    dims = symbolic_sizes({i.name: i for i in plain.get_inputs()}, shapes)
    assert dims == {"N": 2, "h": 8, "w": 8, "S": 77}  # S: the prompt chunks' sequence axis

    def optimized_ops(fixed):
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(tmp_path / f"opt{len(fixed)}.onnx")
        for k, v in fixed.items():
            so.add_free_dimension_override_by_name(k, v)
        ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        return {n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node}

    assert "Shape" in optimized_ops({})
    ops = optimized_ops(dims)
    assert not ops & {"Shape", "Gather", "Cast", "Sqrt", "Where", "Equal"}, ops


@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA)
def test_cuda_loop_generates_whether_or_not_a_graph_is_captured(pipe, artifact):
    """Captured or refused (then with the reason in the status), the loop's result is the numpy loop's."""
    cuda = DeviceLoop.open(pipe.manifest.component("unet"), pipe.root, {"device": "cuda"})
    ref = _numpy_txt2img(pipe, "euler")
    got = _device_txt2img(pipe, cuda, "euler")
    assert np.max(np.abs(got - ref)) <= 2e-3 * float(np.abs(ref).max())
    assert cuda.stats()["cuda_graph"] == cuda.cuda_graph_status


def test_fixed_size_sessions_give_the_same_latents(pipe, artifact):
    """The path taken when ORT refuses a CUDA graph over symbolic sizes: one session per shape with the
    sizes fixed. On the CPU provider (no graph to capture) it must compute what the numpy loop does."""
    loop = DeviceLoop.open(pipe.manifest.component("unet"), pipe.root, {"device": "cpu"})
    loop._graph_mode = "static"  # what a refused capture on CUDA leaves
    pipe.cfg = "batched"
    _assert_close(_device_txt2img(pipe, loop, "euler"), _numpy_txt2img(pipe, "euler"))
    assert loop.cuda_graph_status == "on (sizes fixed: N=2, h=8, w=8, S=77)"
