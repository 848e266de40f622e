"""Device profiles: schema, resolution with flags, export of the tiny pipeline with every profile."""

from __future__ import annotations

import importlib.util

import pytest

from runtime.manifest import Manifest
from sdexport import profile
from sdexport.cli import main
from tests.test_cli_errors import assert_one_line_error, run_cli

SHIPPED = ["apple-silicon-ane", "apple-silicon-gpu", "arm64-cpu", "jetson-orin", "laptop-cpu-onnx",
           "laptop-cpu-x86", "nvidia-gpu"]
# What cannot run on this machine is planned only (dry run): TensorRT is not installable here,
# Core ML predicts only on macOS.
DRY_RUN = {"tensorrt", "coreml"}


def test_shipped_profiles_load_and_list(capsys):
    assert sorted(profile.available()) == SHIPPED
    for name in SHIPPED:
        p = profile.load(name)
        assert p.data["target"] in profile.TARGETS and p.description
    assert main(["profiles"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == len(SHIPPED) and all(line.split()[0] in SHIPPED for line in out)


def test_flags_override_profile_fields():
    options = profile.resolve("jetson-orin", height=64, width=64, cfg="batched", target="onnx")
    assert (options.target, options.precision, options.height, options.width, options.cfg) == ("onnx", "fp16", 64, 64, "batched")
    assert options.profile_name == "jetson-orin"
    default = profile.resolve("jetson-orin")
    assert (default.target, default.height, default.cfg) == ("tensorrt", 512, "sequential")


@pytest.mark.parametrize("name", SHIPPED)
def test_every_profile_exports_the_tiny_pipeline(name, tmp_path, tiny_sd1):
    p = profile.load(name)
    out = tmp_path / "out"
    args = ["export", str(tiny_sd1), "--profile", name, "--out", str(out), "--quiet"]
    if p.data.get("shapes", {}).get("static"):
        args += ["--height", "64", "--width", "64"]  # the profile's shape would only make the test slow
    dry = p.data["target"] in DRY_RUN
    if dry:
        args.append("--dry-run")
    if p.data["target"] == "openvino" and importlib.util.find_spec("openvino") is None:
        pytest.skip("openvino is not installed")
    assert main(args) == 0
    m = Manifest.load(out, check_files=not dry)
    assert m.profile["name"] == name and m.profile["cfg"] == p.get("cfg", "mode", "batched")
    assert m.profile["backend_options"] == p.data.get("backend", {})
    assert m.runtime.cfg == p.get("cfg", "mode", "batched") and m.runtime.backend_options == p.data.get("backend", {})
    assert {c.precision for c in m.components.values()} <= {p.data["precision"], "fp32"}
    if dry:
        assert m.exporter["dry_run"] is True
        assert m.component("unet").inputs[0].shape[2:] == (8, 8)
        return
    if p.get("onnx", "optimize") == "gpu" and not _has_cuda():
        # CUDA-only fused ops: parity is recorded as skipped, and the CPU refuses in one line
        assert "skipped" in m.component("unet").parity
        code = main(["generate", str(out), "--prompt", "a red circle", "--steps", "2", "--device", "cpu",
                     "--output", str(tmp_path / "x.png"), "--quiet"])
        assert code == 2
        return
    # runs here, on the CPU whatever device the profile names
    assert main(["generate", str(out), "--prompt", "a red circle", "--steps", "2", "--device", "cpu",
                 "--output", str(tmp_path / "x.png"), "--quiet"]) == 0


def _has_cuda() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def test_runtime_applies_profile_backend_options(tmp_path, tiny_sd1):
    custom = tmp_path / "two-threads.toml"
    custom.write_text('target = "onnx"\nprecision = "fp32"\n[cfg]\nmode = "sequential"\n[backend]\ndevice = "cpu"\nthreads = 1\n')
    out = tmp_path / "out"
    assert main(["export", str(tiny_sd1), "--profile", str(custom), "--out", str(out), "--quiet"]) == 0
    from runtime import Pipeline

    pipe = Pipeline.from_dir(out)
    assert pipe.options.threads == 1 and pipe.options.device == "cpu" and pipe.cfg == "sequential"


def test_dry_run_manifest_is_refused_by_the_runtime(capsys, tmp_path, tiny_sd1):
    out = tmp_path / "plan"
    assert main(["export", str(tiny_sd1), "--out", str(out), "--dry-run", "--quiet"]) == 0
    code, err = run_cli(capsys, "generate", out, "--prompt", "x", "--output", tmp_path / "x.png")
    assert_one_line_error(code, err, "dry-run plan")
    assert main(["inspect", str(out)]) == 0


@pytest.mark.parametrize(
    "content, needles",
    [
        ('target = "onnx"\nprecision = "fp32"\ncolour = "blue"\n', ["unknown field 'colour'"]),
        ('target = "onnx"\nprecision = "fp32"\n[shapes]\nheight = "512"\n', ["shapes.height", "expected int, got str"]),
        ('target = "onnx"\nprecision = "fp64"\n', ["precision", "'fp64' is not one of"]),
        ('target = "onnx"\nprecision = "fp32"\n[backend]\nthreads = 2\nspeed = 3\n', ["unknown field backend.speed"]),
        ('target = "onnx"\nprecision = "fp32"\n[gpu]\nx = 1\n', ["unknown table [gpu]"]),
        ('precision = "fp32"\n', ["missing field 'target'"]),
        ('target = "onnx"\nprecision = "fp32"\n[shapes]\nstatic = true\n', ["shapes.static needs shapes.height"]),
        ('target = "onnx"\nprecision = \n', ["not valid TOML"]),
    ],
)
def test_bad_profile_file(capsys, tmp_path, tiny_sd1, content, needles):
    bad = tmp_path / "bad.toml"
    bad.write_text(content)
    code, err = run_cli(capsys, "export", tiny_sd1, "--profile", bad, "--out", tmp_path / "o")
    assert_one_line_error(code, err, str(bad), *needles)
    assert not (tmp_path / "o").exists()


def test_unknown_profile_lists_known(capsys, tmp_path, tiny_sd1):
    code, err = run_cli(capsys, "export", tiny_sd1, "--profile", "toaster", "--out", tmp_path / "o")
    assert_one_line_error(code, err, "unknown profile 'toaster'", *SHIPPED)
