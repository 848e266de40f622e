"""The ``sdexport`` command: export, generate, inspect (and more as they land).

``generate`` and ``inspect`` need only the runtime (numpy, Pillow, one backend): this module imports
torch and the export side only inside the commands that use them. Errors a user can cause end in
one line on stderr and exit status 2; nothing half-written is left behind.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Iterator

EXIT_USAGE = 2


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + error
        raise UsageError(message)


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types whose message is meant for the user (imported lazily: no torch here)."""
    from runtime.backends.base import BackendError
    from runtime.image import ImageInputError
    from runtime.manifest import ManifestError
    from runtime.pipeline import PipelineInputError
    from runtime.schedulers import SchedulerConfigError
    from runtime.tokenizer import TokenizerError

    errors: list[type[BaseException]] = [
        UsageError, BackendError, ImageInputError, ManifestError, PipelineInputError, SchedulerConfigError,
        TokenizerError, PermissionError,  # a folder the user cannot write: their setup, not our bug
    ]
    try:
        from sdexport.errors import SdexportError

        errors.append(SdexportError)
    except ImportError:
        pass
    return tuple(errors)


# --- export ------------------------------------------------------------------------------------


def cmd_export(args) -> int:
    from sdexport import options as declared
    from sdexport import profile
    from sdexport.export.run import export

    flags = declared.flag_values(args)
    head, shapes, cfg = flags.pop("", {}), flags.pop("shapes", {}), flags.pop("cfg", {})
    options = profile.resolve(
        args.profile,
        **head,
        **shapes,
        cfg=cfg.get("mode"),
        sections=flags,
        controlnets=tuple(args.controlnet or ()),
        depth_estimator=args.depth_estimator,
        loras=tuple(args.lora or ()),
        source_config=args.config,
        prediction_type=args.prediction_type,
        few_step=args.few_step,
        vae=args.vae,
        validate=not args.no_validate,
        overwrite=args.overwrite,
        dry_run=args.dry_run,
        model=args.source,  # a static profile's size is per model family
    )
    manifest = export(args.source, args.out, options, progress=not args.quiet, command=sys.argv[1:])
    if not args.quiet:
        print(describe(manifest))
    if manifest.root is None:  # a dry run over an existing --out: checked, nothing replaced
        print(f"{args.out}: exists; the dry run checked it and wrote nothing (a dry run replaces nothing)", file=sys.stderr)
    return 0


def cmd_export_vae(args) -> int:
    from sdexport.export.swap_vae import export_vae_into

    manifest = export_vae_into(args.vae, args.into, progress=not args.quiet, command=sys.argv[1:])
    if not args.quiet:
        print(describe(manifest))
    return 0


def cmd_bench(args) -> int:
    from sdexport.measure.bench import BenchConfig, run_bench, write_report

    config = BenchConfig(
        prompts=tuple(args.prompt) if args.prompt else BenchConfig.prompts,
        seeds=tuple(int(s) for s in args.seeds.split(",")),
        scheduler=args.scheduler,
        steps=args.steps,
        height=args.height,
        width=args.width,
        repeats=args.repeats,
        cold_start=not args.no_cold_start,
        threads=args.threads or 0,
        backend_options={"device": args.device} if args.device else {},
    )
    if config.steps < 1 or config.repeats < 1:
        raise UsageError("--steps and --repeats must be at least 1")
    result = run_bench(args.dir, args.reference, config, progress=not args.quiet)
    paths = write_report(result, Path(args.out))
    if not args.quiet:
        from sdexport.measure.bench import markdown

        print(markdown(result))
        print("wrote " + ", ".join(str(p) for p in paths), file=sys.stderr)
    return 0


