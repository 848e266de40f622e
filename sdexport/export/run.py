"""The export run: source in, validated artifact directory out (written atomically)."""

from __future__ import annotations

import dataclasses
import datetime
import gc
import hashlib
import json
import platform
import shutil
import sys
from importlib import metadata
from pathlib import Path

from tqdm import tqdm

from runtime.manifest import Component, FileRef, Manifest, ModelInfo, RunSettings, StaticShape
from runtime.tokenizer import CLIPTokenizer, TokenizerError
from sdexport import __version__
from sdexport.export.artifacts import check_output_dir, staged_directory
from sdexport.export.depth import depth_estimator_spec, depth_source, record_processor
from sdexport.export.components import (
    ComponentSpec,
    controlnet_spec,
    model_info,
    text_encoder_spec,
    unet_spec,
    vae_decoder_spec,
    vae_encoder_spec,
)
from sdexport.errors import ExportError, OptionError, SourceError
from sdexport.sources.base import Source
from sdexport.sources.diffusers import ControlNetSource
from sdexport.sources.open import open_source, recommended_settings
from sdexport.sources.vae import VaeSource
from sdexport.export.targets import get_target
from sdexport.export.targets.base import ExportOptions, Target
from sdexport.export.upscaler import write_low_res_scheduler
from sdexport.export.validate import gate, measure, passes, validation_shape
from sdexport.export.weight_map import weight_map

LIBRARIES = ("torch", "diffusers", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu", "openvino", "nncf",
             "coremltools", "tensorrt", "numpy")


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def spatial_multiple(source: Source, info: ModelInfo) -> int:
    """Pixels per step of size the U-Net accepts without padding tricks (64 for SD)."""
    levels = len(source.unet_config.get("block_out_channels", (1, 1, 1, 1)))
    return info.vae_scale_factor * 2 ** (levels - 1)


def check_options(options: ExportOptions, info: ModelInfo) -> None:
    if (options.height is None) != (options.width is None):
        raise OptionError("give both --height and --width for a static export, or neither")
    for name in ("height", "width"):
        value = getattr(options, name)
        if value is not None and (value <= 0 or value % info.vae_scale_factor):
            raise OptionError(f"--{name} {value}: must be a positive multiple of {info.vae_scale_factor}")
    if options.batch is not None and options.batch < 1:
        raise OptionError(f"--batch {options.batch}: must be at least 1")
    if options.prompt_chunks < 1:
        raise OptionError(f"--prompt-chunks {options.prompt_chunks}: must be at least 1")
    if options.cfg not in ("batched", "sequential"):
        raise OptionError(f"cfg mode {options.cfg!r}: use batched or sequential")


def check_controlnet(cn: ControlNetSource, source: Source) -> None:
    """A ControlNet must produce residuals of the U-Net's layout: same width, blocks and text width."""
    unet, cfg = source.unet_config, cn.config
    keys = ("block_out_channels", "layers_per_block", "down_block_types", "cross_attention_dim")
    for key in keys:
        a, b = cfg.get(key), unet.get(key)
        if isinstance(a, list) or isinstance(b, list):
            a, b = list(a) if isinstance(a, (list, tuple)) else a, list(b) if isinstance(b, (list, tuple)) else b
        if a != b:
            raise SourceError(
                f"ControlNet {cn.name!r} ({cn.path}) does not fit the U-Net of {source.path}: "
                f"{key} is {a} in the ControlNet but {b} in the U-Net"
            )
    if cfg.get("global_pool_conditions"):
        raise SourceError(f"ControlNet {cn.name!r}: global_pool_conditions (shuffle-type) ControlNets are not supported")


