"""The NVIDIA GPU benchmark (issues 7, 17): SD 1.5 architecture (random weights) at 512x512, fp16.

One command on the GPU machine measures everything, in under 10 minutes on an H200 (see
benchmarks/gpu_run.sh for the device-tool calls that bring the wheels there):

    python benchmarks/bench_gpu.py --stage all --wheels /tmp/wheels --out $OUT

Each stage runs in its own process with its own time limit (STAGE_LIMITS) and writes its JSON to
--work/parts and --out as soon as it ends; a stage that fails or runs out of time is recorded as such
and the next one starts, so a timeout loses nothing already measured:

* install: the wheels handed over (onnxruntime-gpu, diffusers, numpy 2.3, open_clip_torch ...), no index;
* export: the SD 1.5 folder and its fp32 ONNX export (--plain-fp16: also the plain fp16 export);
* optimize: ``--optimize gpu`` (fusions, fp16 with fp32 islands) of text encoder, U-Net, VAE decoder,
  each with its load check (onnx.checker + a CPU session, issue 17 item 1);
* torch: diffusers fp16 eager U-Net call and 50-step generation (--compile: torch.compile too), and
  diffusers' fp32 image for the parity protocol;
* ort: U-Net call on ONNX Runtime CUDA with I/O binding, with and without a CUDA graph; the graph's
  status and, where ORT refuses it, the nodes that stop a capture (item 2); parity against PyTorch fp16;
* e2e: text encoder + device-resident loop + VAE decoder, and the numpy loop; the NaN/inf check (item 4);
  the parity protocol: diffusers fp16 vs fp32, ours vs fp32, ours vs fp16 (item 5);
* tests: the CUDA tests of tests/test_device_loop.py and tests/test_onnx_gpu.py;
* report: JSON + markdown under --out/results (or --results).

Goals (issue 7): <= 6.0 ms per U-Net call, <= 0.4 s end to end, PSNR >= 30 dB. The report says which
were met; nothing here is a number until this script ran on the GPU. ``--model tiny --device cpu`` is
the smoke run (tests/test_bench_gpu.py): every stage, CUDA-only parts recorded as "skipped: no CUDA".
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
    plain_fp16: bool = False  # also measure the plain `--precision fp16` export (about a minute more)

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
    if not setup.plain_fp16:
        return {"timings": timings, "plain_fp16": "skipped: not asked for (--plain-fp16)"}
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
        try:
            model, details = onnx_gpu.optimize_for_gpu(model, component.role, "fp16", work / "scratch" / name,
                                                       probe_feeds=_probe_feeds(name, setup) if probe else None,
                                                       block_ops=blocks, options=options)
        except Exception as e:  # one component failing must not lose the others' numbers
            report[name] = {"error": f"{type(e).__name__}: {_first_line(e)}", "seconds": time.perf_counter() - start}
            save_part(work, None, "optimize.partial", {"components": report})
            return None
        report[name] = {**details, "seconds": time.perf_counter() - start}
        save_part(work, None, "optimize.partial", {"components": report})
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
    del pipe
    gc.collect()
    result["parity_references"] = _reference_images(setup, dtype == torch.float16)
    return result


def _reference_images(setup: Setup, have_fp16: bool) -> dict:
    """diffusers' fp32 image (and, off CUDA, its fp16 one) for the parity protocol, same seed."""
    from sdexport.measure.precision_parity import diffusers_images

    work, made = setup.work, {}
    args = dict(steps=setup.steps, guidance_scale=GUIDANCE, height=setup.size, width=setup.size,
                device=setup.device, negative_prompt=NEGATIVE)
    for dtype in ("fp32",) if have_fp16 else ("fp32", "fp16"):
        start = time.perf_counter()
        image = diffusers_images(work / setup.model, dtype, [PROMPT], [SEED], **args)[0]
        np.save(work / f"image_torch_{dtype}.npy", image)
        made[dtype] = {"seconds": time.perf_counter() - start}
    return made


# --- ONNX Runtime CUDA ---------------------------------------------------------------------------


