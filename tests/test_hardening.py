"""Issue 16: untrusted artifacts stay inside their folder, caches never serve stale models, bad input
gets one clear line. Each test reproduces a defect found by probing the CLI with tampered artifacts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdexport.cli import main

pytest.importorskip("openvino")


@pytest.fixture(scope="module")
def ov_artifact(tmp_path_factory):
    from sdexport.demo.tiny import save_tiny_pipeline

    root = tmp_path_factory.mktemp("ov")
    model = save_tiny_pipeline(root / "model", "sd1")
    assert main(["export", str(model), "--target", "openvino", "--out", str(root / "ov"), "--quiet"]) == 0
    return root / "ov"


def _scale_largest_f32_constant(xml: Path, bin_path: Path, factor: float) -> None:
    """Edit weights in place: the .xml (graph, offsets) stays byte for byte the same."""
    import xml.etree.ElementTree as ET

    consts = [d for d in ET.parse(xml).iter("data") if d.get("element_type") == "f32" and d.get("offset")]
    largest = max(consts, key=lambda d: int(d.get("size")))
    offset, size = int(largest.get("offset")), int(largest.get("size"))
    with open(bin_path, "r+b") as f:
        f.seek(offset)
        values = np.frombuffer(f.read(size), np.float32) * np.float32(factor)
        f.seek(offset)
        f.write(values.tobytes())


def _generate(artifact: Path, out: Path, *extra: str) -> np.ndarray:
    code = main(["generate", str(artifact), "--prompt", "a red circle", "--steps", "2", "--seed", "3",
                 "--output", str(out), "--quiet", *extra])
    assert code == 0
    return np.asarray(Image.open(out))


def test_openvino_cache_is_keyed_on_content(ov_artifact, tmp_path):
    """A .bin edited in place (same .xml, manifest hash updated) must not be served from the old blob."""
    from runtime.manifest import sha256_file

    copy = tmp_path / "copy"
    shutil.copytree(ov_artifact, copy)
    before = _generate(copy, tmp_path / "a.png")  # compiles and fills the cache
    _scale_largest_f32_constant(copy / "unet" / "model.xml", copy / "unet" / "model.bin", 1.5)
    manifest = json.loads((copy / "sdexport.json").read_text())
    for ref in manifest["components"]["unet"]["files"]:
        ref["sha256"] = sha256_file(copy / ref["path"])
    (copy / "sdexport.json").write_text(json.dumps(manifest))
    fresh = tmp_path / "fresh"
    shutil.copytree(copy, fresh)  # a new path: OpenVINO's own cache key cannot match
    expected = _generate(fresh, tmp_path / "c.png")
    after = _generate(copy, tmp_path / "b.png")
    assert not np.array_equal(before, expected)  # the edit changes the image
    assert np.array_equal(after, expected)


# --- the manifest is untrusted: paths, hashes, write locations (items 4, 5, 6) ----------------------

from tests.test_cli_errors import assert_one_line_error, run_cli  # noqa: E402


def _tampered(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    data = json.loads((dst / "sdexport.json").read_text())
    edit(data)
    (dst / "sdexport.json").write_text(json.dumps(data))
    return dst


def _unet_files(data: dict) -> list[dict]:
    return data["components"]["unet"]["files"]


@pytest.mark.parametrize("where", ["absolute", "dotdot", "other-artifact", "symlink", "tokenizer", "scheduler"])
def test_manifest_paths_stay_inside_the_artifact(capsys, ov_artifact, tmp_path, where):
    other = tmp_path / "other"
    shutil.copytree(ov_artifact, other)

    def edit(data):
        if where == "absolute":
            _unet_files(data)[0]["path"] = "/etc/passwd"
        elif where == "dotdot":
            _unet_files(data)[0]["path"] = "../../../../../../etc/passwd"
        elif where == "other-artifact":
            for ref in _unet_files(data):
                ref["path"] = "../other/" + ref["path"]
        elif where == "tokenizer":
            data["tokenizer"] = "../other/tokenizer"
        elif where == "scheduler":
            data["scheduler_config"] = "/etc/hostname"

    copy = _tampered(ov_artifact, tmp_path / "copy", edit)
    if where == "symlink":
        target = copy / "unet" / "model.bin"
        target.unlink()
        target.symlink_to(other / "unet" / "model.bin")
    out = tmp_path / "o.png"
    code, err = run_cli(capsys, "generate", copy, "--prompt", "x", "--steps", "1", "--output", out)
    assert_one_line_error(code, err, "outside the artifact" if where != "absolute" and where != "scheduler" else "absolute")
    assert not out.exists()
    code, err = run_cli(capsys, "inspect", copy, "--verify")
    assert code == 2 and "all files present" not in err


def test_flipped_bytes_of_the_same_size_are_refused(capsys, ov_artifact, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(ov_artifact, copy)
    weights = copy / "unet" / "model.bin"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.seek(size // 2)
        block = f.read(4096)
        f.seek(size // 2)
        f.write(bytes(b ^ 0xFF for b in block))
    out = tmp_path / "o.png"
    code, err = run_cli(capsys, "generate", copy, "--prompt", "x", "--steps", "1", "--output", out)
    assert_one_line_error(code, err, "unet/model.bin", "sha256")
    assert not out.exists()


def test_a_wrong_hash_in_the_manifest_is_refused(capsys, ov_artifact, tmp_path):
    copy = _tampered(ov_artifact, tmp_path / "copy", lambda d: _unet_files(d)[-1].update(sha256="0" * 64))
    code, err = run_cli(capsys, "generate", copy, "--prompt", "x", "--steps", "1", "--output", tmp_path / "o.png")
    assert_one_line_error(code, err, "sha256")


def test_verified_hashes_are_cached_by_size_mtime_inode(ov_artifact, tmp_path, monkeypatch):
    from runtime import manifest as manifest_module
    from runtime.manifest import Manifest

    calls = []
    real = manifest_module.sha256_file
    monkeypatch.setattr(manifest_module, "sha256_file", lambda p, *a: calls.append(p) or real(p, *a))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    manifest = Manifest.load(ov_artifact)
    manifest.check_files()
    assert len(calls) == sum(len(c.files) for c in manifest.components.values())
    calls.clear()
    manifest.check_files()  # a warm start hashes nothing
    assert calls == []


def test_the_artifact_does_not_choose_where_files_are_written(ov_artifact, tmp_path):
    evil = tmp_path / "written-by-artifact"

    def edit(data):
        data["runtime"]["backend_options"]["cache_dir"] = str(evil)

    copy = _tampered(ov_artifact, tmp_path / "copy", edit)
    _generate(copy, tmp_path / "o.png")
    assert not evil.exists()


# A child process that opens an OpenVINO session on a model whose one inference lasts many seconds
# on any CPU (a chain of 1024x1024 MatMuls: ~1 TFLOP), prints "started" and runs it. Built with
# OpenVINO's own graph API so the call's length does not depend on the tiny U-Net's speed.
_SLOW_INFERENCE = r"""
import sys, time
from pathlib import Path
import numpy as np, openvino as ov
from openvino import opset13 as ops
from runtime.backends.base import SessionOptions
from runtime.backends.openvino import OpenVinoSession
from runtime.manifest import Component, FileRef, TensorSpec

