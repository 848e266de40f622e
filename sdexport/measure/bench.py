"""``sdexport bench``: latency and parity of an export against diffusers, in one process.

The same prompts, seeds and scheduler go through diffusers (PyTorch, fp32, this machine) and through
the runtime on the artifacts. Reported: per-component latency (median and spread after warm-up),
per-step and end-to-end time, cold start and peak resident memory (each engine in a child process,
from process start to the first image), artifact size, and parity per seed (latent max abs error,
image PSNR and SSIM, latent PSNR at every step). Written as JSON, markdown and PNG plots.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm import tqdm

from runtime.files import write_file_atomic
from runtime.manifest import Manifest
from runtime.metrics import finite, max_abs_error, psnr, ssim
from runtime.pipeline import Pipeline
from sdexport.export.components import model_info
from sdexport.errors import SourceError
from sdexport.measure import sdxl_reference
from sdexport.measure.cold_start import cold_start
from sdexport.measure.machine import machine_info
from sdexport.measure.reference_schedulers import use_scheduler
from sdexport.sources.diffusers import DiffusersSource
from sdexport.measure.timing import timeit

DEFAULT_PROMPTS = ("a red circle in the top left on a blue background", "a photo of a lighthouse at sunset, 8k")



@dataclasses.dataclass(frozen=True)
class BenchConfig:
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    seeds: tuple[int, ...] = (1, 2)
    scheduler: str = "dpmpp-2m"
    steps: int = 20
    guidance_scale: float = 7.5
    height: int | None = None
    width: int | None = None
    repeats: int = 5
    warmup: int = 1
    cold_start: bool = True
    threads: int = 0
    backend_options: dict = dataclasses.field(default_factory=dict)


def both_sides_threads(threads: int, backend_options: dict) -> dict | None:
    """The same thread count for torch (the reference) and the runtime's backend; the backend options
    for the runtime (None: the artifact's own)."""
    options = dict(backend_options)
    if threads:
        torch.set_num_threads(threads)
        options["threads"] = threads
    return options or None


def check_reference(source: DiffusersSource, manifest: Manifest) -> None:
    """The reference must be the exported model: same architecture, and the same weights (the text
    encoders must agree on a prompt), or the parity numbers would be meaningless."""
    ref, ours = model_info(source), manifest.model
    if (ref.is_sdxl, ref.requires_aesthetics_score) != (ours.is_sdxl, ours.requires_aesthetics_score):
        raise SourceError(f"reference {source.path} is of model family {ref.family}, the artifacts in {manifest.root} "
                          f"of {ours.family}: give the model the export was made from")
    for field in ("latent_channels", "unet_in_channels", "vae_scale_factor", "text_hidden_size", "prediction_type"):
        if getattr(ref, field) != getattr(ours, field):
            raise SourceError(
                f"reference {source.path} does not match the artifacts in {manifest.root}: "
                f"{field} is {getattr(ref, field)} in the reference but {getattr(ours, field)} in the export"
            )


def reference_class(info) -> str:
    """The diffusers pipeline class an export is measured against (an SDXL one for SDXL exports)."""
    if info.is_sdxl:
        return sdxl_reference.pipeline_class(info)
    if info.family in ("depth", "upscaler"):
        return {"depth": "StableDiffusionDepth2ImgPipeline", "upscaler": "StableDiffusionUpscalePipeline"}[info.family]
    return "StableDiffusionInpaintPipeline" if info.is_inpainting else "StableDiffusionPipeline"


def _reference_pipeline(source: DiffusersSource, scheduler: str):
    import diffusers

    info = model_info(source)
    if info.is_sdxl:  # diffusers' SDXL pipelines (base, refiner, inpainting)
        pipe = sdxl_reference.load_pipeline(source, info)
    else:
        cls = getattr(diffusers, reference_class(info))
        pipe = cls.from_pretrained(str(source.path), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    use_scheduler(pipe, scheduler)
    return pipe


def _inpaint_inputs(height: int, width: int):
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    image = Image.fromarray(np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1),
                                      np.full_like(x, 128)], -1).astype(np.uint8))
    mask = Image.fromarray(((abs(x - width / 2) < width / 4) & (abs(y - height / 2) < height / 4)).astype(np.uint8) * 255)
    return image, mask


def run_bench(artifact: str | Path, reference: str | Path, config: BenchConfig = BenchConfig(), progress: bool = True) -> dict:
    """``reference``: the diffusers folder the export was made from, or the demo's bundled model
    (``sdexport/demo/assets/small``, packed weights), whose diffusers folder is built for the run."""
    with _diffusers_folder(Path(reference)) as folder:
        return _run_bench(artifact, folder, config, progress)