def write_tokenizer(source: Source, out: Path, directory: Path | None = None) -> dict:
    """vocab.json + merges.txt (what the runtime reads) and the config that sets pad token and length.
    ``directory``: another tokenizer of the source than ``tokenizer_dir`` (SDXL's tokenizer_2)."""
    out.mkdir(parents=True, exist_ok=True)
    directory = directory or source.tokenizer_dir
    try:
        tok = CLIPTokenizer.from_dir(directory)
    except TokenizerError as e:
        raise SourceError(str(e)) from None
    (out / "vocab.json").write_text(json.dumps(tok.encoder, ensure_ascii=False), encoding="utf-8")
    merges = sorted(tok.bpe_ranks, key=tok.bpe_ranks.get)
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n", encoding="utf-8")
    config = {"pad_token": tok.pad_token, "model_max_length": tok.max_length,
              "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>"}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return tokenizer_parity(source, out, directory)


def tokenizer_parity(source: Source, written: Path, directory: Path | None = None) -> dict:
    """The written tokenizer against transformers' on a few prompts: ids must be identical."""
    from transformers import CLIPTokenizer as Reference

    prompts = ["a photo of an astronaut riding a horse on mars", "", "(masterpiece:1.2), 8k, café 東京 🙂",
               "word " * 90, "Hello, World!!! it's 3.14"]
    directory = directory or source.tokenizer_dir
    reference = Reference.from_pretrained(str(directory))
    ours = CLIPTokenizer.from_dir(written)
    expected = reference(prompts, padding="max_length", max_length=ours.max_length, truncation=True).input_ids
    same = ours(prompts).tolist() == [list(e) for e in expected]
    if not same:
        raise ExportError(f"{directory}: the runtime tokenizer disagrees with transformers on this vocabulary")
    return {"reference": "transformers CLIPTokenizer", "prompts": len(prompts), "identical": True}


def component_specs(source: Source, info: ModelInfo, controlnets: list[ControlNetSource]) -> list[ComponentSpec]:
    if info.is_sdxl:
        from sdexport.export import sdxl

        return sdxl.component_specs(source, info, controlnets)
    specs = [text_encoder_spec(source, info), unet_spec(source, info)]
    if controlnets:
        specs.append(unet_spec(source, info, control=True))
    if info.family != "upscaler":  # the x4 upscaler never encodes an image with its VAE
        specs.append(vae_encoder_spec(source, info))
    specs.append(vae_decoder_spec(source, info))
    specs += [controlnet_spec(cn, info) for cn in controlnets]
    return specs


def guess_mode_scales(n: int) -> list[float]:
    """diffusers' guess-mode residual scales (torch.logspace(-1, 0, n) in float32), recorded exactly."""
    import torch

    return [float(v) for v in torch.logspace(-1, 0, n, dtype=torch.float32)]


def artifact_hash(components: dict[str, Component]) -> str:
    digest = hashlib.sha256()
    for name in sorted(components):
        for ref in components[name].files:
            digest.update(f"{name}:{ref.path}:{ref.sha256}\n".encode())
    return digest.hexdigest()[:16]


