"""Long prompts and A1111 emphasis (runtime.prompts), against references built in the test.

- the parser reproduces A1111's ``parse_prompt_attention`` (its docstring's table, and more cases
  worked out from its rules: leniency, escapes, BREAK, nesting);
- chunking: at most 75 tokens is exactly the tokenizer's window (what diffusers encodes); longer
  prompts are 75-token chunks, a chunk end after a near comma moves the text after it;
- embeddings of a 160-token prompt equal transformers' CLIPTextModel run on the chunks and
  concatenated; emphasis equals A1111's weighting written in torch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from runtime.prompts import (BREAK, PromptOptions, PromptSyntaxError, apply_emphasis, chunk_batch, chunk_prompt,
                             encode_chunks, parse_attention)
from runtime.tokenizer import CLIPTokenizer

R, S = 1.1, 1 / 1.1  # A1111's factors of ( ) and [ ]

# (prompt, A1111's parse). The first seven are the examples of A1111's own docstring, verbatim.
PARSER_TABLE = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
    ("", [("", 1.0)]),
    # more, from the same rules
    ("(word:1.3)", [("word", 1.3)]),
    ("(word)", [("word", 1.0 * R)]),
    ("[word]", [("word", 1.0 * S)]),
    ("[[word]]", [("word", 1.0 * S * S)]),
    ("((word))", [("word", 1.0 * R * R)]),
    ("([word])", [("word", 1.0 * S * R)]),
    ("(a [b] c:1.5)", [("a ", 1.5), ("b", 1.0 * S * 1.5), (" c", 1.5)]),
    ("(word:0)", [("word", 0.0)]),
    ("(word:-1)", [("word", -1.0)]),
    ("(word:+.5)", [("word", 0.5)]),
    ("(word: 1.3)", [("word: 1.3", 1.1)]),  # no space allowed before the number: ": 1.3" is text
    ("(word:abc)", [("word:abc", 1.1)]),  # not a number: text, the bracket is a plain ()
    ("word:1.3) x", [("word:1.3) x", 1.0)]),  # ":1.3)" with no open bracket is text
    ("a ) b ] c", [("a ) b ] c", 1.0)]),  # stray closing brackets are text
    ("[unbalanced", [("unbalanced", 1.0 * S)]),
    ("((a)", [("a", 1.0 * R * R)]),  # the inner pair closes, the outer is open till the end
    ("\\(x\\) \\[y\\] \\\\", [("(x) [y] \\", 1.0)]),
    ("(\\(x\\))", [("(x)", 1.1)]),
    ("a\\b", [("ab", 1.0)]),  # a backslash before anything else is dropped
    ("time: noon", [("time: noon", 1.0)]),
    ("a BREAK b", [("a", 1.0), BREAK, ("b", 1.0)]),
    ("BREAK", [("", 1.0), BREAK, ("", 1.0)]),
    ("aBREAK b", [("aBREAK b", 1.0)]),  # a whole word only
    ("a BREAK BREAK b", [("a", 1.0), BREAK, ("", 1.0), BREAK, ("b", 1.0)]),
    ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),  # weighted, BREAK is just a word to A1111
    ("(a:1.2)(b:1.2)", [("ab", 1.2)]),  # equal neighbours merge
]


@pytest.mark.parametrize("text,expected", PARSER_TABLE)
def test_parser_matches_a1111(text, expected):
    assert parse_attention(text) == expected


@pytest.mark.parametrize("text", ["(x:1.2.3)", "(x:.)", "a (b:1..5) c"])
def test_parser_refuses_only_what_a1111_fails_on(text):
    # A1111 raises ValueError from float() on these; every other text is read leniently
    with pytest.raises(PromptSyntaxError, match="is not a number"):
        parse_attention(text)


@pytest.fixture(scope="module")
def tok(clip_vocab_dir) -> CLIPTokenizer:
    return CLIPTokenizer.from_dir(clip_vocab_dir)


WORDS = ("red", "green", "blue", "cat", "dog", "tree", "house", "sky", "sun", "moon", "river", "stone")


def _words(n: int) -> str:
    """``n`` tokens: words that are one token each."""
    return " ".join(WORDS[i % len(WORDS)] for i in range(n))


def _body(chunks, row) -> list[int]:
    ids = chunks.ids[row].tolist()
    return ids[1:ids.index(49407, 1)]


@pytest.mark.parametrize("text", ["", "a cat", "a (red:1.3) car, [blue] sky", "word " * 75, "word " * 200])
def test_one_window_is_the_tokenizers_window(tok, text):
    chunks = chunk_prompt(tok, text)
    if len(tok.encode(text)) <= 75:
        assert len(chunks) == 1 and np.array_equal(chunks.ids[0], tok(text)) and (chunks.weights == 1).all()
    else:
        assert len(chunks) > 1


def test_long_prompt_splits_into_75_token_chunks(tok):
    text = _words(160)  # no commas
    flat = tok.encode(text)
    assert len(flat) == 160
    chunks = chunk_prompt(tok, text)
    assert chunks.ids.shape == (3, 77)
    assert [len(_body(chunks, r)) for r in range(3)] == [75, 75, 10]
    assert sum((_body(chunks, r) for r in range(3)), []) == flat
    assert (chunks.ids[:, 0] == tok.bos_token_id).all() and (chunks.ids[2, 12:] == tok.pad_token_id).all()


def test_chunk_end_moves_text_after_a_near_comma(tok):
    text = "a " * 70 + ", " + "b " * 10  # the comma is token 70; tokens 71..74 would end chunk 1
    comma = tok.encoder[",</w>"]
    moved = chunk_prompt(tok, text)
    assert [len(_body(moved, r)) for r in range(2)] == [71, 10]
    assert _body(moved, 0)[-1] == comma
    exact = chunk_prompt(tok, text, PromptOptions(comma_backtrack=0))
    assert [len(_body(exact, r)) for r in range(2)] == [75, 6]
    far = chunk_prompt(tok, "a " * 50 + ", " + "b " * 40)  # comma 24 tokens back: over 20, not moved
    assert [len(_body(far, r)) for r in range(2)] == [75, 16]


def test_break_and_weights_per_token(tok):
    chunks = chunk_prompt(tok, "a (red:1.5) car BREAK [sky]", PromptOptions(emphasis=True))
    assert len(chunks) == 2
    red, car, sky = tok.encoder["red</w>"], tok.encoder["car</w>"], tok.encoder["sky</w>"]
    assert _body(chunks, 0) == [tok.encoder["a</w>"], red, car] and _body(chunks, 1) == [sky]
    assert chunks.weights[0, :5].tolist() == [1.0, 1.0, 1.5, 1.0, 1.0]
    assert chunks.weights[1, :3].tolist() == pytest.approx([1.0, 1 / 1.1, 1.0])
    literal = chunk_prompt(tok, "a (red:1.5) car BREAK [sky]")  # emphasis off: all text, one chunk
    assert len(literal) == 1 and np.array_equal(literal.ids[0], tok("a (red:1.5) car BREAK [sky]"))


def test_batch_pads_with_empty_chunks(tok):
    batch = chunk_batch(tok, ["short", _words(100)], PromptOptions(), 2)
    assert batch.ids.shape == (2, 2, 77)  # [chunks, prompts, window]
    assert np.array_equal(batch.ids[0, 0], tok("short")) and np.array_equal(batch.ids[1, 0], tok(""))


# --- embeddings against transformers and torch -------------------------------------------------


@pytest.fixture(scope="module")
def clip():
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                            num_hidden_layers=2, max_position_embeddings=77)
    model = CLIPTextModel(config).eval()
    with torch.no_grad():
        # A fresh LayerNorm has bias 0, so every token's mean is 0 and A1111's mean ratio is noise over
        # noise; trained CLIPs have a bias that keeps the mean away from 0.
        model.get_submodule("final_layer_norm" if hasattr(model, "final_layer_norm") else "text_model.final_layer_norm").bias.normal_(0.2, 0.1)
    return model


def _run(clip, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return clip(torch.from_numpy(ids)).last_hidden_state.numpy()


def test_long_prompt_embeddings_equal_transformers_on_the_chunks(tok, hf_clip_tokenizer, clip):
    text = _words(160)
    ours = encode_chunks(lambda ids: _run(clip, ids), chunk_batch(tok, [text, "a cat"], PromptOptions(), 3), False)
    # the reference: transformers' tokenizer, untruncated, cut by hand, each chunk through CLIPTextModel
    flat = hf_clip_tokenizer(text, add_special_tokens=False, truncation=False).input_ids
    bos, eos = hf_clip_tokenizer.bos_token_id, hf_clip_tokenizer.eos_token_id
    rows = [[bos, *flat[k:k + 75], eos] for k in range(0, len(flat), 75)]
    rows = torch.tensor([r + [eos] * (77 - len(r)) for r in rows])
    with torch.no_grad():
        expected = torch.cat(list(clip(rows).last_hidden_state), dim=0)
        short = hf_clip_tokenizer(["a cat", "", ""], padding="max_length", max_length=77, return_tensors="pt")
        expected_short = torch.cat(list(clip(short.input_ids).last_hidden_state), dim=0)
    assert ours.shape == (2, 231, 32)
    np.testing.assert_allclose(ours[0], expected.numpy(), rtol=0, atol=2e-6)
    np.testing.assert_allclose(ours[1], expected_short.numpy(), rtol=0, atol=2e-6)


def test_a_short_prompt_is_encoded_as_one_window_bit_for_bit(tok, clip):
    texts = ["a photo of a cat", "word " * 75]
    ours = encode_chunks(lambda ids: _run(clip, ids), chunk_batch(tok, texts, PromptOptions(), 1), False)
    assert np.array_equal(ours, _run(clip, tok(texts)))


def _a1111_weighting(z: torch.Tensor, multipliers: torch.Tensor) -> torch.Tensor:
    """A1111's "Original" emphasis (sd_emphasis.EmphasisOriginal), for one prompt's chunk."""
    original_mean = z.mean()
    z = z * multipliers.reshape(multipliers.shape + (1,)).expand(z.shape)
    new_mean = z.mean()
    return z * (original_mean / new_mean)


def test_emphasis_equals_a1111_weighting(tok, clip):
    texts = ["a (red:1.4) car on a [[wet]] road, ((sunset))", "plain text", _words(80) + " (long:0.6)"]
    options = PromptOptions(emphasis=True)
    batch = chunk_batch(tok, texts, options, 2)
    ours = encode_chunks(lambda ids: _run(clip, ids), batch, True)
    for b in range(len(texts)):
        parts = []
        for c in range(2):
            z = torch.from_numpy(_run(clip, batch.ids[c, b:b + 1])[0])
            parts.append(_a1111_weighting(z, torch.from_numpy(batch.weights[c, b])))
        np.testing.assert_allclose(ours[b], torch.cat(parts).numpy(), rtol=1e-5, atol=1e-6)
    plain = encode_chunks(lambda ids: _run(clip, ids), chunk_batch(tok, ["plain text"], options, 2), False)
    assert np.array_equal(ours[1], plain[0])  # factors all 1: untouched, bit for bit
    assert not np.allclose(ours[0], encode_chunks(lambda ids: _run(clip, ids), batch, False)[0])


def test_apply_emphasis_restores_the_mean():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((2, 77, 8)).astype(np.float32) + 0.3
    w = np.ones((2, 77), np.float32)
    w[0, 3:6] = 1.5
    out = apply_emphasis(z, w)
    assert out[0].mean() == pytest.approx(z[0].mean(), rel=1e-5)
    assert np.array_equal(out[1], z[1])
