"""``sdexport quality``: the report's schema, and finite numbers computed from real runs of the tiny
pipeline, for an ONNX int8-static export and an OpenVINO int8 (NNCF) export through the same code."""

from __future__ import annotations

import json
import math

import pytest
from PIL import Image

from runtime.manifest import Manifest
from sdexport.cli import main
from tests.test_cli_errors import assert_one_line_error, run_cli
from tests.test_quantize import CALIBRATION, SIZE, STATIC, exported

QUALITY = ("--steps", "4", "--samples", "4", "--calibration-steps", "4", "--prompt", "a red circle",
           "--prompt", "a lighthouse at dusk", "--seeds", "1")


def _number(value, low=-math.inf, high=math.inf) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and low <= value <= high


def check_report(out, artifact, expected_precisions: dict) -> dict:
    report = json.loads((out / "quality.json").read_text())
    manifest = Manifest.load(artifact)
    assert report["schema"] == "sdexport-quality/1"
    assert set(report) >= {"artifact", "reference", "target", "machine", "config", "calibration", "artifact_bytes",
                           "components", "end_to_end", "grid"}
    assert report["artifact_bytes"] == sum(c.size_bytes for c in manifest.components.values())
    assert set(report["components"]) == set(manifest.components)
    for name, c in report["components"].items():
        assert c["precision"] == expected_precisions[name] and c["bytes"] == manifest.component(name).size_bytes
        assert c["inputs"].startswith("recorded") and c["samples"] >= 1 and c["finite"]
        assert _number(c["psnr_db"], 20, 200) and _number(c["psnr_db_worst_input"], 15, 200), (name, c)
        assert _number(c["max_abs_err"], 0) and _number(c["runtime_ms_median"], 0)
        assert c["ssim"] is None or _number(c["ssim"], -1, 1)
        for output in c["outputs"].values():
            assert set(output) >= {"psnr_db", "psnr_db_worst_input", "ssim", "max_abs_err", "finite"}
    decoder = report["components"]["vae_decoder"]["outputs"]["sample"]
    assert _number(decoder["image_ssim"], 0, 1) and _number(report["components"]["unet"]["ssim"], 0, 1)
    e2e = report["end_to_end"]
    assert len(e2e["runs"]) == 2 and _number(e2e["psnr_db"], 15, 200) and _number(e2e["ssim_mean"], 0, 1)
    for run in e2e["runs"]:
        assert _number(run["psnr_db"], 15, 200) and _number(run["ssim"], 0, 1) and run["seed"] == 1
    grid = Image.open(out / report["grid"])
    tile = SIZE * -(-160 // SIZE)  # small images are scaled up by a whole factor to at least 160 px
    assert grid.size == (3 * tile, 18 + 2 * tile)
    md = (out / "quality.md").read_text()
    assert "| unet |" in md and "End to end" in md and report["grid"] in md
    return report


@pytest.mark.slow
def test_quality_of_onnx_int8_static(tmp_path_factory, tmp_path, tiny_sd1, capsys):
    artifact = exported(tmp_path_factory, tiny_sd1, *STATIC, "--precision", "int8-static", *CALIBRATION)
    out = tmp_path / "report"
    assert main(["quality", str(artifact), "--reference", str(tiny_sd1), "--out", str(out), *QUALITY]) == 0
    printed = capsys.readouterr().out
    report = check_report(out, artifact, {"text_encoder": "int8", "unet": "int8-static", "vae_encoder": "int8",
                                          "vae_decoder": "int8"})
    components = report["components"]
    # the VAE has int8 weights and float activations: far closer to fp32 than the int8-activation U-Net
    assert components["vae_decoder"]["psnr_db"] > 45 and components["vae_decoder"]["recipe"]["quantization"]["plan"] == "weights"
    assert components["unet"]["psnr_db"] < 60  # int8: a real, measured difference
    assert components["unet"]["recipe"]["quantization"]["plan"] == "static"
    assert report["calibration"]["counts"]["unet"] >= 4
    assert report["config"]["calibration_seed"] == 1  # held out from the export's seed 0
    print(printed)


@pytest.mark.slow
def test_quality_of_openvino_int8(tmp_path_factory, tmp_path, tiny_sd1):
    """OpenVINO's NNCF compression reports through the same code."""
    artifact = exported(tmp_path_factory, tiny_sd1, *STATIC, "--target", "openvino", "--precision", "int8")
    out = tmp_path / "report"
    assert main(["quality", str(artifact), "--reference", str(tiny_sd1), "--out", str(out), "--quiet", *QUALITY]) == 0
    report = check_report(out, artifact, dict.fromkeys(("text_encoder", "unet", "vae_encoder", "vae_decoder"), "int8"))
    assert report["target"] == "openvino"
    assert report["components"]["unet"]["backend"] == "openvino"
    assert report["components"]["unet"]["recipe"]["weights"]["format"].startswith("int8")


def test_empty_prompt_file(capsys, tmp_path, tmp_path_factory, tiny_sd1):
    artifact = exported(tmp_path_factory, tiny_sd1, *STATIC)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# nothing but a comment\n\n")
    code, err = run_cli(capsys, "quality", artifact, "--reference", tiny_sd1, "--prompts", prompts, "--out", tmp_path / "q")
    assert_one_line_error(code, err, "prompts.txt", "empty")
    assert not (tmp_path / "q").exists()


def test_component_the_model_lacks(capsys, tmp_path, tmp_path_factory, tiny_sd1):
    artifact = exported(tmp_path_factory, tiny_sd1, *STATIC)
    code, err = run_cli(capsys, "quality", artifact, "--reference", tiny_sd1, "--component", "unet_control",
                        "--out", tmp_path / "q")
    assert_one_line_error(code, err, "no 'unet_control' component")
    from sdexport.quantize.calibration import collect
    from sdexport.errors import OptionError

    with pytest.raises(OptionError, match="cannot record controlnet"):
        collect(tiny_sd1, ["controlnet"], height=SIZE, width=SIZE, cache_dir="")


def test_reference_of_another_model(capsys, tmp_path, tmp_path_factory, tiny_sd1, tiny_inpaint):
    artifact = exported(tmp_path_factory, tiny_sd1, *STATIC)
    code, err = run_cli(capsys, "quality", artifact, "--reference", tiny_inpaint, "--out", tmp_path / "q")
    assert_one_line_error(code, err, "does not match", "unet_in_channels")


def test_one_pooled_psnr_for_quality_and_the_quantizer():
    """sdexport quality and the quantizer's parity gate compare outputs the same way (runtime.metrics)."""
    import numpy as np

    from runtime.metrics import pooled_psnr, psnr
    from sdexport.measure.quality import compare_outputs
    from sdexport.quantize.onnx import compare

    rng = np.random.default_rng(0)
    # a small-range pair and a large-range one: pooling takes the peak over both
    reference = [rng.standard_normal((2, 4, 8, 8)) * 0.01, rng.standard_normal((2, 4, 8, 8)) * 10]
    test = [r + rng.standard_normal(r.shape) * 0.001 for r in reference]
    pooled, worst = pooled_psnr(reference, test)
    both = np.concatenate([r.ravel() for r in reference]), np.concatenate([t.ravel() for t in test])
    assert pooled == psnr(*both)
    assert worst == min(psnr(r, t) for r, t in zip(reference, test)) < pooled
    q = compare_outputs(reference, test)
    assert (q["psnr_db"], q["psnr_db_worst_input"], q["finite"]) == (pooled, worst, True)
    gate = compare([[r, 2 * r] for r in reference], [[t, 2 * t] for t in test])
    assert gate == {"psnr_db": pooled, "psnr_db_worst_input": worst}
    assert pooled_psnr(reference, reference) == (math.inf, math.inf)
    assert compare_outputs(reference, [test[0], test[1] * np.inf])["finite"] is False
