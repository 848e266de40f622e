"""``--optimize gpu``: onnxruntime.transformers fusions on the fp32 export, then fp16 with fp32 islands.

Here (CPU): the optimizer runs on the tiny exports and produces the fused ops listed below; the fusions
that also have CPU kernels are checked against the plain graph numerically; the overflow probe keeps
fp16-overflowing nodes in fp32. The CUDA-only graph (NhwcConv, GroupNorm, ...) is compared with torch
where onnxruntime has the CUDA provider, and skipped with the reason elsewhere.
"""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxruntime.transformers.optimizer")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from runtime.metrics import psnr  # noqa: E402
from sdexport.errors import ExportError  # noqa: E402
from sdexport.export.targets import onnx_gpu  # noqa: E402
from sdexport.export.targets.onnx_gpu import GpuOptimization, optimize_for_gpu  # noqa: E402
from tests.test_device_loop import tiny_onnx_export  # noqa: E402

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()
NO_CUDA = "onnxruntime here has no CUDAExecutionProvider: the fused graph's NhwcConv/GroupNorm run only on CUDA"

# What onnxruntime.transformers (1.32) fuses in the tiny SD1 components (toy widths: 32/64 channels,
# so no BiasSplitGelu/BiasAdd, whose CUDA kernels take SD's 320/640/1280 channels only).
EXPECTED_CUDA = {
    "unet": {"MultiHeadAttention", "GroupNorm", "SkipGroupNorm", "NhwcConv", "SkipLayerNormalization", "Gelu"},
    "text_encoder": {"SkipLayerNormalization", "QuickGelu"},
    "vae_decoder": {"GroupNorm", "SkipGroupNorm", "NhwcConv"},
}
EXPECTED_PORTABLE = {
    "unet": {"Attention", "MultiHeadAttention", "SkipLayerNormalization", "Gelu"},
    "text_encoder": {"SkipLayerNormalization", "QuickGelu"},
    "vae_decoder": set(),
}


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tiny_sd1):
    return tiny_onnx_export(tmp_path_factory, tiny_sd1)


def _feeds(name: str) -> dict[str, np.ndarray]:
    gen = np.random.default_rng(0)
    if name == "unet":
        return {"sample": gen.standard_normal((2, 4, 8, 8), np.float32), "timestep": np.array([981.0, 981.0], np.float32),
                "encoder_hidden_states": gen.standard_normal((2, 77, 32), np.float32)}
    if name == "text_encoder":
        ids = gen.integers(0, 49406, (2, 77)).astype(np.int64)
        ids[:, 0], ids[:, 9:] = 49406, 49407
        return {"input_ids": ids}
    return {"latent_sample": gen.standard_normal((1, 4, 8, 8), np.float32)}


ROLES = {"unet": "unet", "text_encoder": "text_encoder", "vae_decoder": "vae_decoder"}


def _run(model: onnx.ModelProto, feeds, providers=("CPUExecutionProvider",)):
    return ort.InferenceSession(model.SerializeToString(), providers=list(providers)).run(None, feeds)[0]


@pytest.fixture(scope="module")
def optimized(artifact, tmp_path_factory):
    """Each tiny component optimised for CUDA (fp16, overflow probe on)."""
    out = {}
    for name, role in ROLES.items():
        model = onnx.load(str(artifact / name / "model.onnx"))
        out[name] = optimize_for_gpu(model, role, "fp16", tmp_path_factory.mktemp(f"gpu-{name}"), probe_feeds=_feeds(name))
    return out


def test_numpy_guard():
    onnx_gpu.check_numpy("2.3.5")
    with pytest.raises(ExportError, match=r"numpy 2\.5\.0.*numpy<2\.5"):
        onnx_gpu.check_numpy("2.5.0")


@pytest.mark.parametrize("name", list(ROLES))
def test_cuda_fusions_on_tiny_exports(optimized, name):
    model, details = optimized[name]
    assert set(details["fused_ops"]) == EXPECTED_CUDA[name], details["fused_ops"]
    assert details["model_type"] == onnx_gpu.MODEL_TYPES[name]
    # fp16 inside, float32 at the boundary (the runtime feeds float32)
    types = {i.data_type for i in model.graph.initializer}
    assert TensorProto.FLOAT16 in types
    assert all(v.type.tensor_type.elem_type in (TensorProto.FLOAT, TensorProto.INT64)
               for v in list(model.graph.input) + list(model.graph.output))
    # onnxruntime's CUDA GroupNorm takes float32 gamma/beta only
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in ("GroupNorm", "SkipGroupNorm"):
            assert all(inits[n].data_type == TensorProto.FLOAT for n in node.input[1:3] if n in inits)
    if name == "text_encoder":
        # the causal mask's -inf/-3.4e38 trips the probe; the nodes touching it stay float32
        assert details["fp32_islands"]["overflow_probe"]["tensors"] > 0 and details["fp32_islands"]["nodes"] > 0


