"""The NVIDIA GPU benchmark of issue 7: SD 1.5 architecture (random weights) at 512x512, fp16.

Measured in one session on the GPU machine (see benchmarks/gpu_run.sh for the device-tool calls):

* U-Net call, batch 2 (classifier-free guidance), latent 64x64: diffusers / PyTorch eager, torch.compile
  (default mode; compile time reported), and sdexport on ONNX Runtime CUDA with I/O binding: the plain
  fp16 export, the export fused by onnxruntime.transformers then fp16 (``--optimize gpu``), and the
  same with a CUDA graph;
* end to end, 50 steps (the model's PNDM scheduler), 512x512, CFG 7.5, batch 1: diffusers fp16 eager
  and sdexport (text encoder, the device-resident loop with the CUDA-graph U-Net, VAE decoder,
  PNG-ready image), plus sdexport's numpy loop for comparison;
* parity: the U-Net output of each ONNX variant against PyTorch fp16 on the same inputs, and the
  PSNR of sdexport's 50-step image against diffusers' fp16 image for the same seed (torch RNG).

Goals (issue 7): <= 6.0 ms per U-Net call, <= 0.4 s end to end, PSNR >= 30 dB. The report says which
were met; nothing here is a number until this script ran on the GPU.

Stages, each well under the device tool's 10 minutes per command, sharing --work between calls:

    python benchmarks/bench_gpu.py --stage export    # SD 1.5 folder, fp32 ONNX, plain fp16 ONNX
    python benchmarks/bench_gpu.py --stage optimize  # --optimize gpu: fused fp32 -> fp16 with fp32 islands
    python benchmarks/bench_gpu.py --stage torch     # diffusers eager / torch.compile, reference image
    python benchmarks/bench_gpu.py --stage ort       # ONNX Runtime CUDA variants, e2e, parity
    python benchmarks/bench_gpu.py --stage report    # JSON + markdown into --results
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, machine_info, markdown_table, write_results  # noqa: E402

PROMPT = "a photo of an astronaut riding a horse on mars"
NEGATIVE = ""
SEED = 42
GUIDANCE = 7.5
GOALS = {"unet_ms": 6.0, "e2e_s": 0.4, "psnr_db": 30.0}
COMPONENTS = ("text_encoder", "unet", "vae_decoder")


@dataclasses.dataclass(frozen=True)
class Setup:
    """What one benchmark run measures. The defaults are the issue's; ``--model tiny --device cpu``
    is a smoke test of this script's code paths on a machine without a GPU (numbers meaningless)."""

    work: Path
    model: str = "sd15"  # or "tiny"
    device: str = "cuda"  # or "cpu" (smoke test)
    size: int = 512
    steps: int = 50
    repeats: int = 50

    @property
    def latent(self) -> int:
        return self.size // 8

    @property
    def text_width(self) -> int:
        return 768 if self.model == "sd15" else 32

    @property
    def cuda_ops(self) -> bool:
        return self.device == "cuda"


def log(*args) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *args, file=sys.stderr, flush=True)


def save_part(work: Path, out: Path | None, stage: str, data: dict) -> None:
    parts = work / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=2, default=str) + "\n"
    (parts / f"{stage}.json").write_text(text)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{stage}.json").write_text(text)
    log(f"stage {stage}: wrote {parts / f'{stage}.json'}")


def timed(fn, repeats: int, warmup: int = 3, sync=None) -> dict:
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if sync:
            sync()
        samples.append((time.perf_counter() - start) * 1e3)
    return {"median_ms": statistics.median(samples), "min_ms": min(samples), "max_ms": max(samples), "repeats": repeats}


# --- artifacts ---------------------------------------------------------------------------------


def rewrite_artifact(src: Path, dst: Path, convert) -> None:
    """Copy an ONNX artifact, replacing components: ``convert(name, component, model)`` returns
    (model, precision, extra details) or None to keep the component as it is."""
    import onnx

    from runtime.manifest import FileRef, Manifest
    from sdexport.export.targets.onnx import save

    manifest = Manifest.load(src)
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    components = dict(manifest.components)
    for name, component in manifest.components.items():
        model = onnx.load(str(src / component.main_file.path))
        result = convert(name, component, model)
        if result is None:
            continue
        model, precision, details = result
        shutil.rmtree(dst / name)
        files = save(model, dst / name)
        components[name] = dataclasses.replace(
            component, files=tuple(FileRef.of(dst, f) for f in files), precision=precision,
            details={**component.details, **details}, parity={},
        )
        log(f"  {name}: {precision} {details.get('fused_ops', '')}")
        del model
        gc.collect()
    dataclasses.replace(manifest, components=components).write(dst)