def _static_graph_session(path: Path, feeds: dict):
    """The U-Net with its symbolic sizes fixed to ``feeds``' shapes, for a CUDA graph (the device
    loop's remedy when ORT refuses a graph over run-time shape computations)."""
    from runtime.backends.onnxruntime import create_session
    from runtime.device_loop import symbolic_sizes

    cuda = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    probe = create_session(path, cuda)
    meta = {i.name: i for i in probe.get_inputs()}
    del probe
    sizes = symbolic_sizes(meta, {k: v.shape for k, v in feeds.items()})
    return create_session(path, cuda, cuda_graph=True, fixed_sizes=sizes)


def open_unet(path: Path, feeds: dict, cuda_graph: bool, device: str):
    """(session, CUDA graph status): a graph ORT refuses is retried with fixed sizes, then run plainly,
    the reason recorded -- never a failed measurement."""
    from runtime.backends.onnxruntime import create_session

    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    if cuda_graph and device == "cuda":
        try:
            return create_session(path, providers, cuda_graph=True), "on"
        except Exception as e:
            refused = _first_line(e)
        try:
            return _static_graph_session(path, feeds), "on (sizes fixed)"
        except Exception as e:
            status = f"off: ONNX Runtime refused CUDA graph capture ({refused}; with fixed sizes: {_first_line(e)})"
        return create_session(path, providers), status
    return create_session(path, providers), "off"


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


def ort_unet_call(path: Path, feeds: dict, repeats: int, cuda_graph: bool, device: str) -> tuple[dict, np.ndarray]:
    """One U-Net call with inputs and output bound to fixed device buffers (I/O binding); the stats say
    whether a CUDA graph replayed it and, if not, why."""
    import onnxruntime as ort

    session, status = open_unet(path, feeds, cuda_graph, device)
    types = {i.name: {"tensor(float)": np.float32, "tensor(float16)": np.float16}[i.type] for i in session.get_inputs()}
    out_meta = session.get_outputs()[0]
    values = {k: ort.OrtValue.ortvalue_from_numpy(v.astype(types[k]), device, 0) for k, v in feeds.items()}
    out_type = {"tensor(float)": np.float32, "tensor(float16)": np.float16}[out_meta.type]
    output = ort.OrtValue.ortvalue_from_shape_and_type(list(feeds["sample"].shape), out_type, device, 0)

    def bind(sess, graph):
        binding = sess.io_binding()
        for k, v in values.items():
            binding.bind_ortvalue_input(k, v)
        binding.bind_ortvalue_output(out_meta.name, output)
        run_options = ort.RunOptions()
        if graph:
            run_options.add_run_config_entry("gpu_graph_id", "0")
        return lambda: sess.run_with_iobinding(binding, run_options)

    call = bind(session, status.startswith("on"))
    try:
        call()  # a graph is captured on the first runs: a failure there falls back, recorded
    except Exception as e:
        if not status.startswith("on"):
            raise
        status = f"off: CUDA graph capture failed at run time ({_first_line(e)})"
        session, _ = open_unet(path, feeds, False, device)
        call = bind(session, False)
    stats = {**timed(call, repeats, warmup=5), "cuda_graph": status}
    result = output.numpy().astype(np.float32)
    del session, values, output, call
    gc.collect()
    return stats, result


def rel_error(reference: np.ndarray, test: np.ndarray) -> float:
    return float(np.max(np.abs(test.astype(np.float64) - reference)) / max(np.max(np.abs(reference)), 1e-12))


