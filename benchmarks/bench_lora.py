"""Run-time LoRAs against re-exporting with the LoRA fused, on an SD 1.5-architecture model (random weights).

For ONNX Runtime and OpenVINO (fp32 exports, CPU): the time and peak memory (VmHWM, each in its own
process) to open the U-Net and text encoder sessions without LoRA, with 1 LoRA and with 5, through
``Pipeline(..., loras=...)`` (reading the LoRAs, computing the deltas, patching, creating the sessions);
the switch from one LoRA to another on a warm pipeline; and ``sdexport export --lora`` of the same
LoRA (the fused route: a whole new export). LoRAs: rank 16 on every attention projection, feed-forward,
proj_in / proj_out of the U-Net and every attention / MLP layer of the text encoder (kohya-style
coverage), random factors, diffusers/PEFT layout.

    python -m benchmarks.bench_lora --model /path/to/sd15-diffusers --work /tmp/bench-lora
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS, machine_info, prepare_model, write_results
from sdexport.measure.child import export_cost, run_child

RANK = 16
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
           "q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def make_loras(artifact: Path, out: Path, count: int) -> list[Path]:
    """LoRA files for the layers the artifact's weight map lists (diffusers/PEFT names, alpha = rank)."""
    from safetensors.numpy import save_file

    from runtime.manifest import Manifest

    manifest = Manifest.load(artifact)
    files = []
    for i in range(count):
        rng = np.random.default_rng(i)
        tensors = {}
        for component in ("unet", "text_encoder"):
            for module, ref in manifest.component(component).weights.items():
                if not module.endswith(TARGETS):
                    continue
                out_dim, in_dim = ref.torch_shape[0], int(np.prod(ref.torch_shape[1:]))
                kernel = ref.torch_shape[2:]
                tensors[f"{component}.{module}.lora_A.weight"] = (rng.standard_normal((RANK, in_dim)) / np.sqrt(in_dim)).astype(np.float32).reshape(RANK, *ref.torch_shape[1:])
                tensors[f"{component}.{module}.lora_B.weight"] = (rng.standard_normal((out_dim, RANK)) * 0.01).astype(np.float32).reshape(out_dim, RANK, *([1] * len(kernel)))
        path = out / f"lora{i}.safetensors"
        save_file(tensors, str(path))
        files.append(path)
    return files


CHILD = r"""
from runtime import Pipeline
artifact, loras, switch = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
start = time.perf_counter()
pipe = Pipeline.from_dir(artifact, loras=[(f, 0.8) for f in loras])
pipe.warmup(("text_encoder", "unet"))
result = {"seconds": time.perf_counter() - start, "peak_rss": rss("VmHWM:")}
if switch:
    start = time.perf_counter()
    reloaded = pipe.set_loras([(f, 0.8) for f in switch])
    pipe.warmup(("text_encoder", "unet"))
    result |= {"switch_seconds": time.perf_counter() - start, "reloaded": sorted(reloaded), "peak_rss_after_switch": rss("VmHWM:")}
print(json.dumps(result))
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="an SD 1.5-architecture diffusers folder (default: built in --work)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-lora"))
    ap.add_argument("--targets", default="onnx,openvino")
    ap.add_argument("--skip-fused", action="store_true", help="do not time the fused re-export")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    model = args.model or prepare_model("sd15", args.work)
    data: dict = {"machine": machine_info(), "model": str(model), "rank": RANK, "scale": 0.8, "runs": {}}
    for target in args.targets.split(","):
        artifact = args.work / f"{target}-base"
        if not (artifact / "sdexport.json").exists():
            data["runs"][f"{target} base export"] = export_cost(model, "--target", target, "--out", artifact,
                                                                "--no-validate", "--overwrite")
        loras = make_loras(artifact, args.work, 5)
        names = [str(f) for f in loras]
        for label, chosen, switch in (("no LoRA", [], names[1:2]), ("1 LoRA", names[:1], names[1:2]), ("5 LoRAs", names, [])):
            data["runs"][f"{target} {label}"] = run_child(CHILD, artifact, json.dumps(chosen), json.dumps(switch))
            print(target, label, data["runs"][f"{target} {label}"], file=sys.stderr)
            write_results("lora-runtime-cpu", data, markdown(data), args.out)  # each run kept as it finishes
        if not args.skip_fused:
            fused = args.work / f"{target}-fused"
            data["runs"][f"{target} export --lora (1 LoRA)"] = export_cost(
                model, "--target", target, "--out", fused, "--no-validate", "--overwrite", "--lora", f"{names[0]}:0.8")
        write_results("lora-runtime-cpu", data, markdown(data), args.out)
    return 0


def markdown(data: dict) -> str:
    gb = 1024 ** 3
    lines = ["# Run-time LoRAs vs re-exporting with the LoRA fused (SD 1.5 architecture, random weights, CPU)", "",
             f"Machine: {data['machine'].get('cpu', '')}; rank {data['rank']} LoRAs at scale {data['scale']}; "
             f"model {data['model']}.", "", "Command: `python -m benchmarks.bench_lora --model DIR --work DIR`", "",
             "| run | seconds | peak RSS (GB) | switch to another LoRA (s) | sessions re-created |", "|---|---|---|---|---|"]
    for label, r in data["runs"].items():
        switch = f"{r['switch_seconds']:.1f}" if "switch_seconds" in r else ""
        lines.append(f"| {label} | {r['seconds']:.1f} | {r['peak_rss'] / gb:.2f} | {switch} | {', '.join(r.get('reloaded', []))} |")
    lines += ["", "Each row is a fresh process opening the U-Net and text encoder sessions (patched with the LoRAs); "
              "'no LoRA' ran first, so its time includes the first sha256 verification of the export's files (and, "
              "for OpenVINO, writing the compiled-model cache), which later opens skip. The switch is `set_loras` "
              "to another LoRA on the warm pipeline plus re-opening the sessions it names (the VAE stays). The fused "
              "route is `sdexport export --lora` (validation off, `validate=False`), the base export the same path "
              "without a LoRA. Timings were taken on a shared 2-core machine with other jobs running: compare rows "
              "with each other, not with other result files."]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