def export(source_path: str | Path, out: str | Path, options: ExportOptions, progress: bool = True,
           command: list[str] | None = None) -> Manifest:
    out = Path(out)
    check_output_dir(out, options.overwrite, [source_path])  # before any expensive work
    source = open_source(source_path, loras=options.loras, config=options.source_config,
                         prediction_type=options.prediction_type, few_step=options.few_step)
    if options.vae is not None:  # checked against the U-Net here, before anything is written
        source = VaeSource.open(source, options.vae)
    target = get_target(options.target)
    if options.precision not in target.precisions:
        raise OptionError(f"target {target.name} supports --precision {', '.join(target.precisions)}, not {options.precision!r}")
    info = model_info(source)
    check_options(options, info)
    controlnets = [ControlNetSource.parse(s) for s in options.controlnets]
    names = [cn.name for cn in controlnets]
    if len(set(names)) != len(names):
        raise OptionError(f"ControlNet names must be unique: {', '.join(names)}")
    for cn in controlnets:
        check_controlnet(cn, source)

    options = dataclasses.replace(options, trace_size=min(info.default_height, options.default_size),
                                  model_size=info.default_height)
    multiple = spatial_multiple(source, info)
    specs = component_specs(source, info, controlnets)
    depth = depth_source(source.path, info.family, options.depth_estimator)
    specs += [depth_estimator_spec(depth)] if depth is not None else []
    components: dict[str, Component] = {}

    if options.dry_run:
        return _write_plan(source, out, options, target, info, specs, command)

    with staged_directory(out, options.overwrite, [source_path]) as stage:
        tokenizer_dirs = {}
        if info.is_sdxl:
            from sdexport.export.sdxl import write_tokenizers

            tokenizer_check, tokenizer_dirs = write_tokenizers(source, stage, write_tokenizer)
        else:
            tokenizer_check = write_tokenizer(source, stage / "tokenizer")
        (stage / "scheduler").mkdir()
        shutil.copyfile(source.path / "scheduler" / "scheduler_config.json", stage / "scheduler" / "scheduler_config.json")
        if info.family == "upscaler":
            write_low_res_scheduler(source, stage)
        with tqdm(specs, desc="export", unit="component", disable=not progress, file=sys.stderr) as bar:
            for spec in bar:  # a context manager: an error message never lands on the bar's line
                bar.set_postfix_str(spec.name)
                components[spec.name] = export_component(spec, target, stage, options, multiple)
                gc.collect()
        record_processor(components, depth)
        info = dataclasses.replace(info, recommended=recommended_settings(source, info))
        manifest = Manifest(
            model=info,
            components=components,
            **tokenizer_dirs,
            exporter={
                "name": "sdexport",
                "version": __version__,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "source": str(Path(source_path)),
                "source_details": source.describe(),
                "target": target.name,
                "command": command or [],
                "libraries": library_versions(),
                "artifact_hash": artifact_hash(components),
                "tokenizer_parity": tokenizer_check,
                "vae_config": source.vae_config,  # what a later single-file VAE swap (export-vae) loads into
            },
            profile=options.profile_record(),
            runtime=run_settings(options, guess_mode_scales(len(info.control_residuals))),
        )
        manifest.write(stage)
    return Manifest.load(out)


def run_settings(options: ExportOptions, scales: list[float] = ()) -> RunSettings:
    """What the runtime reads: CFG mode, backend options, device loop, static shape, guess-mode scales."""
    static = StaticShape(options.height, options.width, options.batch, options.prompt_chunks) if options.static else None
    return RunSettings(cfg=options.cfg, backend_options=options.backend.session_options(),
                       device_loop=options.backend.device_loop or "auto", static_shape=static,
                       guess_mode_scales=tuple(scales))


def _write_plan(source, out: Path, options: ExportOptions, target: Target, info: ModelInfo, specs, command) -> Manifest:
    """A dry run: every option resolved and checked, the components planned with their exact
    inputs and outputs, written as a manifest marked ``dry_run`` that the runtime refuses to run.

    The plan goes only into a new directory: a dry run replaces nothing. When ``out`` exists it is
    checked as the real export would check it, and the plan is returned unwritten (``root`` None)."""
    names = target.file_names
    components = {}
    for spec in specs:
        if options.static:
            spec = spec.static(options.trace_shape(spec), keep_batch_dynamic=_keep_batch_dynamic(options))
        planned = target.plan_details(spec, options)
        components[spec.name] = Component(
            name=spec.name, role=spec.role, backend=target.backend,
            files=tuple(FileRef(f"{spec.name}/{n}", "", 0) for n in names),
            precision="fp32" if spec.keep_fp32 else options.precision,  # as export_component will convert it
            inputs=spec.inputs, outputs=spec.outputs, details={"planned": True, **planned},
        )
    manifest = Manifest(
        model=info, components=components,
        exporter={"name": "sdexport", "version": __version__, "dry_run": True, "target": target.name,
                  "source": str(source.path), "command": command or [], "libraries": library_versions()},
        profile=options.profile_record(), runtime=run_settings(options),
    )
    if out.exists():
        check_output_dir(out, options.overwrite, [source.path])
        return manifest
    with staged_directory(out, options.overwrite, [source.path]) as stage:
        manifest.write(stage)
    return Manifest.load(out, check_files=False)