def stage_export(setup: Setup) -> dict:
    from sdexport.export.run import export
    from sdexport.export.targets.base import ExportOptions
    from sdexport.export.targets.onnx import to_fp16
    from sdexport.demo.tiny import save_sd15_random, save_tiny_pipeline

    work = setup.work
    src = work / setup.model
    timings = {}
    if not (src / "model_index.json").exists():
        start = time.perf_counter()
        save_sd15_random(src) if setup.model == "sd15" else save_tiny_pipeline(src, "sd1")
        timings["build_sd15_s"] = time.perf_counter() - start
    fp32 = work / "onnx-fp32"
    if not (fp32 / "sdexport.json").exists():
        start = time.perf_counter()
        export(src, fp32, ExportOptions(target="onnx", precision="fp32", validate=False, overwrite=True), progress=False)
        timings["export_fp32_s"] = time.perf_counter() - start
    # the plain fp16 export: what `--precision fp16` writes (fp16 conversion of the clean fp32 graph)
    blocks = {"vae_decoder": ("InstanceNormalization", "GroupNormalization"),
              "vae_encoder": ("InstanceNormalization", "GroupNormalization")}
    start = time.perf_counter()
    rewrite_artifact(fp32, work / "onnx-fp16", lambda name, c, m: (
        to_fp16(m, blocks.get(name, ()), work), "fp16", {"kept_fp32": {"op_types": list(blocks.get(name, ()))}}))
    timings["fp16_s"] = time.perf_counter() - start
    return {"timings": timings}


def _probe_feeds(name: str, setup: Setup) -> dict:
    """Example inputs for the fp16 overflow probe (ONNX Runtime CPU, fp32): small sizes keep the
    probe's memory bounded; activation magnitudes hardly depend on the resolution."""
    gen = np.random.default_rng(0)
    if name == "unet":
        side = min(32, setup.latent)
        return {"sample": gen.standard_normal((2, 4, side, side), np.float32),
                "timestep": np.array([981.0, 981.0], np.float32),
                "encoder_hidden_states": gen.standard_normal((2, 77, setup.text_width), np.float32)}
    if name == "text_encoder":
        ids = gen.integers(0, 49406, (2, 77)).astype(np.int64)
        ids[:, 0], ids[:, 12:] = 49406, 49407
        return {"input_ids": ids}
    side = min(16, setup.latent)
    return {"latent_sample": gen.standard_normal((1, 4, side, side), np.float32) * 4}


def stage_optimize(setup: Setup, probe: bool) -> dict:
    from sdexport.export.targets import onnx_gpu

    work = setup.work
    onnx_gpu.check_numpy()
    report = {}

    def convert(name, component, model):
        if name not in COMPONENTS:
            return None
        start = time.perf_counter()
        blocks = ("InstanceNormalization", "GroupNormalization") if name == "vae_decoder" else ()
        options = onnx_gpu.GpuOptimization(cuda_ops=setup.cuda_ops, probe_chunk=64 if name == "vae_decoder" else 256)
        model, details = onnx_gpu.optimize_for_gpu(model, component.role, "fp16", work / "scratch" / name,
                                                   probe_feeds=_probe_feeds(name, setup) if probe else None,
                                                   block_ops=blocks, options=options)
        report[name] = {**details, "seconds": time.perf_counter() - start}
        return model, "fp16", details

    rewrite_artifact(work / "onnx-fp32", work / "onnx-gpu", convert)
    shutil.rmtree(work / "scratch", ignore_errors=True)
    return {"components": report}


# --- PyTorch -----------------------------------------------------------------------------------


def unet_inputs(setup: Setup, seed: int = 0) -> dict[str, np.ndarray]:
    gen = np.random.default_rng(seed)
    return {"sample": gen.standard_normal((2, 4, setup.latent, setup.latent), np.float32),
            "timestep": np.array([500.0, 500.0], np.float32),
            "encoder_hidden_states": gen.standard_normal((2, 77, setup.text_width), np.float32)}


