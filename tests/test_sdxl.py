"""SDXL end to end: tiny SDXL base and refiner (built in-process, random weights) exported to ONNX and
OpenVINO fp32, run by the torch-free runtime, compared with diffusers' SDXL pipelines.

With ``--rng torch`` the image must be diffusers' for the same seed (PSNR >= 45 dB on the 8-bit PNG):
txt2img with no, an empty and a non-empty negative prompt (no negative prompt: zeros, as
``force_zeros_for_empty_prompt``), a non-square size, two schedulers; img2img; the refiner alone
(img2img with aesthetic-score time ids) and as the second expert (base with ``denoising_end``
returning latents, refiner with ``denoising_start``, one generator through both); SDXL-Turbo
(``--few-step turbo``: Euler ancestral with trailing timesteps, 1 step, guidance 0); inpainting with an
ordinary and a 9-channel U-Net (StableDiffusionXLInpaintPipeline).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from runtime.manifest import Manifest
from runtime.metrics import psnr
from sdexport.cli import main
from tests.reference import sample_image, use_scheduler

MIN_PSNR = 45.0
STEPS = 3
PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from sdexport.demo.tiny_sdxl import save_tiny_sdxl

    root = tmp_path_factory.mktemp("tiny-sdxl")
    models = {"base": save_tiny_sdxl(root / "base"), "refiner": save_tiny_sdxl(root / "refiner", refiner=True)}
    models["inpaint"] = root / "inpaint"  # built on first use (the slow 9-channel test only)
    return models


@pytest.fixture(scope="module")
def sdxl_controlnets(models, tmp_path_factory):
    """Two SDXL ControlNets (addition_embed_type text_time) copied from the tiny base U-Net, zero convolutions randomised."""
    from tests.conftest import save_tiny_controlnet

    root = tmp_path_factory.mktemp("sdxl-controlnets")
    return {name: save_tiny_controlnet(models["base"], root / name, seed) for name, seed in (("edges", 11), ("depth", 12))}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, models, sdxl_controlnets):
    """``exported(model, target, *flags)`` -> artifact directory, each exported once per module. The base's
    ONNX export carries the two ControlNets (one export for every ONNX test: the plain runs use ``unet``)."""
    done = {}

    def get(model: str, target: str = "onnx", *flags: str):
        key = (model, target, flags)
        if model == "base" and target == "onnx":
            flags = (*flags, *(f for name, path in sdxl_controlnets.items() for f in ("--controlnet", f"{name}={path}")))
        if model != "base" or target != "onnx":
            # The base's ONNX export runs the per-component parity gate; the others skip it to keep
            # this module quick: the image PSNR against diffusers below is the stronger check anyway.
            flags = (*flags, "--no-validate")
        if key not in done:
            if model == "inpaint" and not models["inpaint"].exists():
                from sdexport.demo.tiny_sdxl import save_tiny_sdxl

                save_tiny_sdxl(models["inpaint"], inpainting=True)
            out = tmp_path_factory.mktemp(f"sdxl-{model}-{target}") / "out"
            assert main(["export", str(models[model]), "--target", target, "--out", str(out), "--quiet", *flags]) == 0
            done[key] = out
        return done[key]

    return get


@pytest.fixture(scope="module")
def reference(models):
    """diffusers' pipelines, loaded once: ``reference(kind)`` with kind txt2img, img2img or refiner."""
    import diffusers

    loaded = {}

    def get(kind: str):
        if kind not in loaded:
            cls = {"txt2img": diffusers.StableDiffusionXLPipeline, "inpaint": diffusers.StableDiffusionXLInpaintPipeline,
                   "inpaint9": diffusers.StableDiffusionXLInpaintPipeline}.get(kind, diffusers.StableDiffusionXLImg2ImgPipeline)
            model = {"refiner": "refiner", "inpaint9": "inpaint"}.get(kind, "base")
            pipe = cls.from_pretrained(str(models[model]))
            pipe.set_progress_bar_config(disable=True)
            loaded[kind] = (pipe, pipe.scheduler)
        pipe, default = loaded[kind]
        pipe.scheduler = default
        return pipe

    return get


def _run(pipe, scheduler, seed, **kwargs):
    import torch

    if scheduler is not None:
        use_scheduler(pipe, scheduler)
    with torch.no_grad():
        return pipe(generator=torch.Generator().manual_seed(seed), **kwargs).images[0]