def cmd_quality(args) -> int:
    from sdexport.measure.quality import QualityConfig, load_prompt_file, markdown, run_quality, write_report

    prompts = tuple(args.prompt or ())
    if args.prompts:
        prompts += load_prompt_file(args.prompts)
    try:
        seeds = tuple(int(s) for s in args.seeds.split(","))
    except ValueError:
        raise UsageError(f"--seeds {args.seeds!r}: expected comma-separated integers") from None
    config = QualityConfig(
        prompts=prompts or QualityConfig.prompts,
        seeds=seeds,
        scheduler=args.scheduler,
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        height=args.height,
        width=args.width,
        samples=args.samples,
        calibration_seed=args.calibration_seed,
        calibration_steps=args.calibration_steps,
        components=tuple(args.component or ()),
        controlnets=tuple(args.controlnet or ()),
        end_to_end=not args.no_end_to_end,
        threads=args.threads or 0,
        backend_options={"device": args.device} if args.device else {},
    )
    result = run_quality(args.dir, args.reference, config, progress=not args.quiet)
    paths = write_report(result, Path(args.out))
    if not args.quiet:
        print(markdown(json.loads(paths[0].read_text(encoding="utf-8"))))
        print("wrote " + ", ".join(str(p) for p in paths), file=sys.stderr)
    return 0


def cmd_demo(args) -> int:
    from sdexport.demo.run import run_demo

    if args.steps < 1:
        raise UsageError("--steps must be at least 1")
    echo = (lambda text: None) if args.quiet else print
    run_demo(args.out, target=args.target, steps=args.steps, progress=not args.quiet, echo=echo)
    return 0


def cmd_profiles(args) -> int:
    from sdexport import profile

    print(profile.listing())
    return 0


# --- merge, merge-lora ---------------------------------------------------------------------------


def cmd_merge(args) -> int:
    from sdexport.sources.merge import merge_checkpoints
    from sdexport.export.artifacts import check_output_file

    check_output_file(args.out)
    result = merge_checkpoints(args.a, args.b, args.alpha, args.out, method=args.method, base=args.base,
                               overwrite=args.overwrite)
    if not args.quiet:
        counts = result["tensors"]
        print(f"wrote {args.out}: {result['method']} merge at alpha {result['alpha']} "
              f"({counts['merged']} tensors merged, {counts['partial']} partly, {counts['skipped']} EMA skipped)",
              file=sys.stderr)
    return 0


def cmd_merge_lora(args) -> int:
    from sdexport.sources.lora import merge_loras
    from sdexport.export.artifacts import check_output_file

    check_output_file(args.out)
    model = None
    if args.model:
        from sdexport.sources.open import open_source

        model = open_source(args.model, config=args.config)
    merge_loras(args.loras, args.out, layout=args.layout, model=model, overwrite=args.overwrite)
    if not args.quiet:
        print(f"wrote {args.out} ({args.layout} layout, {len(args.loras)} LoRAs)", file=sys.stderr)
    return 0


# --- generate ----------------------------------------------------------------------------------

_CONTROL = re.compile(r"^(?P<name>[^=]+)=(?P<rest>.+)$")


def parse_control(spec: str):
    """``NAME=IMAGE[:SCALE]``; a Windows drive colon or a path colon is not a scale."""
    from runtime.pipeline import Control

    match = _CONTROL.match(spec)
    if not match:
        raise UsageError(f"--control {spec!r}: expected NAME=IMAGE[:SCALE]")
    name, rest = match["name"], match["rest"]
    image, scale = rest, 1.0
    head, sep, tail = rest.rpartition(":")
    if sep and head and not re.search(r"[\\/]", tail):
        try:
            scale = float(tail)
        except ValueError:
            raise UsageError(f"--control {spec!r}: scale {tail!r} is not a number") from None
        image = head
    return Control(name=name, image=image, scale=scale)