def stage_torch(setup: Setup, compile_unet: bool) -> dict:
    import diffusers
    import torch

    work, repeats = setup.work, setup.repeats
    src = work / setup.model
    device = torch.device(setup.device)
    dtype = torch.float16 if setup.device == "cuda" else torch.float32  # CPU: a smoke test in fp32
    sync = torch.cuda.synchronize if setup.device == "cuda" else None
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        str(src), torch_dtype=dtype, safety_checker=None, requires_safety_checker=False).to(device)
    pipe.set_progress_bar_config(disable=True)
    feeds = {k: torch.from_numpy(v).to(device) for k, v in unet_inputs(setup).items()}
    feeds["sample"], feeds["encoder_hidden_states"] = feeds["sample"].to(dtype), feeds["encoder_hidden_states"].to(dtype)
    result: dict = {"per_call": {}, "e2e": {}}
    with torch.inference_mode():
        call = lambda: pipe.unet(feeds["sample"], feeds["timestep"], feeds["encoder_hidden_states"]).sample  # noqa: E731
        result["per_call"]["diffusers eager (SDPA)"] = timed(call, repeats, sync=sync)
        np.save(work / "unet_torch_fp16.npy", call().float().cpu().numpy())

        def e2e():
            return pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=setup.steps, guidance_scale=GUIDANCE,
                        height=setup.size, width=setup.size, generator=torch.Generator().manual_seed(SEED)).images[0]

        image = e2e()
        np.save(work / "image_torch_fp16.npy", np.asarray(image))
        image.save(work / "image_torch_fp16.png")
        result["e2e"]["diffusers eager"] = timed(e2e, 3, warmup=1, sync=sync)
        if compile_unet:
            compiled = torch.compile(pipe.unet)
            start = time.perf_counter()
            compiled(feeds["sample"], feeds["timestep"], feeds["encoder_hidden_states"])
            if sync:
                sync()
            compile_s = time.perf_counter() - start
            ccall = lambda: compiled(feeds["sample"], feeds["timestep"], feeds["encoder_hidden_states"]).sample  # noqa: E731
            result["per_call"]["torch.compile (default)"] = {**timed(ccall, repeats, sync=sync), "compile_s": compile_s}
    result["torch"] = torch.__version__
    result["diffusers"] = diffusers.__version__
    return result


# --- ONNX Runtime CUDA ---------------------------------------------------------------------------


def ort_unet_call(path: Path, feeds: dict, repeats: int, cuda_graph: bool, device: str) -> tuple[dict, np.ndarray]:
    """One U-Net call with inputs and output bound to fixed device buffers (I/O binding)."""
    import onnxruntime as ort

    from runtime.backends.onnxruntime import create_session

    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    session = create_session(path, providers, cuda_graph=cuda_graph)
    types = {i.name: {"tensor(float)": np.float32, "tensor(float16)": np.float16}[i.type] for i in session.get_inputs()}
    out_meta = session.get_outputs()[0]
    binding = session.io_binding()
    values = {k: ort.OrtValue.ortvalue_from_numpy(v.astype(types[k]), device, 0) for k, v in feeds.items()}
    out_type = {"tensor(float)": np.float32, "tensor(float16)": np.float16}[out_meta.type]
    output = ort.OrtValue.ortvalue_from_shape_and_type(list(feeds["sample"].shape), out_type, device, 0)
    for k, v in values.items():
        binding.bind_ortvalue_input(k, v)
    binding.bind_ortvalue_output(out_meta.name, output)
    run_options = ort.RunOptions()
    if cuda_graph and device == "cuda":
        run_options.add_run_config_entry("gpu_graph_id", "0")
    stats = timed(lambda: session.run_with_iobinding(binding, run_options), repeats, warmup=5)
    result = output.numpy().astype(np.float32)
    del session, binding, values, output
    gc.collect()
    return stats, result


def rel_error(reference: np.ndarray, test: np.ndarray) -> float:
    return float(np.max(np.abs(test.astype(np.float64) - reference)) / max(np.max(np.abs(reference)), 1e-12))