def _keep_batch_dynamic(options: ExportOptions) -> bool:
    """Static exports fix the batch too, except under sequential CFG: the U-Net's N is then B per
    call, not the 2B a fixed N would bake in (engines still get a fixed batch from their profile)."""
    return options.batch is None or options.cfg == "sequential"


def _validation_backend(component: Component, options: ExportOptions) -> tuple[dict, str | None]:
    """Backend options for the parity check, or why it cannot run on this machine: a graph with
    CUDA-only ops (``--optimize gpu``) is checked on the CUDA provider where there is one."""
    if component.details.get("requires") != "CUDAExecutionProvider":
        return options.backend_options, None
    from sdexport.export.targets.onnx_gpu import validation_providers

    providers, reason = validation_providers(component.details)
    return {**options.backend_options, "providers": providers}, reason


def export_component(spec: ComponentSpec, target: Target, stage: Path, options: ExportOptions, multiple: int) -> Component:
    trace = options.trace_shape(spec)
    if options.static:
        spec = spec.static(trace, keep_batch_dynamic=_keep_batch_dynamic(options))
    module = spec.module()
    precision = options.precision
    if spec.keep_fp32 and precision != "fp32":
        precision = "fp32"
    component = _convert(spec, module, target, stage, options, precision)
    if spec.keep_fp32 and options.precision != "fp32":
        component.details["force_upcast"] = spec.keep_fp32  # the manifest and `sdexport inspect` say why
    backend_options, skipped = _validation_backend(component, options)
    if options.validate and not target.can_validate_here():
        # The backend cannot run here (Core ML off macOS): record that, and what the target can check.
        shape = validation_shape(spec, trace, options.static, multiple)
        component.parity.update(target.offline_parity(spec, module, shape, options))
    elif options.validate and skipped:  # CUDA-only graph, no CUDA provider here: say so in the manifest
        component.parity.update({"skipped": skipped})
    elif options.validate:
        shape = validation_shape(spec, trace, options.static, multiple)
        result = measure(component, stage, spec, module, shape, backend_options)
        floor = gate(spec, precision, options)
        if precision != "fp32" and not result["finite"]:
            # fp16 overflowed somewhere in this component: keep it whole in fp32 and say so.
            shutil.rmtree(stage / spec.name)
            reason = f"{precision} output was not finite; component kept in fp32"
            component = _convert(spec, module, target, stage, options, "fp32")
            component.details["fallback"] = reason
            result = measure(component, stage, spec, module, shape, backend_options)
            floor = gate(spec, "fp32", options)
        result["min_psnr_db"] = floor
        if not passes(result, floor):
            raise ExportError(
                f"{spec.name}: {target.name} output differs from torch beyond tolerance "
                f"(PSNR {result['psnr_db']:.1f} dB < {floor:.0f} dB, max abs error {result['max_abs_err']:.3g})"
            )
        component.parity.update(result)
    del module
    return component


def _convert(spec, module, target: Target, stage: Path, options: ExportOptions, precision: str) -> Component:
    converted = target.convert(spec, module, stage / spec.name, options, precision)
    weights = weight_map(spec.role, module, converted.files, target.backend, converted.precision,
                         getattr(getattr(module, "unet", None), "config", None))
    return Component(
        name=spec.name,
        role=spec.role,
        backend=target.backend,
        files=tuple(FileRef.of(stage, f) for f in converted.files),
        precision=converted.precision,
        inputs=converted.inputs,
        outputs=converted.outputs,
        parity={},
        details={**converted.details, **({"control_inputs": True} if spec.name == "unet_control" else {})},
        weights=weights,
    )