def cmd_generate(args) -> int:
    from runtime import image as imgproc
    from runtime.files import OutputFileError, check_output, write_files
    from runtime.pipeline import Pipeline

    try:
        output = check_output(args.output, args.overwrite, "--output")
        latents_out = check_output(args.latents_out, args.overwrite, "--latents-out") if args.latents_out is not None else None
    except OutputFileError as e:
        raise UsageError(str(e)) from None
    if latents_out is not None and os.path.abspath(latents_out) == os.path.abspath(output):
        raise UsageError("--latents-out names the same file as --output")
    _check_generate_values(args)
    options = {k: getattr(args, k) for k in ("device", "threads", "compute_units", "winograd") if getattr(args, k)}
    pipe = Pipeline.from_dir(args.dir, options=options or None, cfg=args.cfg, loras=args.lora or ())
    controls = _controls(args, pipe)
    if pipe.info.is_sdxl:  # SDXL keeps diffusers' one window per encoder (SD 1.x/2.x take long prompts)
        _warn_truncated(pipe.tokenizer, {"--prompt": args.prompt, "--negative-prompt": args.negative_prompt or ""})
    result = pipe.generate(
        args.prompt,
        args.negative_prompt,
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        scheduler=args.scheduler,
        seed=args.seed,
        rng=args.rng,
        height=args.height,
        width=args.width,
        image=args.image,
        strength=args.strength,
        mask=args.mask,
        depth_map=args.depth_map,
        controls=controls,
        guess_mode=args.guess_mode,
        progress=not args.quiet,
        return_latents=latents_out is not None,
        emphasis=args.emphasis,
        **_sdxl_kwargs(args, pipe, options),
        **_upscale_args(args),
    )
    if args.refiner:
        result = _refine(args, result, latents_out is not None)
    files = [(output, imgproc.png_bytes(result.image, png_metadata(result.settings)))]
    if latents_out is not None:
        import io

        import numpy as np

        buffer = io.BytesIO()  # np.save on a name appends ".npy"; a file object keeps the name given
        np.save(buffer, result.latents)
        files.append((latents_out, buffer.getvalue()))
    try:
        write_files(files, overwrite=args.overwrite)
    except OutputFileError as e:
        raise UsageError(str(e)) from None
    if not args.quiet:
        total = result.timings["total"]
        print(f"wrote {output} ({result.image.width}x{result.image.height}) in {total:.2f} s", file=sys.stderr)
    return 0


def _warn_truncated(tokenizer, prompts: dict[str, str]) -> None:
    """The text encoder sees one window of tokens; say how many were cut rather than drop them silently."""
    window = tokenizer.max_length - 2
    for flag, prompt in prompts.items():
        dropped = len(tokenizer.encode(prompt)) - window
        if dropped > 0:
            print(f"sdexport: warning: {flag} is longer than the text encoder's {window} tokens; "
                  f"its last {dropped} tokens are ignored (SDXL, as diffusers)", file=sys.stderr)


def _sdxl_kwargs(args, pipe, options) -> dict:
    """SDXL's generate arguments; with --refiner the base stops at --denoising-end (0.8 by default)
    and keeps its latents, and one generator runs through both experts (diffusers' ensemble of experts)."""
    from runtime.pipeline import Pipeline
    from runtime.rng import make_rng

    kwargs = {k: getattr(args, k) for k in ("denoising_start", "denoising_end", "aesthetic_score",
                                            "negative_aesthetic_score") if getattr(args, k) is not None}
    if args.refiner:
        if not pipe.info.is_sdxl:
            raise UsageError(f"--refiner needs an SDXL base export; {args.dir} is a {pipe.info.family} model")
        if args.denoising_start is not None:
            raise UsageError("--denoising-start is the refiner's; with --refiner give --denoising-end (both experts use it)")
        args.refiner_pipe = Pipeline.from_dir(args.refiner, options=options or None, cfg=args.cfg)  # checked before the base runs
        if not args.refiner_pipe.info.is_sdxl:
            raise UsageError(f"--refiner {args.refiner}: an SDXL export is needed; that one is a "
                             f"{args.refiner_pipe.info.family} model")
        args.denoising_end = kwargs["denoising_end"] = 0.8 if args.denoising_end is None else args.denoising_end
        args.generator = kwargs["generator"] = make_rng(args.seed, args.rng)
        kwargs["decode"] = False
    return kwargs


def _refine(args, base_result, return_latents: bool):
    """The second expert: the refiner export continues the base's latents from --denoising-end."""
    scores = {k: getattr(args, k) for k in ("aesthetic_score", "negative_aesthetic_score") if getattr(args, k) is not None}
    result = args.refiner_pipe.generate(
        args.prompt, args.negative_prompt, steps=args.steps, guidance_scale=args.guidance_scale,
        scheduler=args.scheduler, seed=args.seed, rng=args.rng, image=base_result.latents,
        denoising_start=args.denoising_end, generator=args.generator, progress=not args.quiet,
        return_latents=return_latents, **scores,
    )
    result.timings["total"] += base_result.timings["total"]
    result.settings.update(refiner=str(args.refiner), denoising_end=args.denoising_end)
    return result
