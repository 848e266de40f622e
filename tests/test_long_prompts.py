"""Long prompts and emphasis end to end: exported U-Nets take 77 * chunks positions.

The oracle is diffusers' pipeline fed ``prompt_embeds`` / ``negative_prompt_embeds`` that the test
builds itself: transformers' tokenizer and CLIPTextModel (the tiny model's own text encoder) on
75-token chunks, concatenated, the negative prompt padded with the empty prompt's window; emphasis
weighted as A1111 does, in torch. Images must reach 45 dB on ONNX Runtime and OpenVINO with
``rng="torch"``. A prompt of at most 75 tokens is encoded exactly as before (bit for bit).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from runtime.metrics import psnr
from runtime.pipeline import Pipeline, PipelineInputError
from runtime.prompts import PromptOptions, chunk_prompt
from sdexport.cli import main
from tests.reference import load_pipeline

MIN_PSNR = 45.0
SIZE, STEPS, SEED = 64, 4, 5
WORDS = ("red", "green", "blue", "cat", "dog", "tree", "house", "sky", "sun", "moon", "river", "stone")
LONG = " ".join(WORDS[i % len(WORDS)] for i in range(160))  # 160 tokens: 3 chunks
NEGATIVE = " ".join(WORDS[(i * 5) % len(WORDS)] for i in range(80))  # 80 tokens: 2 chunks, padded to 3
SHORT_75 = " ".join(WORDS[(i * 7) % len(WORDS)] for i in range(75))  # exactly one window
EMPHASIS = "a (red:1.4) house by a [[blue]] river, ((sunset)) BREAK " + LONG


@pytest.fixture(scope="module")
def source(tmp_path_factory, tiny_sd1):
    """The tiny SD1 model with a trained-looking final LayerNorm bias: a fresh bias of 0 puts every
    token's mean at 0, and A1111's mean ratio is then rounding noise over rounding noise."""
    from transformers import CLIPTextModel

    src = tmp_path_factory.mktemp("long-prompts") / "model"
    shutil.copytree(tiny_sd1, src)
    model = CLIPTextModel.from_pretrained(str(src / "text_encoder"))
    norm = "final_layer_norm" if hasattr(model, "final_layer_norm") else "text_model.final_layer_norm"
    with torch.no_grad():
        model.get_submodule(norm).bias.normal_(0.2, 0.1, generator=torch.Generator().manual_seed(0))
    model.save_pretrained(str(src / "text_encoder"))
    return src


@pytest.fixture(scope="module")
def exports(source):
    out = {}
    for target in ("onnx", "openvino"):
        d = source.parent / target
        # --no-validate: every export's own parity check already runs the U-Net at two chunks
        assert main(["export", str(source), "--target", target, "--out", str(d), "--quiet", "--no-validate"]) == 0
        out[target] = d
    return out


@pytest.fixture(scope="module")
def text_model(source):
    from transformers import CLIPTextModel, CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(source / "tokenizer")), CLIPTextModel.from_pretrained(
        str(source / "text_encoder")).eval()


def _reference_embeds(text_model, text: str, n_chunks: int) -> torch.Tensor:
    """[1, 77 * n_chunks, D] from transformers alone: the text's tokens cut into 75s, each framed."""
    tok, model = text_model
    flat = tok(text, add_special_tokens=False, truncation=False).input_ids
    bodies = [flat[k:k + 75] for k in range(0, len(flat), 75)] or [[]]
    bodies += [[]] * (n_chunks - len(bodies))  # padding chunks: the empty prompt's window
    rows = [[tok.bos_token_id, *b, tok.eos_token_id] for b in bodies]
    ids = torch.tensor([r + [tok.pad_token_id] * (77 - len(r)) for r in rows])
    with torch.no_grad():
        return model(ids).last_hidden_state.reshape(1, -1, model.config.hidden_size)


def _weighted_reference(text_model, pipe: Pipeline, text: str, n_chunks: int) -> torch.Tensor:
    """Chunks and factors from runtime.prompts (its parser is checked against A1111's table in
    test_prompts), hidden states from transformers, A1111's weighting in torch."""
    tok, model = text_model
    chunks = chunk_prompt(pipe.tokenizer, text, PromptOptions(emphasis=True))
    parts = []
    with torch.no_grad():
        for ids, w in zip(chunks.ids, chunks.weights):
            z = model(torch.from_numpy(ids[None])).last_hidden_state[0]
            mean = z.mean()
            z = z * torch.from_numpy(w)[:, None]
            parts.append(z * (mean / z.mean()))
    assert len(parts) == n_chunks
    return torch.cat(parts)[None]


def _diffusers(src, prompt_embeds, negative_embeds) -> Image.Image:
    pipe = load_pipeline(src, "txt2img", "ddim")
    with torch.no_grad():
        return pipe(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds, num_inference_steps=STEPS,
                    height=SIZE, width=SIZE, generator=torch.Generator().manual_seed(SEED)).images[0]


def _ours(artifact, prompt, negative, **kwargs):
    pipe = Pipeline.from_dir(artifact)
    return pipe.generate(prompt, negative, steps=STEPS, scheduler="ddim", seed=SEED, rng="torch", height=SIZE,
                         width=SIZE, **kwargs)


def _psnr(ours: Image.Image, theirs: Image.Image) -> float:
    return psnr(np.asarray(theirs, np.float64), np.asarray(ours.convert("RGB"), np.float64), peak=255.0)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["onnx", "openvino"])