def stage_ort(setup: Setup) -> dict:
    import onnxruntime as ort

    from runtime.metrics import psnr

    work, repeats = setup.work, setup.repeats
    if setup.device == "cuda":
        if hasattr(ort, "preload_dlls"):
            ort.preload_dlls()
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise SystemExit(f"onnxruntime {ort.__version__} here has no CUDAExecutionProvider: install onnxruntime-gpu")
    feeds = unet_inputs(setup)
    torch_out = np.load(work / "unet_torch_fp16.npy") if (work / "unet_torch_fp16.npy").exists() else None
    result: dict = {"per_call": {}, "parity_unet_vs_torch_fp16": {}, "onnxruntime": ort.__version__}
    ep = "CUDA" if setup.device == "cuda" else "CPU (smoke test)"
    for label, artifact, graph in ((f"sdexport ORT {ep}, plain fp16 export", "onnx-fp16", False),
                                   (f"sdexport ORT {ep}, --optimize gpu (fused, fp16)", "onnx-gpu", False),
                                   (f"sdexport ORT {ep}, --optimize gpu + CUDA graph", "onnx-gpu", True)):
        log(label)
        if graph and setup.device != "cuda":
            result["per_call"][label] = {"skipped": "no CUDA"}
            continue
        if not (work / artifact / "unet" / "model.onnx").exists():
            result["per_call"][label] = {"skipped": f"no {artifact} export (see the export/optimize stages)"}
            continue
        try:
            stats, out = ort_unet_call(work / artifact / "unet" / "model.onnx", feeds, repeats, graph, setup.device)
        except Exception as e:  # one variant failing must not lose the others
            result["per_call"][label] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
            continue
        result["per_call"][label] = stats
        if torch_out is not None:
            result["parity_unet_vs_torch_fp16"][label] = {"rel_err": rel_error(torch_out, out), "psnr_db": psnr(torch_out, out)}

    if setup.device == "cuda" and (work / "onnx-gpu").exists():
        result["cuda_graph_blockers"] = _capture_blockers(work / "onnx-gpu" / "unet" / "model.onnx", feeds)
    return result


def _capture_blockers(path: Path, feeds: dict) -> str | None:
    """Which nodes would stop ORT from capturing the U-Net in a CUDA graph (None: none), from a profiled run."""
    from runtime.device_loop import graph_capture_blockers, node_placements

    try:
        return graph_capture_blockers(node_placements(str(path), ["CUDAExecutionProvider", "CPUExecutionProvider"], feeds))
    except Exception as e:
        return f"not determined ({type(e).__name__}: {_first_line(e)})"


def stage_e2e(setup: Setup) -> dict:
    """Text encoder, the device-resident loop (CUDA graph U-Net), VAE decoder, image; the numpy loop;
    the fp16 safety check; the parity protocol against diffusers fp32 and fp16."""
    from runtime import Pipeline
    from runtime.device_loop import DeviceLoop
    from runtime.metrics import psnr
    from runtime.numerics import NumericsError, check_finite
    from runtime.rng import make_rng
    from sdexport.measure.precision_parity import protocol

    work = setup.work
    result: dict = {"e2e": {}}
    pipe = Pipeline.from_dir(work / "onnx-gpu", options={"device": setup.device})
    pipe.warmup(("text_encoder", "vae_decoder"))
    loop = DeviceLoop.open(pipe.manifest.component("unet"), pipe.root, pipe.options)

    def ours():
        sched = pipe.make_scheduler(None)
        sched.set_timesteps(setup.steps)
        embeddings = np.concatenate([pipe.encode_prompts([NEGATIVE]), pipe.encode_prompts([PROMPT])])
        rng = make_rng(SEED, "torch")
        latents = (rng.randn((1, 4, setup.latent, setup.latent)) * np.float32(sched.init_noise_sigma)).astype(np.float32)
        latents = loop.denoise(sched, sched.timesteps, latents, embeddings, guidance_scale=GUIDANCE, rng=rng)
        return pipe.decode(latents)[0]

    try:
        image = ours()
    except NumericsError as e:  # an fp16 overflow: said, never an image
        return {**result, "numerics": str(e), "device_loop": loop.stats()}
    result["numerics"] = "finite"
    image.save(work / "image_sdexport.png")
    loop.transfers.clear()
    runs = 5 if setup.device == "cuda" else 1
    label = f"sdexport (device loop{', CUDA graph' if loop.cuda_graph_status.startswith('on') else ''})"
    result["e2e"][label] = timed(ours, runs, warmup=0)
    result["device_loop"] = {"cuda_graph": loop.cuda_graph_status,
                             "transfers_per_run": {k: v / runs for k, v in loop.transfers.uploads.items()},
                             "downloads_per_run": {k: v / runs for k, v in loop.transfers.downloads.items()}}
    save_part(work, None, "e2e.partial", result)

    numpy_pipe = Pipeline.from_dir(work / "onnx-gpu", options={"device": setup.device, "device_loop": "off"})

    def numpy_loop():
        return numpy_pipe.generate(PROMPT, NEGATIVE, steps=setup.steps, guidance_scale=GUIDANCE, seed=SEED, rng="torch",
                                   height=setup.size, width=setup.size).images[0]

    numpy_image = numpy_loop()
    result["e2e"]["sdexport (numpy loop)"] = timed(numpy_loop, 3 if setup.device == "cuda" else 1, warmup=0)
    ours_images = {"device loop": np.asarray(image), "numpy loop": np.asarray(numpy_image)}
    for name, value in ours_images.items():
        check_finite(f"{name} image", value.astype(np.float32))
    result["image_psnr_db_device_vs_numpy_loop"] = psnr(ours_images["numpy loop"].astype(np.float64),
                                                        ours_images["device loop"].astype(np.float64), peak=255.0)
    refs = {d: work / f"image_torch_{d}.npy" for d in ("fp32", "fp16")}
    if all(p.exists() for p in refs.values()):
        ref32, ref16 = (np.load(refs[d]) for d in ("fp32", "fp16"))
        result["precision_parity"] = {name: protocol([img], [ref32], [ref16]) for name, img in ours_images.items()}
    else:
        result["precision_parity"] = "skipped: no diffusers reference images (the torch stage did not finish)"
    return result