def _upscale_args(args) -> dict:
    """x4 upscaler exports: --noise-level and the tiling of large inputs (passed only when given)."""
    out = {}
    if args.noise_level is not None:
        out["noise_level"] = args.noise_level
    if args.tile is not None or args.tile_overlap is not None:
        from runtime.upscale import Tiling

        default = Tiling()
        out["tiling"] = Tiling(default.size if args.tile is None else args.tile,
                               default.overlap if args.tile_overlap is None else args.tile_overlap)
    return out


def _check_generate_values(args) -> None:
    """What argparse lets through and would otherwise surface as an internal error or garbage."""
    import math

    from runtime.rng import check_seed

    for flag, text in (("--prompt", args.prompt), ("--negative-prompt", args.negative_prompt)):
        try:
            (text or "").encode("utf-8")
        except UnicodeEncodeError:
            raise UsageError(f"{flag}: not valid UTF-8 text (undecodable bytes in the argument)") from None
    try:
        check_seed(args.seed, args.rng)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads {args.threads}: must be at least 1")
    for flag, value in (("--control-start", args.control_start), ("--control-end", args.control_end)):
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise UsageError(f"{flag} {value}: expected a fraction within [0, 1]")


def _controls(args, pipe) -> list:
    """--control NAME=IMAGE[:SCALE] with the start/end fractions, images preprocessed and fitted
    (``--preprocess depth`` runs the export's depth estimator: Pipeline.depth_control_image)."""
    from runtime import image as imgproc
    from runtime.pipeline import PipelineInputError

    controls = [parse_control(c) for c in args.control or ()]
    for c in controls:
        c.start, c.end = args.control_start, args.control_end
    if not controls or (args.preprocess == "none" and args.control_fit == "resize"):
        return controls
    from runtime.preprocess import fit, preprocess

    for c in controls:
        image = imgproc.load_image(c.image, f"control image for {c.name}")
        try:
            if args.preprocess == "depth":
                image = pipe.depth_control_image(image)
            else:
                image = preprocess(image, args.preprocess, **_preprocess_params(args))
            if args.height and args.width:
                image = fit(image, args.height, args.width, args.control_fit)
        except imgproc.ImageInputError:
            raise
        except ValueError as e:
            raise PipelineInputError(str(e)) from None
        c.image = image
    return controls


def _preprocess_params(args) -> dict:
    if args.preprocess == "canny":
        return {"low_threshold": args.canny_low, "high_threshold": args.canny_high}
    if args.preprocess == "threshold":
        return {"level": args.threshold}
    return {}


def png_metadata(settings: dict) -> dict:
    """Text chunks: one per setting, plus the A1111-style ``parameters`` line other tools read."""
    from sdexport import __version__

    meta = {k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in settings.items() if v is not None}
    negative = settings.get("negative_prompt") or ""
    meta["parameters"] = (
        f"{settings.get('prompt')}\n"
        + (f"Negative prompt: {negative}\n" if negative else "")
        + f"Steps: {settings.get('steps')}, Sampler: {settings.get('scheduler')}, CFG scale: {settings.get('guidance_scale')}, "
        f"Seed: {settings.get('seed')}, Size: {settings.get('width')}x{settings.get('height')}, "
        f"Model hash: {settings.get('model_hash')}, RNG: {settings.get('rng')}"
        # A1111's names: "Original" is its emphasis, "None" reads the prompt as literal text
        + (f", Emphasis: {'Original' if settings['emphasis'] else 'None'}" if "emphasis" in settings else "")
    )
    meta["software"] = f"sdexport {__version__}"
    return meta


# --- inspect -----------------------------------------------------------------------------------