@contextlib.contextmanager
def _diffusers_folder(reference: Path) -> Iterator[Path]:
    from sdexport.demo.run import CONFIGS, WEIGHTS, build_bundled_model

    if not ((reference / WEIGHTS).is_file() and (reference / CONFIGS).is_file()):
        yield reference
        return
    with tempfile.TemporaryDirectory(prefix="sdexport-bench-reference-") as scratch:
        yield build_bundled_model(scratch, reference).model


def _run_bench(artifact: str | Path, reference: Path, config: BenchConfig, progress: bool) -> dict:
    manifest = Manifest.load(artifact)
    source = DiffusersSource.open(reference)
    check_reference(source, manifest)
    info = manifest.model
    height = config.height or info.default_height
    width = config.width or info.default_width
    pipe = Pipeline.from_dir(artifact, options=both_sides_threads(config.threads, config.backend_options))
    ref = _reference_pipeline(source, config.scheduler)
    # The weights must agree too: the text encoders on one prompt.
    ids = pipe.tokenizer([config.prompts[0]])
    if info.is_sdxl:
        text_psnr = sdxl_reference.text_psnr(pipe, ref, config.prompts[0])
    else:
        text_psnr = _text_encoder_psnr(pipe, ref, ids)
    if text_psnr < 20:
        raise SourceError(f"reference {source.path} does not match the artifacts in {manifest.root}: "
                          f"their text encoders disagree (PSNR {text_psnr:.1f} dB)")

    total = 4 + len(config.prompts) * len(config.seeds) + (2 if config.cold_start else 0)
    with tqdm(total=total, desc="bench", disable=not progress, file=sys.stderr) as bar:
        return _measure(pipe, ref, manifest, info, ids, text_psnr, config, height, width, artifact, reference, bar)


def _text_encoder_psnr(pipe, ref, ids: np.ndarray) -> float:
    ours_text = pipe.session("text_encoder").run({"input_ids": ids})["last_hidden_state"]
    with torch.no_grad():
        ref_text = ref.text_encoder(torch.from_numpy(ids))[0].numpy()
    return psnr(ref_text, ours_text)


def _measure(pipe, ref, manifest, info, ids, text_psnr, config, height, width, artifact, reference, bar) -> dict:
    if info.is_sdxl:
        feeds = sdxl_reference.component_feeds(pipe, info, config.prompts[0], height, width)
    else:
        feeds = {**_component_feeds(info, ids, height, width), **depth_feeds(manifest)}
    components = _component_latency(pipe, ref, manifest, feeds, config, bar)
    runs = _end_to_end(pipe, ref, info, config, height, width, bar)
    parity = _precision_parity(manifest, reference, config, height, width, [r.pop("_images") for r in runs])
    cold = _cold_starts(info, config, height, width, artifact, reference, bar)
    e2e_rt = [r["runtime_seconds"] for r in runs]
    e2e_pt = [r["pytorch_seconds"] for r in runs]
    return {
        "schema": "sdexport-bench/1",
        "artifact": str(artifact),
        "reference": str(reference),
        "reference_pipeline": type(ref).__name__,  # the diffusers class the parity is measured against
        "machine": machine_info(),
        "config": {**dataclasses.asdict(config), "height": height, "width": width},
        "artifact_bytes": sum(c.size_bytes for c in manifest.components.values()),
        "artifact_components": {k: {"bytes": c.size_bytes, "precision": c.precision, "backend": c.backend}
                                for k, c in manifest.components.items()},
        "text_encoder_psnr_db": finite(text_psnr),
        "components": components,
        "end_to_end": {
            "runtime_median_s": float(np.median(e2e_rt)), "pytorch_median_s": float(np.median(e2e_pt)),
            "speedup": float(np.median(e2e_pt) / np.median(e2e_rt)),
            "runtime_step_ms": float(np.median([r["runtime_step_ms"] for r in runs if r["runtime_step_ms"]] or [0])),
            "pytorch_step_ms": float(np.median([r["pytorch_step_ms"] for r in runs if r["pytorch_step_ms"]] or [0])),
        },
        "cold_start": cold,
        "runs": runs,
        "precision_parity": parity,
    }