def _generate(tmp_path, artifact, *extra) -> Image.Image:
    out = tmp_path / "out.png"
    args = ["generate", str(artifact), "--seed", "3", "--rng", "torch", "--steps", str(STEPS), "--output", str(out),
            "--quiet", "--overwrite", *extra]
    assert main(args) == 0
    return Image.open(out).convert("RGB")


def _check(ours: Image.Image, theirs: Image.Image) -> float:
    assert ours.size == theirs.size
    value = psnr(np.asarray(theirs, np.float64), np.asarray(ours, np.float64), peak=255.0)
    assert value >= MIN_PSNR, f"PSNR {value:.1f} dB < {MIN_PSNR} dB"
    return value


# --- the model description -------------------------------------------------------------------


def test_manifest_describes_sdxl(exported):
    base, refiner = Manifest.load(exported("base")), Manifest.load(exported("refiner"))
    m = base.model
    assert (m.family, m.text_hidden_size, m.text_encoder_2_hidden_size, m.projection_dim) == ("sdxl", 64, 32, 32)
    assert (m.addition_time_embed_dim, m.time_ids_length, m.vae_scaling_factor) == (8, 6, 0.13025)
    assert m.force_zeros_for_empty_prompt and m.vae_force_upcast and not m.requires_aesthetics_score
    assert (base.tokenizer_dir, base.tokenizer_2_dir) == ("tokenizer", "tokenizer_2")
    assert [s.name for s in base.component("unet").inputs] == [
        "sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    assert [s.name for s in base.component("text_encoder_2").outputs] == ["penultimate_hidden_state", "text_embeds"]
    r = refiner.model
    assert (r.family, r.time_ids_length, r.text_hidden_size, r.force_zeros_for_empty_prompt) == ("sdxl-refiner", 5, 32, False)
    assert "text_encoder" not in refiner.components and refiner.tokenizer_dir == "tokenizer_2"
    # tokenizer_2 pads with "!" (id 0), read from its files
    from runtime.tokenizer import CLIPTokenizer

    tok = CLIPTokenizer.from_dir(exported("base") / "tokenizer_2")
    assert tok.pad_token == "!" and tok("a")[-1] == 0
    assert CLIPTokenizer.from_dir(exported("base") / "tokenizer")("a")[-1] == 49407


def test_sd_manifest_unchanged_by_sdxl_fields():
    """An SD 1.x/2.x model section is written without the SDXL keys, and one without them loads."""
    from runtime.manifest import ModelInfo

    info = ModelInfo("sd1", "epsilon", 4, 4, 8, 0.18215, None, 768, 77, 512, 512)
    data = info.to_json()
    assert not {"projection_dim", "vae_force_upcast", "addition_time_embed_dim"} & set(data)
    assert ModelInfo.from_json(data) == info and not info.is_sdxl


# --- parity with diffusers --------------------------------------------------------------------


@pytest.mark.parametrize("negative, scheduler, height, width", [
    (None, None, 64, 96),  # no negative prompt: zero embeddings (force_zeros_for_empty_prompt), non-square
    ("", "dpmpp-2m", 64, 64),  # an empty one given: the encoders run on ""
    ("blurry, low quality", "euler-a", 96, 64),
])
def test_txt2img_equals_diffusers_onnx(exported, reference, tmp_path, negative, scheduler, height, width):
    extra = ["--prompt", PROMPT, "--height", str(height), "--width", str(width)]
    extra += (["--negative-prompt", negative] if negative is not None else []) + (["--scheduler", scheduler] if scheduler else [])
    ours = _generate(tmp_path, exported("base"), *extra)
    theirs = _run(reference("txt2img"), scheduler, 3, prompt=PROMPT, negative_prompt=negative, num_inference_steps=STEPS,
                  height=height, width=width)
    _check(ours, theirs)


@pytest.mark.parametrize("scheduler", [None, "ddim"])
def test_img2img_equals_diffusers_onnx(exported, reference, tmp_path, scheduler):
    sample_image(64).save(tmp_path / "in.png")
    extra = ["--prompt", PROMPT, "--image", str(tmp_path / "in.png"), "--strength", "0.7", "--negative-prompt", "dark",
             "--steps", "4"] + (["--scheduler", scheduler] if scheduler else [])
    ours = _generate(tmp_path, exported("base"), *extra)
    theirs = _run(reference("img2img"), scheduler, 3, prompt=PROMPT, negative_prompt="dark", image=sample_image(64),
                  strength=0.7, num_inference_steps=4)
    _check(ours, theirs)


def test_refiner_img2img_equals_diffusers(exported, reference, tmp_path):
    """The refiner alone: aesthetic-score time ids, "" encoded as the negative (no force_zeros), strength 0.3."""
    sample_image(64).save(tmp_path / "in.png")
    ours = _generate(tmp_path, exported("refiner"), "--prompt", PROMPT, "--image", str(tmp_path / "in.png"), "--steps", "5")
    theirs = _run(reference("refiner"), None, 3, prompt=PROMPT, image=sample_image(64), num_inference_steps=5)
    _check(ours, theirs)


@pytest.mark.parametrize("scheduler", [None, "euler-a"])
def test_base_then_refiner_equals_diffusers(exported, reference, tmp_path, scheduler):
    """Ensemble of experts: `generate BASE --refiner REFINER --denoising-end 0.5` against diffusers'
    base(denoising_end=0.5, output_type="latent") then refiner(image=latents, denoising_start=0.5),
    one generator through both (euler-a draws noise in both experts)."""
    import torch

    extra = ["--prompt", PROMPT, "--refiner", str(exported("refiner")), "--denoising-end", "0.5", "--steps", "5",
             "--height", "64", "--width", "64"] + (["--scheduler", scheduler] if scheduler else [])
    ours = _generate(tmp_path, exported("base"), *extra)
    base, refiner = reference("txt2img"), reference("refiner")
    if scheduler is not None:
        use_scheduler(base, scheduler)
        use_scheduler(refiner, scheduler)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        latents = base(PROMPT, num_inference_steps=5, denoising_end=0.5, output_type="latent", height=64, width=64,
                       generator=generator).images
        theirs = refiner(PROMPT, image=latents, num_inference_steps=5, denoising_start=0.5, generator=generator).images[0]
    _check(ours, theirs)
    # the check discriminates: the base's own decode of its latents would fail it
    base_only = _generate(tmp_path, exported("base"), "--prompt", PROMPT, "--denoising-end", "0.5", "--steps", "5",
                          "--height", "64", "--width", "64", *(["--scheduler", scheduler] if scheduler else []))
    assert psnr(np.asarray(base_only, np.float64), np.asarray(theirs, np.float64), peak=255.0) < MIN_PSNR


def test_python_api_hand_over(exported, reference):
    """The Python API the CLI uses: base latents (decode=False) as the refiner's image."""
    from runtime import Pipeline
    from runtime.rng import make_rng

    generator = make_rng(7, "torch")
    base = Pipeline.from_dir(exported("base")).generate(PROMPT, steps=4, denoising_end=0.6, decode=False, rng="torch",
                                                         height=64, width=64, generator=generator)
    assert base.images == [] and base.latents.shape == (1, 4, 8, 8)
    refiner = Pipeline.from_dir(exported("refiner"))
    refiner.warmup()  # the refiner's one text encoder, its U-Net and VAE decoder
    assert {"text_encoder_2", "unet", "vae_decoder"} <= set(refiner._sessions) and "text_encoder" not in refiner._sessions
    ours = refiner.generate(PROMPT, "dark", steps=4, image=base.latents, rng="torch", denoising_start=0.6,
                            generator=generator).image
    import torch

    torch_generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        latents = reference("txt2img")(PROMPT, num_inference_steps=4, denoising_end=0.6, output_type="latent",
                                       height=64, width=64, generator=torch_generator).images
        np.testing.assert_allclose(base.latents, latents.numpy(), atol=1e-3)
        theirs = reference("refiner")(PROMPT, negative_prompt="dark", image=latents, num_inference_steps=4,
                                      denoising_start=0.6, generator=torch_generator).images[0]
    _check(ours, theirs)


@pytest.mark.parametrize("model, strength, negative, scheduler", [
    ("base", None, None, None),  # an ordinary U-Net: the kept area follows the noised original (strength 0.9999)
    ("base", "0.7", "dark", "ddim"),
    pytest.param("inpaint", None, None, None, marks=pytest.mark.slow),  # 9-channel U-Net (mask + masked image)
    pytest.param("inpaint", "1.0", "", "euler-a", marks=pytest.mark.slow),
])
def test_inpaint_equals_diffusers(exported, reference, tmp_path, model, strength, negative, scheduler):
    from tests.reference import sample_mask

    sample_image(64).save(tmp_path / "in.png")
    sample_mask(64).save(tmp_path / "mask.png")
    extra = ["--prompt", PROMPT, "--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"), "--steps", "4"]
    extra += (["--strength", strength] if strength else []) + (["--negative-prompt", negative] if negative is not None else [])
    ours = _generate(tmp_path, exported(model), *extra, *(["--scheduler", scheduler] if scheduler else []))
    kwargs = {"strength": float(strength)} if strength else {}
    theirs = _run(reference("inpaint" if model == "base" else "inpaint9"), scheduler, 3, prompt=PROMPT,
                  negative_prompt=negative, image=sample_image(64), mask_image=sample_mask(64), num_inference_steps=4,
                  height=64, width=64, **kwargs)
    _check(ours, theirs)