def describe(manifest) -> str:
    info = manifest.model
    lines = [
        f"{manifest.root or '(plan, not written)'}: {info.family}, {info.prediction_type}, latents {info.latent_channels}ch /{info.vae_scale_factor}, "
        f"default {info.default_width}x{info.default_height}, U-Net in {info.unet_in_channels}ch",
        ("DRY RUN (plan only, nothing converted); " if manifest.exporter.get("dry_run") else "")
        + f"exported by sdexport {manifest.exporter.get('version')} for {manifest.exporter.get('target')} "
        f"on {manifest.exporter.get('created')}, artifact hash {manifest.exporter.get('artifact_hash')}",
        "",
        f"{'component':<24} {'backend':<12} {'precision':<9} {'size MB':>8} {'parity PSNR dB':>15} {'max abs err':>12}",
    ]
    for name, c in manifest.components.items():
        p = c.parity or {}
        psnr = p.get("psnr_db")
        psnr_s = "skipped" if "skipped" in p else "identical" if psnr is None and p else ("-" if psnr is None else f"{psnr:.1f}")
        err = p.get("max_abs_err")
        lines.append(
            f"{name:<24} {c.backend:<12} {c.precision:<9} {c.size_bytes / 1e6:>8.1f} {psnr_s:>15} "
            f"{'-' if err is None else f'{err:.2e}':>12}"
        )
    for name, c in manifest.components.items():
        lines.append(f"  {name}: " + ", ".join(t.describe() for t in c.inputs) + " -> " + ", ".join(t.describe() for t in c.outputs))
    return "\n".join(lines)


def cmd_inspect(args) -> int:
    from runtime.manifest import Manifest

    manifest = Manifest.load(args.dir, check_files=False)
    if not manifest.exporter.get("dry_run"):
        manifest.check_files()
    if args.verify:
        manifest.check_files(verify_hashes=True)
    if args.json:
        print(json.dumps(manifest.to_json(), indent=2))
    else:
        print(describe(manifest))
        if args.verify:
            print("all files present with their recorded sha256")
    return 0


# --- parser ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sdexport", description="Export Stable Diffusion to ONNX / OpenVINO / Core ML / TensorRT and run it without PyTorch.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in (_export_parser, _export_vae_parser, _merge_parser, _merge_lora_parser, _generate_parser, _bench_parser, _quality_parser,
                _demo_parser, _profiles_parser, _inspect_parser):
        add(sub)
    return parser


def _export_parser(sub) -> None:
    from sdexport import options as declared

    p = sub.add_parser("export", help="convert a model (diffusers folder or single file) into an artifact directory")
    p.add_argument("source", help="diffusers model folder, or a single-file checkpoint (.safetensors / .ckpt)")
    p.add_argument("--profile", help="a device profile (sdexport profiles lists them) or a .toml file; flags override it")
    p.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    declared.add_flags(p)  # the profile's settings that have a flag: --target, --precision, --height ...
    p.add_argument("--controlnet", action="append", metavar="[NAME=]PATH", help="a diffusers ControlNet folder (repeatable)")
    p.add_argument("--depth-estimator", metavar="DIR", help="a DPT depth estimator to export with it (a depth-to-image "
                   "model folder or a transformers DPT folder), for generate --preprocess depth")
    p.add_argument("--lora", action="append", metavar="FILE[:SCALE]",
                   help="a LoRA (diffusers/PEFT or kohya) fused into the weights; repeatable, applied in order")
    p.add_argument("--config", metavar="DIR", help="single files: a diffusers folder whose configs describe the "
                   "architecture (default: detected SD 1.x / 2.x / inpainting)")
    p.add_argument("--prediction-type", choices=("epsilon", "v_prediction"),
                   help="single files: SD 2.x v-models cannot be told from their weights (default for SD 2.x: v)")
    p.add_argument("--few-step", choices=("lcm", "turbo"),
                   help="an LCM(-LoRA) or SD-Turbo-style model: its sampler, steps and guidance as defaults")
    p.add_argument("--vae", metavar="DIR_OR_FILE", help="export with another VAE: a diffusers AutoencoderKL folder, "
                   "or one .safetensors in diffusers or original (LDM) names, e.g. vae-ft-mse-840000-ema-pruned")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--no-validate", action="store_true", help="skip the parity check against torch")
    p.add_argument("--dry-run", action="store_true", help="resolve and check everything, write a plan manifest, convert nothing")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_export)


def _export_vae_parser(sub) -> None:
    v = sub.add_parser("export-vae", help="export a VAE on its own and make it an artifact's VAE (atomic swap)")
    v.add_argument("vae", help="a diffusers AutoencoderKL folder, or one .safetensors in diffusers or original (LDM) names")
    v.add_argument("--into", required=True, metavar="ART", help="the artifact directory whose VAE it replaces "
                   "(its target, precision and shapes are used; nothing else is re-exported)")
    v.add_argument("--quiet", action="store_true")
    v.set_defaults(func=cmd_export_vae)


