"""``sdexport quality``: what an export's precision costs, measured against the fp32 torch pipeline.

Two measurements, both against the reference model in fp32 PyTorch on this machine:

- per component: the same recorded inputs (real pipeline runs of the reference model, from
  :mod:`sdexport.quantize.calibration`, with a seed held out from the export's calibration) go through the
  artifact's backend and through the torch module; per output PSNR (pooled over all inputs, and the
  worst single input), SSIM of the spatial maps, max abs error. Components that calibration cannot
  record (ControlNets) get the spec's example inputs, and the report says so;
- end to end: a fixed prompt/seed set through the runtime pipeline (``rng="torch"``) and through the
  diffusers pipeline; image PSNR and SSIM, and a grid PNG (reference | export | difference per run).

Nothing here knows a target: every backend the runtime opens reports through the same code, so ONNX
int8/int8-static/mixed, OpenVINO fp16/int8/int4/hybrid/int8-static and Core ML palettization (where Core ML runs)
are compared on equal terms. The result is written as JSON (schema ``sdexport-quality/1``), markdown
and the grid PNG.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from runtime.files import write_file_atomic
from runtime.manifest import Manifest
from runtime.metrics import finite, max_abs_error, pooled_psnr, psnr, ssim
from sdexport.errors import OptionError

SCHEMA = "sdexport-quality/1"
DEFAULT_PROMPTS = (
    "a photo of an astronaut riding a horse on mars",
    "a watercolor illustration of a fox in a snowy birch forest",
    "a red sports car on a mountain road at sunset, motion blur, wide angle",
    "a bowl of fruit in the style of cezanne",
)
RECORDED = ("text_encoder", "unet", "unet_control", "vae_encoder", "vae_decoder")  # what calibration records


@dataclasses.dataclass(frozen=True)
class QualityConfig:
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    seeds: tuple[int, ...] = (1,)
    scheduler: str = "dpmpp-2m"
    steps: int = 20
    guidance_scale: float = 7.5
    height: int | None = None  # None: the export's static size, else the model's default
    width: int | None = None
    samples: int = 8  # recorded U-Net inputs per component comparison (fewer for the others)
    calibration_seed: int = 1  # held out: exports calibrate with seed 0
    calibration_steps: int = 20
    components: tuple[str, ...] = ()  # empty: every component of the export
    controlnets: tuple[str, ...] = ()  # NAME=PATH, the torch reference of controlnet/NAME components
    end_to_end: bool = True
    threads: int = 0
    backend_options: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if not self.prompts:
            raise OptionError("quality needs at least one prompt")
        if not self.seeds:
            raise OptionError("quality needs at least one seed")
        if self.steps < 1 or self.samples < 1 or self.calibration_steps < 1:
            raise OptionError("--steps, --samples and --calibration-steps must be at least 1")


def load_prompt_file(path: str | Path) -> tuple[str, ...]:
    """Prompts one per line; blank lines and ``#`` comments are skipped. An empty file is an error."""
    path = Path(path)
    if not path.is_file():
        raise OptionError(f"{path}: no such prompt file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise OptionError(f"{path}: not a UTF-8 text file") from None
    prompts = tuple(ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#"))
    if not prompts:
        raise OptionError(f"{path}: the prompt file is empty (one prompt per line; '#' starts a comment)")
    return prompts


# --- measures ------------------------------------------------------------------------------------


def tensor_ssim(reference: np.ndarray, test: np.ndarray) -> float | None:
    """Mean SSIM of the 2-D maps in the last two axes (channels of a latent, rows of hidden states),
    with the reference's value range as the peak. None for tensors without two spatial axes."""
    ref = np.asarray(reference, np.float64)
    out = np.asarray(test, np.float64)
    if ref.ndim < 3 or min(ref.shape[-2:]) < 7:
        return None
    peak = float(ref.max() - ref.min()) or 1.0
    maps = zip(ref.reshape(-1, *ref.shape[-2:]), out.reshape(-1, *out.shape[-2:]))
    return float(np.mean([ssim(a, b, peak=peak) for a, b in maps]))


def compare_outputs(reference: list[np.ndarray], test: list[np.ndarray]) -> dict:
    """One output over many inputs: pooled PSNR (all inputs as one tensor), worst single input, SSIM."""
    pooled, worst = pooled_psnr(reference, test)
    ssims = [s for s in (tensor_ssim(r, t) for r, t in zip(reference, test)) if s is not None]
    return {
        "psnr_db": finite(pooled),
        "psnr_db_worst_input": finite(worst),
        "ssim": float(np.mean(ssims)) if ssims else None,
        "max_abs_err": max(max_abs_error(r, t) for r, t in zip(reference, test)),
        "finite": all(bool(np.isfinite(t).all()) for t in test),
    }


def image_metrics(reference, test) -> dict:
    a, b = np.asarray(reference, np.float64), np.asarray(test, np.float64)
    return {"psnr_db": finite(psnr(a, b, peak=255.0)), "ssim": ssim(a, b)}


def _psnr_key(value: float | None) -> float:
    return float("inf") if value is None else value


# --- per component -------------------------------------------------------------------------------


def _component_inputs(name: str, component, spec, data, config: QualityConfig, shape) -> tuple[list[dict], str]:
    import torch

    batch = component.inputs[0].shape[0]
    batch = batch if isinstance(batch, int) else None
    if data is not None and name in data.feeds:
        feeds = data.for_component(name, batch)[: config.samples]
        return feeds, f"recorded from {len(data.info.get('prompts', []))} pipeline runs (seed {config.calibration_seed})"
    gen = torch.Generator().manual_seed(config.calibration_seed)
    feeds = []
    for _ in range(min(config.samples, 2)):
        example = spec.example(shape, gen)
        feeds.append({t.name: x.numpy() for t, x in zip(spec.inputs, example)})
    return feeds, "random example inputs (calibration does not record this component)"


def _torch_outputs(spec, feeds: list[dict]) -> list[tuple[np.ndarray, ...]]:
    import torch

    module = spec.module()
    results = []
    with torch.no_grad():
        for feed in feeds:
            out = module(*[torch.from_numpy(np.ascontiguousarray(feed[t.name])) for t in spec.inputs])
            out = out if isinstance(out, tuple) else (out,)
            results.append(tuple(o.float().numpy() for o in out))
    del module
    gc.collect()
    return results


def measure_component(name: str, pipe, spec, data, config: QualityConfig, shape, cache: dict) -> dict:
    component = pipe.manifest.component(name)
    feeds, origin = _component_inputs(name, component, spec, data, config, shape)
    key = ("component", name, (data.info.get("key") if data is not None else None), len(feeds),
           tuple(next(iter(feeds[0].values())).shape) if feeds else ())
    if key not in cache:
        cache[key] = _torch_outputs(spec, feeds)
    expected = cache[key]
    session = pipe.session(name)
    got, times = [], []
    for feed in feeds:
        start = time.perf_counter()
        out = session.run(feed)
        times.append((time.perf_counter() - start) * 1e3)
        got.append(out)
    outputs = {}
    for i, t in enumerate(spec.outputs):
        outputs[t.name] = compare_outputs([e[i] for e in expected], [np.asarray(g[t.name], np.float32) for g in got])
    if name.startswith("vae_decoder"):
        # the decoder's output is the picture: also judge it as 8-bit images, as users see it
        to8 = lambda x: np.clip((np.asarray(x, np.float64) + 1) * 127.5, 0, 255).round()  # noqa: E731
        per = [image_metrics(to8(e[0][j]).transpose(1, 2, 0), to8(g["sample"][j]).transpose(1, 2, 0))
               for e, g in zip(expected, got) for j in range(len(e[0]))]
        outputs["sample"]["image_psnr_db"] = finite(min(_psnr_key(p["psnr_db"]) for p in per))
        outputs["sample"]["image_ssim"] = float(np.mean([p["ssim"] for p in per]))
    worst = min(outputs.values(), key=lambda r: _psnr_key(r["psnr_db"]))
    ssims = [o["ssim"] for o in outputs.values() if o["ssim"] is not None]
    return {
        "backend": component.backend,
        "precision": component.precision,
        "bytes": component.size_bytes,
        "inputs": origin,
        "samples": len(feeds),
        "psnr_db": worst["psnr_db"],
        "psnr_db_worst_input": min((o["psnr_db_worst_input"] for o in outputs.values()), key=_psnr_key),
        "ssim": min(ssims) if ssims else None,
        "max_abs_err": max(o["max_abs_err"] for o in outputs.values()),
        "finite": all(o["finite"] for o in outputs.values()),
        "runtime_ms_median": float(np.median(times)),
        "outputs": outputs,
        "at_export": {k: component.parity.get(k) for k in ("psnr_db", "max_abs_err") if k in component.parity},
        "recipe": _recipe_summary(component),
    }


def _recipe_summary(component) -> dict:
    """What the exporter says it did to this component (quantization recipe, weight formats, fallbacks)."""
    d = component.details or {}
    keep = ("quantization", "weights", "kept_fp32", "fallback", "weight_formats", "activation_quantizers", "calibration")
    return {k: d[k] for k in keep if k in d}


# --- end to end ----------------------------------------------------------------------------------


def _reference_image(ref, prompt: str, seed: int, config: QualityConfig, height: int, width: int, extra: dict):
    import torch

    from sdexport.measure.sdxl_reference import call_size

    ref_extra = {"image": extra["image"], **({"mask_image": extra["mask"]} if "mask" in extra else {})} if extra else {}
    with torch.no_grad():
        return ref(prompt, num_inference_steps=config.steps, guidance_scale=config.guidance_scale,
                   generator=torch.Generator().manual_seed(seed), **call_size(ref, height, width), **ref_extra).images[0]


def end_to_end(pipe, source, config: QualityConfig, height: int, width: int, cache: dict, bar) -> list[dict]:
    from sdexport.measure.bench import _inpaint_inputs, _reference_pipeline

    extra = {}
    if pipe.info.is_inpainting:
        image, mask = _inpaint_inputs(height, width)
        extra = {"image": image, "mask": mask}
    elif pipe.info.requires_aesthetics_score:  # an SDXL refiner refines an image
        extra = {"image": _inpaint_inputs(height, width)[0]}
    ref = None
    runs = []
    for prompt in config.prompts:
        for seed in config.seeds:
            key = ("image", str(source.path), prompt, seed, config.scheduler, config.steps, config.guidance_scale, height, width)
            if key not in cache:
                if ref is None:
                    ref = _reference_pipeline(source, config.scheduler)
                cache[key] = np.asarray(_reference_image(ref, prompt, seed, config, height, width, extra))
            start = time.perf_counter()
            result = pipe.generate(prompt, steps=config.steps, guidance_scale=config.guidance_scale,
                                   scheduler=config.scheduler, seed=seed, rng="torch", height=height, width=width, **extra)
            seconds = time.perf_counter() - start
            ours = np.asarray(result.image.convert("RGB"))
            runs.append({"prompt": prompt, "seed": seed, "runtime_seconds": seconds, **image_metrics(cache[key], ours),
                         "_images": (cache[key], ours)})
            bar.update()
    del ref
    gc.collect()
    return runs


def grid(runs: list[dict], path: Path, min_tile: int = 160) -> None:
    """One row per run: reference | export | |difference| x4, with a header line."""
    from PIL import Image, ImageDraw

    h, w = runs[0]["_images"][0].shape[:2]
    scale = max(1, -(-min_tile // max(h, w)))
    th, tw = h * scale, w * scale
    header, label_w = 18, 0
    canvas = Image.new("RGB", (3 * tw + label_w, header + len(runs) * th), "white")
    draw = ImageDraw.Draw(canvas)
    for col, title in enumerate(("reference (torch fp32)", "export", "|difference| x4")):
        draw.text((col * tw + 4, 3), title, fill="black")
    for row, run in enumerate(runs):
        ref, ours = run["_images"]
        diff = np.clip(np.abs(ref.astype(np.int16) - ours.astype(np.int16)) * 4, 0, 255).astype(np.uint8)
        for col, tile in enumerate((ref, ours, diff)):
            img = Image.fromarray(np.asarray(tile, np.uint8)).resize((tw, th), Image.NEAREST)
            canvas.paste(img, (col * tw, header + row * th))
        p = run["psnr_db"]
        draw.text((4, header + row * th + 4), f"seed {run['seed']}", fill="yellow")
        draw.text((tw + 4, header + row * th + 4), "identical" if p is None else f"{p:.1f} dB", fill="yellow")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


# --- the run -------------------------------------------------------------------------------------


def _specs(source, info, controlnets: dict) -> dict:
    """Every component spec the reference can build, by name (specs load their modules lazily)."""
    from sdexport.export.components import controlnet_spec, text_encoder_spec, unet_spec, vae_decoder_spec, vae_encoder_spec

    if info.is_sdxl:
        from sdexport.measure.sdxl_reference import specs

        return specs(source, info, controlnets)

    specs = [text_encoder_spec(source, info), unet_spec(source, info), unet_spec(source, info, control=True),
             vae_encoder_spec(source, info), vae_decoder_spec(source, info)]
    specs += [controlnet_spec(cn, info) for cn in controlnets.values()]
    return {s.name: s for s in specs}


def _controlnet_sources(config: QualityConfig) -> dict:
    from sdexport.sources.diffusers import ControlNetSource

    sources = [ControlNetSource.parse(s) for s in config.controlnets]
    return {cn.name: cn for cn in sources}


def run_quality(artifact: str | Path, reference: str | Path, config: QualityConfig = QualityConfig(),
                progress: bool = True, cache: dict | None = None) -> dict:
    """Measure ``artifact`` against the fp32 torch pipeline of ``reference``.

    ``cache``: a dict kept across calls with the same reference (benchmarks comparing several exports
    of one model): torch outputs and reference images are computed once.
    """
    from tqdm import tqdm

    from runtime.pipeline import Pipeline
    from sdexport.measure.bench import both_sides_threads, check_reference, reference_class
    from sdexport.quantize.calibration import CalibrationSettings, collect
    from sdexport.export.components import Shape, model_info
    from sdexport.measure.machine import machine_info
    from sdexport.sources.diffusers import DiffusersSource

    cache = {} if cache is None else cache
    manifest = Manifest.load(artifact)
    source = DiffusersSource.open(reference)
    check_reference(source, manifest)
    info = model_info(source)
    names = list(config.components or manifest.components)
    for name in names:
        manifest.component(name)  # an unknown name is a one-line error naming what the export has
    options = both_sides_threads(config.threads, config.backend_options)
    pipe = Pipeline.from_dir(artifact, options=options)
    static_h, static_w = pipe.static_size()
    height = config.height or static_h or info.default_height
    width = config.width or static_w or info.default_width
    shape = Shape(1, height, width)
    specs = _specs(source, info, _controlnet_sources(config))

    recordable = [n for n in names if n in RECORDED]
    data = None
    total = len(names) + (len(config.prompts) * len(config.seeds) if config.end_to_end else 0) + (1 if recordable else 0)
    with tqdm(total=total, desc="quality", disable=not progress, file=sys.stderr) as bar:
        if recordable:
            per_prompt = 4
            settings = CalibrationSettings(samples=config.samples, per_prompt=per_prompt, steps=config.calibration_steps,
                                           scheduler=config.scheduler, guidance_scale=config.guidance_scale,
                                           seed=config.calibration_seed)
            data = collect(source.path, recordable, height=height, width=width, settings=settings)
            bar.update()
        components: dict[str, Any] = {}
        for name in names:
            bar.set_postfix_str(name)
            spec = specs.get(name)
            if spec is None:
                c = manifest.component(name)
                components[name] = {"backend": c.backend, "precision": c.precision, "bytes": c.size_bytes,
                                    "skipped": "no torch reference (give --controlnet NAME=PATH)"}
            else:
                components[name] = measure_component(name, pipe, spec, data, config, shape, cache)
            bar.update()
        runs = end_to_end(pipe, source, config, height, width, cache, bar) if config.end_to_end else []

    psnrs = [_psnr_key(r["psnr_db"]) for r in runs]
    pooled = finite(pooled_psnr([r["_images"][0] for r in runs], [r["_images"][1] for r in runs],
                                peak=255.0)[0]) if runs else None
    result = {
        "schema": SCHEMA,
        "artifact": str(artifact),
        "reference": str(reference),
        "reference_pipeline": reference_class(info),  # the diffusers class of the end-to-end images
        "target": manifest.exporter.get("target"),
        "machine": machine_info(),
        "config": {**{k: v for k, v in dataclasses.asdict(config).items() if k != "backend_options"},
                   "backend_options": options or {}, "height": height, "width": width},
        "calibration": {k: data.info.get(k) for k in ("key", "scheduler", "counts", "cached")} if data else None,
        "artifact_bytes": sum(c.size_bytes for c in manifest.components.values()),
        "components": components,
        "end_to_end": {
            "psnr_db": pooled,  # all runs' pixels as one image
            "psnr_db_min": finite(min(psnrs)) if runs else None,
            "ssim_mean": float(np.mean([r["ssim"] for r in runs])) if runs else None,
            "runs": runs,
        },
    }
    return result


def write_report(result: dict, out_dir: str | Path) -> list[Path]:
    """quality.json, quality.md and grid.png (when there are end-to-end runs) in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = result["end_to_end"]["runs"]
    paths = [out_dir / "quality.json", out_dir / "quality.md"]
    if runs and "_images" in runs[0]:
        paths.append(out_dir / "grid.png")
        grid(runs, paths[-1])
    clean = dict(result, end_to_end={**result["end_to_end"], "runs": [{k: v for k, v in r.items() if k != "_images"} for r in runs]})
    if len(paths) == 3:
        clean["grid"] = paths[2].name
    write_file_atomic(paths[0], (json.dumps(clean, indent=2) + "\n").encode())
    write_file_atomic(paths[1], (markdown(clean) + "\n").encode())
    return paths


def _db(value) -> str:
    return "identical" if value is None else f"{value:.1f}"


def markdown(r: dict) -> str:
    c, m = r["config"], r["machine"]
    lines = [
        f"# sdexport quality: {Path(r['artifact']).name} ({r['target']}) vs {Path(r['reference']).name} "
        f"(torch fp32, diffusers {r.get('reference_pipeline', '')})",
        "",
        f"{m['cpu']} ({m['cores']} cores); {c['width']}x{c['height']}, {c['steps']} steps {c['scheduler']}, "
        f"guidance {c['guidance_scale']}; artifacts {r['artifact_bytes'] / 1e6:.1f} MB",
        "",
        "| component | backend | precision | MB | inputs | PSNR dB (pooled) | worst input dB | SSIM | max abs err | PSNR at export |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, v in r["components"].items():
        if "skipped" in v:
            lines.append(f"| {name} | {v['backend']} | {v['precision']} | {v['bytes'] / 1e6:.1f} | {v['skipped']} | | | | | |")
            continue
        ssim_s = "-" if v["ssim"] is None else f"{v['ssim']:.4f}"
        at = v["at_export"].get("psnr_db")
        lines.append(f"| {name} | {v['backend']} | {v['precision']} | {v['bytes'] / 1e6:.1f} | {v['samples']} "
                     f"{'recorded' if v['inputs'].startswith('recorded') else 'random'} | {_db(v['psnr_db'])} | "
                     f"{_db(v['psnr_db_worst_input'])} | {ssim_s} | {v['max_abs_err']:.3g} | "
                     f"{'-' if not v['at_export'] else _db(at)} |")
    e = r["end_to_end"]
    if e["runs"]:
        lines += ["", f"End to end (runtime, rng=torch, vs diffusers): image PSNR {_db(e['psnr_db'])} dB over all runs, "
                      f"min {_db(e['psnr_db_min'])} dB, SSIM mean {e['ssim_mean']:.4f}.", "",
                  "| prompt | seed | image PSNR dB | SSIM | runtime s |", "|---|---|---|---|---|"]
        for run in e["runs"]:
            lines.append(f"| {run['prompt'][:48]} | {run['seed']} | {_db(run['psnr_db'])} | {run['ssim']:.4f} | "
                         f"{run['runtime_seconds']:.2f} |")
    if r.get("grid"):
        lines += ["", f"![reference | export | difference]({r['grid']})"]
    return "\n".join(lines)