# --- report --------------------------------------------------------------------------------------


def machine_slug(info: dict) -> str:
    name = (info.get("gpu") or "unknown-gpu").split(",")[0]
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _report_tables(parts: dict) -> list[str]:
    """Markdown for issue 17's items: load checks, CUDA graph, numerics, the parity protocol."""
    md: list[str] = []
    optimize = parts.get("optimize", {}).get("components", {})
    if optimize:
        rows = [[k, v.get("load_check", v.get("error", "-")), ", ".join(v.get("cuda_only_ops", [])) or "-"] for k, v in optimize.items()]
        md += ["## --optimize gpu: load check (onnx.checker + CPU session)", "", markdown_table(["component", "result", "CUDA-only ops"], rows), ""]
    graph = {k: v.get("cuda_graph") for k, v in parts.get("ort", {}).get("per_call", {}).items() if "cuda_graph" in v}
    loop = parts.get("e2e", {}).get("device_loop", {}).get("cuda_graph")
    if graph or loop:
        rows = [[k, v] for k, v in graph.items()] + ([["device loop", loop]] if loop else [])
        md += ["## CUDA graph", "", markdown_table(["where", "status"], rows), ""]
        if parts.get("ort", {}).get("cuda_graph_blockers"):
            md += [f"Nodes that stop a capture: {parts['ort']['cuda_graph_blockers']}", ""]
    e2e = parts.get("e2e", {})
    if "numerics" in e2e:
        md += [f"fp16 safety (NaN/inf check of the U-Net latents and the VAE output): {e2e['numerics']}", ""]
    parity = e2e.get("precision_parity")
    if isinstance(parity, dict):
        rows = [[loop_name, k, "identical" if v is None else round(v, 1)] for loop_name, prot in parity.items()
                for k, v in prot["median_db"].items()]
        md += ["## Parity protocol (image PSNR, same seed)", "", markdown_table(["loop", "pair", "PSNR dB"], rows), ""]
    return md


