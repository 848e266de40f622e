"""Issue 16, items 2, 3, 10, 11, 12 and 14: outputs written only where and as asked, and every bad
value (from the command line, the manifest, a profile or a LoRA) refused in one line, exit 2."""

from __future__ import annotations

import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdexport.cli import main
from tests.reference import sample_image
from tests.test_cli_errors import assert_one_line_error, run_cli

GEN = ("--prompt", "x", "--steps", "1", "--quiet", "--height", "64", "--width", "64")


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tiny_sd1):
    out = tmp_path_factory.mktemp("hardening-inputs") / "onnx"
    assert main(["export", str(tiny_sd1), "--out", str(out), "--quiet"]) == 0
    return out


def generate(capsys, artifact, out, *args):
    return run_cli(capsys, "generate", artifact, *GEN, *args, "--output", out)


def leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.startswith(".")]


# --- item 2: --overwrite replaces regular files only -------------------------------------------------


def test_overwrite_refuses_a_fifo(capsys, artifact, tmp_path):
    out = tmp_path / "out.png"
    os.mkfifo(out)
    code, err = generate(capsys, artifact, out, "--overwrite")
    assert_one_line_error(code, err, "not a regular file")
    assert code == 2 and out.is_fifo() and not leftovers(tmp_path)


def test_overwrite_refuses_a_symlink(capsys, artifact, tmp_path):
    target = tmp_path / "elsewhere.txt"
    target.write_text("keep")
    out = tmp_path / "out.png"
    out.symlink_to(target)
    code, err = generate(capsys, artifact, out, "--overwrite")
    assert_one_line_error(code, err, "symbolic link")
    assert code == 2 and out.is_symlink() and target.read_text() == "keep"


def test_overwrite_refuses_a_directory(capsys, artifact, tmp_path):
    out = tmp_path / "out.png"
    out.mkdir()
    code, err = generate(capsys, artifact, out, "--overwrite")
    assert_one_line_error(code, err, "is a directory")
    assert code == 2 and out.is_dir()


def test_overwrite_replaces_a_regular_file(capsys, artifact, tmp_path):
    out = tmp_path / "out.png"
    out.write_bytes(b"old")
    code, err = generate(capsys, artifact, out, "--overwrite")
    assert code == 0, err
    assert Image.open(out).size == (64, 64) and not leftovers(tmp_path)


# --- item 3: --latents-out follows the image's rules ------------------------------------------------


def test_latents_out_refuses_an_existing_file(capsys, artifact, tmp_path):
    out, latents = tmp_path / "out.png", tmp_path / "lat.npy"
    latents.write_bytes(b"precious")
    code, err = generate(capsys, artifact, out, "--latents-out", latents)
    assert_one_line_error(code, err, "already exists", "--overwrite")
    assert code == 2 and latents.read_bytes() == b"precious" and not out.exists()


