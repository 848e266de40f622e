"""``--quiet``: nothing on stderr from diffusers, transformers or torch (progress bars, with their
cursor-up debris, notices, warnings) and the results still written."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def _sdexport(*argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sdexport.cli", *map(str, argv)], capture_output=True, text=True)


@pytest.mark.slow  # an export and a bench, each in a new process
def test_quiet_export_and_bench_print_nothing_from_other_libraries(tmp_path, tiny_sd1):
    artifact = tmp_path / "out" / "onnx"
    proc = _sdexport("export", tiny_sd1, "--out", artifact, "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == ""
    proc = _sdexport("bench", artifact, "--reference", tiny_sd1, "--height", "64", "--width", "64", "--steps", "2",
                     "--repeats", "1", "--out", tmp_path / "b", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == "", proc.stderr[-2000:]
    assert json.loads((tmp_path / "b" / "bench.json").read_text())["runs"]
