"""Issue 16 (items 1, 13, 8): no command destroys what it did not create, a killed export's stage is
cleaned up by a later run, and a request too large for this machine is refused before any model runs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sdexport.cli import main
from tests.test_cli_errors import assert_one_line_error, no_partial_dirs, run_cli

REPO = Path(__file__).resolve().parents[1]


def listing(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` with its size and mtime: any change, removal or addition shows."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def source(tmp_path, tiny_sd1) -> Path:
    """A private copy of the tiny model: a defect here must not damage the session's fixture."""
    return Path(shutil.copytree(tiny_sd1, tmp_path / "src"))


# -- 1. --overwrite replaces only an earlier export; a dry run replaces nothing ---------------------


def test_overwrite_dry_run_onto_the_source_leaves_it_whole(capsys, source):
    before = listing(source)
    code, err = run_cli(capsys, "export", source, "--out", source, "--overwrite", "--dry-run", "--quiet")
    assert_one_line_error(code, err, str(source))
    assert listing(source) == before


@pytest.mark.parametrize("dry", [True, False])
def test_overwrite_refuses_a_folder_holding_the_source(capsys, source, dry):
    parent = source.parent
    (parent / "notes.txt").write_text("mine")
    before = listing(parent)
    code, err = run_cli(capsys, "export", source, "--out", parent, "--overwrite", "--quiet", *(["--dry-run"] if dry else []))
    assert_one_line_error(code, err, "input")
    assert listing(parent) == before


def test_overwrite_refuses_a_folder_of_user_files(capsys, tmp_path, tiny_sd1):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"\xff\xd8 not really")
    before = listing(out)
    for extra in (["--dry-run"], []):
        code, err = run_cli(capsys, "export", tiny_sd1, "--out", out, "--overwrite", "--quiet", *extra)
        assert_one_line_error(code, err, "not an sdexport output")
        assert listing(out) == before and no_partial_dirs(tmp_path)


def test_dry_run_never_replaces_an_earlier_export(capsys, tmp_path, tiny_sd1):
    out = tmp_path / "plan"
    assert main(["export", str(tiny_sd1), "--out", str(out), "--dry-run", "--quiet"]) == 0
    (out / "sdexport.json").write_text((out / "sdexport.json").read_text() + "\n")  # recognisably the old one
    before = listing(out)
    code, err = run_cli(capsys, "export", tiny_sd1, "--out", out, "--overwrite", "--dry-run", "--quiet")
    assert code == 0 and "wrote nothing" in err
    assert listing(out) == before and no_partial_dirs(tmp_path)


def test_merge_overwrite_replaces_regular_files_only(capsys, tmp_path, tiny_sd1):
    from sdexport.sources.open import open_source
    from sdexport.sources.single_file import write_single_file

    a = write_single_file(open_source(tiny_sd1), tmp_path / "a.safetensors")
    fifo = tmp_path / "out.safetensors"
    os.mkfifo(fifo)
    code, err = run_cli(capsys, "merge", a, a, "--alpha", "0.5", "--out", fifo, "--overwrite", "--quiet")
    assert_one_line_error(code, err, "not a regular file")
    assert fifo.is_fifo()
    folder = tmp_path / "dir.safetensors"
    folder.mkdir()
    code, err = run_cli(capsys, "merge-lora", a, "--out", folder, "--overwrite", "--quiet")
    assert_one_line_error(code, err, "not a regular file")
    assert folder.is_dir()


# -- 13. a SIGKILLed export's stage is removed by the next run, a live one's is kept -----------------


def _partials(parent: Path, name: str) -> list[Path]:
    return sorted(parent.glob(f".{name}.partial-*"))