@pytest.mark.parametrize("name", ["unet", "vae_decoder"])
def test_cuda_only_graph_is_not_validated_on_cpu(optimized, name):
    model, details = optimized[name]
    assert details["requires"] == "CUDAExecutionProvider" and "NhwcConv" in details["cuda_only_ops"]
    with pytest.raises(Exception, match="NOT_IMPLEMENTED|Could not find an implementation"):
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    providers, reason = onnx_gpu.validation_providers(details, ["CPUExecutionProvider"])
    assert providers is None and "onnxruntime-gpu" in reason and "NhwcConv" in reason
    providers, reason = onnx_gpu.validation_providers(details, ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert providers[0] == "CUDAExecutionProvider" and reason is None
    assert onnx_gpu.validation_providers({"optimize": "gpu"}, ["CPUExecutionProvider"]) == (None, None)


@pytest.mark.parametrize("name", list(ROLES))
def test_portable_fusions_keep_the_numbers(artifact, tmp_path, name):
    """Fusions with CPU kernels: fp32 equal to the plain graph to rounding, fp16 within 35 dB PSNR."""
    plain = onnx.load(str(artifact / name / "model.onnx"))
    feeds = _feeds(name)
    reference = _run(plain, feeds)
    portable = GpuOptimization(cuda_ops=False)
    fused32, details = optimize_for_gpu(plain, ROLES[name], "fp32", tmp_path / "a", options=portable)
    assert set(details["fused_ops"]) == EXPECTED_PORTABLE[name] and not details["cuda_only_ops"]
    got = _run(fused32, feeds)
    assert np.max(np.abs(got - reference)) <= 1e-5 * np.max(np.abs(reference))
    fused16, _ = optimize_for_gpu(plain, ROLES[name], "fp16", tmp_path / "b", probe_feeds=feeds, options=portable)
    got16 = _run(fused16, feeds)
    assert got16.dtype == np.float32 and psnr(reference, got16) >= 35.0


def _overflow_model() -> onnx.ModelProto:
    """y = relu(x * 200 * 200 / 200 / 200): the middle tensor overflows fp16 for |x| > 1.6."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    k = numpy_helper.from_array(np.array([200.0], np.float32), "k")
    nodes = [helper.make_node("Mul", ["x", "k"], ["s1"], name="up1"),
             helper.make_node("Mul", ["s1", "k"], ["s2"], name="up2"),
             helper.make_node("Div", ["s2", "k"], ["s3"], name="down1"),
             helper.make_node("Div", ["s3", "k"], ["s4"], name="down2"),
             helper.make_node("Relu", ["s4"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "overflow", [x], [y], [k])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_overflow_probe_makes_fp32_islands():
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = _overflow_model()
    feeds = {"x": np.array([1.0, -2.0, 3.0, 0.5], np.float32)}
    hot = onnx_gpu.overflow_tensors(model, feeds)
    assert set(hot) == {"s2"} and hot["s2"] == pytest.approx(1.2e5)
    nodes = onnx_gpu._island_nodes(model, list(hot))
    assert nodes == ["up2", "down1"]
    islanded = onnx_gpu.to_fp16(OnnxModel(onnx.load_from_string(model.SerializeToString())), (), nodes)
    np.testing.assert_allclose(_run(islanded, feeds), [1.0, 0.0, 3.0, 0.5], rtol=1e-3)
    naive = onnx_gpu.to_fp16(OnnxModel(onnx.load_from_string(model.SerializeToString())))

    def hot_edge(m):
        """(does down1 read up2's output directly, that tensor's element type)"""
        up, down = (next(n for n in m.graph.node if n.name == name) for name in ("up2", "down1"))
        elem = next(v.type.tensor_type.elem_type for v in m.graph.value_info if v.name == up.output[0])
        return up.output[0] in down.input, elem

    # the overflowing tensor stays float32 between the two islanded nodes (ORT's CPU provider
    # upcasts fp16 arithmetic anyway, so the overflow itself would only show on a GPU)
    assert hot_edge(islanded) == (True, TensorProto.FLOAT)
    assert hot_edge(naive) == (True, TensorProto.FLOAT16)


def _geglu_model(d: int) -> onnx.ModelProto:
    """MatMul + bias, then GEGLU with constant slice bounds, as our clean export writes it."""
    inp = helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, 16, 8])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 16, d // 2])
    gen = np.random.default_rng(0)
    inits = [numpy_helper.from_array(gen.standard_normal((8, d)).astype(np.float32), "w"),
             numpy_helper.from_array(gen.standard_normal(d).astype(np.float32), "b"),
             numpy_helper.from_array(np.array([0], np.int64), "zero"),
             numpy_helper.from_array(np.array([d // 2], np.int64), "half"),
             numpy_helper.from_array(np.array([d], np.int64), "full"),
             numpy_helper.from_array(np.array([-1], np.int64), "last")]
    nodes = [helper.make_node("MatMul", ["h", "w"], ["mm"], name="mm"),
             helper.make_node("Add", ["b", "mm"], ["biased"], name="add"),
             helper.make_node("Slice", ["biased", "zero", "half", "last"], ["lo"], name="slice_lo"),
             helper.make_node("Slice", ["biased", "half", "full", "last"], ["hi"], name="slice_hi"),
             helper.make_node("Gelu", ["hi"], ["g"], name="gelu", domain="com.microsoft"),
             helper.make_node("Mul", ["lo", "g"], ["out"], name="mul")]
    graph = helper.make_graph(nodes, "geglu", [inp], [out], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


@pytest.mark.parametrize("d, fused", [(2560, 1), (5120, 1), (256, 0)])
def test_bias_split_gelu_with_constant_bounds(d, fused):
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = OnnxModel(_geglu_model(d))
    assert onnx_gpu.fuse_bias_split_gelu(model) == fused
    ops = [n.op_type for n in model.model.graph.node]
    if fused:
        assert ops == ["MatMul", "BiasSplitGelu"]
        node = model.model.graph.node[1]
        assert list(node.input) == ["mm", "b"] and list(node.output) == ["out"] and node.domain == "com.microsoft"
    else:  # the CUDA kernel takes 2560/5120/10240 only: a toy width stays unfused
        assert "BiasSplitGelu" not in ops


def test_unknown_role_and_precision_are_refused(artifact, tmp_path):
    model = onnx.load(str(artifact / "text_encoder" / "model.onnx"))
    with pytest.raises(ExportError, match="no fusions"):
        optimize_for_gpu(model, "safety_checker", "fp16", tmp_path)
    with pytest.raises(ExportError, match="int8"):
        optimize_for_gpu(model, "text_encoder", "int8", tmp_path)


@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA)
def test_fused_fp16_unet_matches_torch_on_cuda(optimized, tiny_sd1):
    import torch

    from sdexport.export.components import model_info, unet_spec
    from sdexport.sources.diffusers import DiffusersSource

    source = DiffusersSource.open(tiny_sd1)
    module = unet_spec(source, model_info(source)).module()
    feeds = _feeds("unet")
    with torch.no_grad():
        expected = module(*(torch.from_numpy(feeds[k]) for k in ("sample", "timestep", "encoder_hidden_states"))).numpy()
    model, _ = optimized["unet"]
    got = _run(model, feeds, ("CUDAExecutionProvider", "CPUExecutionProvider"))
    assert psnr(expected, got) >= 30.0


# --- valid by construction (issue 17, item 1) --------------------------------------------------------


def _shared_constant_model() -> onnx.ModelProto:
    """One Constant read by two Resize scales (fp32 by rule) and by two nodes kept fp32 as islands:
    what torch 2.11's exporter writes for the VAE decoder's upsamplers, in small."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 16, 16])
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32))
    nodes = [helper.make_node("Constant", [], ["/up/Constant_output_0"], name="/up/Constant", value=scales),
             helper.make_node("Resize", ["x", "", "/up/Constant_output_0"], ["r1"], name="resize1", mode="nearest"),
             helper.make_node("Relu", ["x"], ["x2"], name="relu"),
             helper.make_node("Resize", ["x2", "", "/up/Constant_output_0"], ["r2"], name="resize2", mode="nearest"),
             helper.make_node("ReduceMax", ["/up/Constant_output_0"], ["m"], name="island_a", keepdims=1),
             helper.make_node("Mul", ["/up/Constant_output_0", "m"], ["k"], name="island_b"),
             helper.make_node("Add", ["r1", "r2"], ["s"], name="add"),
             helper.make_node("ReduceMean", ["k"], ["km"], name="mean", keepdims=1),
             helper.make_node("Mul", ["s", "km"], ["y"], name="mul")]
    graph = helper.make_graph(nodes, "shared", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _assert_unique(model: onnx.ModelProto) -> None:
    names = [n.name for n in model.graph.node if n.name]
    outputs = [o for n in model.graph.node for o in n.output if o]
    assert len(names) == len(set(names)) and len(outputs) == len(set(outputs))


def test_one_constant_feeding_two_fp32_islands_gives_a_valid_graph():
    """onnxruntime <= 1.31 wrote two `<constant>_cast_to_fp32_node` Casts here (the H200 run's VAE
    error); any version's output must pass onnx.checker (node order included) and load."""
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = _shared_constant_model()
    x = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    reference = _run(model, {"x": x})
    converted = onnx_gpu.to_fp16(OnnxModel(model), (), ["island_a", "island_b"])
    _assert_unique(converted)
    onnx.checker.check_model(converted, full_check=True)
    assert onnx_gpu.check_loadable(converted) == "loads"
    np.testing.assert_allclose(_run(converted, {"x": x}), reference, rtol=2e-3, atol=2e-3)


def _as_onnxruntime_131_writes_it() -> onnx.ModelProto:
    """The converter output of onnxruntime 1.31.1 for the graph above (one Cast per consumer)."""
    model = _shared_constant_model()
    nodes = list(model.graph.node)
    cast = helper.make_node("Cast", ["/up/Constant_output_0"], ["/up/Constant_output_0_cast_to_fp32"], to=1,
                            name="/up/Constant_output_0_cast_to_fp32_node")
    for node in nodes:
        for i, name in enumerate(node.input):
            if name == "/up/Constant_output_0":
                node.input[i] = "/up/Constant_output_0_cast_to_fp32"
    info = helper.make_tensor_value_info("/up/Constant_output_0_cast_to_fp32", TensorProto.FLOAT, [4])
    graph = helper.make_graph(nodes[:1] + [cast, copy_node(cast)] + nodes[1:], "shared", list(model.graph.input),
                              list(model.graph.output), value_info=[info, info])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def copy_node(node):
    twin = onnx.NodeProto()
    twin.CopyFrom(node)
    return twin


def test_unique_names_repairs_duplicate_casts():
    model = _as_onnxruntime_131_writes_it()
    with pytest.raises(Exception, match="two nodes with same node name"):
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert onnx_gpu.unique_names(model) == 1
    _assert_unique(model)
    assert [v.name for v in model.graph.value_info] == ["/up/Constant_output_0_cast_to_fp32"]
    assert onnx_gpu.check_loadable(model) == "loads"


def test_unique_names_renames_distinct_nodes_and_refuses_two_writers():
    model = _shared_constant_model()
    model.graph.node[2].name = model.graph.node[1].name  # relu shares resize1's name
    assert onnx_gpu.unique_names(model) == 1
    _assert_unique(model)
    assert model.graph.node[2].name == "resize1_1"
    model.graph.node[2].output[0] = "r1"  # two different nodes writing one tensor: not repairable
    with pytest.raises(ExportError, match="both write 'r1'"):
        onnx_gpu.unique_names(model)


def test_load_check_refuses_invalid_graphs():
    model = _as_onnxruntime_131_writes_it()
    with pytest.raises(ExportError, match="cannot load"):
        onnx_gpu.check_loadable(model)


@pytest.mark.parametrize("name", list(ROLES))
def test_optimized_components_pass_the_load_checks(optimized, name):
    """The real --optimize gpu path on the tiny SD1 components (the VAE decoder with SD 1.5's four up
    blocks and three upsamplers): names unique, onnx.checker clean, a CPU session stops at the CUDA-only
    kernels at most."""
    model, details = optimized[name]
    _assert_unique(model)
    onnx.checker.check_model(model)
    expected = "loads up to CUDA-only kernels" if details["cuda_only_ops"] else "loads"
    assert details["load_check"] == expected == onnx_gpu.check_loadable(model)
