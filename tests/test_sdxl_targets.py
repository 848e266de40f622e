"""SDXL on the Core ML, TensorRT and ONNX ``--optimize gpu`` targets, as far as this machine runs them.

The tiny SDXL base (sdexport.demo.tiny_sdxl: two text encoders, a U-Net with text_embeds/time_ids,
a force_upcast VAE) goes through each target's real code path:

* Core ML (Linux converts, only macOS predicts): the U-Net, text_encoder_2 and VAE decoder exported
  with the ``apple-silicon-ane`` profile (split-einsum, 6-bit palettes, cpu-and-ne) at 64x64; the
  packages' declared inputs/outputs, einsum and look-up-table ops, the fp32 VAE, and the offline
  parity (the split-einsum torch rewrite against the stock module). Predictions: macOS only.
* TensorRT (not installable here): the optimization profiles of the real SDXL base and refiner
  architectures from their configs, the dry-run plans (1024 static for Jetson, the model's own size
  as the dynamic profile's opt), and the build path up to the builder against the stand-in
  ``tensorrt`` of tests/test_tensorrt.py: every input of the ONNX it feeds has a profile that fits
  its static and dynamic dimensions. A real engine: where TensorRT and a GPU are.
* ONNX ``--optimize gpu``: the fused U-Net keeps the SDXL inputs; the fusions that also run on the
  CPU are checked against the plain graph (fp32 and fp16); the CUDA-only graph is compared with
  torch where onnxruntime has CUDA, and skipped with the reason elsewhere.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch

from runtime.manifest import Component, FileRef, Manifest
from runtime.metrics import psnr
from sdexport import profile
from sdexport.export.components import Shape, model_info
from sdexport.export.sdxl import FORCE_UPCAST, component_specs
from sdexport.export.targets.tensorrt import EngineSettings, TensorRTTarget, profile_shapes
from sdexport.sources.diffusers import DiffusersSource
from sdexport.sources.models import CONFIGS_DIR
from tests.test_tensorrt import NO_TRT, fakes  # noqa: F401  (the stand-in tensorrt fixture)

SIZE = 64
SDXL_INPUTS = ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
ON_MAC = sys.platform == "darwin"
MAC_ONLY = pytest.mark.skipif(not ON_MAC, reason="Core ML prediction needs macOS; this is " + sys.platform)
NEEDS_CT = pytest.mark.skipif(importlib.util.find_spec("coremltools") is None,
                              reason="coremltools is not installed: pip install 'sdexport[coreml]'")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    from sdexport.demo.tiny_sdxl import save_tiny_sdxl

    return save_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl") / "base")


@pytest.fixture(scope="module")
def specs(base):
    source = DiffusersSource.open(base)
    info = model_info(source)
    return {spec.name: spec for spec in component_specs(source, info, [])}, source, info


def _export(specs, names, target, options, stage: Path) -> dict[str, Component]:
    from sdexport.export.run import export_component, spatial_multiple

    by_name, source, info = specs
    multiple = spatial_multiple(source, info)
    return {name: export_component(by_name[name], target, stage, options, multiple) for name in names}


# --- Core ML ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def coreml(specs, base, tmp_path_factory):
    """U-Net, text_encoder_2 and VAE decoder with the apple-silicon-ane profile at 64x64 (fp16, split-einsum,
    palettize6, cpu-and-ne, sequential CFG), through the export run's per-component path. The U-Net is
    left unpalettized to keep this module quick (k-means over its weights: ~18 s here); palettization is
    per weight and the same for every family (tests/test_coreml.py palettizes the SD 1.x U-Net)."""
    from sdexport.export.targets.coreml import CoreMLTarget

    options = profile.resolve("apple-silicon-ane", height=SIZE, width=SIZE, model=str(base))
    options = dataclasses.replace(options, coreml=dataclasses.replace(
        options.coreml, compress={"unet": "none", "default": options.coreml.compress}))
    stage = tmp_path_factory.mktemp("sdxl-coreml")
    return stage, _export(specs, ["unet", "text_encoder_2", "vae_decoder"], CoreMLTarget(), options, stage)


def _package(stage: Path, component: Component):
    from sdexport.export.targets.coreml import PACKAGE, coremltools, quiet_coremltools

    ct = coremltools()
    with quiet_coremltools():
        return ct.models.MLModel(str(stage / component.name / PACKAGE), skip_model_load=True)


@NEEDS_CT
@pytest.mark.slow
def test_coreml_packages_declare_the_sdxl_signatures(coreml):
    from sdexport.export.targets.coreml import declared_io

    stage, components = coreml
    for c in components.values():
        assert declared_io(_package(stage, c)) == (c.inputs, c.outputs), c.name
    unet, te2, vae = components["unet"], components["text_encoder_2"], components["vae_decoder"]
    # sequential CFG: the U-Net sees B = 1 per call; its added conditioning is text_embeds and 6 time ids
    assert [t.describe() for t in unet.inputs] == [
        "sample: float32[1, 4, 8, 8]", "timestep: float32[1]", "encoder_hidden_states: float32[1, 77, 64]",
        "text_embeds: float32[1, 32]", "time_ids: float32[1, 6]"]
    assert [t.describe() for t in unet.outputs] == ["out_sample: float32[1, 4, 8, 8]"]
    assert [t.describe() for t in te2.inputs] == ["input_ids: int32[1, 77]"]
    assert [t.describe() for t in te2.outputs] == [
        "penultimate_hidden_state: float32[1, 77, 32]", "text_embeds: float32[1, 32]"]
    assert [t.describe() for t in vae.outputs] == ["sample: float32[1, 3, 64, 64]"]


@NEEDS_CT
@pytest.mark.slow
def test_coreml_split_einsum_palettized_and_the_fp32_vae(coreml, specs):
    from sdexport.export.targets.coreml import mil_op_counts

    stage, components = coreml
    for c in components.values():
        counts = mil_op_counts(_package(stage, c))
        assert counts["einsum"] > 0 and c.details["attention"]["implementation"] == "split-einsum", c.name
        compression = c.details["compression"]
        if c.name == "unet":
            assert compression is None and counts["constexpr_lut_to_dense"] == 0
            continue
        assert counts["constexpr_lut_to_dense"] == compression["compressed_weights"] > 0, c.name
        assert compression["mode"] == "palettize6" and compression["ratio"] > 1.5, (c.name, compression)
    # every attention (self and cross) one head at a time: 2 einsums per head
    heads = sum(m.heads for m in specs[0]["unet"].module().modules() if type(m).__name__ == "Attention")
    assert mil_op_counts(_package(stage, components["unet"]))["einsum"] == 2 * heads == 64
    for name in ("unet", "text_encoder_2"):
        assert components[name].precision == "fp16" and components[name].details["compute_units"] == "cpu-and-ne"
    vae = components["vae_decoder"]
    # force_upcast: fp32 whatever the profile asks, so the GPU runs it (the Neural Engine runs fp16 only)
    assert vae.precision == "fp32" and vae.details["force_upcast"] == FORCE_UPCAST
    assert vae.details["compute_units"] == "cpu-and-gpu"


@NEEDS_CT
@pytest.mark.slow
@pytest.mark.skipif(ON_MAC, reason="on macOS the components are validated by running them")
def test_coreml_offline_parity_checks_the_sdxl_rewrite(coreml):
    _, components = coreml
    for c in components.values():
        assert c.parity["skipped"].startswith("Core ML prediction needs macOS"), c.name
        assert "psnr_db" not in c.parity  # no number for a prediction that never ran
        rewrite = c.parity["torch_rewrite"]
        assert rewrite["max_abs_err"] <= 1e-4 and rewrite["psnr_db"] > 100, (c.name, rewrite)


@pytest.mark.parametrize("profile_name, n, b", [("apple-silicon-ane", "N", "B"), ("apple-silicon-gpu", 2, 1)])
def test_coreml_profiles_plan_sdxl_at_1024(tmp_path, profile_name, n, b):
    """The SDXL base's configs through the CLI's dry run: static at SDXL's 1024, the U-Net's added
    conditioning planned, the force_upcast VAE fp32 (sequential CFG plans the batch symbolic; Core ML then
    fixes it at one prompt per call, as the conversion tests above show)."""
    from sdexport.cli import main

    out = tmp_path / "plan"
    assert main(["export", str(CONFIGS_DIR / "sdxl-base"), "--profile", profile_name, "--out", str(out),
                 "--dry-run", "--quiet"]) == 0
    m = Manifest.load(out, check_files=False)
    assert (m.profile["shapes"]["height"], m.profile["shapes"]["width"], m.exporter["target"]) == (1024, 1024, "coreml")
    assert [t.describe() for t in m.component("unet").inputs] == [
        f"sample: float32[{n}, 4, 128, 128]", f"timestep: float32[{n}]", f"encoder_hidden_states: float32[{n}, 77, 2048]",
        f"text_embeds: float32[{n}, 1280]", f"time_ids: float32[{n}, 6]"]
    assert [t.describe() for t in m.component("text_encoder_2").outputs] == [
        f"penultimate_hidden_state: float32[{b}, 77, 1280]", f"text_embeds: float32[{b}, 1280]"]
    assert m.component("vae_decoder").precision == "fp32" and m.component("unet").precision == "fp16"


def test_split_einsum_keeps_every_hidden_state_of_clip(specs):
    """transformers records output_hidden_states with hooks on the encoder layers the rewrite replaces;
    SDXL reads hidden_states[-2] from both encoders, so every one of them must survive the rewrite."""
    from sdexport.export.attention import attention_implementation

    _, source, _ = specs
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 49000, (2, 77), generator=gen)
    for model in (source.load_text_encoder(), source.load_text_encoder_2()):
        with torch.no_grad():
            stock = model(ids, output_hidden_states=True).hidden_states
            with attention_implementation(model, "split-einsum") as report:
                split = model(ids, output_hidden_states=True).hidden_states
        assert report["rewritten"] == {"CLIPEncoder": 1}
        assert len(split) == len(stock) == model.config.num_hidden_layers + 1
        for a, b in zip(stock, split):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


def test_neural_engine_profile_puts_a_kept_fp32_component_on_the_gpu():
    from sdexport.errors import OptionError
    from sdexport.export.targets.coreml import CoreMLSettings

    settings = CoreMLSettings(compute_units="cpu-and-ne")
    assert settings.units_for("fp16") == "cpu-and-ne"
    assert settings.units_for("fp32", kept_fp32=True) == "cpu-and-gpu"
    with pytest.raises(OptionError, match="cpu-and-ne needs --precision fp16"):
        settings.units_for("fp32")  # asked for fp32 everywhere: still the user's error


@NEEDS_CT
@MAC_ONLY
def test_coreml_sdxl_predictions_match_torch(coreml, specs):
    from runtime.backends import open_session

    stage, components = coreml
    by_name = specs[0]
    for name, component in components.items():
        spec = by_name[name]
        example = spec.example(Shape(1, SIZE, SIZE, 1), torch.Generator().manual_seed(7))
        with torch.no_grad():
            expected = spec.module()(*example)
        expected = expected if isinstance(expected, tuple) else (expected,)
        got = open_session(component, stage, {}).run({t.name: x.numpy() for t, x in zip(spec.inputs, example)})
        for t, ref in zip(spec.outputs, expected):
            assert psnr(ref.numpy(), np.asarray(got[t.name], np.float32)) >= 30.0, (name, t.name)  # palettized fp16


# --- TensorRT ----------------------------------------------------------------------------------------


def _real(name: str):
    source = DiffusersSource.open(CONFIGS_DIR / name)
    info = model_info(source)
    return {s.name: s for s in component_specs(source, info, [])}, info


@pytest.mark.parametrize("name, width, time_ids", [("sdxl-base", 2048, 6), ("sdxl-refiner", 1280, 5)])
def test_tensorrt_profiles_of_the_real_sdxl_architectures(name, width, time_ids):
    """Configs only (no weights): dynamic profile as the export run resolves it, half to twice 1024 px."""
    specs, info = _real(name)
    options = profile.resolve("nvidia-gpu", target="tensorrt", model=str(CONFIGS_DIR / name))
    options = dataclasses.replace(options, trace_size=min(info.default_height, options.default_size),
                                  model_size=info.default_height)
    settings = EngineSettings.from_options(options)
    unet = profile_shapes(specs["unet"], options, settings)
    assert list(unet) == SDXL_INPUTS
    # batched CFG: N = 2B at opt/max (1..4 prompts), B at min; latents 64..128..256 (512..1024..2048 px)
    assert unet["sample"] == {"min": [1, 4, 64, 64], "opt": [2, 4, 128, 128], "max": [8, 4, 256, 256]}
    assert unet["encoder_hidden_states"] == {"min": [1, 77, width], "opt": [2, 77, width], "max": [8, 77, width]}
    assert unet["text_embeds"] == {"min": [1, 1280], "opt": [2, 1280], "max": [8, 1280]}
    assert unet["time_ids"] == {"min": [1, time_ids], "opt": [2, time_ids], "max": [8, time_ids]}
    expected_text = ["text_encoder_2"] if name == "sdxl-refiner" else ["text_encoder", "text_encoder_2"]
    assert [n for n in specs if n.startswith("text")] == expected_text
    for text in expected_text:
        assert profile_shapes(specs[text], options, settings) == {
            "input_ids": {"min": [1, 77], "opt": [1, 77], "max": [4, 77]}}
    vae = profile_shapes(specs["vae_decoder"], options, settings)
    assert vae["latent_sample"] == {"min": [1, 4, 64, 64], "opt": [1, 4, 128, 128], "max": [4, 4, 256, 256]}


@pytest.mark.parametrize("profile_name, sample, static", [
    ("jetson-orin", {"min": [1, 4, 128, 128], "opt": [1, 4, 128, 128], "max": [1, 4, 128, 128]}, True),
    ("nvidia-gpu", {"min": [1, 4, 64, 64], "opt": [2, 4, 128, 128], "max": [8, 4, 256, 256]}, False),
])
def test_tensorrt_dry_run_plans_sdxl_at_1024(tmp_path, profile_name, sample, static):
    """Through the CLI on the SDXL base's configs: Jetson static at SDXL's 1024, the dynamic profile's
    opt at the model's own 1024; the force_upcast VAE planned as an fp32 engine."""
    from sdexport.cli import main

    out = tmp_path / "plan"
    assert main(["export", str(CONFIGS_DIR / "sdxl-base"), "--profile", profile_name, "--target", "tensorrt",
                 "--out", str(out), "--dry-run", "--quiet"]) == 0
    m = Manifest.load(out, check_files=False)
    assert m.profile["shapes"]["static"] is static and m.profile["shapes"].get("height") == (1024 if static else None)
    unet = m.component("unet").details
    assert unet["profiles"]["sample"] == sample and list(unet["profiles"]) == SDXL_INPUTS
    assert unet["profiles"]["time_ids"]["max"][1] == 6 and unet["builder"]["precision"] == "fp16"
    for vae in ("vae_encoder", "vae_decoder"):
        assert m.component(vae).precision == "fp32" and m.component(vae).details["builder"]["precision"] == "fp32"
    assert {"text_encoder", "text_encoder_2"} <= set(m.components)