def _merge_parser(sub) -> None:
    m = sub.add_parser("merge", help="merge two checkpoints into a new one (streamed tensor by tensor)")
    m.add_argument("a", help="checkpoint A (.safetensors or .ckpt)")
    m.add_argument("b", help="checkpoint B")
    m.add_argument("--alpha", type=float, required=True, help="weight of B: (1-alpha)*A + alpha*B, or A + alpha*(B-C)")
    m.add_argument("--method", choices=("weighted", "add-difference"), default="weighted")
    m.add_argument("--base", help="checkpoint C for add-difference")
    m.add_argument("--out", required=True, help="the merged .safetensors file")
    m.add_argument("--overwrite", action="store_true")
    m.add_argument("--quiet", action="store_true")
    m.set_defaults(func=cmd_merge)


def _merge_lora_parser(sub) -> None:
    ml = sub.add_parser("merge-lora", help="combine LoRAs into one LoRA file (ranks concatenated, weights folded in)")
    ml.add_argument("loras", nargs="+", metavar="FILE[:WEIGHT]")
    ml.add_argument("--out", required=True, help="the merged LoRA .safetensors file")
    ml.add_argument("--layout", choices=("diffusers", "kohya"), default="diffusers")
    ml.add_argument("--model", help="the model the LoRAs are for (resolves kohya names; default: SD 1.x/2.x names)")
    ml.add_argument("--config", metavar="DIR", help="with a single-file --model: its architecture")
    ml.add_argument("--overwrite", action="store_true")
    ml.add_argument("--quiet", action="store_true")
    ml.set_defaults(func=cmd_merge_lora)