def _precision_parity(manifest, reference, config: BenchConfig, height: int, width: int, images: list) -> dict | None:
    """Issue 17's protocol for an export with reduced-precision components (None when all are fp32):
    the same prompts and seeds through diffusers fp16 too, so PyTorch's own fp16 drift is known.
    ``images``: (diffusers fp32, ours) per run, in prompt x seed order."""
    from sdexport.measure.precision_parity import diffusers_images, protocol

    reduced = {k: c.precision for k, c in manifest.components.items() if c.precision != "fp32"}
    if not reduced:
        return None
    if manifest.model.family == "upscaler":
        return {"reduced": reduced, "skipped": "the protocol's diffusers fp16 reference covers text-to-image only"}
    if manifest.model.is_inpainting or manifest.model.family == "depth" or manifest.model.requires_aesthetics_score:
        return {"reduced": reduced, "skipped": "the protocol's diffusers fp16 reference covers text-to-image only"}
    ref_fp16 = diffusers_images(reference, "fp16", config.prompts, config.seeds, steps=config.steps,
                                guidance_scale=config.guidance_scale, height=height, width=width, scheduler=config.scheduler,
                                sdxl=manifest.model.is_sdxl)
    return {"reduced": reduced, **protocol([o for _, o in images], [r for r, _ in images], ref_fp16)}