def stage_report(setup: Setup, results_dir: Path) -> Path:
    work = setup.work
    parts = {p.stem: json.loads(p.read_text()) for p in sorted((work / "parts").glob("*.json")) if "." not in p.stem}
    info = machine_info()
    per_call = {**parts.get("torch", {}).get("per_call", {}), **parts.get("ort", {}).get("per_call", {})}
    e2e = {**parts.get("torch", {}).get("e2e", {}), **parts.get("e2e", {}).get("e2e", {})}
    ours_call = [v["median_ms"] for k, v in per_call.items() if k.startswith("sdexport") and "median_ms" in v]
    ours_e2e = [v["median_ms"] for k, v in e2e.items() if k.startswith("sdexport") and "median_ms" in v]
    parity = parts.get("e2e", {}).get("precision_parity")
    image_psnr = parity["device loop"]["median_db"].get("ours vs diffusers fp16") if isinstance(parity, dict) else None
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
    rows = [[k, round(v["median_ms"], 2) if "median_ms" in v else v.get("error", v.get("skipped", "-"))] for k, v in per_call.items()]
    e2e_rows = [[k, round(v["median_ms"] / 1e3, 3)] for k, v in e2e.items() if "median_ms" in v]
    goal_rows = [[k, g["goal"], "-" if g["best"] is None else round(g["best"], 3), {True: "yes", False: "no", None: "not measured"}[g["met"]]]
                 for k, g in goals.items()]
    status_rows = [[k, v.get("status", "done"), round(v.get("stage_seconds", 0), 1)] for k, v in parts.items()]
    md = [f"# GPU benchmark: {info.get('gpu') or info['cpu']}", "",
          f"{model}, {setup.size}x{setup.size}, fp16, batch 2 per U-Net call (CFG); "
          f"{setup.steps} steps end to end. {info['date']}.", "",
          "## Stages", "", markdown_table(["stage", "status", "s"], status_rows), "",
          "## U-Net call", "", markdown_table(["engine", "ms per call (median)"], rows), "",
          "## End to end", "", markdown_table(["pipeline", "s (median)"], e2e_rows), "",
          "## Goals (issue 7)", "", markdown_table(["goal", "target", "measured", "met"], goal_rows), ""]
    unet_parity = parts.get("ort", {}).get("parity_unet_vs_torch_fp16", {})
    if unet_parity:
        md += ["## U-Net parity against PyTorch fp16", "",
               markdown_table(["variant", "relative error", "PSNR dB"], [[k, f"{v['rel_err']:.2e}", round(v["psnr_db"], 1)] for k, v in unet_parity.items()]), ""]
    md += _report_tables(parts)
    name = f"gpu-{machine_slug(info)}" if setup.device == "cuda" else "gpu-smoke-test-cpu"
    write_results(name, data, "\n".join(md), results_dir)
    log(f"wrote {results_dir / (name + '.json')} and .md")
    return results_dir / f"{name}.json"


# --- install, CUDA tests, and the whole run ------------------------------------------------------

STAGES = ("install", "export", "optimize", "torch", "ort", "e2e", "tests", "report")
#: seconds each stage may take in `--stage all` (H200 costs in shared/device/README.md, with margin);
#: the whole run stays under 10 minutes
STAGE_LIMITS = {"install": 60, "export": 150, "optimize": 180, "torch": 90, "ort": 60, "e2e": 90, "tests": 120, "report": 30}


def stage_install(setup: Setup, wheels: Path | None, site: Path) -> dict:
    """Install the wheels handed over (``part_*`` pieces of one split wheel are joined first) into
    ``site`` without an index; later stages run with ``site`` first on PYTHONPATH."""
    import subprocess

    if wheels is None:
        return {"status": "skipped: no --wheels given (using what is installed)"}
    wheels = Path(wheels)
    files = sorted(wheels.glob("*.whl"))
    pieces = sorted(wheels.glob("part_*"))
    if pieces:  # a wheel too large for one transfer: its file name travels in joined-name.txt
        name_file = wheels / "joined-name.txt"
        if not name_file.exists():
            raise RuntimeError(f"{wheels} has part_* pieces but no joined-name.txt naming the wheel they make")
        joined = wheels / name_file.read_text().strip()
        with joined.open("wb") as out:
            for piece in pieces:
                out.write(piece.read_bytes())
        files.append(joined)
    if not files:
        return {"status": f"skipped: no wheels in {wheels}"}
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--upgrade", "--target", str(site), *map(str, files)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"pip install failed: {done.stderr.strip().splitlines()[-1:]}")
    return {"installed": [f.name for f in files], "site": str(site)}


def stage_tests(setup: Setup) -> dict:
    """The CUDA tests of the device loop and --optimize gpu (skipped with their reason on a CPU)."""
    import subprocess

    if setup.device != "cuda":
        return {"status": "skipped: no CUDA"}
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda",
           "tests/test_device_loop.py", "tests/test_onnx_gpu.py"]
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=STAGE_LIMITS["tests"] - 10)
    lines = done.stdout.strip().splitlines()
    return {"returncode": done.returncode, "summary": lines[-1] if lines else "",
            "failures": [line for line in lines if line.startswith(("FAILED", "ERROR"))][:20]}