def _generate_parser(sub) -> None:
    from sdexport import options as declared

    g = sub.add_parser("generate", help="make an image from an artifact directory (no PyTorch needed)")
    g.add_argument("dir")
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative-prompt")
    g.add_argument("--emphasis", action="store_true",
                   help="read A1111's prompt syntax: (word:1.3), (word), [word], \\( \\), BREAK (default: literal text, as diffusers)")
    g.add_argument("--steps", type=int)
    g.add_argument("--guidance-scale", type=float)
    g.add_argument("--scheduler", help="ddim, pndm, lms, euler, euler-a, heun, dpmpp-2m, dpmpp-2m-karras, unipc, lcm, ddpm")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--rng", choices=("numpy", "torch"), default="numpy",
                   help="torch reproduces diffusers' CPU generator: same seed, same image")
    g.add_argument("--height", type=int)
    g.add_argument("--width", type=int)
    g.add_argument("--image", help="input image for img2img / inpainting")
    g.add_argument("--strength", type=float)
    g.add_argument("--mask", help="inpainting mask (white = repaint), same size as --image")
    g.add_argument("--depth-map", help="depth-to-image: your own depth map for --image (a one-channel image of its "
                   "size, 8/16-bit gray or 32-bit; larger = nearer, as DPT), instead of the exported estimator's")
    _control_args(g)
    g.add_argument("--lora", action="append", metavar="FILE[:SCALE]",
                   help="apply a LoRA (.safetensors) to the export's weights at run time (repeatable)")
    g.add_argument("--noise-level", type=int, help="x4 upscaler: noise added to the input, 0..max_noise_level "
                   "(default 20, as diffusers)")
    g.add_argument("--tile", type=int, help="x4 upscaler: tile side in input pixels for large inputs "
                   "(default 256; 0: never tile); tiles overlap and are blended with linear feathering")
    g.add_argument("--tile-overlap", type=int, help="x4 upscaler: input pixels neighbouring tiles share (default 32)")
    g.add_argument("--cfg", choices=declared.CFG_MODES, help="override the export's CFG batching")
    g.add_argument("--device", help="backend device: cpu, cuda, gpu, npu, auto ...")
    g.add_argument("--threads", type=int)
    g.add_argument("--compute-units", choices=declared.COMPUTE_UNITS,
                   help="Core ML exports: override the compute units the export chose")
    g.add_argument("--winograd", choices=declared.WINOGRAD_RUN_MODES,
                   help="OpenVINO CPU at f32: apply the export's Winograd plan (auto, default) or not (off)")
    g.add_argument("--denoising-end", type=float, metavar="F",
                   help="SDXL: stop the schedule at this fraction (the base's share; with --refiner default 0.8)")
    g.add_argument("--denoising-start", type=float, metavar="F",
                   help="SDXL: start the schedule at this fraction, adding no noise to --image (a refiner's share)")
    g.add_argument("--refiner", metavar="DIR", help="SDXL: an export that takes over at --denoising-end "
                   "(ensemble of experts: base then refiner, one seed)")
    g.add_argument("--aesthetic-score", type=float, help="SDXL refiner time ids (default 6.0)")
    g.add_argument("--negative-aesthetic-score", type=float, help="SDXL refiner time ids, negative side (default 2.5)")
    g.add_argument("--output", "-o", required=True, help="PNG file to write")
    g.add_argument("--latents-out", help="also save the final latents (.npy)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    g.add_argument("--quiet", action="store_true")
    g.set_defaults(func=cmd_generate)


def _control_args(g) -> None:
    g.add_argument("--control", action="append", metavar="NAME=IMAGE[:SCALE]", help="a ControlNet and its image (repeatable)")
    g.add_argument("--control-start", type=float, default=0.0, help="fraction of steps where control starts")
    g.add_argument("--control-end", type=float, default=1.0, help="fraction of steps where control ends")
    g.add_argument("--guess-mode", action="store_true", help="control on the conditional branch only")
    g.add_argument("--preprocess", default="none", help="none | canny | threshold | scribble | invert | depth (applied to control images; depth runs the "
                   "export's depth estimator)")
    g.add_argument("--control-fit", choices=("resize", "crop", "pad"), default="resize",
                   help="how control images meet --height/--width: stretch (as diffusers), center-crop, or pad")
    g.add_argument("--canny-low", type=int, default=100)
    g.add_argument("--canny-high", type=int, default=200)
    g.add_argument("--threshold", type=int, default=127)


def _measure_args(report: str, files: str, seeds: str, prompts: str) -> argparse.ArgumentParser:
    """The arguments bench and quality share: the export, its torch reference, the runs, the device."""
    shared = argparse.ArgumentParser(add_help=False)
    shared.add_argument("dir", help="artifact directory")
    shared.add_argument("--reference", required=True, help="the diffusers model folder it was exported from")
    shared.add_argument("--out", default=report, help=f"directory for {files}")
    shared.add_argument("--prompt", action="append", help=f"a prompt (repeatable; {prompts} defaults)")
    shared.add_argument("--seeds", default=seeds, help="comma-separated seeds")
    shared.add_argument("--scheduler", default="dpmpp-2m")
    shared.add_argument("--steps", type=int, default=20)
    shared.add_argument("--height", type=int)
    shared.add_argument("--width", type=int)
    shared.add_argument("--threads", type=int)
    shared.add_argument("--device")
    shared.add_argument("--quiet", action="store_true")
    return shared


def _bench_parser(sub) -> None:
    shared = _measure_args("bench", "bench.json, bench.md and the PNG plots", seeds="1,2", prompts="two")
    b = sub.add_parser("bench", parents=[shared], help="latency and parity of an export against diffusers (PyTorch)")
    b.add_argument("--repeats", type=int, default=5, help="timed calls per component after one warm-up")
    b.add_argument("--no-cold-start", action="store_true", help="skip the child-process cold-start runs")
    b.set_defaults(func=cmd_bench)


def _quality_parser(sub) -> None:
    shared = _measure_args("quality", "quality.json, quality.md and grid.png", seeds="1", prompts="four end-to-end")
    q = sub.add_parser("quality", parents=[shared],
                       help="what the export's precision costs: per component and end to end against torch fp32")
    q.add_argument("--prompts", metavar="FILE", help="end-to-end prompts, one per line ('#' comments)")
    q.add_argument("--guidance-scale", type=float, default=7.5)
    q.add_argument("--samples", type=int, default=8, help="recorded inputs per component comparison")
    q.add_argument("--calibration-seed", type=int, default=1, help="seed of the recorded inputs (exports calibrate with 0)")
    q.add_argument("--calibration-steps", type=int, default=20, help="steps of the runs the inputs are recorded from")
    q.add_argument("--component", action="append", help="only this component (repeatable; default: all)")
    q.add_argument("--controlnet", action="append", metavar="NAME=PATH", help="torch reference for controlnet/NAME")
    q.add_argument("--no-end-to-end", action="store_true", help="components only")
    q.set_defaults(func=cmd_quality)


def _demo_parser(sub) -> None:
    d = sub.add_parser("demo", help="export the bundled small trained model, generate pictures, compare with PyTorch")
    d.add_argument("--out", default="sdexport-demo", help="directory for grid.png, demo.json, the model and its export "
                   "(an earlier demo's directory is replaced)")
    d.add_argument("--target", choices=("auto", "onnx", "openvino"), default="auto",
                   help="auto: OpenVINO where it is installed, else ONNX")
    d.add_argument("--steps", type=int, default=20)
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=cmd_demo)