def test_latents_out_keeps_the_name_given(capsys, artifact, tmp_path):
    out, latents = tmp_path / "out.png", tmp_path / "final.latents"
    code, err = generate(capsys, artifact, out, "--latents-out", latents)
    assert code == 0, err
    assert np.load(latents).shape == (1, 4, 8, 8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final.latents", "out.png"]


def test_latents_out_overwrite_replaces_both(capsys, artifact, tmp_path):
    out, latents = tmp_path / "out.png", tmp_path / "lat.npy"
    out.write_bytes(b"old")
    latents.write_bytes(b"old")
    code, err = generate(capsys, artifact, out, "--latents-out", latents, "--overwrite")
    assert code == 0, err
    assert np.load(latents).shape == (1, 4, 8, 8) and Image.open(out).size == (64, 64)


def test_latents_out_failure_writes_neither(capsys, artifact, tmp_path):
    out, latents = tmp_path / "out.png", tmp_path / "missing" / "lat.npy"
    code, err = generate(capsys, artifact, out, "--latents-out", latents)
    assert_one_line_error(code, err, "missing")
    assert code == 2 and not out.exists() and not leftovers(tmp_path)


def test_latents_published_failure_removes_the_image(capsys, artifact, tmp_path, monkeypatch):
    """The image is published first; when the latents then cannot be, the new image goes too."""
    from runtime import pipeline

    out, latents = tmp_path / "out.png", tmp_path / "lat.npy"
    real = pipeline.Pipeline.generate

    def then_taken(self, *a, **k):
        result = real(self, *a, **k)
        latents.write_bytes(b"someone else's")
        return result

    monkeypatch.setattr(pipeline.Pipeline, "generate", then_taken)
    code, err = generate(capsys, artifact, out, "--latents-out", latents)
    assert_one_line_error(code, err, "already exists")
    assert not out.exists() and latents.read_bytes() == b"someone else's" and not leftovers(tmp_path)


# --- item 12: the destination checked when the file is published, not only at the start ------------


def test_destination_created_during_the_run_is_kept(capsys, artifact, tmp_path, monkeypatch):
    from runtime import pipeline

    out = tmp_path / "out.png"
    real = pipeline.Pipeline.generate

    def other_run_finishes_first(self, *a, **k):
        result = real(self, *a, **k)
        out.write_bytes(b"the other run's image")
        return result

    monkeypatch.setattr(pipeline.Pipeline, "generate", other_run_finishes_first)
    code, err = generate(capsys, artifact, out)
    assert_one_line_error(code, err, "already exists")
    assert code == 2 and out.read_bytes() == b"the other run's image" and not leftovers(tmp_path)


# --- item 10: non-finite and degenerate values -------------------------------------------------------


@pytest.fixture()
def image_file(tmp_path):
    sample_image(64).save(tmp_path / "image.png")
    return tmp_path / "image.png"


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--guidance-scale", "inf"], ["guidance scale", "finite"]),
        (["--guidance-scale", "nan"], ["guidance scale", "finite"]),
        (["--height", "0"], ["height 0"]),
        (["--width", "-8"], ["width -8"]),
        (["--strength", "nan", "--image", "{image}"], ["strength"]),
        (["--control-start", "nan"], ["--control-start"]),
    ],
)
def test_non_finite_or_degenerate_arguments(capsys, artifact, tmp_path, image_file, args, needles):
    out = tmp_path / "out.png"
    code, err = generate(capsys, artifact, out, *[a.format(image=image_file) for a in args])
    assert_one_line_error(code, err, *needles)
    assert code == 2 and not out.exists()


def edited_copy(artifact: Path, tmp_path: Path, edit) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(artifact, copy)
    data = json.loads((copy / "sdexport.json").read_text())
    edit(data)
    (copy / "sdexport.json").write_text(json.dumps(data))
    return copy


def _set(section, key, value):
    def edit(data):
        data[section][key] = value
    return edit


@pytest.mark.parametrize(
    "edit, needles",
    [
        (_set("model", "vae_scaling_factor", float("nan")), ["vae_scaling_factor"]),
        (_set("model", "vae_scaling_factor", 0), ["vae_scaling_factor"]),
        (_set("model", "vae_scale_factor", 0), ["vae_scale_factor"]),
        (_set("model", "vae_scale_factor", "8"), ["vae_scale_factor"]),
        (_set("model", "latent_channels", -4), ["latent_channels"]),
        (lambda d: d.__setitem__("components", list(d["components"].values())), ["components"]),
        (lambda d: d["components"]["unet"]["inputs"][0].__setitem__("dtype", "bfloat16"), ["bfloat16"]),
        (lambda d: d["runtime"]["backend_options"].__setitem__("providers", "CPUExecutionProvider"), ["providers"]),
        (lambda d: d["runtime"]["backend_options"].__setitem__("threads", "many"), ["threads"]),
        (lambda d: d["runtime"]["backend_options"].__setitem__("threads", -3), ["threads"]),
    ],
)
def test_bad_manifest_values(capsys, artifact, tmp_path, edit, needles):
    copy = edited_copy(artifact, tmp_path, edit)
    code, err = generate(capsys, copy, tmp_path / "out.png")
    assert_one_line_error(code, err, *needles)
    assert code == 2 and not (tmp_path / "out.png").exists()