@pytest.mark.parametrize("nets, negative, guess", [
    ((("edges", 1.0, 0.0, 1.0),), None, False),
    ((("edges", 0.7, 0.0, 0.6), ("depth", 1.2, 0.3, 1.0)), "dark", False),  # two at once, scales, start/end
    ((("edges", 1.0, 0.0, 1.0),), "", True),  # guess mode: the conditional half only, diffusers' logspace scales
])
def test_controlnet_equals_diffusers(exported, models, sdxl_controlnets, tmp_path, nets, negative, guess):
    import diffusers
    import torch

    from runtime import Pipeline
    from runtime.pipeline import Control

    artifact = exported("base")
    images = {name: sample_image(64, seed=5 + i) for i, name in enumerate(sdxl_controlnets)}
    controls = [Control(name, images[name], scale, start, end) for name, scale, start, end in nets]
    ours = Pipeline.from_dir(artifact).generate(PROMPT, negative, steps=4, seed=3, rng="torch", height=64, width=64,
                                                controls=controls, guess_mode=guess).image
    cns = [diffusers.ControlNetModel.from_pretrained(str(sdxl_controlnets[n])) for n, *_ in nets]
    pipe = diffusers.StableDiffusionXLControlNetPipeline.from_pretrained(
        str(models["base"]), controlnet=cns if len(cns) > 1 else cns[0])
    pipe.set_progress_bar_config(disable=True)
    one = len(nets) == 1
    pick = (lambda v: v[0]) if one else (lambda v: v)
    with torch.no_grad():
        theirs = pipe(PROMPT, negative_prompt=negative, image=pick([images[n] for n, *_ in nets]), num_inference_steps=4,
                      height=64, width=64, guess_mode=guess, generator=torch.Generator().manual_seed(3),
                      controlnet_conditioning_scale=pick([c[1] for c in nets]),
                      control_guidance_start=pick([c[2] for c in nets]),
                      control_guidance_end=pick([c[3] for c in nets])).images[0]
    _check(ours, theirs)