def stage_ort(setup: Setup) -> dict:
    import onnxruntime as ort

    from runtime import Pipeline
    from runtime.device_loop import DeviceLoop
    from runtime.metrics import psnr
    from runtime.rng import make_rng

    work, repeats = setup.work, setup.repeats
    if setup.device == "cuda":
        if hasattr(ort, "preload_dlls"):
            ort.preload_dlls()
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise SystemExit(f"onnxruntime {ort.__version__} here has no CUDAExecutionProvider: install onnxruntime-gpu")
    feeds = unet_inputs(setup)
    torch_out = np.load(work / "unet_torch_fp16.npy") if (work / "unet_torch_fp16.npy").exists() else None
    result: dict = {"per_call": {}, "parity_unet_vs_torch_fp16": {}, "e2e": {}, "onnxruntime": ort.__version__}
    ep = "CUDA" if setup.device == "cuda" else "CPU (smoke test)"
    for label, artifact, graph in ((f"sdexport ORT {ep}, plain fp16 export", "onnx-fp16", False),
                                   (f"sdexport ORT {ep}, --optimize gpu (fused, fp16)", "onnx-gpu", False),
                                   (f"sdexport ORT {ep}, --optimize gpu + CUDA graph", "onnx-gpu", True)):
        log(label)
        try:
            stats, out = ort_unet_call(work / artifact / "unet" / "model.onnx", feeds, repeats, graph, setup.device)
        except Exception as e:  # one variant failing must not lose the others
            result["per_call"][label] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
            continue
        result["per_call"][label] = stats
        if torch_out is not None:
            result["parity_unet_vs_torch_fp16"][label] = {"rel_err": rel_error(torch_out, out), "psnr_db": psnr(torch_out, out)}

    # end to end: text encoder, the device-resident loop (CUDA graph U-Net), VAE decoder, image
    pipe = Pipeline.from_dir(work / "onnx-gpu", options={"device": setup.device})
    pipe.warmup(("text_encoder", "vae_decoder"))
    loop = DeviceLoop.open(pipe.manifest.component("unet"), pipe.root, pipe.options)
    result["device_loop"] = {"cuda_graph": loop.cuda_graph_status}

    def ours():
        sched = pipe.make_scheduler(None)
        sched.set_timesteps(setup.steps)
        embeddings = np.concatenate([pipe.encode_prompts([NEGATIVE]), pipe.encode_prompts([PROMPT])])
        rng = make_rng(SEED, "torch")
        latents = (rng.randn((1, 4, setup.latent, setup.latent)) * np.float32(sched.init_noise_sigma)).astype(np.float32)
        latents = loop.denoise(sched, sched.timesteps, latents, embeddings, guidance_scale=GUIDANCE, rng=rng)
        return pipe.decode(latents)[0]

    image = ours()
    image.save(work / "image_sdexport.png")
    loop.transfers.clear()
    result["e2e"][f"sdexport (device loop{', CUDA graph' if loop.cuda_graph_status == 'on' else ''})"] = timed(ours, 5, warmup=0)
    result["device_loop"]["transfers_per_run"] = {k: v / 5 for k, v in loop.transfers.uploads.items()}
    result["device_loop"]["downloads_per_run"] = {k: v / 5 for k, v in loop.transfers.downloads.items()}

    numpy_pipe = Pipeline.from_dir(work / "onnx-gpu", options={"device": setup.device, "device_loop": "off"})

    def numpy_loop():
        return numpy_pipe.generate(PROMPT, NEGATIVE, steps=setup.steps, guidance_scale=GUIDANCE, seed=SEED, rng="torch",
                             height=setup.size, width=setup.size).images[0]

    numpy_image = numpy_loop()
    result["e2e"]["sdexport (numpy loop)"] = timed(numpy_loop, 3, warmup=0)
    if (work / "image_torch_fp16.npy").exists():
        reference = np.load(work / "image_torch_fp16.npy").astype(np.float64)
        result["image_psnr_db"] = {
            "device loop vs diffusers fp16": psnr(reference, np.asarray(image, np.float64), peak=255.0),
            "numpy loop vs diffusers fp16": psnr(reference, np.asarray(numpy_image, np.float64), peak=255.0),
        }
    result["image_psnr_db_device_vs_numpy_loop"] = psnr(np.asarray(numpy_image, np.float64), np.asarray(image, np.float64), peak=255.0)
    return result


# --- report --------------------------------------------------------------------------------------


