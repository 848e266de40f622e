"""benchmarks/bench_gpu.py's smoke run on a CPU: the tiny model through every stage of `--stage all`.

The numbers mean nothing here; what is checked is that each stage runs (in its own process), writes its
JSON to --out as it ends, and that what needs CUDA says so ("skipped: no CUDA") instead of failing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime.transformers.optimizer")
pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_gpu.py"


@pytest.mark.slow
def test_smoke_run_covers_every_stage(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, str(SCRIPT), "--stage", "all", "--model", "tiny", "--device", "cpu", "--steps", "2",
           "--repeats", "1", "--work", str(tmp_path / "work"), "--out", str(out), "--time-scale", "8"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-2000:]
    from benchmarks.bench_gpu import STAGES

    parts = {stage: json.loads((out / f"{stage}.json").read_text()) for stage in STAGES if stage != "report"}
    assert all("status" not in p or p["status"].startswith("skipped") for p in parts.values()), \
        {k: p.get("status") for k, p in parts.items()}
    assert parts["install"]["status"].startswith("skipped: no --wheels")
    assert parts["tests"]["status"] == "skipped: no CUDA"
    per_call = parts["ort"]["per_call"]
    assert per_call["sdexport ORT CPU (smoke test), --optimize gpu + CUDA graph"] == {"skipped": "no CUDA"}
    assert per_call["sdexport ORT CPU (smoke test), --optimize gpu (fused, fp16)"]["cuda_graph"] == "off"
    assert {c["load_check"] for c in parts["optimize"]["components"].values()} == {"loads"}
    e2e = parts["e2e"]
    assert e2e["numerics"] == "finite" and e2e["device_loop"]["cuda_graph"] == "off"
    protocol = e2e["precision_parity"]["device loop"]["median_db"]
    assert set(protocol) == {"diffusers fp16 vs diffusers fp32", "ours vs diffusers fp32", "ours vs diffusers fp16"}
    report = json.loads((out / "results" / "gpu-smoke-test-cpu.json").read_text())
    assert set(report["stages"]) == set(parts)
    assert "Parity protocol" in (out / "results" / "gpu-smoke-test-cpu.md").read_text()


def test_install_without_wheels_is_skipped_and_split_wheels_need_their_name(tmp_path):
    from benchmarks.bench_gpu import Setup, stage_install

    setup = Setup(work=tmp_path, model="tiny", device="cpu")
    assert stage_install(setup, None, tmp_path / "site")["status"].startswith("skipped")
    assert stage_install(setup, tmp_path, tmp_path / "site")["status"].startswith("skipped: no wheels")
    (tmp_path / "part_aa").write_bytes(b"x")
    with pytest.raises(RuntimeError, match="joined-name.txt"):
        stage_install(setup, tmp_path, tmp_path / "site")


def test_parity_protocol_numbers():
    import numpy as np

    from sdexport.measure.precision_parity import protocol

    gen = np.random.default_rng(0)
    ref32 = [gen.integers(0, 256, (8, 8, 3)).astype(np.uint8)]
    ref16 = [np.clip(ref32[0].astype(int) + 1, 0, 255).astype(np.uint8)]  # about 48 dB
    ours = [ref32[0].copy()]
    result = protocol(ours, ref32, ref16)
    medians = result["median_db"]
    assert medians["ours vs diffusers fp32"] == np.inf and medians["ours vs diffusers fp16"] == medians["diffusers fp16 vs diffusers fp32"]
    assert result["per_image_db"]["ours vs diffusers fp32"] == [None] and result["ours_as_close_as_torch_fp16"]
    far = [np.clip(ref32[0].astype(int) + 20, 0, 255).astype(np.uint8)]  # about 22 dB: far worse than PyTorch's fp16
    assert protocol(far, ref32, ref16)["ours_as_close_as_torch_fp16"] is False
    assert "ours vs diffusers fp32" not in protocol(None, ref32, ref16)["median_db"]


@pytest.mark.slow
def test_sdexport_bench_reports_the_protocol_for_an_fp16_export(tmp_path, tiny_sd1):
    from sdexport.cli import main
    from sdexport.measure.bench import BenchConfig, run_bench

    out = tmp_path / "fp16"
    assert main(["export", str(tiny_sd1), "--target", "onnx", "--precision", "fp16", "--out", str(out), "--quiet",
                 "--no-validate"]) == 0
    config = BenchConfig(prompts=("a red circle",), seeds=(1,), steps=2, repeats=1, warmup=0, cold_start=False)
    result = run_bench(out, tiny_sd1, config, progress=False)
    parity = result["precision_parity"]
    assert parity["reduced"] and set(parity["median_db"]) == {
        "diffusers fp16 vs diffusers fp32", "ours vs diffusers fp32", "ours vs diffusers fp16"}
    assert "_images" not in result["runs"][0]