@pytest.mark.slow
def test_tensorrt_build_path_feeds_every_sdxl_input_a_fitting_profile(fakes, specs, tmp_path):  # noqa: F811
    """Up to the builder (stand-in tensorrt): the ONNX it parses has exactly the spec's inputs, each with
    a profile, dynamic exactly where the profile ranges; refittable: the weight map covers the added
    (text_time) embedding; the runtime session binds all five inputs."""
    import onnx

    from runtime.backends import tensorrt as trt_backend
    from runtime.backends.base import SessionOptions
    from sdexport.options import TensorRTOptions

    trt, _ = fakes
    options = profile.resolve("nvidia-gpu", target="tensorrt")
    options = dataclasses.replace(options, trace_size=SIZE, model_size=256,  # the tiny model's own size
                                  tensorrt=TensorRTOptions(refittable=True, timing_cache=str(tmp_path / "t.cache")))
    spec = specs[0]["unet"]
    converted = TensorRTTarget().convert(spec, spec.module(), tmp_path / "unet", options, "fp16")
    (_, _, _, shapes), = trt.log
    assert list(shapes) == SDXL_INPUTS and [t.name for t in converted.inputs] == SDXL_INPUTS
    assert shapes["time_ids"] == ((1, 6), (2, 6), (8, 6)) and shapes["text_embeds"] == ((1, 32), (2, 32), (8, 32))
    assert shapes["sample"] == ((1, 4, 16, 16), (2, 4, 32, 32), (8, 4, 64, 64))  # 128..256..512 px
    graph = onnx.load(str(tmp_path / "unet" / "model.onnx"), load_external_data=False).graph
    assert [i.name for i in graph.input] == SDXL_INPUTS
    # the profile's [onnx] optimize = "gpu" is for ONNX Runtime: TensorRT gets the plain graph
    assert not [n.op_type for n in graph.node if n.domain == "com.microsoft"]
    for inp in graph.input:
        lo, _, hi = shapes[inp.name]
        for axis, dim in enumerate(inp.type.tensor_type.shape.dim):
            if lo[axis] == hi[axis] and dim.dim_value:
                assert dim.dim_value == lo[axis], (inp.name, axis)
            else:
                assert dim.dim_param, (inp.name, axis, "the profile ranges over a static dimension")
    weights = json.loads((tmp_path / "unet" / "weights.json").read_text())["weights"]
    assert {"unet.add_embedding.linear_1.weight", "unet.add_embedding.linear_2.weight"} <= set(weights)
    component = Component(name="unet", role="unet", backend="tensorrt", precision=converted.precision,
                          files=tuple(FileRef.of(tmp_path, f) for f in converted.files),
                          inputs=converted.inputs, outputs=converted.outputs, details=converted.details)
    session = trt_backend.TensorRTSession(component, tmp_path, SessionOptions())
    gen = np.random.default_rng(0)
    feeds = {"sample": gen.standard_normal((2, 4, 32, 32), np.float32), "timestep": np.full((2,), 500.0, np.float32),
             "encoder_hidden_states": gen.standard_normal((2, 77, 64), np.float32),
             "text_embeds": gen.standard_normal((2, 32), np.float32),
             "time_ids": np.tile(np.array([256, 256, 0, 0, 256, 256], np.float32), (2, 1))}
    np.testing.assert_array_equal(session.run(feeds)["out_sample"], 2 * feeds["sample"])  # the stand-in's engine


