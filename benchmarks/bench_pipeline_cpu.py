"""sdexport's runtime on ONNX Runtime against diffusers (PyTorch), same model, same machine, one run.

Measures per U-Net call (batch 2 = classifier-free guidance), the cost of ControlNets per step, and
end-to-end txt2img; reports the runtime's own overhead (tokenizer, scheduler, CFG arithmetic, image
conversion: everything outside the model calls) as a share of the end-to-end time, and image parity
(PSNR of the PNG) between the two with the torch-compatible RNG.

    python benchmarks/bench_pipeline_cpu.py --model tiny
    python benchmarks/bench_pipeline_cpu.py --model sd15 --size 256 --controlnets 2
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, bar_chart, machine_info, markdown_table, prepare_model, timeit, unet_feeds, write_results  # noqa: E402
from runtime.metrics import psnr  # noqa: E402
from sdexport.measure.reference_schedulers import use_scheduler  # noqa: E402

PROMPT = "a photo of a red circle in the top left on a blue background"


def prepare_with_controlnets(kind: str, work: Path, controlnets: int) -> tuple[Path, list[Path]]:
    from diffusers import ControlNetModel, UNet2DConditionModel

    src = prepare_model(kind, work)
    cns = []
    for i in range(controlnets):
        path = work / f"{kind}-controlnet{i}"
        if not (path / "config.json").exists():
            torch.manual_seed(100 + i)
            cn = ControlNetModel.from_unet(UNet2DConditionModel.from_pretrained(str(src), subfolder="unet"))
            for block in list(cn.controlnet_down_blocks) + [cn.controlnet_mid_block]:
                torch.nn.init.normal_(block.weight, std=0.02)  # zero-initialised in a fresh ControlNet
            cn.save_pretrained(str(path))
        cns.append(path)
    return src, cns


def export_onnx(src: Path, cns: list[Path], out: Path) -> None:
    if (out / "sdexport.json").exists():
        return
    from sdexport.export.run import export
    from sdexport.export.targets.base import ExportOptions

    options = ExportOptions(target="onnx", controlnets=tuple(f"cn{i}={p}" for i, p in enumerate(cns)))
    export(src, out, options)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("tiny", "sd15"), default="tiny")
    ap.add_argument("--size", type=int, default=None, help="pixels (default 64 tiny, 256 sd15)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--scheduler", default="dpmpp-2m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--e2e-repeats", type=int, default=3)
    ap.add_argument("--controlnets", type=int, default=2, help="measure control cost with 0..N ControlNets")
    ap.add_argument("--work", type=Path, default=Path(".cache/bench"))
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    size = args.size or (64 if args.model == "tiny" else 256)
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)

    import diffusers

    from runtime import Pipeline

    src, cn_paths = prepare_with_controlnets(args.model, args.work, args.controlnets)
    artifact = args.work / f"{args.model}-onnx-cn{args.controlnets}"
    export_onnx(src, cn_paths, artifact)

    results: dict = {"machine": machine_info(), "model": args.model, "size": size, "steps": args.steps,
                     "scheduler": args.scheduler, "threads": args.threads}

    # --- per call: U-Net alone, + 1 ControlNet, + 2 ControlNets (batch 2 = CFG) ---------------
    pipe_rt = Pipeline.from_dir(artifact, options={"threads": args.threads})
    info = pipe_rt.info
    calls: dict[str, dict] = {}
    feeds = unet_feeds(info, size, False)
    calls["onnxruntime: U-Net"] = timeit(lambda: pipe_rt.session("unet").run(feeds), args.repeats)
    cond = np.random.default_rng(1).random((2, 3, size, size), dtype=np.float32)
    n_res = len(info.control_residuals)
    cn_feeds = {"sample": feeds["sample"], "timestep": feeds["timestep"],
                "encoder_hidden_states": feeds["encoder_hidden_states"], "controlnet_cond": cond,
                "conditioning_scale": np.ones((n_res,), np.float32)}
    control_feeds = unet_feeds(info, size, True)
    for k in range(1, args.controlnets + 1):
        def run_control(k=k):
            for i in range(k):
                pipe_rt.session(f"controlnet/cn{i}").run(cn_feeds)
            pipe_rt.session("unet_control").run(control_feeds)
        calls[f"onnxruntime: U-Net + {k} ControlNet"] = timeit(run_control, args.repeats)

    pipe_pt = diffusers.StableDiffusionPipeline.from_pretrained(str(src), safety_checker=None, requires_safety_checker=False)
    pipe_pt.set_progress_bar_config(disable=True)
    use_scheduler(pipe_pt, args.scheduler)
    tfeeds = {k: torch.from_numpy(v) for k, v in feeds.items()}
    with torch.no_grad():
        calls["PyTorch: U-Net"] = timeit(lambda: pipe_pt.unet(tfeeds["sample"], tfeeds["timestep"], tfeeds["encoder_hidden_states"]), args.repeats)
        if args.controlnets:
            cns_pt = [diffusers.ControlNetModel.from_pretrained(str(p)).eval() for p in cn_paths]
            tcond = torch.from_numpy(cond)
            for k in range(1, args.controlnets + 1):
                def run_control_pt(k=k):
                    total = None
                    for cn in cns_pt[:k]:
                        down, mid = cn(tfeeds["sample"], tfeeds["timestep"], tfeeds["encoder_hidden_states"], controlnet_cond=tcond, return_dict=False)
                        total = [*down, mid] if total is None else [a + b for a, b in zip(total, [*down, mid])]
                    pipe_pt.unet(tfeeds["sample"], tfeeds["timestep"], tfeeds["encoder_hidden_states"],
                                 down_block_additional_residuals=total[:-1], mid_block_additional_residual=total[-1])
                calls[f"PyTorch: U-Net + {k} ControlNet"] = timeit(run_control_pt, args.repeats)
            del cns_pt
    results["per_call"] = calls
    gc.collect()

    # --- end to end ---------------------------------------------------------------------------
    kwargs = dict(steps=args.steps, scheduler=args.scheduler, seed=1, rng="torch", height=size, width=size)
    rt_runs = []

    def run_rt():
        rt_runs.append(pipe_rt.generate(PROMPT, **kwargs))

    e2e_rt = timeit(run_rt, args.e2e_repeats)
    last = rt_runs[-1]
    overhead = [r.overhead_seconds / r.timings["total"] for r in rt_runs[1:]]
    pt_images = []

    def run_pt():
        with torch.no_grad():
            pt_images.append(pipe_pt(PROMPT, num_inference_steps=args.steps, height=size, width=size,
                                     generator=torch.Generator().manual_seed(1)).images[0])

    e2e_pt = timeit(run_pt, args.e2e_repeats)
    image_psnr = psnr(np.asarray(pt_images[-1], np.float64), np.asarray(last.image, np.float64), peak=255.0)
    results["end_to_end"] = {
        "onnxruntime": e2e_rt,
        "pytorch": e2e_pt,
        "speedup": e2e_pt["median_ms"] / e2e_rt["median_ms"],
        "runtime_component_seconds": last.timings,
        "runtime_calls": last.calls,
        "runtime_overhead_share": {"median": float(np.median(overhead)), "max": float(np.max(overhead))},
        "image_psnr_db_vs_diffusers": image_psnr,
    }

    rows = [[k, v["median_ms"], v["min_ms"], v["max_ms"]] for k, v in calls.items()]
    rows += [[f"end to end, {args.steps} steps {args.scheduler}: onnxruntime", e2e_rt["median_ms"], e2e_rt["min_ms"], e2e_rt["max_ms"]],
             [f"end to end, {args.steps} steps {args.scheduler}: PyTorch", e2e_pt["median_ms"], e2e_pt["min_ms"], e2e_pt["max_ms"]]]
    name = f"pipeline-cpu-{args.model}-{size}"
    md = "\n".join([
        f"# {args.model} at {size}x{size}, batch 2 (CFG), fp32, {args.threads} threads",
        f"machine: {results['machine']['cpu']} ({results['machine']['cores']} cores); command: `{results['machine']['command']}`",
        "",
        markdown_table(["what", "median ms", "min ms", "max ms"], rows),
        "",
        f"- end-to-end speedup over diffusers: {results['end_to_end']['speedup']:.2f}x",
        f"- runtime overhead (tokenizer + scheduler + CFG + image conversion): "
        f"{100 * results['end_to_end']['runtime_overhead_share']['median']:.3f}% of end to end (max {100 * results['end_to_end']['runtime_overhead_share']['max']:.3f}%)",
        f"- image parity vs diffusers (same seed, rng=torch): PSNR {image_psnr:.1f} dB",
    ])
    out = write_results(name, results, md, args.out)
    bar_chart(out / f"{name}.png", f"{args.model} {size}x{size}, CPU {args.threads} threads (ms, lower is better)",
              [r[0] for r in rows], [r[1] for r in rows])
    print(md)


if __name__ == "__main__":
    main()
