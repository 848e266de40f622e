"""runtime.tokenizer against transformers' CLIPTokenizer on the real CLIP vocabulary."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from runtime.tokenizer import CLIPTokenizer, TokenizerError
from tests.prompt_corpus import generate

CORPUS = generate(2400)


@pytest.fixture(scope="module")
def ours(clip_vocab_dir):
    return CLIPTokenizer.from_dir(clip_vocab_dir)


def test_vocabulary_is_the_real_clip_one(ours):
    assert ours.vocab_size == 49408
    assert ours.bos_token_id == 49406 and ours.eos_token_id == 49407
    assert ours.encoder["photo</w>"] == 1125  # a known id of openai/clip-vit-large-patch14


def test_corpus_is_varied():
    assert len(CORPUS) >= 2000
    assert any(len(p) > 1000 for p in CORPUS)
    for needle in ("é", "東", "🙂", "&amp;", "(masterpiece:1.2)", "ΣΑΣ", "\u3000"):
        assert any(needle in p for p in CORPUS), needle


def test_ids_equal_transformers_on_corpus(ours, hf_clip_tokenizer):
    expected = hf_clip_tokenizer(CORPUS, padding="max_length", max_length=77, truncation=True).input_ids
    got = ours(CORPUS)
    assert got.shape == (len(CORPUS), 77) and got.dtype == np.int64
    mismatches = [(p, e[:20], g[:20]) for p, e, g in zip(CORPUS, expected, got.tolist()) if e != g]
    assert not mismatches, f"{len(mismatches)} prompts differ, first: {mismatches[0]}"


def test_untruncated_ids_equal_transformers(ours, hf_clip_tokenizer):
    # Beyond 77 tokens too: the BPE pieces themselves, not only the first window.
    for prompt in CORPUS[::7]:
        assert ours.encode(prompt) == hf_clip_tokenizer(prompt, add_special_tokens=False).input_ids, prompt


def test_sd2_padding_with_exclamation_mark(clip_vocab_dir, tmp_path):
    from transformers import CLIPTokenizer as HFTokenizer

    hf = HFTokenizer.from_pretrained(str(clip_vocab_dir), pad_token="!")
    hf.save_pretrained(str(tmp_path))  # transformers 5 writes tokenizer.json + tokenizer_config.json
    ours = CLIPTokenizer.from_dir(tmp_path)
    assert ours.pad_token_id == 0
    for prompt in CORPUS[:200]:
        expected = hf(prompt, padding="max_length", max_length=77, truncation=True).input_ids
        assert ours(prompt).tolist() == expected, prompt


def test_single_and_batch_shapes(ours):
    assert ours("a cat").shape == (77,)
    assert ours(["a", "b", "c"]).shape == (3, 77)
    ids = ours("")
    assert ids[0] == ours.bos_token_id and ids[1] == ours.eos_token_id and (ids[2:] == ours.pad_token_id).all()


def test_truncation_keeps_eos_last(ours):
    ids = ours("word " * 200)
    assert ids[0] == ours.bos_token_id and ids[-1] == ours.eos_token_id
    assert (ids[1:-1] == ours.encoder["word</w>"]).all()


def test_long_prompt_chunks(ours):
    text = " ".join(f"w{i}" for i in range(100))
    flat = ours.encode(text)
    chunks = ours.encode_chunks(text)
    assert chunks.shape[0] == -(-len(flat) // 75)
    body = [t for row in chunks for t in row[1:-1].tolist() if t != ours.pad_token_id]
    assert body == flat


def test_decode_round_trip(ours):
    assert ours.decode(ours("a photo of a cat, 8k")) == "a photo of a cat , 8 k"


def test_merge_cache_is_bounded(clip_vocab_dir):
    tok = CLIPTokenizer.from_dir(clip_vocab_dir, cache_size=8)
    tok(" ".join(f"unique{i}" for i in range(50)))
    assert tok._bpe_cached.cache_info().currsize <= 8


@pytest.mark.parametrize(
    "files, message",
    [
        ({"merges.txt": "#version: 0.2\na b\n"}, "vocab.json: vocabulary file not found"),
        ({"vocab.json": "{not json", "merges.txt": "a b\n"}, "vocab.json: not valid JSON"),
        ({"vocab.json": '["a"]', "merges.txt": "a b\n"}, "vocab.json: vocabulary must be a JSON object"),
        ({"vocab.json": "{}"}, "merges.txt: merges file not found"),
        ({"vocab.json": "{}", "merges.txt": "#version: 0.2\na b\nthree tokens here\n"}, "merges.txt:3: bad merges line"),
        ({"vocab.json": '{"a": 0}', "merges.txt": "a b\n"}, "special token '<|startoftext|>' is not in the vocabulary"),
    ],
)
def test_malformed_files_raise_clear_errors(tmp_path, files, message):
    for name, content in files.items():
        (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises(TokenizerError) as err:
        CLIPTokenizer.from_dir(tmp_path)
    assert message in str(err.value)
    assert str(tmp_path) in str(err.value)


def test_missing_directory(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer directory not found"):
        CLIPTokenizer.from_dir(tmp_path / "nope")


def test_tokenizer_config_sets_pad_and_length(clip_vocab_dir, tmp_path):
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((clip_vocab_dir / name).read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": {"content": "!"}, "model_max_length": 32}))
    tok = CLIPTokenizer.from_dir(tmp_path)
    assert tok.pad_token_id == 0 and tok("x").shape == (32,)


def test_runtime_tokenizer_imports_no_transformers():
    code = "import runtime.tokenizer, sys; bad = [m for m in ('torch', 'transformers', 'tokenizers') if m in sys.modules]; assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True)