def versions() -> dict:
    found = {}
    for name in ("numpy", "onnx", "onnxruntime", "torch", "diffusers", "transformers"):
        try:
            module = __import__(name)
            found[name] = getattr(module, "__version__", "?")
        except Exception as e:  # a missing package is a finding, not a crash
            found[name] = f"missing ({type(e).__name__})"
    try:
        import onnxruntime as ort

        if hasattr(ort, "preload_dlls"):
            ort.preload_dlls()
        found["onnxruntime_providers"] = ort.get_available_providers()
    except Exception:
        pass
    return found


def run_stage(stage: str, setup: Setup, args) -> None:
    start = time.perf_counter()
    log(f"stage {stage} ...")
    if stage == "report":
        log(f"report: {stage_report(setup, args.out / 'results' if args.out else args.results)}")
        return
    if stage == "install":
        data = stage_install(setup, args.wheels, args.site)
    elif stage == "export":
        data = stage_export(setup)
    elif stage == "optimize":
        data = stage_optimize(setup, probe=args.probe)
    elif stage == "torch":
        data = stage_torch(setup, compile_unet=args.compile)
    elif stage == "ort":
        data = stage_ort(setup)
    elif stage == "e2e":
        data = stage_e2e(setup)
    else:
        data = stage_tests(setup)
    data = {**data, "versions": versions()} if stage in ("install", "ort") else data
    data["stage_seconds"] = time.perf_counter() - start
    save_part(args.work, args.out, stage, data)


def run_all(args, argv: list[str]) -> None:
    """Every stage in its own process with its own time limit: a stage that fails or runs out of
    time is recorded (its JSON says so) and the next one starts; nothing measured is lost."""
    import os
    import subprocess

    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([str(args.site), root, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    base = [a for a in argv if a not in ("--stage", "all")]
    # a report before the CUDA tests too: should the device tool's 10 minutes run out there, it is in --out
    for stage in (*STAGES[:-2], "report", *STAGES[-2:]):
        limit = STAGE_LIMITS[stage] * args.time_scale
        start = time.perf_counter()
        try:
            done = subprocess.run([sys.executable, __file__, "--stage", stage, *base], env=env, timeout=limit)
            status = "done" if done.returncode == 0 else f"failed (exit {done.returncode})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {limit:.0f} s"
        if status != "done":
            log(f"stage {stage}: {status}")
            partial = args.work / "parts" / f"{stage}.partial.json"
            data = json.loads(partial.read_text()) if partial.exists() else {}
            save_part(args.work, args.out, stage, {**data, "status": status, "stage_seconds": time.perf_counter() - start})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", required=True, choices=(*STAGES, "all"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/sdexport-gpu-bench"))
    ap.add_argument("--out", type=Path, default=None, help="also copy each stage's JSON here (the device tool's $OUT)")
    ap.add_argument("--results", type=Path, default=RESULTS, help="where the report stage writes")
    ap.add_argument("--wheels", type=Path, default=None, help="install: folder of wheels (and part_* pieces of a split one)")
    ap.add_argument("--site", type=Path, default=Path("/tmp/site"), help="install target, first on the stages' PYTHONPATH")
    ap.add_argument("--repeats", type=int, default=30, help="timed U-Net calls per engine")
    ap.add_argument("--model", choices=("sd15", "tiny"), default="sd15")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: smoke test of this script")
    ap.add_argument("--size", type=int, default=None, help="pixels (default 512; 64 for the tiny model)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (about 90 s of compiling)")
    ap.add_argument("--probe", action="store_true", help="run the fp16 overflow probe of --optimize gpu (minutes)")
    ap.add_argument("--plain-fp16", action="store_true", help="also export and time the plain --precision fp16 U-Net")
    ap.add_argument("--time-scale", type=float, default=1.0, help="--stage all: multiply every stage's time limit")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.stage == "all":
        run_all(args, sys.argv[1:])
        return
    setup = Setup(work=args.work, model=args.model, device=args.device, size=args.size or (512 if args.model == "sd15" else 64),
                  steps=args.steps, repeats=args.repeats, plain_fp16=args.plain_fp16)
    run_stage(args.stage, setup, args)


if __name__ == "__main__":
    main()