@pytest.mark.skipif(NO_TRT is not None, reason=NO_TRT or "")
def test_real_sdxl_engine_matches_torch(specs, tmp_path):
    from runtime.backends import tensorrt as trt_backend
    from runtime.backends.base import SessionOptions

    options = dataclasses.replace(profile.resolve("nvidia-gpu", target="tensorrt"), trace_size=SIZE, model_size=256)
    spec = specs[0]["unet"]
    module = spec.module()
    converted = TensorRTTarget().convert(spec, module, tmp_path / "unet", options, "fp16")
    component = Component(name="unet", role="unet", backend="tensorrt", precision=converted.precision,
                          files=tuple(FileRef.of(tmp_path, f) for f in converted.files),
                          inputs=converted.inputs, outputs=converted.outputs, details=converted.details)
    example = spec.example(Shape(1, 256, 256), torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = module(*example).numpy()
    got = trt_backend.TensorRTSession(component, tmp_path, SessionOptions()).run(
        {t.name: x.numpy() for t, x in zip(spec.inputs, example)})["out_sample"]
    assert psnr(expected, got) >= 30.0


# --- ONNX --optimize gpu -----------------------------------------------------------------------------


HAS_CUDA = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
NO_CUDA = "onnxruntime here has no CUDAExecutionProvider: the fused graph's NhwcConv/GroupNorm run only on CUDA"


@pytest.fixture(scope="module")
def plain_onnx(specs, tmp_path_factory):
    """The U-Net and text_encoder_2 as plain fp32 ONNX (dynamic shapes, traced at 64 px)."""
    import onnx

    from sdexport.export.targets.onnx import OnnxTarget
    from sdexport.export.targets.base import ExportOptions

    options = ExportOptions(target="onnx", precision="fp32", trace_size=SIZE)
    out = tmp_path_factory.mktemp("sdxl-onnx")
    models = {}
    for name in ("unet", "text_encoder_2"):
        spec = specs[0][name]
        converted = OnnxTarget().convert(spec, spec.module(), out / name, options, "fp32")
        models[name] = onnx.load(str(converted.files[0]))
    return models


def _feeds(name: str) -> dict[str, np.ndarray]:
    gen = np.random.default_rng(0)
    if name == "text_encoder_2":
        ids = gen.integers(1, 49406, (2, 77)).astype(np.int64)
        ids[:, 0], ids[:, 9], ids[:, 10:] = 49406, 49407, 0  # BOS, EOS, then "!" padding
        return {"input_ids": ids}
    return {"sample": gen.standard_normal((2, 4, 8, 8), np.float32), "timestep": np.array([981.0, 981.0], np.float32),
            "encoder_hidden_states": gen.standard_normal((2, 77, 64), np.float32),
            "text_embeds": gen.standard_normal((2, 32), np.float32),
            "time_ids": np.tile(np.array([64, 64, 0, 0, 64, 64], np.float32), (2, 1))}


def _run(model, feeds, providers=("CPUExecutionProvider",)) -> list[np.ndarray]:
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=list(providers)).run(None, feeds)