def test_scheduler_config_nan(capsys, artifact, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(artifact, copy)
    path = copy / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    config["beta_start"] = float("nan")
    path.write_text(json.dumps(config))
    code, err = generate(capsys, copy, tmp_path / "out.png")
    assert_one_line_error(code, err, "beta_start", "finite")
    assert code == 2


# --- LoRAs: NaN, rank 0, a kohya alpha of several numbers; the dry run checks them too -------------


def _kohya_lora(tiny_sd1: Path, path: Path, rank: int, down_fill=None, alpha=None) -> Path:
    from safetensors.numpy import load_file, save_file

    weights = load_file(str(tiny_sd1 / "unet" / "diffusion_pytorch_model.safetensors"))
    key = next(k for k in weights if k.endswith("attn1.to_q.weight"))
    out_f, in_f = weights[key].shape
    flat = "lora_unet_" + key.removesuffix(".weight").replace(".", "_")
    down = np.full((rank, in_f), 0.01, np.float32) if down_fill is None else np.full((rank, in_f), down_fill, np.float32)
    tensors = {f"{flat}.lora_down.weight": down, f"{flat}.lora_up.weight": np.full((out_f, rank), 0.01, np.float32)}
    if alpha is not None:
        tensors[f"{flat}.alpha"] = np.asarray(alpha, np.float32)
    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize(
    "kind, needles",
    [
        ("nan", ["NaN"]),
        ("rank0", ["rank 0"]),
        ("alpha9", ["alpha has 9 elements"]),
    ],
)
@pytest.mark.parametrize("dry_run", [True, False])
def test_bad_lora_is_one_line(capsys, tmp_path, tiny_sd1, kind, needles, dry_run):
    lora = {
        "nan": lambda p: _kohya_lora(tiny_sd1, p, 2, down_fill=float("nan")),
        "rank0": lambda p: _kohya_lora(tiny_sd1, p, 0),
        "alpha9": lambda p: _kohya_lora(tiny_sd1, p, 2, alpha=np.ones(9)),
    }[kind](tmp_path / "lora.safetensors")
    out = tmp_path / "o"
    code, err = run_cli(capsys, "export", tiny_sd1, "--out", out, "--lora", lora, "--quiet",
                        *(["--dry-run"] if dry_run else []))
    assert_one_line_error(code, err, *needles)
    assert code == 2 and not out.exists()


# --- item 11: step counts the schedule cannot give ---------------------------------------------------


@pytest.mark.parametrize("scheduler, steps", [("dpmpp-2m", 2000), ("unipc", 1000), ("ddim", 1000), ("ddim", 1001)])
def test_more_steps_than_the_schedule_has(capsys, artifact, tmp_path, scheduler, steps):
    out = tmp_path / "out.png"
    code, err = run_cli(capsys, "generate", artifact, "--prompt", "x", "--steps", steps, "--scheduler", scheduler,
                        "--quiet", "--output", out)
    assert_one_line_error(code, err, str(steps), "1000")
    assert code == 2 and not out.exists()


# --- item 14: user errors that were internal errors, and misleading messages ------------------------


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--seed", "-1"], ["seed -1", "0 or more"]),
        (["--seed", str(2**64), "--rng", "torch"], ["seed", "2**64"]),
        (["--prompt", "bad \udcff byte"], ["--prompt", "UTF-8"]),
        (["--negative-prompt", "bad \udcff"], ["--negative-prompt", "UTF-8"]),
        (["--threads", "-2"], ["--threads"]),
    ],
)
def test_bad_generate_arguments(capsys, artifact, tmp_path, args, needles):
    out = tmp_path / "out.png"
    code, err = generate(capsys, artifact, out, *args)
    assert_one_line_error(code, err, *needles)
    assert code == 2 and not out.exists()


