"""Errors a user can cause: one clear line on stderr, a non-zero exit, no traceback, nothing half-written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from sdexport.cli import main
from tests.reference import sample_image, sample_mask


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tiny_sd1):
    out = tmp_path_factory.mktemp("cli-errors") / "onnx"
    assert main(["export", str(tiny_sd1), "--out", str(out), "--quiet"]) == 0
    return out


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    return code, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip() and "%|" not in line]  # ignore progress bars
    assert len(lines) == 1, err
    assert lines[0].startswith("sdexport: error: "), lines[0]
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def no_partial_dirs(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name]


def test_missing_source(capsys, tmp_path):
    code, err = run_cli(capsys, "export", tmp_path / "nope", "--out", tmp_path / "o")
    assert_one_line_error(code, err, "no such file or directory")
    assert not (tmp_path / "o").exists() and no_partial_dirs(tmp_path)


def test_not_a_diffusers_folder(capsys, tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "weights.bin").write_bytes(b"x")
    code, err = run_cli(capsys, "export", tmp_path / "src", "--out", tmp_path / "o")
    assert_one_line_error(code, err, "not a diffusers model folder")
    assert not (tmp_path / "o").exists() and no_partial_dirs(tmp_path)


def test_unknown_target(capsys, tmp_path, tiny_sd1):
    code, err = run_cli(capsys, "export", tiny_sd1, "--target", "tflite", "--out", tmp_path / "o")
    assert_one_line_error(code, err, "unknown target 'tflite'")
    assert no_partial_dirs(tmp_path)


def test_existing_output_is_refused_and_untouched(capsys, tmp_path, tiny_sd1):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    before = os.stat(out / "keep.txt").st_mtime_ns
    code, err = run_cli(capsys, "export", tiny_sd1, "--out", out)
    assert_one_line_error(code, err, "already exists", "--overwrite")
    assert (out / "keep.txt").read_text() == "precious" and os.stat(out / "keep.txt").st_mtime_ns == before
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] and no_partial_dirs(tmp_path)


def test_overwrite_replaces_whole_directory(capsys, tmp_path, tiny_sd1):
    out = tmp_path / "o"
    assert main(["export", str(tiny_sd1), "--out", str(out), "--dry-run", "--quiet"]) == 0  # an earlier export
    (out / "old.txt").write_text("old")
    code, _ = run_cli(capsys, "export", tiny_sd1, "--out", out, "--overwrite", "--quiet")
    assert code == 0 and not (out / "old.txt").exists() and (out / "sdexport.json").is_file()
    assert no_partial_dirs(tmp_path)


def test_static_size_not_multiple_of_8(capsys, tmp_path, tiny_sd1):
    code, err = run_cli(capsys, "export", tiny_sd1, "--out", tmp_path / "o", "--height", "100", "--width", "64")
    assert_one_line_error(code, err, "--height 100", "multiple of 8")
    assert not (tmp_path / "o").exists() and no_partial_dirs(tmp_path)


def test_failed_validation_leaves_nothing(capsys, tmp_path, tiny_sd1, monkeypatch):
    import sdexport.export.run

    monkeypatch.setattr(sdexport.export.run, "gate", lambda *args: 1000.0)  # an impossible floor
    code, err = run_cli(capsys, "export", tiny_sd1, "--out", tmp_path / "o", "--quiet")
    assert_one_line_error(code, err, "text_encoder", "differs from torch beyond tolerance")
    assert not (tmp_path / "o").exists() and no_partial_dirs(tmp_path)


@pytest.fixture()
def images(tmp_path):
    sample_image(64).save(tmp_path / "image.png")
    sample_mask(64).save(tmp_path / "mask.png")
    sample_mask(32).save(tmp_path / "small_mask.png")
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    return tmp_path


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--height", "60", "--width", "64"], ["height 60", "multiple of 8"]),
        (["--steps", "0"], ["steps must be at least 1"]),
        (["--image", "{d}/image.png", "--strength", "1.5"], ["strength must be within [0, 1]"]),
        (["--image", "{d}/image.png", "--strength", "-0.1"], ["strength must be within [0, 1]"]),
        (["--image", "{d}/image.png", "--mask", "{d}/small_mask.png"], ["mask is 32x32 but the image is 64x64"]),
        (["--image", "{d}/missing.png"], ["no such file"]),
        (["--image", "{d}/broken.png"], ["cannot read it as an image"]),
        (["--scheduler", "karras-magic"], ["unknown scheduler 'karras-magic'"]),
        (["--image", "{d}/image.png", "--strength", "0.01", "--steps", "10"], ["leaves no denoising step"]),
        (["--control", "canny={d}/image.png"], ["this export has no ControlNet"]),
    ],
)
def test_generate_bad_input(capsys, artifact, images, args, needles):
    out = images / "out.png"
    args = [a.format(d=images) for a in args]
    code, err = run_cli(capsys, "generate", artifact, "--prompt", "x", "--steps", "2", *args, "--output", out)
    assert_one_line_error(code, err, *needles)
    assert not out.exists() and not [p for p in images.iterdir() if p.name.startswith(".out.png")]


def test_generate_refuses_existing_output(capsys, artifact, tmp_path):
    out = tmp_path / "out.png"
    Image.new("RGB", (8, 8)).save(out)
    before = out.read_bytes()
    code, err = run_cli(capsys, "generate", artifact, "--prompt", "x", "--output", out)
    assert_one_line_error(code, err, "already exists")
    assert out.read_bytes() == before


def _copy(artifact: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(artifact, copy)
    return copy


def test_corrupted_onnx_same_size(capsys, artifact, tmp_path):
    copy = _copy(artifact, tmp_path)
    model = copy / "unet" / "model.onnx"
    data = bytearray(model.read_bytes())
    data[: len(data) // 2] = bytes(len(data) // 2)  # zero the first half, keep the size
    model.write_bytes(bytes(data))
    code, err = run_cli(capsys, "generate", copy, "--prompt", "x", "--steps", "1", "--output", tmp_path / "o.png")
    assert_one_line_error(code, err, "unet/model.onnx", "sha256 differs")  # caught before any parser sees it
    assert not (tmp_path / "o.png").exists()
    # With the manifest's hash made to match, ONNX Runtime's own refusal is still one line.
    from runtime.manifest import sha256_file

    manifest = json.loads((copy / "sdexport.json").read_text())
    manifest["components"]["unet"]["files"][0]["sha256"] = sha256_file(model)
    (copy / "sdexport.json").write_text(json.dumps(manifest))
    code, err = run_cli(capsys, "generate", copy, "--prompt", "x", "--steps", "1", "--output", tmp_path / "o.png")
    assert_one_line_error(code, err, "unet/model.onnx", "ONNX Runtime cannot load this model")
    assert not (tmp_path / "o.png").exists()


def test_truncated_onnx(capsys, artifact, tmp_path):
    copy = _copy(artifact, tmp_path)
    model = copy / "vae_decoder" / "model.onnx"
    model.write_bytes(model.read_bytes()[:1000])
    code, err = run_cli(capsys, "generate", copy, "--prompt", "x", "--steps", "1", "--output", tmp_path / "o.png")
    assert_one_line_error(code, err, "vae_decoder/model.onnx", "the manifest says")
    code, err = run_cli(capsys, "inspect", copy, "--verify")
    assert_one_line_error(code, err, "vae_decoder/model.onnx")


def test_newer_manifest_schema(capsys, artifact, tmp_path):
    copy = _copy(artifact, tmp_path)
    path = copy / "sdexport.json"
    data = json.loads(path.read_text())
    data["schema_version"] = 99
    path.write_text(json.dumps(data))
    code, err = run_cli(capsys, "generate", copy, "--prompt", "x", "--output", tmp_path / "o.png")
    assert_one_line_error(code, err, "schema version 99 is newer", "upgrade sdexport")
    code, err = run_cli(capsys, "inspect", copy)
    assert_one_line_error(code, err, "schema version 99")


def test_not_an_artifact_dir(capsys, tmp_path):
    code, err = run_cli(capsys, "generate", tmp_path, "--prompt", "x", "--output", tmp_path / "o.png")
    assert_one_line_error(code, err, "no sdexport.json")


def test_bad_option_is_one_line(capsys, tmp_path):
    code, err = run_cli(capsys, "generate", tmp_path, "--prompt", "x", "--output", tmp_path / "o.png", "--rng", "cuda")
    assert_one_line_error(code, err, "--rng")


def test_console_script_entry_point(tmp_path):
    """The installed `sdexport` command, as a user runs it."""
    exe = Path(sys.executable).with_name("sdexport")
    proc = subprocess.run([str(exe), "inspect", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_inspect_shows_parity(capsys, artifact):
    code = main(["inspect", str(artifact)])
    out = capsys.readouterr().out
    assert code == 0
    for name in ("text_encoder", "unet", "vae_encoder", "vae_decoder"):
        assert name in out
    assert "parity PSNR dB" in out
