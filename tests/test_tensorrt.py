"""TensorRT: everything that does not need the library here, the rest where it is importable.

TensorRT cannot be installed on this project's machines (its PyPI packages are download stubs), so:

* settings, optimization profiles, the dry-run plan, weight maps, refit-set mapping, safetensors
  reading, engine compatibility and profile checks, and the one-line errors are tested as they are;
* the build and run code paths are exercised against small stand-ins for ``tensorrt`` and
  ``cuda.bindings.runtime`` that follow the documented TensorRT 10 / cuda-python call signatures
  (they prove the plumbing: buffers, profiles, CUDA-graph replay, refit, scratch sharing; not
  TensorRT's numerics);
* the real build-and-run test runs where ``tensorrt`` imports and a GPU is visible, and is skipped
  with that reason elsewhere.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from runtime.backends.base import BackendError, SessionOptions
from runtime.backends import tensorrt as trt_backend
from runtime.manifest import Component, FileRef, Manifest, TensorSpec
from sdexport import profile
from sdexport.options import TensorRTOptions
from sdexport.cli import main
from sdexport.errors import OptionError
from sdexport.export.targets import get_target
from sdexport.export.targets.tensorrt import (
    EngineSettings,
    TensorRTTarget,
    attach_engine_names,
    component_prefix,
    engine_details,
    onnx_weight_map,
    profile_shapes,
)
from tests.test_cli_errors import assert_one_line_error, run_cli
from tests.test_device_loop import tiny_onnx_export


def _real_tensorrt() -> str | None:
    """None when TensorRT and a GPU are usable here, else the reason."""
    try:
        import tensorrt  # noqa: F401
    except Exception as e:
        return f"TensorRT is not importable here ({type(e).__name__}); its PyPI packages are stubs on this project's machines"
    try:
        trt_backend._Cuda.get()
    except Exception as e:
        return f"no usable CUDA device ({e})"
    return None


NO_TRT = _real_tensorrt()


@pytest.fixture(scope="module")
def tiny(tiny_sd1):
    from sdexport.export.components import model_info
    from sdexport.sources.diffusers import DiffusersSource

    source = DiffusersSource.open(tiny_sd1)
    return source, model_info(source)


def _options(profile_name=None, **flags):
    options = profile.resolve(profile_name, **flags)
    return dataclasses.replace(options, trace_size=128)


def _with_table(options, **table):
    return dataclasses.replace(options, tensorrt=TensorRTOptions(**table))


# --- settings and optimization profiles --------------------------------------------------------------


def test_target_loads_without_tensorrt():
    target = get_target("tensorrt")
    assert (target.name, target.backend, target.file_names) == ("tensorrt", "tensorrt", ("model.plan",))
    assert "tensorrt" not in sys.modules or NO_TRT is None


def test_static_profile_like_jetson(tiny):
    from sdexport.export.components import unet_spec, vae_decoder_spec

    source, info = tiny
    options = _options("jetson-orin", height=512, width=512)  # static, batch 1, sequential CFG
    settings = EngineSettings.from_options(options)
    unet = profile_shapes(unet_spec(source, info), options, settings)
    assert unet["sample"] == {"min": [1, 4, 64, 64], "opt": [1, 4, 64, 64], "max": [1, 4, 64, 64]}
    assert unet["encoder_hidden_states"]["max"] == [1, 77, 32]  # sequential CFG: two calls on B
    vae = profile_shapes(vae_decoder_spec(source, info), options, settings)
    assert vae["latent_sample"] == {"min": [1, 4, 64, 64], "opt": [1, 4, 64, 64], "max": [1, 4, 64, 64]}


def test_dynamic_profile_from_builder_batch_and_size(tiny):
    from sdexport.export.components import controlnet_spec, text_encoder_spec, unet_spec

    source, info = tiny
    options = _with_table(_options("nvidia-gpu", target="tensorrt"), builder_batch=[1, 1, 4], builder_size=[256, 512, 768])
    settings = EngineSettings.from_options(options)
    unet = profile_shapes(unet_spec(source, info), options, settings)
    # batched CFG: N = 2B at opt/max, B at min (an unguided run)
    assert unet["sample"] == {"min": [1, 4, 32, 32], "opt": [2, 4, 64, 64], "max": [8, 4, 96, 96]}
    assert unet["timestep"] == {"min": [1], "opt": [2], "max": [8]}
    text = profile_shapes(text_encoder_spec(source, info), options, settings)
    assert text["input_ids"] == {"min": [1, 77], "opt": [1, 77], "max": [4, 77]}
    cn = types.SimpleNamespace(name="edges", load=None)
    control = profile_shapes(controlnet_spec(cn, info), options, settings)
    assert control["controlnet_cond"]["max"] == [8, 3, 768, 768]
    defaults = profile_shapes(unet_spec(source, info), _options("nvidia-gpu", target="tensorrt"), EngineSettings())
    assert defaults["sample"]["min"][2:] == [8, 8] and defaults["sample"]["max"][2:] == [32, 32]  # 64..256 px


@pytest.mark.parametrize("table, needle", [
    ({"builder_batch": [4, 1, 2]}, "builder_batch must be three positive integers"),
    ({"builder_size": [256, 512]}, "builder_size"),
    ({"optimization_level": 9}, "optimization_level must be 0..5"),
    ({"hardware_compatibility": "turing"}, "hardware_compatibility: 'turing' is not one of none, ampere_plus"),
])
def test_bad_settings_are_one_line(table, needle):
    with pytest.raises(OptionError, match=needle):
        EngineSettings.from_options(_with_table(_options(), **table))


def test_settings_from_profile_table(tmp_path, monkeypatch):
    options = _with_table(_options(), refittable=True, optimization_level=5, timing_cache=str(tmp_path / "t.cache"),
                          hardware_compatibility="ampere_plus")
    s = EngineSettings.from_options(options)
    assert (s.refittable, s.optimization_level, s.hardware_compatibility) == (True, 5, "ampere_plus")
    assert s.timing_cache_path() == tmp_path / "t.cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("SDEXPORT_TRT_TIMING_CACHE", raising=False)
    assert EngineSettings().timing_cache_path() == tmp_path / "xdg" / "sdexport" / "tensorrt-timing.cache"


def test_jetson_dry_run_plans_engines(tmp_path, tiny_sd1, tiny):
    from sdexport.export.components import unet_spec

    out = tmp_path / "plan"
    assert main(["export", str(tiny_sd1), "--profile", "jetson-orin", "--height", "64", "--width", "64",
                 "--out", str(out), "--dry-run", "--quiet"]) == 0
    m = Manifest.load(out, check_files=False)
    assert m.exporter["dry_run"] and m.exporter["target"] == "tensorrt"
    for name, c in m.components.items():
        assert c.backend == "tensorrt" and c.files[0].path == f"{name}/model.plan" and c.precision == "fp16"
    # what the (proposed) plan hook adds to each component: profile and builder settings
    source, info = tiny
    options = _options("jetson-orin", height=64, width=64)
    details = TensorRTTarget().plan_details(unet_spec(source, info), options)
    assert details["profiles"]["sample"]["max"] == [1, 4, 8, 8] and details["builder"]["precision"] == "fp16"


def test_export_without_tensorrt_is_one_line(capsys, tmp_path, tiny_sd1):
    if NO_TRT is None:
        pytest.skip("TensorRT is usable here: the export would build")
    out = tmp_path / "engines"
    code, err = run_cli(capsys, "export", tiny_sd1, "--target", "tensorrt", "--out", out, "--height", "64",
                        "--width", "64", "--no-validate")
    assert_one_line_error(code, err, "TensorRT", "--dry-run")
    assert not out.exists()


def test_int8_needs_a_qdq_export(tiny):
    from sdexport.export.targets.tensorrt import _qdq_path

    with pytest.raises(OptionError, match="int8-static"):
        _qdq_path(EngineSettings(), "unet")
    with pytest.raises(OptionError, match="refittable engines are fp16 or fp32"):
        TensorRTTarget().convert(None, None, Path("x"), _with_table(_options(), refittable=True), "int8")


# --- weight maps and refit sets ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tiny_sd1):
    return tiny_onnx_export(tmp_path_factory, tiny_sd1)


@pytest.fixture(scope="module")
def unet_map(tiny, artifact):
    import onnx

    from sdexport.export.components import unet_spec

    source, info = tiny
    module = unet_spec(source, info).module()
    model = onnx.load(str(artifact / "unet" / "model.onnx"))
    return module, model, onnx_weight_map(module, model, component_prefix("unet"))


def test_weight_map_finds_every_unet_parameter(unet_map):
    from onnx import numpy_helper

    module, model, wm = unet_map
    params = {f"unet.{k.split('.', 1)[1]}": v.detach().numpy() for k, v in module.named_parameters()}
    assert wm["prefix"] == "unet" and not wm["unmapped"]
    assert set(wm["weights"]) | set(wm["ambiguous"]) == set(params)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    transposed = 0
    for key, entry in wm["weights"].items():
        value = params[key].T if entry["transform"] == "transpose" else params[key]
        np.testing.assert_array_equal(value.reshape(entry["shape"]), inits[entry["initializer"]])
        transposed += entry["transform"] == "transpose"
    # nn.Linear weights are stored transposed for MatMul, under exporter names
    q = wm["weights"]["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"]
    assert q["transform"] == "transpose" and q["initializer"].startswith("onnx::MatMul")
    assert transposed >= 30
    # untrained norms (all ones / zeros) are equal bytes in several places: never refitted blindly
    assert all("norm" in k for k in wm["ambiguous"])


def test_weight_map_follows_fp16_conversion(tiny, artifact, unet_map):
    import onnx

    from sdexport.export.targets.onnx import to_fp16

    module, model, _ = unet_map
    half = to_fp16(onnx.load(str(artifact / "unet" / "model.onnx")), (), Path("."))
    wm = onnx_weight_map(module, half, "unet")
    assert {e["dtype"] for e in wm["weights"].values()} == {"float16"}
    assert wm["weights"]["unet.conv_in.weight"]["shape"] == [32, 4, 3, 3]


def test_refit_set_to_engine_weights(unet_map):
    module, _, wm = unet_map
    wm = attach_engine_names(wm, [e["initializer"] for e in wm["weights"].values()])
    params = {f"unet.{k.split('.', 1)[1]}": v.detach().numpy() for k, v in module.named_parameters()}
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    fused = params[key] + 0.01  # what a LoRA fused at some scale looks like
    refit_set = {key: fused, "unet.conv_in.weight": params["unet.conv_in.weight"] * 2,
                 "text_encoder.text_model.embeddings.token_embedding.weight": np.zeros((3, 3), np.float32)}
    arrays = trt_backend.refit_arrays(refit_set, wm)
    entry = wm["weights"][key]
    assert set(arrays) == {entry["engine"], wm["weights"]["unet.conv_in.weight"]["engine"]}
    np.testing.assert_array_equal(arrays[entry["engine"]], fused.T)
    assert arrays[entry["engine"]].flags.c_contiguous
    # with TensorRT's prototypes (dtype, count) checked
    protos = {name: ("float32", a.size) for name, a in arrays.items()}
    assert set(trt_backend.refit_arrays(refit_set, wm, protos)) == set(arrays)
    with pytest.raises(BackendError, match="engine expects"):
        trt_backend.refit_arrays(refit_set, wm, {name: ("float16", a.size) for name, a in arrays.items()})


def test_refit_refuses_what_the_engine_cannot_take(unet_map):
    module, _, wm = unet_map
    wm = attach_engine_names(wm, [])  # built without REFIT: nothing refittable
    params = {f"unet.{k.split('.', 1)[1]}": v.detach().numpy() for k, v in module.named_parameters()}
    with pytest.raises(BackendError, match=r"cannot refit unet\.conv_in\.weight.*--lora"):
        trt_backend.refit_arrays({"unet.conv_in.weight": params["unet.conv_in.weight"]}, wm)
    full = attach_engine_names(unet_map[2], [e["initializer"] for e in unet_map[2]["weights"].values()])
    shared_init, keys = next(iter(full["shared"].items()))
    with pytest.raises(BackendError, match="stored once for"):
        trt_backend.refit_arrays({keys[0]: np.ones(full["weights"][keys[0]]["shape"], np.float32)}, full)


def test_read_safetensors_matches_the_library(tmp_path):
    import torch
    from safetensors.torch import save_file

    tensors = {"a": torch.randn(3, 4), "b": torch.randn(5).half(), "c": torch.randn(2, 2).bfloat16(),
               "d": torch.arange(6).reshape(2, 3)}
    save_file(tensors, str(tmp_path / "set.safetensors"), metadata={"format": "pt"})
    got = trt_backend.read_safetensors(tmp_path / "set.safetensors")
    for k, v in tensors.items():
        np.testing.assert_array_equal(got[k], v.float().numpy() if k == "c" else v.numpy())
    (tmp_path / "bad.safetensors").write_bytes(b"xx")
    with pytest.raises(BackendError, match="not a safetensors file"):
        trt_backend.read_safetensors(tmp_path / "bad.safetensors")


# --- what the runtime checks before loading an engine ------------------------------------------------

BUILT = {"version": "10.8.0.43", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0",
         "hardware_compatibility": "none", "version_compatible": False, "typing": "strong"}
PROFILES = {"sample": {"min": [1, 4, 32, 32], "opt": [2, 4, 64, 64], "max": [2, 4, 64, 64]},
            "timestep": {"min": [1], "opt": [2], "max": [2]},
            "encoder_hidden_states": {"min": [1, 77, 32], "opt": [2, 77, 32], "max": [2, 77, 32]}}


def _component(record=BUILT, profiles=PROFILES, **details) -> Component:
    return Component(
        name="unet", role="unet", backend="tensorrt", files=(FileRef("unet/model.plan", "", 0),), precision="fp16",
        inputs=(TensorSpec("sample", "float32", ("N", 4, "h", "w")), TensorSpec("timestep", "float32", ("N",)),
                TensorSpec("encoder_hidden_states", "float32", ("N", 77, 32))),
        outputs=(TensorSpec("out_sample", "float32", ("N", 4, "h", "w")),),
        details={"tensorrt": record, "profiles": profiles, **details},
    )


@pytest.mark.parametrize("here, ok, needle", [
    ({"version": "10.8.0.43", "gpu": "NVIDIA H100 PCIe", "compute_capability": "9.0"}, True, None),
    ({"version": "10.9.0.34", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}, False, "TensorRT version"),
    ({"version": "10.8.0.43", "gpu": "NVIDIA A10G", "compute_capability": "8.6"}, False, "GPU architecture"),
])
def test_engine_compatibility(here, ok, needle):
    component = _component()
    if ok:
        trt_backend.check_compatible(component, here)
        return
    with pytest.raises(BackendError) as e:
        trt_backend.check_compatible(component, here)
    message = str(e.value)
    assert "\n" not in message and needle in message and "rebuild the engines on this machine" in message
    assert "NVIDIA H100 80GB HBM3 (compute capability 9.0) with TensorRT 10.8.0.43" in message


def test_hardware_and_version_compatible_engines():
    ampere = _component({**BUILT, "hardware_compatibility": "ampere_plus", "compute_capability": "8.0"})
    trt_backend.check_compatible(ampere, {"version": "10.8.0.43", "compute_capability": "8.9"})
    with pytest.raises(BackendError, match="Ampere or newer"):
        trt_backend.check_compatible(ampere, {"version": "10.8.0.43", "compute_capability": "7.5"})
    lean = _component({**BUILT, "version_compatible": True})
    trt_backend.check_compatible(lean, {"version": "10.9.1", "compute_capability": "9.0"})
    with pytest.raises(BackendError, match="TensorRT version"):
        trt_backend.check_compatible(lean, {"version": "10.7.0", "compute_capability": "9.0"})
    with pytest.raises(BackendError, match="does not say which TensorRT"):
        trt_backend.check_compatible(_component(record={}), {"version": "10.8.0"})


def test_inputs_outside_the_profile_say_what_to_do():
    component = _component()
    ok = {"sample": np.zeros((2, 4, 48, 64), np.float32), "timestep": np.zeros(2, np.float32),
          "encoder_hidden_states": np.zeros((2, 77, 32), np.float32)}
    trt_backend.check_profile(component, ok, vae_scale=8)
    too_big = {**ok, "sample": np.zeros((2, 4, 96, 96), np.float32)}
    with pytest.raises(BackendError) as e:
        trt_backend.check_profile(component, too_big, vae_scale=8)
    message = str(e.value)
    assert "\n" not in message
    assert "input sample is 2 x 4 x 768 px x 768 px" in message
    assert "1..2 x 4 x 256..512 px x 256..512 px" in message and "builder_size" in message


def test_runtime_without_tensorrt_is_one_line(tmp_path, capsys, artifact):
    """An export whose U-Net is a TensorRT engine, opened where TensorRT cannot load."""
    if NO_TRT is None:
        pytest.skip("TensorRT is usable here")
    import shutil

    out = tmp_path / "trt-export"
    shutil.copytree(artifact, out)
    data = json.loads((out / "sdexport.json").read_text())
    unet = data["components"]["unet"]
    (out / "unet" / "model.plan").write_bytes(b"not really an engine")
    plan_hash = hashlib.sha256(b"not really an engine").hexdigest()
    unet.update(backend="tensorrt", files=[{"path": "unet/model.plan", "sha256": plan_hash, "bytes": 20}])
    unet["details"] = {"tensorrt": BUILT, "profiles": {k: {"min": [1, 4, 8, 8] if k == "sample" else v["min"],
                                                           "opt": v["opt"], "max": v["max"]} for k, v in PROFILES.items()}}
    (out / "sdexport.json").write_text(json.dumps(data))
    code, err = run_cli(capsys, "generate", out, "--prompt", "x", "--steps", "2", "--output", tmp_path / "x.png")
    assert_one_line_error(code, err, "TensorRT", "10.8.0.43")


def test_cuda_requested_without_cuda_provider_is_one_line(capsys, tmp_path, artifact):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    code, err = run_cli(capsys, "generate", artifact, "--prompt", "x", "--steps", "2", "--device", "cuda",
                        "--output", tmp_path / "x.png")
    assert_one_line_error(code, err, "CUDAExecutionProvider")


# --- the build and run code paths, against stand-ins for tensorrt and cuda-python --------------------


class FakeCudart(types.ModuleType):
    """cuda.bindings.runtime as far as the backend uses it: (error, value) tuples, real host memory."""

    def __init__(self):
        super().__init__("cuda.bindings.runtime")
        self.memory, self.capturing, self.launches = {}, None, 0
        self.cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)
        self.cudaStreamCaptureMode = types.SimpleNamespace(cudaStreamCaptureModeThreadLocal=2)

    def cudaGetDeviceCount(self):
        return 0, 1

    def cudaStreamCreate(self):
        return 0, 7

    def cudaGetDeviceProperties(self, device):
        return 0, types.SimpleNamespace(name=b"Fake GPU", major=8, minor=9)

    def cudaGetErrorName(self, err):
        return 0, b"cudaErrorFake"

    def cudaMalloc(self, n):
        buf = ctypes.create_string_buffer(n)
        self.memory[ctypes.addressof(buf)] = buf
        return 0, ctypes.addressof(buf)

    def cudaFree(self, ptr):
        self.memory.pop(ptr)
        return (0,)

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):
        ctypes.memmove(dst, src, n)
        return (0,)

    def cudaStreamSynchronize(self, stream):
        return (0,)

    def cudaStreamBeginCapture(self, stream, mode):
        self.capturing = []
        return (0,)

    def cudaStreamEndCapture(self, stream):
        graph, self.capturing = self.capturing, None
        return 0, graph

    def cudaGraphInstantiate(self, graph, flags):
        return 0, list(graph)

    def cudaGraphLaunch(self, graph, stream):
        self.launches += 1
        for work in graph:
            work()
        return (0,)


def _fake_tensorrt(cudart: FakeCudart, version="10.8.0.43"):
    """tensorrt as far as sdexport uses it. The "engine" computes out_sample = scale * sample, where
    scale is its one refittable weight (2 when built)."""
    import onnx

    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    ns = types.SimpleNamespace
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level=2: None})
    trt.NetworkDefinitionCreationFlag = ns(STRONGLY_TYPED=5)
    trt.BuilderFlag = ns(FP16=0, INT8=1, REFIT=2, STRIP_PLAN=3)
    trt.MemoryPoolType = ns(WORKSPACE=0)
    trt.HardwareCompatibilityLevel = ns(AMPERE_PLUS=1)
    trt.TensorIOMode = ns(INPUT=1, OUTPUT=2)
    trt.ExecutionContextAllocationStrategy = ns(USER_MANAGED=2)
    trt.DataType = ns(FLOAT=0)
    trt.nptype = lambda dtype: np.float32
    trt.Weights = lambda array: array
    trt.log = []

    class Parser:
        def __init__(self, network, logger):
            self.network, self.num_errors = network, 0

        def parse_from_file(self, path):
            model = onnx.load(path, load_external_data=False)
            self.network["inputs"] = [i.name for i in model.graph.input]
            self.network["outputs"] = [o.name for o in model.graph.output]
            return True

    class Config:
        def __init__(self):
            self.flags, self.profiles, self.builder_optimization_level = set(), [], None

        def set_flag(self, flag):
            self.flags.add(flag)

        def add_optimization_profile(self, profile):
            self.profiles.append(profile)

        def create_timing_cache(self, data):
            return ns(data=data)

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache

        def get_timing_cache(self):
            return ns(serialize=lambda: self.cache.data + b"+")

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            return {"flags": flags}

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            profile = {}
            return ns(set_shape=lambda name, lo, opt, hi: profile.__setitem__(name, (lo, opt, hi)), shapes=profile)

        def build_serialized_network(self, network, config):
            trt.log.append(("build", network["flags"], sorted(config.flags), config.profiles[0].shapes))
            return json.dumps({"inputs": network["inputs"], "outputs": network["outputs"],
                               "refit": trt.BuilderFlag.REFIT in config.flags}).encode()

    class Context:
        def __init__(self, engine):
            self.engine, self.shapes, self.addresses, self.memory = engine, {}, {}, None

        def set_device_memory(self, ptr, size):
            self.memory = (ptr, size)

        def set_input_shape(self, name, shape):
            self.shapes[name] = tuple(shape)

        def get_tensor_shape(self, name):
            return self.shapes["sample"]

        def set_tensor_address(self, name, ptr):
            self.addresses[name] = ptr

        def execute_async_v3(self, stream):
            n = int(np.prod(self.shapes["sample"]))
            src, dst, scale = self.addresses["sample"], self.addresses["out_sample"], self.engine.scale

            def work():
                x = np.ctypeslib.as_array((ctypes.c_float * n).from_address(src))
                np.ctypeslib.as_array((ctypes.c_float * n).from_address(dst))[:] = scale * x

            if cudart.capturing is not None:
                cudart.capturing.append(work)
            else:
                work()
            return True

    class Engine:
        device_memory_size_v2 = 4096

        def __init__(self, meta):
            self.meta, self.scale, self.refittable = meta, 2.0, meta["refit"]
            self.names = meta["inputs"] + meta["outputs"]
            self.num_io_tensors = len(self.names)

        def get_tensor_name(self, i):
            return self.names[i]

        def get_tensor_mode(self, name):
            return trt.TensorIOMode.INPUT if name in self.meta["inputs"] else trt.TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name):
            return trt.DataType.FLOAT

        def create_execution_context(self, strategy):
            assert strategy == trt.ExecutionContextAllocationStrategy.USER_MANAGED
            return Context(self)

    class Refitter:
        def __init__(self, engine, logger):
            self.engine, self.pending = engine, {}

        def get_all_weights(self):
            return ["scale"]

        def get_weights_prototype(self, name):
            return ns(dtype=trt.DataType.FLOAT, size=1)

        def set_named_weights(self, name, weights):
            self.pending[name] = weights
            return name == "scale"

        def get_missing_weights(self):
            return []

        def refit_cuda_engine(self):
            self.engine.scale = float(np.asarray(self.pending.get("scale", [self.engine.scale])).reshape(-1)[0])
            return True

    trt.OnnxParser = Parser
    trt.Builder = Builder
    trt.Runtime = lambda logger: ns(deserialize_cuda_engine=lambda data: Engine(json.loads(bytes(data))))
    trt.Refitter = Refitter
    trt.OnnxParserRefitter = lambda refitter, logger: ns(refit_from_file=lambda path: True, num_errors=0)
    return trt


@pytest.fixture
def fakes(monkeypatch):
    cudart = FakeCudart()
    trt = _fake_tensorrt(cudart)
    cuda = types.ModuleType("cuda")
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime, cuda.bindings = cudart, bindings
    for name, module in (("tensorrt", trt), ("cuda", cuda), ("cuda.bindings", bindings), ("cuda.bindings.runtime", cudart)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(trt_backend._Cuda, "_instance", None)
    monkeypatch.setattr(trt_backend._Scratch, "_instance", None)
    return trt, cudart


def _build_unet(tiny, tmp_path, **table):
    from sdexport.export.components import unet_spec

    source, info = tiny
    options = _with_table(_options("jetson-orin", height=64, width=64), timing_cache=str(tmp_path / "timing.cache"), **table)
    spec = unet_spec(source, info)
    # static sizes, batch left symbolic under sequential CFG (as the proposed export.py change does)
    spec = spec.static(options.trace_shape(spec), keep_batch_dynamic=True)
    root = tmp_path / "art"
    converted = TensorRTTarget().convert(spec, spec.module(), root / "unet", options, "fp16")
    component = Component(name="unet", role="unet", backend="tensorrt",
                          files=tuple(FileRef.of(root, f) for f in converted.files), precision=converted.precision,
                          inputs=converted.inputs, outputs=converted.outputs, details=converted.details)
    return root, component, converted


def _feeds(n=1, h=8):
    gen = np.random.default_rng(0)
    return {"sample": gen.standard_normal((n, 4, h, h), np.float32), "timestep": np.full((n,), 500.0, np.float32),
            "encoder_hidden_states": gen.standard_normal((n, 77, 32), np.float32)}


def test_build_records_what_the_runtime_checks(fakes, tiny, tmp_path):
    trt, _ = fakes
    root, component, converted = _build_unet(tiny, tmp_path)
    (_, flags, builder_flags, shapes), = trt.log
    assert flags == 1 << 5 and builder_flags == []  # strongly typed: the fp16 graph decides precisions
    assert shapes["sample"] == ((1, 4, 8, 8),) * 3  # static 64x64, batch 1, sequential CFG: N = B = 1
    d = converted.details
    assert d["tensorrt"] == {"version": "10.8.0.43", "gpu": "Fake GPU", "compute_capability": "8.9",
                             "hardware_compatibility": "none", "version_compatible": False, "typing": "strong"}
    assert d["device_memory_size"] == 4096 and d["profiles"]["sample"]["min"] == [1, 4, 8, 8]
    assert [f.name for f in converted.files] == ["model.plan"] and converted.precision == "fp16"
    assert (tmp_path / "timing.cache").read_bytes() == b"+"  # written back after the build


def test_session_runs_replays_and_checks(fakes, tiny, tmp_path):
    trt, cudart = fakes
    root, component, _ = _build_unet(tiny, tmp_path)
    session = trt_backend.TensorRTSession(component, root, SessionOptions())
    feeds = _feeds()
    for _ in range(3):  # plain run, capture, replay
        out = session.run(feeds)["out_sample"]
        np.testing.assert_array_equal(out, 2 * feeds["sample"])
    assert cudart.launches == 2  # the second call ran the captured graph, the third replayed it
    assert session.context.memory == (session.scratch.ptr, 4096)
    with pytest.raises(BackendError, match=r"input sample is 2 x 4 x 8 x 8, outside this engine's profile \(1 x 4 x 8 x 8\)"):
        session.run(_feeds(n=2))


def test_scratch_is_shared_and_grows(fakes, tiny, tmp_path):
    trt, cudart = fakes
    root, component, _ = _build_unet(tiny, tmp_path)
    a = trt_backend.TensorRTSession(component, root, SessionOptions())
    big = dataclasses.replace(component, details={**component.details, "device_memory_size": 1 << 20})
    a.run(_feeds())
    a.run(_feeds())
    assert a._buffers and next(iter(a._buffers.values()))["graph"] is not None
    scratch = a.scratch
    scratch.reserve(1 << 20)  # a larger engine opens: one allocation, re-pointed, graphs dropped
    b = trt_backend.TensorRTSession(big, root, SessionOptions())
    assert b.scratch is scratch and scratch.size == 1 << 20
    assert a.context.memory == b.context.memory == (scratch.ptr, 1 << 20)
    assert next(iter(a._buffers.values()))["graph"] is None
    np.testing.assert_array_equal(a.run(_feeds())["out_sample"], 2 * _feeds()["sample"])


def test_refit_from_a_refit_set(fakes, tiny, tmp_path):
    from safetensors.numpy import save_file

    trt, _ = fakes
    root, component, converted = _build_unet(tiny, tmp_path, refittable=True)
    names = [f.name for f in converted.files]
    assert names[0] == "model.plan" and "model.onnx" in names and "weights.json" in names
    assert converted.details["refit"] == {"weights": "weights.json", "stripped": True, "source": "model.onnx",
                                          "refittable_weights": 1}
    session = trt_backend.TensorRTSession(component, root, SessionOptions())  # refitted from model.onnx on open
    feeds = _feeds()
    session.run(feeds)
    session.run(feeds)
    assert session.refit({"scale": np.array([3.0], np.float32)}) == 1
    np.testing.assert_array_equal(session.run(feeds)["out_sample"], 3 * feeds["sample"])
    # a refit set keyed by diffusers names: nothing of it maps onto the stand-in's one weight
    save_file({"unet.conv_in.weight": np.zeros((32, 4, 3, 3), np.float32)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(BackendError, match="cannot refit unet.conv_in.weight"):
        session.refit(tmp_path / "lora.safetensors")
    weight_map = json.loads((root / "unet" / "weights.json").read_text())
    assert weight_map["prefix"] == "unet" and weight_map["refittable"] == 0 and weight_map["weights"]


def test_engine_from_another_tensorrt_is_refused_before_loading(fakes, tiny, tmp_path):
    trt, _ = fakes
    root, component, _ = _build_unet(tiny, tmp_path)
    trt.__version__ = "10.9.0.34"
    with pytest.raises(BackendError, match="built for Fake GPU .* with TensorRT 10.8.0.43; this machine has .* TensorRT 10.9.0.34"):
        trt_backend.TensorRTSession(component, root, SessionOptions())


def test_engine_details_are_plain_json():
    settings = EngineSettings(refittable=True, hardware_compatibility="ampere_plus")
    details = engine_details({"version": "10.8.0", "device_memory_size": 10, "refittable_weights": ["a", "b"]},
                             {"gpu": "G", "compute_capability": "8.6"}, PROFILES, settings, "fp16", {"onnx": "x"})
    assert json.loads(json.dumps(details)) == details
    assert details["refit"]["refittable_weights"] == 2 and details["tensorrt"]["hardware_compatibility"] == "ampere_plus"


# --- real TensorRT ---------------------------------------------------------------------------------------


@pytest.mark.skipif(NO_TRT is not None, reason=NO_TRT or "")
def test_real_engine_matches_torch(tiny, tmp_path):
    """Where TensorRT and a GPU exist: build the tiny U-Net's fp16 engine, run it, compare with torch."""
    import torch

    from runtime.metrics import psnr
    from sdexport.export.components import unet_spec

    root, component, _ = _build_unet(tiny, tmp_path)
    session = trt_backend.TensorRTSession(component, root, SessionOptions())
    feeds = _feeds()
    got = session.run(feeds)["out_sample"]
    again = session.run(feeds)["out_sample"]  # CUDA-graph replay
    source, info = tiny
    module = unet_spec(source, info).module()
    with torch.no_grad():
        expected = module(*(torch.from_numpy(feeds[k]) for k in ("sample", "timestep", "encoder_hidden_states"))).numpy()
    assert psnr(expected, got) >= 30.0
    np.testing.assert_array_equal(got, again)