def _bomb_png(path: Path, side: int = 20000) -> Path:
    """A valid 8-bit greyscale PNG of side x side zeros, a few hundred KB on disk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    packer = zlib.compressobj(9)
    row = bytes(side + 1)
    idat = b"".join(packer.compress(row * 500) for _ in range(side // 500)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def test_decompression_bomb_image(capsys, artifact, tmp_path):
    bomb = _bomb_png(tmp_path / "bomb.png")
    code, err = generate(capsys, artifact, tmp_path / "out.png", "--image", bomb)
    assert_one_line_error(code, err, "bomb.png", "too many pixels")
    assert code == 2


def test_image_over_the_pixel_limit(capsys, artifact, tmp_path):
    big = _bomb_png(tmp_path / "big.png", side=10000)  # between Pillow's warning and its refusal
    code, err = generate(capsys, artifact, tmp_path / "out.png", "--image", big)
    assert_one_line_error(code, err, "big.png", "10000x10000", "too many pixels")
    assert code == 2


def test_image_is_a_directory(capsys, artifact, tmp_path):
    code, err = generate(capsys, artifact, tmp_path / "out.png", "--image", tmp_path)
    assert_one_line_error(code, err, "is a directory")
    assert code == 2


def test_image_smaller_than_the_minimum(capsys, artifact, tmp_path):
    Image.new("RGB", (5, 5)).save(tmp_path / "tiny.png")
    code, err = run_cli(capsys, "generate", artifact, "--prompt", "x", "--steps", "1", "--image", tmp_path / "tiny.png",
                        "--output", tmp_path / "out.png")
    assert_one_line_error(code, err, "5x5", "smaller than")
    assert code == 2


def test_empty_output_name(capsys, artifact, tmp_path):
    code, err = generate(capsys, artifact, "")
    assert_one_line_error(code, err, "--output")
    assert code == 2


def test_unwritable_output(capsys, artifact):
    # /sys refuses new files even to root (a chmod'ed folder would not stop root)
    code, err = generate(capsys, artifact, "/sys/sdexport-test.png")
    assert_one_line_error(code, err, "/sys")
    assert code == 2 and not os.path.exists("/sys/sdexport-test.png")


def test_unwritable_export_out(capsys, tiny_sd1):
    code, err = run_cli(capsys, "export", tiny_sd1, "--out", "/sys/sdexport-test", "--quiet", "--dry-run")
    assert_one_line_error(code, err, "/sys")
    assert code == 2


def test_profile_table_given_as_a_number(capsys, tmp_path, tiny_sd1):
    profile = tmp_path / "p.toml"
    profile.write_text('target = "onnx"\nprecision = "fp32"\nshapes = 5\n')
    code, err = run_cli(capsys, "export", tiny_sd1, "--profile", profile, "--out", tmp_path / "o", "--dry-run")
    assert_one_line_error(code, err, "shapes must be a table")
    assert code == 2


def test_empty_target(capsys, tmp_path, tiny_sd1):
    code, err = run_cli(capsys, "export", tiny_sd1, "--target", "", "--out", tmp_path / "o", "--dry-run")
    assert_one_line_error(code, err, "target ''")
    assert code == 2 and not (tmp_path / "o").exists()


def test_long_prompt_is_taken_whole_without_a_warning(capsys, artifact, tmp_path):
    """SD 1.x/2.x read prompts past 75 tokens in chunks (issue 21): nothing is cut, so nothing to warn of."""
    out = tmp_path / "out.png"
    code, err = run_cli(capsys, "generate", artifact, "--prompt", " ".join(["cat"] * 80), "--steps", "1",
                        "--quiet", "--output", out)
    assert code == 0 and not err.strip(), err
    assert Image.open(out).text["prompt_chunks"] == "2"


def test_onnx_runtime_out_of_memory_is_one_line(artifact):
    """A U-Net call whose attention needs 128 GiB: ONNX Runtime's allocation failure becomes a BackendError
    naming the component (the size checks before a run are estimates; this is the last line of defence)."""
    from runtime.backends import SessionOptions, open_session
    from runtime.backends.base import BackendError
    from runtime.manifest import Manifest

    manifest = Manifest.load(artifact)
    unet = manifest.component("unet")
    session = open_session(unet, manifest.root, SessionOptions())
    hidden = unet.input("encoder_hidden_states").shape[-1]
    feeds = {"sample": np.zeros((1, 4, 256, 256), np.float32), "timestep": np.ones(1, np.float32),
             "encoder_hidden_states": np.zeros((1, 77, hidden), np.float32)}
    with pytest.raises(BackendError, match="unet: out of memory"):
        session.run(feeds)
