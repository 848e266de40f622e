"""What the ONNX target writes: precisions, static shapes, external data, lean graphs, the manifest."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from PIL import Image

from runtime.manifest import Manifest
from runtime.metrics import psnr
from sdexport.cli import main
from tests.test_cli_errors import assert_one_line_error, run_cli

SIZE = 64


def _export(tmp_path, src, *extra):
    out = tmp_path / "out"
    assert main(["export", str(src), "--out", str(out), "--quiet", *extra]) == 0
    return out


def _generate(artifact, out, *extra):
    assert main(["generate", str(artifact), "--prompt", "a red circle", "--seed", "2", "--rng", "torch", "--steps", "6",
                 "--height", str(SIZE), "--width", str(SIZE), "--output", str(out), "--quiet", *extra]) == 0
    return np.asarray(Image.open(out).convert("RGB"), np.float64)


@pytest.fixture(scope="module")
def fp32_export(tmp_path_factory, tiny_sd1):
    return _export(tmp_path_factory.mktemp("fp32"), tiny_sd1)


def test_manifest_contract(fp32_export, tiny_sd1):
    m = Manifest.load(fp32_export)
    data = json.loads((fp32_export / "sdexport.json").read_text())
    assert data["schema_version"] == 2
    assert m.model.family == "sd1" and m.model.prediction_type == "epsilon"
    assert m.model.latent_channels == 4 and m.model.vae_scale_factor == 8 and m.model.vae_scaling_factor == pytest.approx(0.18215)
    assert m.exporter["libraries"]["torch"] and m.exporter["libraries"]["onnxruntime"]
    assert m.exporter["tokenizer_parity"]["identical"] is True
    for name in ("text_encoder", "unet", "vae_encoder", "vae_decoder"):
        c = m.component(name)
        assert c.backend == "onnxruntime" and c.precision == "fp32"
        assert c.main_file.path == f"{name}/model.onnx" and len(c.main_file.sha256) == 64
        assert c.parity["reference"] == "torch fp32" and c.parity["finite"]
        assert c.parity["psnr_db"] is None or c.parity["psnr_db"] >= 60
        assert c.parity["max_abs_err"] < 1e-3
        # validated at another batch and a non-square size than it was traced with (dynamic axes work)
        assert c.parity["shape"]["batch"] == 2 and c.parity["shape"]["width"] != c.parity["shape"]["height"]
    unet = m.component("unet")
    assert unet.parity["shape"]["prompt_chunks"] == 2  # checked at two prompt chunks too (S = 154)
    assert [t.describe() for t in unet.inputs] == [
        "sample: float32[N, 4, h, w]", "timestep: float32[N]", "encoder_hidden_states: float32[N, S, 32]"]  # S: 77 per 75-token prompt chunk
    m.check_files(verify_hashes=True)
    assert (fp32_export / "tokenizer" / "vocab.json").is_file() and (fp32_export / "scheduler" / "scheduler_config.json").is_file()


def test_graphs_have_no_duplicate_initializers(fp32_export):
    for name in ("text_encoder", "unet", "vae_decoder"):
        model = onnx.load(str(fp32_export / name / "model.onnx"))
        seen = {}
        for init in model.graph.initializer:
            if init.raw_data and len(init.raw_data) > 64:
                key = (init.data_type, tuple(init.dims), init.raw_data)
                assert key not in seen, f"{name}: {init.name} duplicates {seen.get(key)}"
                seen[key] = init.name


def test_fp16_export_is_reported_against_fp32(tmp_path, tiny_sd1, fp32_export):
    fp16 = _export(tmp_path, tiny_sd1, "--precision", "fp16")
    m = Manifest.load(fp16)
    for name, c in m.components.items():
        assert c.precision == "fp16", name
        assert c.parity["psnr_db"] is not None and c.parity["psnr_db"] >= 30, (name, c.parity)
        assert c.details["kept_fp32"]["io"]
        fp32_size = Manifest.load(fp32_export).component(name).size_bytes
        assert c.size_bytes < 0.7 * fp32_size, (name, c.size_bytes, fp32_size)
    assert "InstanceNormalization" in m.component("vae_decoder").details["kept_fp32"]["op_types"]
    a = _generate(fp32_export, tmp_path / "fp32.png")
    b = _generate(fp16, tmp_path / "fp16.png")
    value = psnr(a, b, peak=255.0)
    print(f"fp16 vs fp32 image PSNR: {value:.1f} dB; component PSNR vs torch: "
          + ", ".join(f"{n} {c.parity['psnr_db']:.1f}" for n, c in m.components.items()))
    assert value >= 30


def test_static_shapes(tmp_path, tiny_sd1, capsys):
    out = _export(tmp_path, tiny_sd1, "--height", str(SIZE), "--width", str(SIZE))
    unet = Manifest.load(out).component("unet")
    assert unet.inputs[0].shape == ("N", 4, SIZE // 8, SIZE // 8)
    model = onnx.load(str(out / "unet" / "model.onnx"))
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[2:]]
    assert dims == [SIZE // 8, SIZE // 8]
    assert _generate(out, tmp_path / "a.png").shape == (SIZE, SIZE, 3)
    code, err = run_cli(capsys, "generate", out, "--prompt", "x", "--height", "128", "--width", "128", "--output", tmp_path / "b.png")
    assert_one_line_error(code, err, "static shapes 64x64")


def test_external_data_past_the_protobuf_limit(tmp_path, tiny_sd1, monkeypatch, fp32_export):
    import sdexport.export.targets.onnx as target

    monkeypatch.setattr(target, "PROTOBUF_LIMIT", 1 << 20)  # pretend every model is over 2 GB
    out = _export(tmp_path, tiny_sd1)
    m = Manifest.load(out)
    unet = m.component("unet")
    assert [f.path for f in unet.files] == ["unet/model.onnx", "unet/model.onnx_data"]
    graph, data = (out / "unet" / "model.onnx").stat().st_size, (out / "unet" / "model.onnx_data").stat().st_size
    assert data > 5 * graph  # the weights live in the data file, the graph file holds only the graph
    a = _generate(fp32_export, tmp_path / "inline.png")
    b = _generate(out, tmp_path / "external.png")
    assert psnr(a, b, peak=255.0) >= 60


def test_graphs_with_external_weights_are_cleaned_file_to_file(tmp_path, tiny_sd1, monkeypatch, fp32_export):
    """A graph torch writes with external data (past 2 GB: SDXL's 10 GB U-Net) is cleaned and written
    without loading its weights into memory; same images as the in-memory path."""
    import sdexport.export.targets.onnx as target

    inline = fp32_export / "unet" / "model.onnx"
    external = tmp_path / "external" / "model.onnx"
    external.parent.mkdir()
    onnx.save_model(onnx.load(str(inline)), str(external), save_as_external_data=True, location="w.bin")
    assert target.has_external_data(external) and not target.has_external_data(inline)

    monkeypatch.setattr(target, "has_external_data", lambda path: True)  # as torch does for SDXL's U-Net
    out = _export(tmp_path, tiny_sd1)
    unet = Manifest.load(out).component("unet")
    assert [f.path for f in unet.files] == ["unet/model.onnx", "unet/model.onnx_data"]
    assert unet.details["external_data"].startswith("weights streamed")
    assert [t.describe() for t in unet.inputs] == [t.describe() for t in Manifest.load(fp32_export).component("unet").inputs]
    a = _generate(fp32_export, tmp_path / "inline.png")
    b = _generate(out, tmp_path / "streamed.png")
    assert psnr(a, b, peak=255.0) >= 60


def test_odd_latent_size_runs(fp32_export, tmp_path):
    # 72 px -> a 9x9 latent: the U-Net's upsampler must follow the skip connection's size
    assert main(["generate", str(fp32_export), "--prompt", "x", "--steps", "2", "--height", "72", "--width", "88",
                 "--output", str(tmp_path / "odd.png"), "--quiet"]) == 0
    assert Image.open(tmp_path / "odd.png").size == (88, 72)