def test_long_prompt_warns_how_many_tokens_were_dropped(exported, tmp_path, capsys):
    """SDXL keeps diffusers' one 77-token window per encoder: what is cut is said, not dropped silently."""
    out = tmp_path / "long.png"
    code = main(["generate", str(exported("base")), "--prompt", " ".join(["cat"] * 80), "--steps", "1",
                 "--height", "64", "--width", "64", "--quiet", "--output", str(out)])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 0 and out.exists()
    assert len(lines) == 1 and lines[0].startswith("sdexport: warning: --prompt") and "last 5 tokens" in lines[0], lines


def test_controlnet_of_the_other_family_is_one_line(models, tiny_controlnets, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["export", str(models["base"]), "--controlnet", f"edges={tiny_controlnets['edges']}", "--out", str(out),
                 "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not fit the U-Net" in err[0] and not out.exists()


@pytest.mark.slow
def test_openvino_fp32_equals_diffusers(exported, reference, tmp_path):
    artifact = exported("base", "openvino")
    ours = _generate(tmp_path, artifact, "--prompt", PROMPT, "--height", "64", "--width", "96", "--scheduler", "euler-a",
                     "--negative-prompt", "blurry")
    theirs = _run(reference("txt2img"), "euler-a", 3, prompt=PROMPT, negative_prompt="blurry", num_inference_steps=STEPS,
                  height=64, width=96)
    _check(ours, theirs)
    sample_image(64).save(tmp_path / "in.png")
    ours = _generate(tmp_path, artifact, "--prompt", PROMPT, "--image", str(tmp_path / "in.png"), "--strength", "0.7",
                     "--steps", "4")
    theirs = _run(reference("img2img"), None, 3, prompt=PROMPT, image=sample_image(64), strength=0.7, num_inference_steps=4)
    _check(ours, theirs)


def test_turbo_equals_diffusers(exported, models, reference, tmp_path):
    """--few-step turbo: SDXL-Turbo's scheduler (Euler ancestral, trailing), 1 step and guidance 0 by default.

    What the export writes for it (scheduler config, model.recommended) comes from the source layer,
    checked here; the run uses the base export with those two written in, as a turbo export has them
    (a third export of the same weights would add half a minute and test nothing more)."""
    import diffusers

    from sdexport.sources.open import open_source, recommended_settings

    source = open_source(models["base"], few_step="turbo")
    config = source.scheduler_config
    assert (config["_class_name"], config["timestep_spacing"]) == ("EulerAncestralDiscreteScheduler", "trailing")
    recommended = recommended_settings(source)
    assert recommended == {"scheduler": "EulerAncestralDiscreteScheduler", "steps": 1, "guidance_scale": 0.0}
    artifact = tmp_path / "turbo"
    shutil.copytree(exported("base"), artifact)
    (artifact / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    data = json.loads((artifact / "sdexport.json").read_text())
    data["model"]["recommended"] = recommended
    (artifact / "sdexport.json").write_text(json.dumps(data))
    out = tmp_path / "turbo.png"
    assert main(["generate", str(artifact), "--prompt", PROMPT, "--seed", "3", "--rng", "torch", "--height", "64",
                 "--width", "64", "--output", str(out), "--quiet"]) == 0
    pipe = reference("txt2img")
    pipe.scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(config)
    theirs = _run(pipe, None, 3, prompt=PROMPT, num_inference_steps=1, guidance_scale=0.0, height=64, width=64)
    _check(Image.open(out).convert("RGB"), theirs)


# --- one clear line -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd1_like(exported, tmp_path_factory):
    """The SDXL export's files under a manifest that says SD 1.x (what the option checks read)."""
    out = tmp_path_factory.mktemp("sd1-like") / "out"
    shutil.copytree(exported("base"), out)
    data = json.loads((out / "sdexport.json").read_text())
    for key in ("text_encoder_2_hidden_size", "projection_dim", "addition_time_embed_dim", "force_zeros_for_empty_prompt",
                "vae_force_upcast"):
        data["model"].pop(key, None)
    data["model"]["family"] = "sd1"
    (out / "sdexport.json").write_text(json.dumps(data))
    return out


@pytest.mark.parametrize("case, expected", [
    ("sd1 --denoising-end", "--denoising-end is an SDXL option; this export is a sd1 model"),
    ("sd1 --refiner", "--refiner needs an SDXL base export"),
    ("refiner alone", "this export is an SDXL refiner: give an --image"),
    ("refiner --denoising-start", "--denoising-start continues a base run"),
    ("sdxl --mask --denoising-start", "SDXL inpainting (--mask) starts from an image"),
    ("base --refiner sd1", "an SDXL export is needed; that one is a sd1 model"),
])
def test_wrong_family_options_are_one_line(exported, sd1_like, tmp_path, capsys, case, expected):
    sample_image(64).save(tmp_path / "in.png")
    out = tmp_path / "x.png"
    base, refiner = str(exported("base")), str(exported("refiner"))
    args = {
        "sd1 --denoising-end": [str(sd1_like), "--denoising-end", "0.8"],
        "sd1 --refiner": [str(sd1_like), "--refiner", refiner],
        "refiner alone": [refiner],
        "refiner --denoising-start": [refiner, "--denoising-start", "0.8"],
        "sdxl --mask --denoising-start": [base, "--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "in.png"),
                                          "--denoising-start", "0.5"],
        "base --refiner sd1": [base, "--refiner", str(sd1_like), "--steps", "2", "--height", "64", "--width", "64"],
    }[case]
    assert main(["generate", *args, "--prompt", "x", "--output", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert not out.exists()


def test_force_upcast_vae_stays_fp32_in_a_reduced_export(models, tmp_path):
    """The SDXL VAE overflows in fp16: asked for fp16, the export keeps it fp32 and says why."""
    from sdexport.export import sdxl
    from sdexport.export.components import model_info
    from sdexport.export.run import export_component
    from sdexport.export.targets import get_target
    from sdexport.export.targets.base import ExportOptions
    from sdexport.sources.open import open_source

    source = open_source(models["base"])
    info = model_info(source)
    spec = next(s for s in sdxl.component_specs(source, info, []) if s.name == "vae_decoder")
    options = ExportOptions(target="onnx", precision="fp16", trace_size=64)
    component = export_component(spec, get_target("onnx"), tmp_path, options, 16)
    assert component.precision == "fp32" and component.details["force_upcast"] == sdxl.FORCE_UPCAST
    assert component.parity["psnr_db"] >= 60