@pytest.fixture(scope="module")
def fused_unet(plain_onnx, tmp_path_factory):
    from sdexport.export.targets.onnx_gpu import optimize_for_gpu

    return optimize_for_gpu(plain_onnx["unet"], "unet", "fp16", tmp_path_factory.mktemp("gpu-unet"),
                            probe_feeds=_feeds("unet"))


def test_gpu_fused_sdxl_unet_keeps_its_inputs(fused_unet):
    from onnx import TensorProto

    from sdexport.export.targets.onnx_gpu import validation_providers

    model, details = fused_unet
    assert [i.name for i in model.graph.input] == SDXL_INPUTS and [o.name for o in model.graph.output] == ["out_sample"]
    assert all(v.type.tensor_type.elem_type == TensorProto.FLOAT for v in list(model.graph.input) + list(model.graph.output))
    assert {"MultiHeadAttention", "GroupNorm", "SkipGroupNorm", "NhwcConv", "SkipLayerNormalization"} <= set(details["fused_ops"])
    assert details["requires"] == "CUDAExecutionProvider" and details["load_check"]
    providers, reason = validation_providers(details, ["CPUExecutionProvider"])
    assert providers is None and "onnxruntime-gpu" in reason


@pytest.mark.parametrize("name", ["unet", "text_encoder_2"])
def test_gpu_portable_fusions_keep_the_sdxl_numbers(plain_onnx, tmp_path, name):
    """The fusions with CPU kernels: fp32 equal to the plain graph to rounding, fp16 at least 35 dB, every output."""
    from sdexport.export.targets.onnx_gpu import GpuOptimization, optimize_for_gpu

    role = "unet" if name == "unet" else "text_encoder"
    plain, feeds = plain_onnx[name], _feeds(name)
    reference = _run(plain, feeds)
    portable = GpuOptimization(cuda_ops=False)
    fused32, details = optimize_for_gpu(plain, role, "fp32", tmp_path / "a", options=portable)
    assert details["fused_ops"] and not details["cuda_only_ops"]
    assert [i.name for i in fused32.graph.input] == list(feeds)
    for ref, got in zip(reference, _run(fused32, feeds), strict=True):
        assert np.max(np.abs(got - ref)) <= 1e-5 * np.max(np.abs(ref))
    fused16, _ = optimize_for_gpu(plain, role, "fp16", tmp_path / "b", probe_feeds=feeds, options=portable)
    for ref, got in zip(reference, _run(fused16, feeds), strict=True):
        assert got.dtype == np.float32 and psnr(ref, got) >= 35.0


@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA)
def test_gpu_fused_fp16_sdxl_unet_matches_torch_on_cuda(fused_unet, specs):
    spec = specs[0]["unet"]
    feeds = _feeds("unet")
    with torch.no_grad():
        expected = spec.module()(*(torch.from_numpy(feeds[k]) for k in SDXL_INPUTS)).numpy()
    got = _run(fused_unet[0], feeds, ("CUDAExecutionProvider", "CPUExecutionProvider"))[0]
    assert psnr(expected, got) >= 30.0