def machine_slug(info: dict) -> str:
    name = (info.get("gpu") or "unknown-gpu").split(",")[0]
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def stage_report(setup: Setup, results_dir: Path) -> Path:
    work = setup.work
    parts = {p.stem: json.loads(p.read_text()) for p in sorted((work / "parts").glob("*.json"))}
    info = machine_info()
    per_call = {**parts.get("torch", {}).get("per_call", {}), **parts.get("ort", {}).get("per_call", {})}
    e2e = {**parts.get("torch", {}).get("e2e", {}), **parts.get("ort", {}).get("e2e", {})}
    ours_call = [v["median_ms"] for k, v in per_call.items() if k.startswith("sdexport") and "median_ms" in v]
    ours_e2e = [v["median_ms"] for k, v in e2e.items() if k.startswith("sdexport") and "median_ms" in v]
    image_psnr = parts.get("ort", {}).get("image_psnr_db", {}).get("device loop vs diffusers fp16")
    goals = {
        "unet_call_ms": {"goal": GOALS["unet_ms"], "best": min(ours_call) if ours_call else None},
        "e2e_s": {"goal": GOALS["e2e_s"], "best": min(ours_e2e) / 1e3 if ours_e2e else None},
        "psnr_db": {"goal": GOALS["psnr_db"], "best": image_psnr},
    }
    for name, g in goals.items():
        g["met"] = None if g["best"] is None else (g["best"] >= g["goal"] if name == "psnr_db" else g["best"] <= g["goal"])
    model = "SD 1.5 architecture, random weights" if setup.model == "sd15" else "tiny SD1 (smoke test)"
    data = {"machine": info, "model": model, "device": setup.device, "size": setup.size, "steps": setup.steps,
            "guidance": GUIDANCE, "stages": parts, "goals": goals}
    rows = [[k, round(v["median_ms"], 2) if "median_ms" in v else v.get("error", "-")] for k, v in per_call.items()]
    e2e_rows = [[k, round(v["median_ms"] / 1e3, 3)] for k, v in e2e.items() if "median_ms" in v]
    goal_rows = [[k, g["goal"], "-" if g["best"] is None else round(g["best"], 3), {True: "yes", False: "no", None: "not measured"}[g["met"]]]
                 for k, g in goals.items()]
    md = [f"# GPU benchmark: {info.get('gpu') or info['cpu']}", "",
          f"{model}, {setup.size}x{setup.size}, fp16, batch 2 per U-Net call (CFG); "
          f"{setup.steps} steps end to end. {info['date']}.", "",
          "## U-Net call", "", markdown_table(["engine", "ms per call (median)"], rows), "",
          "## End to end", "", markdown_table(["pipeline", "s (median)"], e2e_rows), "",
          "## Goals (issue 7)", "", markdown_table(["goal", "target", "measured", "met"], goal_rows), ""]
    parity = parts.get("ort", {}).get("parity_unet_vs_torch_fp16", {})
    if parity:
        md += ["## U-Net parity against PyTorch fp16", "",
               markdown_table(["variant", "relative error", "PSNR dB"], [[k, f"{v['rel_err']:.2e}", round(v["psnr_db"], 1)] for k, v in parity.items()]), ""]
    name = f"gpu-{machine_slug(info)}" if setup.device == "cuda" else "gpu-smoke-test-cpu"
    write_results(name, data, "\n".join(md), results_dir)
    log(f"wrote {results_dir / (name + '.json')} and .md")
    return results_dir / f"{name}.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", required=True, choices=("export", "optimize", "torch", "ort", "report", "all"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/sdexport-gpu-bench"))
    ap.add_argument("--out", type=Path, default=None, help="also copy each stage's JSON here (the device tool's $OUT)")
    ap.add_argument("--results", type=Path, default=RESULTS, help="where the report stage writes")
    ap.add_argument("--repeats", type=int, default=50, help="timed U-Net calls per engine")
    ap.add_argument("--model", choices=("sd15", "tiny"), default="sd15")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: smoke test of this script")
    ap.add_argument("--size", type=int, default=None, help="pixels (default 512; 64 for the tiny model)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile (about 90 s of compiling)")
    ap.add_argument("--no-probe", action="store_true", help="skip the fp16 overflow probe of --optimize gpu")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    setup = Setup(work=args.work, model=args.model, device=args.device, size=args.size or (512 if args.model == "sd15" else 64),
                  steps=args.steps, repeats=args.repeats)
    stages = ("export", "optimize", "torch", "ort", "report") if args.stage == "all" else (args.stage,)
    for stage in stages:
        start = time.perf_counter()
        log(f"stage {stage} ...")
        if stage == "export":
            data = stage_export(setup)
        elif stage == "optimize":
            data = stage_optimize(setup, probe=not args.no_probe)
        elif stage == "torch":
            data = stage_torch(setup, compile_unet=not args.no_compile)
        elif stage == "ort":
            data = stage_ort(setup)
        else:
            path = stage_report(setup, args.out / "results" if args.out else args.results)
            log(f"report: {path}")
            continue
        data["stage_seconds"] = time.perf_counter() - start
        save_part(args.work, args.out, stage, data)


if __name__ == "__main__":
    main()