root, n, depth = Path(sys.argv[1]), 1024, 500
x = ops.parameter([n, n], np.float32, name="x")
y, w = x, ops.constant(np.eye(n, dtype=np.float32))
for _ in range(depth):
    y = ops.matmul(y, w, False, False)
model = ov.Model([y], [x])
model.inputs[0].get_tensor().set_names({"x"})
model.outputs[0].get_tensor().set_names({"y"})
ov.save_model(model, root / "slow.xml")
files = tuple(FileRef(f, "0" * 64, (root / f).stat().st_size) for f in ("slow.xml", "slow.bin"))
spec = (TensorSpec("x", "float32", (n, n)),), (TensorSpec("y", "float32", (n, n)),)
session = OpenVinoSession(Component("slow", "unet", "openvino", files, "fp32", *spec), root,
                          SessionOptions(cache_dir=""))
print("started", flush=True)
start = time.monotonic()
try:
    session.run({"x": np.ones((n, n), np.float32)})
except KeyboardInterrupt:
    print("interrupted", flush=True)
    sys.exit(130)
print(f"finished in {time.monotonic() - start:.1f} s", flush=True)
"""


def test_ctrl_c_stops_an_openvino_inference_in_progress(tmp_path):
    """SIGINT during one long OpenVINO call ends it within seconds, not after the call (which takes
    ~10 s here: on the code before the fix, which blocked in ``infer``, the process ran on until the end)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-c", _SLOW_INFERENCE, str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdout.readline().strip() == "started", proc.communicate()[1]
    time.sleep(0.5)  # inside the inference
    proc.send_signal(signal.SIGINT)
    sent = time.monotonic()
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("the inference still ran 60 s after Ctrl-C")
    waited = time.monotonic() - sent
    assert "interrupted" in out and proc.returncode == 130, out + err
    assert waited < 3.0, f"took {waited:.1f} s to stop after Ctrl-C ({out.strip()})"