def _component_feeds(info, ids, height: int, width: int) -> dict[str, dict[str, np.ndarray]]:
    """One call's inputs per component, seeded; the text encoder and U-Net at the CFG batch of 2."""
    rng = np.random.default_rng(0)
    f = info.vae_scale_factor
    n = 2  # one prompt under classifier-free guidance
    feeds = {
        "text_encoder": {"input_ids": np.repeat(ids, n, axis=0)},
        "unet": {"sample": rng.standard_normal((n, info.unet_in_channels, height // f, width // f), np.float32),
                 "timestep": np.full((n,), 500.0, np.float32),
                 "encoder_hidden_states": rng.standard_normal((n, info.max_length, info.text_hidden_size), np.float32)},
        "vae_decoder": {"latent_sample": rng.standard_normal((1, info.latent_channels, height // f, width // f), np.float32)},
        "vae_encoder": {"sample": rng.uniform(-1, 1, (1, 3, height, width)).astype(np.float32)},
    }
    if info.family == "upscaler":  # the noise level, as class labels
        feeds["unet"]["class_labels"] = np.full((n,), 20, np.int64)
    return feeds


def depth_feeds(manifest: Manifest) -> dict[str, dict[str, np.ndarray]]:
    """The depth estimator's input at the size its image processor feeds (none without an estimator)."""
    if "depth_estimator" not in manifest.components:
        return {}
    from runtime.depth import processor_config

    config = processor_config(manifest.component("depth_estimator").details)
    pixels = np.random.default_rng(0).uniform(-1, 1, (1, 3, config.height, config.width)).astype(np.float32)
    return {"depth_estimator": {"pixel_values": pixels}}


def _component_latency(pipe, ref, manifest, feeds: dict, config: BenchConfig, bar) -> dict:
    """Per-component latency, both engines on the same inputs."""
    torch_calls = {
        "text_encoder": lambda x: ref.text_encoder(torch.from_numpy(x["input_ids"])),
        "unet": lambda x: ref.unet(torch.from_numpy(x["sample"]), torch.from_numpy(x["timestep"]),
                                   torch.from_numpy(x["encoder_hidden_states"])),
        "vae_decoder": lambda x: ref.vae.decode(torch.from_numpy(x["latent_sample"])),
        "vae_encoder": lambda x: ref.vae.encode(torch.from_numpy(x["sample"])),
    }
    if manifest.model.family == "upscaler":
        from sdexport.measure.bench_upscale import unet_torch_call

        torch_calls["unet"] = unet_torch_call(ref)
    if manifest.model.is_sdxl:  # two text encoders, and the U-Net's text_embeds and time_ids
        torch_calls.update(sdxl_reference.torch_calls(ref))
    if getattr(ref, "depth_estimator", None) is not None:  # depth-to-image references have one
        torch_calls["depth_estimator"] = lambda x: ref.depth_estimator(torch.from_numpy(x["pixel_values"]))
    components = {}
    for name, feed in feeds.items():
        if name not in manifest.components or name not in torch_calls:
            continue
        session = pipe.session(name)
        runtime_t = timeit(lambda: session.run(feed), config.repeats, config.warmup)
        with torch.no_grad():
            torch_t = timeit(lambda: torch_calls[name](feed), config.repeats, config.warmup)
        components[name] = {"runtime": runtime_t, "pytorch": torch_t, "speedup": torch_t["median_ms"] / runtime_t["median_ms"],
                            "batch": next(iter(feed.values())).shape[0]}
        bar.update()
    return components


def _end_to_end(pipe, ref, info, config: BenchConfig, height: int, width: int, bar) -> list[dict]:
    """Every prompt and seed through both pipelines, with the latents after every step."""
    if info.family == "upscaler":
        from sdexport.measure.bench_upscale import end_to_end

        return end_to_end(pipe, ref, info, config, height, width, bar)
    extra = {}
    if info.is_inpainting:
        image, mask = _inpaint_inputs(height, width)
        extra = {"image": image, "mask": mask}
    elif info.family == "depth" or info.requires_aesthetics_score:  # depth-to-image, the SDXL refiner: an image
        extra = {"image": _inpaint_inputs(height, width)[0]}
    runs = []
    for prompt in config.prompts:
        for seed in config.seeds:
            runs.append(_one_run(pipe, ref, prompt, seed, config, height, width, extra))
            bar.update()
    return runs


def _one_run(pipe, ref, prompt: str, seed: int, config: BenchConfig, height: int, width: int, extra: dict) -> dict:
    ours_steps, ours_times = [], []

    def on_step(i, t, latents):
        ours_steps.append(latents.copy())
        ours_times.append(time.perf_counter())

    start = time.perf_counter()
    result = pipe.generate(prompt, steps=config.steps, guidance_scale=config.guidance_scale,
                           scheduler=config.scheduler, seed=seed, rng="torch", height=height, width=width,
                           callback=on_step, return_latents=True, **extra)
    ours_total = time.perf_counter() - start
    ref_steps, ref_times = [], []

    def on_step_ref(p, i, t, kwargs):
        ref_steps.append(kwargs["latents"].numpy().copy())
        ref_times.append(time.perf_counter())
        return kwargs

    ref_extra = {"image": extra["image"], **({"mask_image": extra["mask"]} if "mask" in extra else {})} if extra else {}
    start = time.perf_counter()
    with torch.no_grad():
        ref_image = ref(prompt, num_inference_steps=config.steps, guidance_scale=config.guidance_scale,
                        generator=torch.Generator().manual_seed(seed), callback_on_step_end=on_step_ref,
                        **sdxl_reference.call_size(ref, height, width), **ref_extra).images[0]
    ref_total = time.perf_counter() - start
    a, b = np.asarray(ref_image, np.float64), np.asarray(result.image, np.float64)
    return {
        "prompt": prompt, "seed": seed,
        "runtime_seconds": ours_total, "pytorch_seconds": ref_total,
        "runtime_step_ms": _median_step_ms(ours_times), "pytorch_step_ms": _median_step_ms(ref_times),
        "runtime_overhead_share": result.overhead_seconds / result.timings["total"],
        "loop": result.settings.get("loop"),
        "depth_estimator_ms": result.timings["depth_estimator"] * 1e3 if "depth_estimator" in result.timings else None,
        "loop_reason": result.loop_reason,  # device or numpy loop, and whether a CUDA graph ran (and why not)
        "latent_max_abs_err": max_abs_error(ref_steps[-1], result.latents),
        "image_psnr_db": finite(psnr(a, b, peak=255.0)),
        "image_ssim": ssim(a, b),
        "latent_psnr_per_step_db": [finite(psnr(r, o)) for r, o in zip(ref_steps, ours_steps)],
        "_images": (a, b),  # for the reduced-precision protocol; not written out
    }


def _median_step_ms(times: list[float]) -> float | None:
    return float(np.median(np.diff(times)) * 1e3) if len(times) > 1 else None


def _cold_starts(info, config: BenchConfig, height: int, width: int, artifact, reference, bar) -> dict:
    """Cold start and peak memory, each engine in its own process (text-to-image models only)."""
    if not config.cold_start or info.is_inpainting or info.family in ("depth", "upscaler") or info.requires_aesthetics_score:
        return {}
    args = dict(steps=config.steps, height=height, width=width, scheduler=config.scheduler)
    cold = {"runtime": cold_start("runtime", artifact, config.prompts[0], **args)}
    bar.update()
    cold["pytorch"] = cold_start("diffusers", reference, config.prompts[0], **args)
    bar.update()
    return cold


def write_report(result: dict, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "bench.json", out_dir / "bench.md", out_dir / "latency.png", out_dir / "psnr_per_step.png"]
    write_file_atomic(paths[0], (json.dumps(result, indent=2) + "\n").encode())
    write_file_atomic(paths[1], (markdown(result) + "\n").encode())
    _plots(result, paths[2], paths[3])
    return paths


def markdown(r: dict) -> str:
    m, c = r["machine"], r["config"]
    lines = [
        f"# sdexport bench: {Path(r['artifact']).name} vs diffusers {r.get('reference_pipeline', '')} "
        f"({Path(r['reference']).name})",
        "",
        f"{m['cpu']} ({m['cores']} cores){', ' + m['gpu'] if m.get('gpu') else ''}; "
        f"{c['width']}x{c['height']}, {c['steps']} steps {c['scheduler']}, guidance {c['guidance_scale']}; "
        f"artifacts {r['artifact_bytes'] / 1e6:.1f} MB",
        "",
        "| component | batch | runtime ms (median, IQR) | PyTorch ms (median, IQR) | speedup |",
        "|---|---|---|---|---|",
    ]
    for name, v in r["components"].items():
        lines.append(f"| {name} | {v['batch']} | {v['runtime']['median_ms']:.2f} ({v['runtime']['iqr_ms']:.2f}) | "
                     f"{v['pytorch']['median_ms']:.2f} ({v['pytorch']['iqr_ms']:.2f}) | {v['speedup']:.2f}x |")
    e = r["end_to_end"]
    lines += [
        "",
        f"End to end: runtime {e['runtime_median_s']:.3f} s, PyTorch {e['pytorch_median_s']:.3f} s ({e['speedup']:.2f}x); "
        f"per step {e['runtime_step_ms']:.1f} ms vs {e['pytorch_step_ms']:.1f} ms.",
    ]
    depth = [run["depth_estimator_ms"] for run in r["runs"] if run.get("depth_estimator_ms") is not None]
    if depth:  # depth-to-image: the estimator runs once per image, before the loop
        lines.append(f"Depth step (depth estimator, once per image): {float(np.median(depth)):.1f} ms (median of {len(depth)}).")
    if r["cold_start"]:
        lines.append("Cold start (process start to first image) and peak RSS: " + "; ".join(
            f"{k} {v['seconds']:.2f} s, {v['peak_rss_mb']:.0f} MB" for k, v in r["cold_start"].items()))
    lines += ["", "| prompt | seed | image PSNR dB | SSIM | latent max abs err | runtime overhead |", "|---|---|---|---|---|---|"]
    for run in r["runs"]:
        p = run["image_psnr_db"]
        lines.append(f"| {run['prompt'][:40]} | {run['seed']} | {'identical' if p is None else f'{p:.1f}'} | "
                     f"{run['image_ssim']:.4f} | {run['latent_max_abs_err']:.2e} | {100 * run['runtime_overhead_share']:.2f}% |")
    from sdexport.measure.bench_upscale import markdown_line

    lines += markdown_line(r["runs"])
    reasons = sorted({f"{run.get('loop')} loop: {run['loop_reason']}" for run in r["runs"] if run.get("loop_reason")})
    if reasons:
        lines += ["", "Denoising loop: " + "; ".join(reasons)]
    parity = r.get("precision_parity")
    if parity and "median_db" in parity:
        lines += ["", "Reduced precision, image PSNR (median dB): " + "; ".join(
            f"{k} {'identical' if v is None else f'{v:.1f}'}" for k, v in parity["median_db"].items())
            + f"; ours within {parity['margin_db']:.0f} dB of PyTorch's fp16: {'yes' if parity['ours_as_close_as_torch_fp16'] else 'no'}"]
    return "\n".join(lines)


def _plots(r: dict, latency_png: Path, psnr_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(r["components"])
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(x - 0.2, [r["components"][n]["pytorch"]["median_ms"] for n in names], 0.4, label="diffusers (PyTorch)")
    ax.bar(x + 0.2, [r["components"][n]["runtime"]["median_ms"] for n in names], 0.4, label="sdexport runtime")
    ax.set_xticks(x, names)
    ax.set_ylabel("ms per call (median)")
    ax.set_title("latency per component (lower is better)", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(latency_png, dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for run in r["runs"]:
        values = [v if v is not None else 150.0 for v in run["latent_psnr_per_step_db"]]
        ax.plot(range(1, len(values) + 1), values, marker=".", label=f"seed {run['seed']}: {run['prompt'][:24]}")
    ax.set_xlabel("step")
    ax.set_ylabel("latent PSNR vs diffusers (dB)")
    ax.set_title("parity along the trajectory (identical plotted at 150 dB)", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(psnr_png, dpi=120)
    plt.close(fig)
