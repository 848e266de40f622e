"""``sdexport demo``: the whole path on the bundled small trained model, in about a minute on a CPU.

The model (``sdexport/demo/assets/small``) is a latent diffusion model trained by
:mod:`sdexport.demo.train` on the synthetic shapes of :mod:`sdexport.demo.data`: 64x64 images, a
VAE with downsampling 4, a CLIP text encoder on the real tokenizer, a U-Net with cross-attention and
a ControlNet on Canny edges. Its weights ship in a compact form (fp16; the token embedding only for
the tokens its captions use, with the id mapping) and :func:`build_bundled_model` expands them into
a standard diffusers folder, so diffusers itself is the parity reference.

:func:`run_demo` builds that folder, exports it to the best target on the machine (OpenVINO if it is
installed, else ONNX), generates a few prompts (captions the model never saw in training) and one
ControlNet example, compares each image with diffusers on the same seed (PSNR) and with its prompt
(:mod:`sdexport.demo.semantic`), times both, writes ``grid.png`` and ``demo.json`` and prints a table.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from runtime.safetensors import load as load_safetensors
from sdexport.demo import semantic
from sdexport.demo import data

ASSETS = Path(__file__).resolve().parent / "assets" / "small"
WEIGHTS, CONFIGS, PROVENANCE = "weights.safetensors", "configs.json", "provenance.json"
CONTROLNET_NAME = "canny"
EMBEDDING_SUFFIX = "embeddings.token_embedding.weight"
# (folder in the diffusers layout, weights file name, prefix in the packed file)
PARTS = (
    ("unet", "diffusion_pytorch_model.safetensors", "unet"),
    ("vae", "diffusion_pytorch_model.safetensors", "vae"),
    ("text_encoder", "model.safetensors", "text_encoder"),
)
DEMO_MARKER = "demo.json"

STEPS = 20
GUIDANCE = 5.0
# Captions name what the model learned: colour, shape, size, background. No position: the model ignores
# position words (25% on held-out captions, provenance.json), and a prompt should not ask for what it
# cannot do. Training dropped the position from 15% of captions, so this form is a trained one.
PROMPTS = (
    "a red circle on a blue background",
    "a large blue star on a yellow background",
    "a small green triangle on a black background",
    "a large yellow cross on a purple background",
    "a small purple square on a white background",
    "a large white circle on a red background",
)
# The ControlNet example: the Canny edges of a held-out scene, and a prompt that names its colours only.
CONTROL_SCENE = data.Scene("star", "white", "small", "bottom left", "red")
CONTROL_PROMPT = "a white star on a red background"


# --- the bundled model --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BundledModel:
    model: Path  # a StableDiffusionPipeline folder
    controlnet: Path  # a ControlNetModel folder (Canny edges)


def pack_assets(model_dir: Path, controlnet_dir: Path, assets: Path, provenance: dict, token_ids: list[int]) -> Path:
    """Diffusers folders -> compact assets: one fp16 safetensors file, the configs, the provenance.

    The text encoder's 49,408-row token embedding is stored as the rows of ``token_ids`` (the tokens
    the captions use) plus those ids; :func:`build_bundled_model` refills the other rows with their mean.
    """
    from safetensors.numpy import save_file

    tensors: dict[str, np.ndarray] = {}
    configs: dict[str, dict] = {"model_index": _read_json(model_dir / "model_index.json"),
                                "scheduler": _read_json(model_dir / "scheduler" / "scheduler_config.json")}
    stats = {}
    for folder, filename, prefix in PARTS:
        weights = load_safetensors(model_dir / folder / filename)
        configs[folder] = _read_json(model_dir / folder / "config.json")
        stats[folder] = _count(weights)
        if folder == "text_encoder":
            key = _embedding_key(weights)
            table = weights.pop(key)
            ids = np.asarray(sorted(token_ids), np.int32)
            tensors[f"{prefix}.{key}.rows"] = table[ids].astype(np.float16)
            tensors[f"{prefix}.{key}.ids"] = ids
        for key, value in weights.items():
            tensors[f"{prefix}.{key}"] = value.astype(np.float16) if value.dtype.kind == "f" else value
    weights = load_safetensors(controlnet_dir / "diffusion_pytorch_model.safetensors")
    configs["controlnet"] = _read_json(controlnet_dir / "config.json")
    stats["controlnet"] = _count(weights)
    for key, value in weights.items():
        tensors[f"controlnet.{key}"] = value.astype(np.float16) if value.dtype.kind == "f" else value
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = model_dir / "tokenizer" / name
        if path.is_file():
            configs[f"tokenizer/{name}"] = _read_json(path)

    assets.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(assets / WEIGHTS), metadata={"format": "pt"})
    (assets / CONFIGS).write_text(json.dumps(configs, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    provenance = {
        **provenance,
        "components": stats,
        "token_rows_stored": len(token_ids),
        "assets": {WEIGHTS: {"bytes": (assets / WEIGHTS).stat().st_size, "sha256": _sha256(assets / WEIGHTS)}},
    }
    (assets / PROVENANCE).write_text(json.dumps(provenance, indent=1) + "\n", encoding="utf-8")
    return assets


def build_bundled_model(dest: str | Path, assets: Path = ASSETS) -> BundledModel:
    """Write the bundled model as diffusers folders under ``dest`` (``model/``, ``controlnet/``), fp32."""
    from safetensors.numpy import save_file

    from sdexport.sources.clip_vocab import write_clip_vocab

    from sdexport.errors import SourceError

    dest = Path(dest)
    if not (assets / WEIGHTS).is_file():
        raise SourceError(f"{assets / WEIGHTS}: the bundled model's weights are missing (train them with "
                          "python -m sdexport.demo.train)")
    packed = load_safetensors(assets / WEIGHTS)
    configs = _read_json(assets / CONFIGS)
    model, controlnet = dest / "model", dest / "controlnet"
    for d in (model / "scheduler", model / "tokenizer", controlnet):
        d.mkdir(parents=True, exist_ok=True)
    _write_json(model / "model_index.json", configs["model_index"])
    _write_json(model / "scheduler" / "scheduler_config.json", configs["scheduler"])
    for folder, filename, prefix in PARTS:
        part = {k[len(prefix) + 1:]: v for k, v in packed.items() if k.startswith(prefix + ".")}
        if folder == "text_encoder":
            key = _embedding_key(part, ".rows")
            rows = part.pop(f"{key}.rows").astype(np.float32)
            ids = part.pop(f"{key}.ids")
            vocab = int(configs["text_encoder"]["vocab_size"])
            table = np.repeat(rows.mean(0, keepdims=True), vocab, axis=0)
            table[ids] = rows
            part[key] = table
        (model / folder).mkdir(parents=True, exist_ok=True)
        save_file(_fp32(part), str(model / folder / filename), metadata={"format": "pt"})
        _write_json(model / folder / "config.json", configs[folder])
    cn = {k[len("controlnet."):]: v for k, v in packed.items() if k.startswith("controlnet.")}
    save_file(_fp32(cn), str(controlnet / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    _write_json(controlnet / "config.json", configs["controlnet"])
    write_clip_vocab(model / "tokenizer")
    for key, value in configs.items():
        if key.startswith("tokenizer/"):
            _write_json(model / key, value)
    return BundledModel(model, controlnet)


def _embedding_key(weights: dict, suffix: str = "") -> str:
    """The token-embedding key as this transformers version writes it (with or without ``text_model.``)."""
    keys = [k[: len(k) - len(suffix)] for k in weights if k.endswith(EMBEDDING_SUFFIX + suffix)]
    if len(keys) != 1:
        raise ValueError(f"expected one token embedding ({EMBEDDING_SUFFIX}{suffix}), found {keys}")
    return keys[0]


def _fp32(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.ascontiguousarray(v.astype(np.float32) if v.dtype.kind == "f" else v) for k, v in tensors.items()}


def _count(weights: dict[str, np.ndarray]) -> dict:
    return {"parameters": int(sum(v.size for v in weights.values())),
            "fp32_bytes": int(sum(v.size * 4 for v in weights.values() if v.dtype.kind == "f"))}


def _read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _write_json(path: Path, value: dict) -> None:
    Path(path).write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --- the demo -----------------------------------------------------------------------------------


def best_target() -> str:
    """OpenVINO where it (and sdexport's OpenVINO target) can be imported, else ONNX."""
    if importlib.util.find_spec("openvino") is not None and importlib.util.find_spec("sdexport.export.targets.openvino") is not None:
        return "openvino"
    return "onnx"


def _check_out(out: Path) -> None:
    """The demo writes a new directory or replaces one an earlier demo wrote (it has a demo.json), nothing else."""
    from sdexport.errors import OptionError

    if out.exists() and (not out.is_dir() or not (out / DEMO_MARKER).is_file()):
        raise OptionError(f"{out}: exists and is not an earlier demo's output; choose another --out")


def _publish(work: Path, out: Path) -> None:
    """The finished demo replaces the earlier one only now: an interrupted run leaves the old one whole."""
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        work.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        work.rename(out)


@dataclasses.dataclass
class Row:
    prompt: str
    seed: int
    control: bool
    ms_ours: float
    ms_torch: float
    psnr_db: float | None
    semantic: dict
    image: object = dataclasses.field(repr=False, default=None)


def _torch_pipelines(bundled: BundledModel):
    import diffusers

    diffusers.utils.logging.set_verbosity_error()  # its safety-checker notice is not for a shapes model

    base = diffusers.StableDiffusionPipeline.from_pretrained(str(bundled.model), safety_checker=None,
                                                             requires_safety_checker=False)
    base.set_progress_bar_config(disable=True)
    cn = diffusers.ControlNetModel.from_pretrained(str(bundled.controlnet))
    control = diffusers.StableDiffusionControlNetPipeline(**base.components, controlnet=cn)
    control.set_progress_bar_config(disable=True)
    return base, control


def generate_both(pipe, torch_pipes, prompt: str, seed: int, steps: int, guidance: float, control_image=None) -> tuple:
    """The same generation through the exported artifact and through diffusers (torch CPU)."""
    import torch

    from runtime.pipeline import Control

    controls = [Control(CONTROLNET_NAME, control_image)] if control_image is not None else []
    start = time.perf_counter()
    ours = pipe.generate(prompt, steps=steps, guidance_scale=guidance, seed=seed, rng="torch", controls=controls).image
    ms_ours = (time.perf_counter() - start) * 1e3
    base, control = torch_pipes
    kwargs = dict(prompt=prompt, num_inference_steps=steps, guidance_scale=guidance,
                  generator=torch.Generator().manual_seed(seed), height=data.RESOLUTION, width=data.RESOLUTION)
    start = time.perf_counter()
    with torch.no_grad():
        theirs = (control(image=control_image, **kwargs) if control_image is not None else base(**kwargs)).images[0]
    ms_torch = (time.perf_counter() - start) * 1e3
    return ours, theirs, ms_ours, ms_torch


def run_demo(out_dir: str | Path | None = None, target: str = "auto", steps: int = STEPS, guidance: float = GUIDANCE,
             progress: bool = True, echo: Callable[[str], None] | None = None, assets: Path = ASSETS) -> dict:
    """Build, export, generate, compare; returns what ``demo.json`` records."""
    from sdexport.export.artifacts import ordinary_permissions

    echo = echo or print
    t_start = time.perf_counter()
    out = Path(out_dir or "sdexport-demo").absolute()
    target = best_target() if target == "auto" else target
    _check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    ordinary_permissions(work)  # it becomes sdexport-demo/, which should not be private (0700)
    try:
        return _run(work, out, target, steps, guidance, progress, echo, assets, t_start)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(work: Path, out: Path, target: str, steps: int, guidance: float, progress: bool,
         echo: Callable[[str], None], assets: Path, t_start: float) -> dict:
    """The demo in ``work``, published as ``out`` at the end (paths in the result name ``out``)."""
    import torch

    from runtime.metrics import finite, psnr
    from runtime.pipeline import Pipeline
    from sdexport.export.run import export
    from sdexport.export.targets.base import ExportOptions

    import transformers

    transformers.logging.set_verbosity_error()  # config notices about training-only fields
    timings: dict[str, float] = {}

    t = time.perf_counter()
    bundled = build_bundled_model(work / "source", assets)
    timings["build_s"] = time.perf_counter() - t

    t = time.perf_counter()
    artifact = work / target
    options = ExportOptions(target=target, controlnets=(f"{CONTROLNET_NAME}={bundled.controlnet}",))
    export(bundled.model, artifact, options, progress=progress, command=["demo", "--target", target])
    timings["export_s"] = time.perf_counter() - t

    t = time.perf_counter()
    pipe = Pipeline.from_dir(artifact)
    pipe.warmup(("text_encoder", "unet", "unet_control", f"controlnet/{CONTROLNET_NAME}", "vae_decoder"))
    torch_pipes = _torch_pipelines(bundled)
    timings["load_s"] = time.perf_counter() - t

    control_image = data.edge_map(data.render(CONTROL_SCENE))
    jobs = [(p, i, None) for i, p in enumerate(PROMPTS)] + [(CONTROL_PROMPT, len(PROMPTS), control_image)]
    generate_both(pipe, torch_pipes, PROMPTS[0], 0, 2, guidance)  # warm-up of both sides (first-call costs)
    rows: list[Row] = []
    from tqdm import tqdm

    t = time.perf_counter()
    for prompt, seed, control in tqdm(jobs, desc="generate", unit="image", disable=not progress, file=sys.stderr):
        ours, theirs, ms_ours, ms_torch = generate_both(pipe, torch_pipes, prompt, seed, steps, guidance, control)
        value = psnr(np.asarray(theirs, np.float64), np.asarray(ours, np.float64), peak=255.0)
        rows.append(Row(prompt, seed, control is not None, ms_ours, ms_torch, finite(value),
                        semantic.score(ours, prompt), ours))
    timings["generate_s"] = time.perf_counter() - t

    make_grid(rows, control_image).save(work / "grid.png")
    timings["total_s"] = time.perf_counter() - t_start
    result = {
        "target": target,
        "artifact": str(out / target),
        "source": str(out / "source"),
        "grid": str(out / "grid.png"),
        "steps": steps,
        "guidance_scale": guidance,
        "scheduler": pipe.scheduler_config.get("_class_name"),
        "threads_torch": torch.get_num_threads(),
        "rows": [{k: v for k, v in dataclasses.asdict(r).items() if k != "image"} for r in rows],
        "summary": {
            "median_ms_per_image": statistics.median(r.ms_ours for r in rows),
            "median_ms_per_image_torch": statistics.median(r.ms_torch for r in rows),
            "min_psnr_db": min((r.psnr_db for r in rows if r.psnr_db is not None), default=None),
            "semantic": semantic.accuracy(r.semantic for r in rows),
        },
        "timings": {k: round(v, 2) for k, v in timings.items()},
    }
    (work / DEMO_MARKER).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    del pipe  # its sessions hold the artifact's files open
    _publish(work, out)
    echo(format_table(result))
    return result


def format_table(result: dict) -> str:
    rows = result["rows"]
    lines = [
        f"sdexport demo: bundled model -> {result['target']} ({result['artifact']}), {result['steps']} steps "
        f"{result['scheduler']}, guidance {result['guidance_scale']}, 64x64, --rng torch",
        "",
        f"{'prompt':<62} {result['target'] + ' ms':>11} {'torch ms':>9} {'PSNR dB':>8}  colour shape",
    ]
    for r in rows:
        name = ("[control] " if r["control"] else "") + r["prompt"]
        psnr = "identical" if r["psnr_db"] is None else f"{r['psnr_db']:.1f}"
        s = r["semantic"]
        lines.append(f"{name[:62]:<62} {r['ms_ours']:>11.0f} {r['ms_torch']:>9.0f} {psnr:>8}  "
                     f"{'yes' if s.get('color') else 'NO':>6} {'yes' if s.get('shape') else 'NO':>5}")
    summary = result["summary"]
    acc = summary["semantic"]
    lines += [
        "",
        f"median time per image: {result['target']} {summary['median_ms_per_image']:.0f} ms, "
        f"diffusers (torch) {summary['median_ms_per_image_torch']:.0f} ms; "
        f"lowest PSNR against diffusers {summary['min_psnr_db'] if summary['min_psnr_db'] is None else round(summary['min_psnr_db'], 1)} dB",
        f"prompted colour and shape: {acc.get('color_and_shape', 0) * 100:.0f}% of {acc['n']} images",
        f"grid: {result['grid']}   total {result['timings']['total_s']:.0f} s "
        f"(export {result['timings']['export_s']:.0f} s)",
    ]
    return "\n".join(lines)


def make_grid(rows: list[Row], control_image, scale: int = 3):
    """Tiles (upscaled 3x) with their prompt under each; the ControlNet example next to its edge map."""
    import textwrap

    from PIL import Image, ImageDraw, ImageFont

    tile = data.RESOLUTION * scale
    caption_h = 58
    tiles = []
    for r in rows:
        if r.control:
            tiles.append(("control image (Canny edges)", control_image))
        # Only what semantic.py checks and the model learned: it ignores position words (25% on held-out
        # captions, provenance.json), so a tile never claims its position is right.
        mark = ", ".join(f"{name} {'ok' if r.semantic.get(key) else 'wrong'}" for key, name in
                         (("color", "colour"), ("shape", "shape")))
        tiles.append((("[ControlNet] " if r.control else "") + f"{r.prompt} ({mark})", r.image))
    cols = 4
    n_rows = (len(tiles) + cols - 1) // cols
    pad = 6
    grid = Image.new("RGB", (cols * (tile + pad) + pad, n_rows * (tile + caption_h + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    try:
        font = ImageFont.load_default(size=12)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        font = ImageFont.load_default()
    for i, (text, image) in enumerate(tiles):
        x = pad + (i % cols) * (tile + pad)
        y = pad + (i // cols) * (tile + caption_h + pad)
        grid.paste(image.convert("RGB").resize((tile, tile), Image.NEAREST), (x, y))
        for j, line in enumerate(textwrap.wrap(text, 30)[:4]):
            draw.text((x, y + tile + 2 + 13 * j), line, fill="black", font=font)
    return grid