def test_sigkilled_export_stage_is_removed_by_the_next_run(tmp_path, tiny_sd1):
    out = tmp_path / "onnx"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-m", "sdexport.cli", "export", str(tiny_sd1), "--out", str(out), "--quiet"],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        # Kill it once its stage holds a component file: mid-export, as a crash or the OOM killer would.
        while not any(p.rglob("*.onnx") for p in _partials(tmp_path, "onnx")):
            assert child.poll() is None and time.monotonic() < deadline, "the export ended before it could be killed"
            time.sleep(0.05)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    stale = _partials(tmp_path, "onnx")
    assert stale and not out.exists()

    # A concurrent export's stage (this live process owns it) must survive the cleanup.
    live = tmp_path / ".onnx.partial-live"
    live.mkdir()
    from sdexport.export.artifacts import OWNER_MARKER, _write_owner

    _write_owner(live)
    assert json.loads((live / OWNER_MARKER).read_text())["pid"] == os.getpid()
    assert main(["export", str(tiny_sd1), "--out", str(out), "--quiet", "--no-validate"]) == 0
    assert _partials(tmp_path, "onnx") == [live]
    assert not (out / OWNER_MARKER).exists()


def test_stage_of_a_reused_pid_is_removed(tmp_path, tiny_sd1):
    """A pid alive again after a reboot or wrap-around is not the owner: the start time tells."""
    from sdexport.export.artifacts import OWNER_MARKER, _write_owner, remove_stale_partials

    stage = tmp_path / ".o.partial-old"
    stage.mkdir()
    _write_owner(stage)
    owner = json.loads((stage / OWNER_MARKER).read_text())
    owner["start"] = "1"  # this pid, started at another time: another process
    (stage / OWNER_MARKER).write_text(json.dumps(owner))
    unmarked = tmp_path / ".o.partial-unmarked"  # not ours to judge
    unmarked.mkdir()
    assert remove_stale_partials(tmp_path / "o") == [stage.resolve()]
    assert not stage.exists() and unmarked.is_dir()


# -- 8. requests beyond this machine are refused up front; threads bounded by the CPUs ------------


@pytest.fixture(scope="module")
def onnx_artifact(tmp_path_factory, tiny_sd1) -> Path:
    out = tmp_path_factory.mktemp("resources") / "onnx"
    assert main(["export", str(tiny_sd1), "--out", str(out), "--quiet", "--no-validate"]) == 0
    return out


def _limited(gib: int):
    """A child process that cannot take the shared test machine down, whatever the code under test does."""
    def limit():
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (gib << 30, gib << 30))
    return limit


@pytest.mark.parametrize("args, needle", [
    (["--height", "4096", "--width", "4096", "--steps", "1"], "4096x4096"),
    (["--steps", "1000000000"], "steps 1000000000"),
])
def test_request_beyond_this_machine_refused_before_any_model_runs(tmp_path, onnx_artifact, args, needle):
    out = tmp_path / "x.png"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "sdexport.cli", "generate", str(onnx_artifact), "--prompt", "a cat",
                           "-o", str(out), "--quiet", *args], env=env, capture_output=True, text=True, timeout=120,
                          preexec_fn=_limited(6))
    assert done.returncode == 2, done.stderr[-2000:]
    assert_one_line_error(done.returncode, done.stderr, needle)
    assert time.monotonic() - start < 60 and not out.exists()


def test_normal_sizes_pass_the_estimate():
    from runtime.resources import request_bytes

    # SD 1.5 (latents /8, 4 channels) with guidance: the README's sizes fit a 24 GB machine with room for weights.
    assert request_bytes(512, 512, 1, True, 50, 8, 4) < 1 << 30
    assert request_bytes(1024, 1024, 1, True, 50, 8, 4) < 4 << 30
    assert request_bytes(4096, 4096, 1, True, 1, 8, 4) > 256 << 30


def test_threads_bounded_by_the_cpus():
    from runtime.backends.onnxruntime import session_options
    from runtime.resources import usable_cpus

    assert session_options(100_000).intra_op_num_threads == usable_cpus()
    pytest.importorskip("openvino")
    from runtime.backends.base import SessionOptions
    from runtime.backends.openvino import compile_config

    config = compile_config(SessionOptions(threads=100_000, cache_dir=""), "CPU", ["CPU"])
    assert config["INFERENCE_NUM_THREADS"] == usable_cpus()