def test_long_prompt_image_equals_diffusers_fed_chunked_embeddings(exports, source, text_model, target):
    result = _ours(exports[target], LONG, NEGATIVE)
    assert result.settings["prompt_chunks"] == 3
    theirs = _diffusers(source, _reference_embeds(text_model, LONG, 3), _reference_embeds(text_model, NEGATIVE, 3))
    value = _psnr(result.image, theirs)
    assert value >= MIN_PSNR, f"{target}: PSNR {value:.1f} dB < {MIN_PSNR} dB"


@pytest.mark.slow
def test_emphasis_image_equals_diffusers_fed_a1111_weighted_embeddings(exports, source, text_model):
    artifact = exports["onnx"]
    result = _ours(artifact, EMPHASIS, "(ugly:1.2), blurry", emphasis=True)
    pipe = Pipeline.from_dir(artifact)
    n = result.settings["prompt_chunks"]
    assert n == 4 and result.settings["emphasis"] is True  # BREAK ends chunk 1; 160 tokens take 3 more
    theirs = _diffusers(source, _weighted_reference(text_model, pipe, EMPHASIS, n),
                        torch.cat([_weighted_reference(text_model, pipe, "(ugly:1.2), blurry", 1),
                                   _reference_embeds(text_model, "", 3)], dim=1))
    value = _psnr(result.image, theirs)
    assert value >= MIN_PSNR, f"PSNR {value:.1f} dB < {MIN_PSNR} dB"
    plain = _ours(artifact, EMPHASIS, "(ugly:1.2), blurry")  # the same text read literally: another image
    assert _psnr(plain.image, result.image) < 40


def test_75_tokens_stay_one_window_bit_for_bit(exports, source):
    pipe = Pipeline.from_dir(exports["onnx"])
    assert len(pipe.tokenizer.encode(SHORT_75)) == 75
    before = pipe.session("text_encoder").run({"input_ids": pipe.tokenizer([SHORT_75, "a cat"])})["last_hidden_state"]
    assert np.array_equal(pipe.encode_prompts([SHORT_75, "a cat"]), before)
    result = _ours(exports["onnx"], SHORT_75, "blurry")
    assert result.settings["prompt_chunks"] == 1
    pipe_d = load_pipeline(source, "txt2img", "ddim")
    with torch.no_grad():
        theirs = pipe_d(SHORT_75, negative_prompt="blurry", num_inference_steps=STEPS, height=SIZE, width=SIZE,
                        generator=torch.Generator().manual_seed(SEED)).images[0]
    assert _psnr(result.image, theirs) >= MIN_PSNR


def test_device_loop_takes_the_longer_sequence(exports):
    kwargs = dict(steps=STEPS, scheduler="euler", seed=SEED, rng="torch", height=SIZE, width=SIZE, return_latents=True)
    ref = Pipeline.from_dir(exports["onnx"], options={"device": "cpu", "device_loop": "off"}).generate(LONG, NEGATIVE, **kwargs)
    got = Pipeline.from_dir(exports["onnx"], options={"device": "cpu", "device_loop": "on"}).generate(LONG, NEGATIVE, **kwargs)
    assert got.settings["loop"] == "device" and ref.settings["loop"] == "numpy"
    np.testing.assert_allclose(got.latents, ref.latents, rtol=0, atol=1e-4 * float(np.abs(ref.latents).max()))


def test_a_fixed_77_artifact_refuses_a_long_prompt_in_one_line(exports, tmp_path, capsys):
    old = tmp_path / "old"
    shutil.copytree(exports["onnx"], old)
    manifest = json.loads((old / "sdexport.json").read_text())
    for component in manifest["components"].values():  # as exports made before long prompts wrote it
        for spec in component["inputs"]:
            if spec["name"] == "encoder_hidden_states":
                spec["shape"][1] = 77
    (old / "sdexport.json").write_text(json.dumps(manifest))
    with pytest.raises(PipelineInputError, match="re-export it with dynamic shapes, or with --prompt-chunks 3"):
        _ours(old, LONG, None)
    out = tmp_path / "x.png"
    assert main(["generate", str(old), "--prompt", LONG, "--steps", "2", "--output", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--prompt-chunks 3" in err and not out.exists()
    assert _ours(old, SHORT_75, "blurry").settings["prompt_chunks"] == 1  # short prompts run as before


def test_emphasis_is_recorded_in_the_png_parameters(exports, tmp_path):
    texts = {}
    for flags in ([], ["--emphasis"]):
        out = tmp_path / f"e{len(flags)}.png"
        assert main(["generate", str(exports["onnx"]), "--prompt", "a (red:1.3) cat", "--steps", "2", "--height",
                     str(SIZE), "--width", str(SIZE), "--output", str(out), "--quiet", *flags]) == 0
        texts[bool(flags)] = Image.open(out).text["parameters"]
    assert texts[False].endswith(", Emphasis: None") and texts[True].endswith(", Emphasis: Original")


def test_malformed_weight_is_one_line(exports, tmp_path, capsys):
    out = tmp_path / "x.png"
    assert main(["generate", str(exports["onnx"]), "--prompt", "a (cat:1.2.3)", "--emphasis", "--steps", "2",
                 "--output", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "1.2.3" in err and not out.exists()
