"""Core ML target: packages, attention rewrite, compression, errors; predictions where macOS is.

On Linux coremltools converts and saves ``.mlpackage`` folders but cannot predict: the tests here check
what the packages declare and contain (names, shapes, dtypes against the manifest; split-einsum ops;
compressed-weight ops and sizes) and that the split-einsum rewrite is the stock model in torch. The
prediction tests at the end run on a Mac only and are skipped with the reason elsewhere.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from runtime.backends import BackendError, open_session
from runtime.manifest import Manifest
from runtime.metrics import psnr
from sdexport.export.attention import UnsupportedAttention, attention_implementation, split_einsum
from sdexport.export.components import (
    Shape,
    controlnet_spec,
    model_info,
    text_encoder_spec,
    unet_spec,
    vae_decoder_spec,
    vae_encoder_spec,
)
from sdexport.errors import ExportError, OptionError
from sdexport.export.run import export
from sdexport.sources.diffusers import ControlNetSource, DiffusersSource
from sdexport.export.targets.base import ExportOptions
from sdexport.options import BackendOptions, CoreMLOptions
from sdexport.export.targets.coreml import (
    COMPRESSION,
    PACKAGE,
    CoreMLTarget,
    compress,
    compressed_weight_count,
    coremltools,
    declared_io,
    mil_op_counts,
    quiet_coremltools,
)
from tests.test_cli_errors import assert_one_line_error, no_partial_dirs, run_cli

SIZE = 64
ON_MAC = sys.platform == "darwin"
MAC_ONLY = pytest.mark.skipif(not ON_MAC, reason="Core ML prediction needs macOS; this is " + sys.platform)
MIN_PSNR = 35.0  # Apple's gate for a converted component against PyTorch
# Conversion needs coremltools (the coreml extra); the torch-side and backend tests do not.
NEEDS_CT = pytest.mark.skipif(importlib.util.find_spec("coremltools") is None,
                              reason="coremltools is not installed: pip install 'sdexport[coreml]'")




def coreml_options(attention: str, compress: str | None = None, precision: str = "fp16", **coreml) -> ExportOptions:
    return ExportOptions(target="coreml", precision=precision, height=SIZE, width=SIZE, validate=True,
                         coreml=CoreMLOptions(attention=attention, compress=compress, **coreml))


@pytest.fixture(scope="module")
def stock_export(tmp_path_factory, tiny_sd1, tiny_controlnets) -> Path:
    """sd1 with a ControlNet, stock attention, fp16, no compression: the GPU flavour."""
    out = tmp_path_factory.mktemp("coreml-stock") / "out"
    options = dataclasses.replace(coreml_options("original"), controlnets=(f"edges={tiny_controlnets['edges']}",))
    export(tiny_sd1, out, options, progress=False)
    return out


@pytest.fixture(scope="module")
def ane_export(tmp_path_factory, tiny_sd1) -> Path:
    """sd1, split-einsum attention, fp16, 6-bit palettized: the Neural Engine flavour."""
    out = tmp_path_factory.mktemp("coreml-ane") / "out"
    export(tiny_sd1, out, coreml_options("split-einsum", "palettize6"), progress=False)
    return out


def open_package(path: Path):
    """A saved package as coremltools sees it on Linux: its spec and weights, not loadable for prediction."""
    ct = coremltools()
    with quiet_coremltools():
        return ct.models.MLModel(str(path), skip_model_load=True)


def load_package(root: Path, component):
    return open_package(root / component.name / PACKAGE)


def attention_heads(module: torch.nn.Module) -> int:
    """Heads of all diffusers attention layers: the split-einsum graph has two einsums per head."""
    return sum(m.heads for m in module.modules() if type(m).__name__ == "Attention")


def linears_outside_transformers(module: torch.nn.Module) -> int:
    """nn.Linear layers the split-einsum rewrite leaves alone (time embeddings, ResNet time projections)."""
    inside = {id(m) for t in module.modules() if type(t).__name__ == "Transformer2DModel" for m in t.modules()}
    return sum(isinstance(m, torch.nn.Linear) and id(m) not in inside for m in module.modules())


# --- the packages against the manifest ----------------------------------------------------------


@NEEDS_CT
@pytest.mark.parametrize("which", ["stock_export", "ane_export"])
@pytest.mark.slow
def test_packages_declare_what_the_manifest_says(request, which):
    root = request.getfixturevalue(which)
    m = Manifest.load(root)  # every listed file present with its size
    expected = {"text_encoder", "unet", "vae_encoder", "vae_decoder"}
    if which == "stock_export":
        expected |= {"unet_control", "controlnet/edges"}
    assert set(m.components) == expected
    for c in m.components.values():
        assert c.backend == "coreml" and c.precision == "fp16"
        assert c.main_file.path == f"{c.name}/{PACKAGE}/Manifest.json"
        inputs, outputs = declared_io(load_package(root, c))
        assert inputs == c.inputs and outputs == c.outputs, c.name  # names, dtypes, static shapes
        assert all(isinstance(d, int) for t in c.inputs + c.outputs for d in t.shape)
        assert c.details["minimum_deployment_target"] == "macOS14" and c.details["format"] == "mlprogram"
    te = m.component("text_encoder")
    assert te.inputs[0].describe() == "input_ids: int32[1, 77]"  # Core ML has no int64 inputs
    unet = m.component("unet")
    assert [t.describe() for t in unet.inputs] == [
        "sample: float32[2, 4, 8, 8]", "timestep: float32[2]", "encoder_hidden_states: float32[2, 77, 32]"]
    assert [t.describe() for t in unet.outputs] == ["out_sample: float32[2, 4, 8, 8]"]
    assert m.component("vae_decoder").outputs[0].describe() == "sample: float32[1, 3, 64, 64]"


@NEEDS_CT
@pytest.mark.slow
def test_control_unet_and_controlnet_use_the_residual_layout(stock_export):
    m = Manifest.load(stock_export)
    info = m.model
    residuals = [t for t in m.component("unet_control").inputs if "residual" in t.name]
    outputs = m.component("controlnet/edges").outputs
    assert len(residuals) == len(outputs) == len(info.control_residuals) == 5
    for res, out, (channels, down) in zip(residuals, outputs, info.control_residuals):
        side = SIZE // info.vae_scale_factor // down
        assert res.shape == out.shape == (2, channels, side, side)
    assert [t.name for t in residuals][-1] == "mid_block_additional_residual"
    assert m.component("controlnet/edges").inputs[-1].describe() == "conditioning_scale: float32[5]"
    assert m.component("unet_control").details["control_inputs"] is True


@NEEDS_CT
@pytest.mark.slow
def test_attention_variant_is_in_the_program(stock_export, ane_export, tiny_sd1):
    stock, ane = Manifest.load(stock_export), Manifest.load(ane_export)
    for name in ("text_encoder", "unet", "vae_decoder"):
        plain = mil_op_counts(load_package(stock_export, stock.component(name)))
        split = mil_op_counts(load_package(ane_export, ane.component(name)))
        assert plain["einsum"] == 0 and split["einsum"] > 0, name
        assert ane.component(name).details["attention"]["implementation"] == "split-einsum"
    unet = mil_op_counts(load_package(ane_export, ane.component("unet")))
    source = DiffusersSource.open(tiny_sd1)
    module = unet_spec(source, model_info(source)).module()
    # every attention one head at a time (2 einsums per head), every projection in them a 1x1 convolution
    assert unet["einsum"] == 2 * attention_heads(module) == 2 * 8 * 2 * 4  # 8 heads, 2 attentions, 4 transformers
    assert unet["linear"] == linears_outside_transformers(module) == 10
    assert ane.component("unet").details["attention"]["rewritten"] == {"Transformer2DModel": 4}
    assert ane.component("unet").details["compute_units"] == "cpu-and-ne"
    assert stock.component("unet").details["compute_units"] == "cpu-and-gpu"


@NEEDS_CT
@pytest.mark.slow
def test_palettized_export_has_lookup_tables_and_shrinks(ane_export):
    m = Manifest.load(ane_export)
    for c in m.components.values():
        info = c.details["compression"]
        counts = mil_op_counts(load_package(ane_export, c))
        assert counts["constexpr_lut_to_dense"] == info["compressed_weights"] > 0, c.name
        assert info["mode"] == "palettize6" and info["package_bytes"] == c.size_bytes
        assert info["uncompressed_bytes"] / c.size_bytes == pytest.approx(info["ratio"], rel=1e-3)
        assert info["ratio"] > 1.5, (c.name, info)


@pytest.fixture(scope="module")
def text_encoder_package(tmp_path_factory, tiny_sd1) -> Path:
    """The tiny text encoder, fp16: nearly all its bytes are one 49408x32 token embedding."""
    source = DiffusersSource.open(tiny_sd1)
    spec = text_encoder_spec(source, model_info(source))
    options = coreml_options("original")
    out = tmp_path_factory.mktemp("coreml-te")
    CoreMLTarget().convert(spec.static(options.trace_shape(spec)), spec.module(), out, options, "fp16")
    return out / PACKAGE


# Bits per weight element each mode stores: palettes cost ~0 per element, int8 rows carry an fp16
# scale and an int8 zero point per output channel (the embedding's rows are 32 wide).
EXPECTED_BITS = {"palettize4": 4, "palettize6": 6, "palettize8": 8, "linear8": 8 + 24 / 32}


@NEEDS_CT
@pytest.mark.parametrize("mode", list(COMPRESSION))
@pytest.mark.slow
def test_each_compression_mode(text_encoder_package, tmp_path, mode):
    ct = coremltools()
    with quiet_coremltools():
        model = ct.models.MLModel(str(text_encoder_package), skip_model_load=True)
        compressed = compress(ct, model, mode)
        compressed.save(str(tmp_path / "c.mlpackage"))
    counts = mil_op_counts(compressed)
    op = "constexpr_lut_to_dense" if mode.startswith("palettize") else "constexpr_affine_dequantize"
    assert counts[op] == compressed_weight_count(counts, mode) >= 1  # the iOS16/17 ops at macOS14
    weights = "Data/com.apple.CoreML/weights/weight.bin"
    ratio = (text_encoder_package / weights).stat().st_size / (tmp_path / "c.mlpackage" / weights).stat().st_size
    ideal = 16 / EXPECTED_BITS[mode]
    print(f"{mode}: weights shrink {ratio:.2f}x (ideal for the embedding {ideal:.2f}x)")
    assert 0.95 * ideal <= ratio <= 1.01 * ideal


@NEEDS_CT
@pytest.mark.slow
def test_sd2_unet_with_linear_projections_converts_at_fp32(tmp_path, tiny_sd2v):
    """sd2-v: linear proj_in/proj_out and 2/4 heads per block; fp32 weights and compute."""
    source = DiffusersSource.open(tiny_sd2v)
    spec = unet_spec(source, model_info(source))
    options = coreml_options("split-einsum", precision="fp32")
    module = spec.module()
    converted = CoreMLTarget().convert(spec.static(options.trace_shape(spec)), module, tmp_path, options, "fp32")
    assert [t.name for t in converted.inputs] == ["sample", "timestep", "encoder_hidden_states"]
    assert converted.details["compute_units"] == "cpu-and-gpu"  # the Neural Engine runs fp16 only
    counts = mil_op_counts(open_package(tmp_path / PACKAGE))
    assert counts["einsum"] == 2 * attention_heads(module) == 2 * 2 * (2 + 4 + 2 * 2)  # heads per block: 2, 4, 2, 2
    assert counts["linear"] == linears_outside_transformers(module)


# --- the split-einsum rewrite in torch ----------------------------------------------------------


def _outputs(module, example):
    with torch.no_grad():
        out = module(*example)
    return out if isinstance(out, tuple) else (out,)


def _assert_rewrite_matches(module, example, atol=1e-4):
    expected = _outputs(module, example)
    with attention_implementation(module, "split-einsum") as report:
        got = _outputs(module, example)
    assert report["rewritten"]
    err = max((a - b).abs().max().item() for a, b in zip(expected, got))
    assert err <= atol, err
    again = _outputs(module, example)  # the stock modules are back
    assert all(torch.equal(a, b) for a, b in zip(expected, again))
    return err


@pytest.mark.parametrize("kind", ["sd1", "sd2-v"])
def test_split_einsum_equals_stock_on_tiny_models(request, tiny_controlnets, kind):
    source = DiffusersSource.open(request.getfixturevalue("tiny_sd1" if kind == "sd1" else "tiny_sd2v"))
    info = model_info(source)
    specs = [text_encoder_spec(source, info), unet_spec(source, info), unet_spec(source, info, control=True),
             vae_encoder_spec(source, info), vae_decoder_spec(source, info)]
    if kind == "sd1":
        specs.append(controlnet_spec(ControlNetSource.parse(f"edges={tiny_controlnets['edges']}"), info))
    for spec in specs:
        example = spec.example(Shape(1, SIZE, SIZE), torch.Generator().manual_seed(3))
        err = _assert_rewrite_matches(spec.module().eval(), example)
        print(f"{kind} {spec.name}: max abs error {err:.2e}")


def test_split_einsum_equals_stock_on_an_sd15_block():
    """One SD 1.5 down block at full width: 320 channels, 8 heads of 40, cross-attention from 768, 64x64 latents."""
    from diffusers.models.unets.unet_2d_blocks import CrossAttnDownBlock2D

    torch.manual_seed(0)
    block = CrossAttnDownBlock2D(in_channels=320, out_channels=320, temb_channels=1280, num_layers=2,
                                 resnet_groups=32, cross_attention_dim=768, num_attention_heads=8).eval()

    class Wrapper(torch.nn.Module):  # the block returns (hidden, (states...)): flatten for comparison
        def __init__(self):
            super().__init__()
            self.block = block

        def forward(self, x, temb, context):
            h, states = self.block(x, temb, encoder_hidden_states=context)
            return (h, *states)

    gen = torch.Generator().manual_seed(1)
    example = (torch.randn(1, 320, 64, 64, generator=gen), torch.randn(1, 1280, generator=gen),
               torch.randn(1, 77, 768, generator=gen))
    err = _assert_rewrite_matches(Wrapper(), example)
    print(f"SD 1.5 CrossAttnDownBlock2D: max abs error {err:.2e}")


def test_split_einsum_kernel_equals_sdpa():
    gen = torch.Generator().manual_seed(0)
    heads, dim, sq, sk = 3, 5, 7, 11
    q, k, v = (torch.randn(2, heads * dim, 1, s, generator=gen) for s in (sq, sk, sk))
    mask = torch.randn(2, sk, 1, sq, generator=gen)
    got = split_einsum(q, k, v, heads, dim**-0.5, mask)  # (B, C, 1, Sq)
    split = lambda x: x.squeeze(2).view(2, heads, dim, -1).transpose(2, 3)  # noqa: E731  (B, heads, S, dim)
    expected = torch.nn.functional.scaled_dot_product_attention(
        split(q), split(k), split(v), attn_mask=mask.squeeze(2).transpose(1, 2).unsqueeze(1))
    assert torch.allclose(got, expected.transpose(2, 3).reshape(2, heads * dim, 1, sq), atol=1e-6)


def test_unsupported_attention_is_named():
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    holder = torch.nn.Module()
    holder.attn = Transformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=32, norm_num_groups=8,
                                     cross_attention_dim=32, norm_type="ada_norm", num_embeds_ada_norm=10)
    with pytest.raises(UnsupportedAttention, match=r"attn\.transformer_blocks\.0: norm_type 'ada_norm' is not supported"):
        with attention_implementation(holder, "split-einsum"):
            pass
    assert type(holder.attn).__name__ == "Transformer2DModel"  # nothing was swapped


# --- what the export records where it cannot predict --------------------------------------------


def test_offline_parity_compares_the_torch_rewrite(tiny_sd1):
    source = DiffusersSource.open(tiny_sd1)
    spec = unet_spec(source, model_info(source))
    module = spec.module()
    target = CoreMLTarget()
    record = target.offline_parity(spec, module, Shape(1, SIZE, SIZE), coreml_options("split-einsum"))
    if ON_MAC:
        assert target.can_validate_here()
    else:
        assert not target.can_validate_here()
        assert record["skipped"].startswith("Core ML prediction needs macOS")
    assert record["torch_rewrite"]["max_abs_err"] <= 1e-4 and record["torch_rewrite"]["psnr_db"] > 100
    assert "psnr_db" not in record and "max_abs_err" not in record  # no number for a prediction that never ran
    assert "torch_rewrite" not in target.offline_parity(spec, module, Shape(1, SIZE, SIZE), coreml_options("original"))


@NEEDS_CT
@pytest.mark.skipif(ON_MAC, reason="on macOS the components are validated by running them")
@pytest.mark.slow
def test_export_records_skipped_parity(ane_export, capsys):
    from sdexport.cli import main

    m = Manifest.load(ane_export)
    for c in m.components.values():
        assert c.parity["skipped"].startswith("Core ML prediction needs macOS"), c.name
        assert "psnr_db" not in c.parity
        assert c.parity["torch_rewrite"]["max_abs_err"] <= 1e-4, c.name
    assert main(["inspect", str(ane_export)]) == 0
    assert "skipped" in capsys.readouterr().out


# --- errors a user can cause --------------------------------------------------------------------


def test_dynamic_shapes_are_refused(capsys, tmp_path, tiny_sd1):
    code, err = run_cli(capsys, "export", tiny_sd1, "--target", "coreml", "--out", tmp_path / "o")
    assert_one_line_error(code, err, "Core ML needs static shapes", "--height", "--width")
    assert not (tmp_path / "o").exists() and no_partial_dirs(tmp_path)


@NEEDS_CT
def test_compression_needs_a_recent_deployment_target(capsys, tmp_path, tiny_sd1):
    old = tmp_path / "old-mac.toml"
    old.write_text('target = "coreml"\nprecision = "fp16"\n[coreml]\ncompress = "palettize6"\n'
                   'minimum_deployment_target = "macOS12"\n')
    code, err = run_cli(capsys, "export", tiny_sd1, "--profile", old, "--height", "64", "--width", "64",
                        "--out", tmp_path / "o")
    assert_one_line_error(code, err, "--compress palettize6 needs minimum deployment target macOS13")
    assert not (tmp_path / "o").exists() and no_partial_dirs(tmp_path)


@NEEDS_CT
def test_component_without_compressible_weights(tmp_path, tiny_sd1):
    source = DiffusersSource.open(tiny_sd1)
    spec = vae_decoder_spec(source, model_info(source))
    # no weight of the tiny VAE decoder has 10**7 elements; per component, 'none' would skip it
    options = coreml_options("original", {"vae_decoder": "linear8"}, weight_threshold=10**7)
    with pytest.raises(ExportError) as e:
        CoreMLTarget().convert(spec.static(options.trace_shape(spec)), spec.module(), tmp_path / "d", options, "fp16")
    assert "vae_decoder: --compress linear8 is not supported for this component" in str(e.value)
    assert "\n" not in str(e.value)
    skipped = coreml_options("original", {"vae_decoder": "none", "default": "linear8"})
    from sdexport.export.targets.coreml import CoreMLSettings

    assert CoreMLSettings.from_options(skipped).compression_for(spec) is None


@NEEDS_CT
@pytest.mark.parametrize(
    "coreml, needle",
    [
        ({"attention": "flash"}, "coreml.attention: 'flash' is not one of original, split-einsum"),
        ({"compress": "palettize3"}, "coreml.compress: 'palettize3' is not one of"),
        ({"compute_units": "npu"}, "backend.compute_units: 'npu' is not one of"),
        ({"minimum_deployment_target": "macOS9"}, "minimum deployment target 'macOS9'"),
        ({"minimum_deployment_target": "iOS14"}, "ML Programs need macOS12"),
        ({"compute_units": "cpu-and-ne", "attention": "original"}, None),  # fine at fp16
        ({"colour": "blue"}, "unknown field coreml.colour"),
    ],
)
def test_bad_settings(tiny_sd1, tmp_path, coreml, needle):
    source = DiffusersSource.open(tiny_sd1)
    spec = text_encoder_spec(source, model_info(source))
    def make():
        backend = BackendOptions.from_table({k: v for k, v in coreml.items() if k == "compute_units"})
        table = CoreMLOptions.from_table({k: v for k, v in coreml.items() if k != "compute_units"})
        return ExportOptions(target="coreml", precision="fp16", height=SIZE, width=SIZE, coreml=table, backend=backend)

    if needle is None:
        options = make()
        CoreMLTarget().convert(spec.static(options.trace_shape(spec)), spec.module(), tmp_path, options, "fp16")
        return
    with pytest.raises(OptionError, match=needle.replace("(", r"\(")):
        options = make()
        CoreMLTarget().convert(spec.static(options.trace_shape(spec)), spec.module(), tmp_path, options, "fp16")


@NEEDS_CT
def test_neural_engine_needs_fp16(tiny_sd1, tmp_path):
    source = DiffusersSource.open(tiny_sd1)
    spec = text_encoder_spec(source, model_info(source))
    options = ExportOptions(target="coreml", precision="fp32", height=SIZE, width=SIZE,
                            backend=BackendOptions(compute_units="cpu-and-ne"))
    with pytest.raises(OptionError, match="cpu-and-ne needs --precision fp16"):
        CoreMLTarget().convert(spec, spec.module(), tmp_path, options, "fp32")


@NEEDS_CT
@pytest.mark.skipif(ON_MAC, reason="on macOS the export runs")
@pytest.mark.slow
def test_generate_on_linux_is_one_line(capsys, stock_export, tmp_path):
    code, err = run_cli(capsys, "generate", stock_export, "--prompt", "x", "--steps", "1", "--output", tmp_path / "o.png")
    assert_one_line_error(code, err, "Core ML models run only on macOS", "this is Linux")
    assert not (tmp_path / "o.png").exists()
    m = Manifest.load(stock_export)
    with pytest.raises(BackendError, match="run only on macOS"):
        open_session(m.component("unet"), stock_export, {})


def test_runtime_backend_imports_neither_torch_nor_coremltools():
    code = ("import runtime.backends.coreml, sys; "
            "print(','.join(m for m in ('torch', 'coremltools', 'sdexport') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == ""


# --- the backend's choices, with a stand-in for Core ML -----------------------------------------


class _FakeModel:
    """Records how it was opened and what it was fed; answers with zeros of the declared shapes."""

    outputs: tuple = ()

    def __init__(self, path, compute_units=None):
        self.path, self.units = path, compute_units

    def predict(self, feeds):
        self.feeds = feeds
        return {t.name: np.zeros(t.shape, np.float32) for t in self.outputs}


def _fake_coremltools(component):
    import enum
    import types

    model = type("M", (_FakeModel,), {"outputs": component.outputs})
    ct = types.SimpleNamespace(
        ComputeUnit=enum.Enum("ComputeUnit", "ALL CPU_AND_GPU CPU_ONLY CPU_AND_NE"),
        models=types.SimpleNamespace(MLModel=model, CompiledMLModel=model),
    )
    return ct


@NEEDS_CT
@pytest.mark.slow
def test_backend_opens_with_the_recorded_compute_units(monkeypatch, stock_export):
    import runtime.backends.coreml as backend

    m = Manifest.load(stock_export)
    te = m.component("text_encoder")
    monkeypatch.setattr(backend.sys, "platform", "darwin")
    monkeypatch.setattr(backend, "_coremltools", lambda: _fake_coremltools(te))
    session = open_session(te, stock_export, {})
    assert session.compute_units == "cpu-and-gpu" and Path(session.path).name == PACKAGE  # as exported
    out = session.run({"input_ids": np.ones((1, 77), np.int64)})
    assert session._model.feeds["input_ids"].dtype == np.int32  # cast to what the package declares
    assert set(out) == {"last_hidden_state", "pooler_output"}
    with pytest.raises(BackendError, match="input_ids"):
        session.run({"input_ids": np.ones((2, 77), np.int64)})  # static batch of 1
    assert open_session(te, stock_export, {"compute_units": "cpu-only"}).compute_units == "cpu-only"
    with pytest.raises(BackendError, match="compute units 'gpu'"):
        open_session(te, stock_export, {"compute_units": "gpu"})
    # a compiled model beside the package is preferred: it loads without compiling
    compiled = stock_export / "text_encoder" / "model.mlmodelc"
    compiled.mkdir()
    try:
        assert Path(open_session(te, stock_export, {}).path) == compiled
    finally:
        shutil.rmtree(compiled)


# --- on a Mac: predictions against torch --------------------------------------------------------


@pytest.fixture(scope="module")
def ane_uncompressed_export(tmp_path_factory, tiny_sd1) -> Path:
    out = tmp_path_factory.mktemp("coreml-ane-fp16") / "out"
    export(tiny_sd1, out, coreml_options("split-einsum"), progress=False)
    return out


def _specs_by_name(source_dir: Path, controlnets: dict[str, Path]):
    source = DiffusersSource.open(source_dir)
    info = model_info(source)
    specs = [text_encoder_spec(source, info), unet_spec(source, info), unet_spec(source, info, control=True),
             vae_encoder_spec(source, info), vae_decoder_spec(source, info)]
    specs += [controlnet_spec(ControlNetSource.parse(f"{n}={p}"), info) for n, p in controlnets.items()]
    return {s.name: s for s in specs}


@NEEDS_CT
@MAC_ONLY
# 6-bit palettes alone cost the tiny models 42-47 dB in torch (k-means as coremltools does it, fp32):
# with fp16 on top the palettized export gets the export gate for reduced precision, 30 dB.
@pytest.mark.parametrize("which, floor", [("stock_export", MIN_PSNR), ("ane_uncompressed_export", MIN_PSNR),
                                          ("ane_export", 30.0)])
@pytest.mark.parametrize("units", ["cpu-only", None])  # None: the compute units the export chose
def test_predictions_match_torch(request, tiny_sd1, tiny_controlnets, which, floor, units):
    root = request.getfixturevalue(which)
    m = Manifest.load(root)
    specs = _specs_by_name(tiny_sd1, {"edges": tiny_controlnets["edges"]})
    for name, component in m.components.items():
        spec = specs[name]
        example = spec.example(Shape(1, SIZE, SIZE), torch.Generator().manual_seed(7))
        expected = _outputs(spec.module().eval(), example)
        session = open_session(component, root, {"compute_units": units} if units else {})
        got = session.run({t.name: x.numpy() for t, x in zip(spec.inputs, example)})
        for t, ref in zip(spec.outputs, expected):
            value = psnr(ref.numpy(), np.asarray(got[t.name], np.float32))
            print(f"{which} {name}.{t.name} on {units or component.details['compute_units']}: {value:.1f} dB")
            assert value >= floor, (name, t.name, value)


@NEEDS_CT
@MAC_ONLY
def test_generate_on_a_mac(stock_export, tmp_path, tmp_path_factory):
    from PIL import Image

    from sdexport.cli import main
    from tests.reference import sample_image

    sample_image(SIZE).save(tmp_path / "edges.png")
    out = tmp_path / "o.png"
    assert main(["generate", str(stock_export), "--prompt", "a red circle", "--steps", "3", "--scheduler", "euler",
                 "--control", f"edges={tmp_path / 'edges.png'}", "--output", str(out), "--quiet"]) == 0
    image = np.asarray(Image.open(out))
    assert image.shape == (SIZE, SIZE, 3) and image.std() > 0


# --- the command line's Core ML flags (proposed with this target; skipped until cli.py has them) ----




def test_cli_flags_fill_the_profile(tmp_path, tiny_sd1):
    from sdexport.cli import main

    out = tmp_path / "plan"
    assert main(["export", str(tiny_sd1), "--target", "coreml", "--precision", "fp16", "--height", "64", "--width", "64",
                 "--attention", "original", "--compress", "linear8", "--compute-units", "cpu-only",
                 "--out", str(out), "--dry-run", "--quiet"]) == 0
    m = Manifest.load(out, check_files=False)
    assert m.profile["coreml"].items() >= {"attention": "original", "compress": "linear8"}.items()
    assert m.profile["backend_options"]["compute_units"] == "cpu-only"
    assert m.component("unet").main_file.path == f"unet/{PACKAGE}/Manifest.json"


def test_cli_coreml_flags_need_the_coreml_target(capsys, tmp_path, tiny_sd1):
    code, err = run_cli(capsys, "export", tiny_sd1, "--target", "onnx", "--compress", "palettize6", "--out", tmp_path / "o")
    assert_one_line_error(code, err, "--compress", "applies to --target coreml, not onnx")
    code, err = run_cli(capsys, "export", tiny_sd1, "--target", "coreml", "--compress", "palettize5", "--out", tmp_path / "o")
    assert_one_line_error(code, err, "--compress", "palettize5")
    assert not (tmp_path / "o").exists() and no_partial_dirs(tmp_path)


@NEEDS_CT
@pytest.mark.skipif(ON_MAC, reason="on macOS the export runs")
@pytest.mark.slow
def test_cli_generate_with_compute_units_on_linux(capsys, stock_export, tmp_path):
    code, err = run_cli(capsys, "generate", stock_export, "--prompt", "x", "--compute-units", "cpu-and-gpu",
                        "--output", tmp_path / "o.png")
    assert_one_line_error(code, err, "Core ML models run only on macOS")