def _profiles_parser(sub) -> None:
    sub.add_parser("profiles", help="list the device profiles, one line each").set_defaults(func=cmd_profiles)


def _inspect_parser(sub) -> None:
    i = sub.add_parser("inspect", help="show what an artifact directory's manifest says")
    i.add_argument("dir")
    i.add_argument("--json", action="store_true", help="print the manifest as JSON")
    i.add_argument("--verify", action="store_true", help="check every file's sha256")
    i.set_defaults(func=cmd_inspect)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv or os.environ.get("SDEXPORT_DEBUG") == "1"
    try:
        args = build_parser().parse_args(argv)
        with _third_party_quiet(args):
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("sdexport: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if isinstance(e, _user_errors()):
            print(f"sdexport: error: {_one_line(e)}", file=sys.stderr)
            return EXIT_USAGE
        if isinstance(e, ModuleNotFoundError) and _extra_for(e.name) and not debug:
            print(f"sdexport: error: this command needs {e.name}, which is not installed: "
                  f"pip install \"sdexport[{_extra_for(e.name)}]\" (or pip install -e \".[{_extra_for(e.name)}]\" "
                  "in a clone)", file=sys.stderr)
            return EXIT_USAGE
        if debug:
            raise
        print(f"sdexport: internal error: {type(e).__name__}: {_one_line(e)} (SDEXPORT_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 1


# The extra (pyproject.toml) that installs each optional top-level package: a runtime-only install
# (numpy, Pillow, one backend) has none of the export side's.
_EXTRAS = {
    **dict.fromkeys(("torch", "diffusers", "transformers", "safetensors", "accelerate", "huggingface_hub", "onnx",
                     "onnxscript", "onnx_ir", "nncf", "yaml"), "export"),
    "onnxruntime": "onnx", "openvino": "openvino", "coremltools": "coreml", "kmeans1d": "coreml-export",
    "sklearn": "coreml-export", "tensorrt": "tensorrt", "cuda": "tensorrt", "matplotlib": "bench",
}


def _extra_for(module: str | None) -> str | None:
    """Only a missing top-level package: a missing submodule of an installed one is a bug, not an install."""
    return _EXTRAS.get(module or "")


# Commands that import no third-party library that prints (a runtime-only install has none to quiet).
_TORCH_FREE_COMMANDS = ("generate", "inspect", "profiles")


@contextlib.contextmanager
def _third_party_quiet(args) -> Iterator[None]:
    """``--quiet`` also silences diffusers, transformers and the libraries under them: their progress bars
    (which leave cursor-up debris in logs), notices and warnings. Their settings are restored afterwards."""
    if not getattr(args, "quiet", False) or args.command in _TORCH_FREE_COMMANDS:
        yield
        return
    restore = []
    for name in ("diffusers.utils.logging", "transformers.utils.logging"):
        try:
            logging = importlib.import_module(name)
        except ImportError:
            continue  # the command itself then says which extra to install
        restore.append((logging, logging.get_verbosity(), logging.is_progress_bar_enabled()))
        logging.set_verbosity_error()
        logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore")
            warnings.filterwarnings("default", module=r"(sdexport|runtime)(\.|$)")
            yield
    finally:
        for logging, level, bars in restore:
            logging.set_verbosity(level)
            (logging.enable_progress_bar if bars else logging.disable_progress_bar)()


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
