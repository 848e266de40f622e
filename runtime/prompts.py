"""Prompts as people write them: longer than one CLIP window, and with A1111's emphasis syntax.

Stable Diffusion's text encoder sees 77 positions: BOS, 75 tokens, EOS (then padding). AUTOMATIC1111's
web UI lifted that limit in a way most prompt writers now take for granted, and this module follows it:

* **chunks**: the prompt's tokens are cut into chunks of 75, each framed as the tokenizer frames one
  prompt (BOS, tokens, EOS, padding), encoded on its own, and the hidden states are concatenated along
  the sequence axis, giving [B, 77 * chunks, D]. A chunk boundary that would split the text after a
  comma less than ``comma_backtrack`` tokens back moves that text to the next chunk (A1111's "prompt
  word wrap length limit", 20 by default there and here). Prompts of a batch, and the negative
  prompts, are padded to the same number of chunks with empty chunks (BOS, EOS, padding).
* **emphasis** (optional): ``(text)`` multiplies the attention to ``text`` by 1.1, ``[text]`` divides
  it by 1.1, ``(text:1.3)`` sets the factor, nesting multiplies, ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are
  literal, and ``BREAK`` ends the current chunk. The encoder's output at each token is multiplied
  by its factor, then the whole chunk is rescaled so its mean is the mean before weighting.

A prompt of at most 75 tokens without emphasis gives exactly the single window diffusers encodes.
The functions here are pure (tokenizer and encoder call in, arrays out), so SDXL's two text encoders
can share them.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Sequence

import numpy as np

__all__ = ["PromptOptions", "PromptSyntaxError", "PromptChunks", "parse_attention", "chunk_prompt", "chunk_batch",
           "apply_emphasis", "encode_chunks", "CHUNK_TOKENS", "BREAK"]

CHUNK_TOKENS = 75  # tokens per chunk: the window minus BOS and EOS
BREAK = ("BREAK", -1.0)  # parse_attention's marker for a forced chunk end (A1111's representation)
_ROUND, _SQUARE = 1.1, 1 / 1.1  # factors of () and []: [] multiplies by the rounded 1/1.1, as A1111 does

# One token of the emphasis syntax per match, tried in this order.
_SCANNER = re.compile(
    r"""
    (?P<escape>\\[()\[\]\\]) |        # \( \) \[ \] \\ : the character itself
    (?P<lone>\\) |                     # any other backslash: dropped
    (?P<open>[(\[]) |
    :(?P<weight>[+-]?[.\d]+)\) |       # ":1.3)" closes a round bracket with that factor (no spaces)
    (?P<close>[)\]]) |
    (?P<text>[^\\()\[\]:]+ | :)
    """,
    re.X,
)
_BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*", re.S)


class PromptSyntaxError(ValueError):
    """A prompt the emphasis syntax cannot read (A1111 fails on the same text)."""


@dataclasses.dataclass(frozen=True)
class PromptOptions:
    emphasis: bool = False  # read A1111's ( ) [ ] (x:w) and BREAK; off: the text is literal, as in diffusers
    comma_backtrack: int = 20  # A1111's comma_padding_backtrack (0: cut every 75 tokens exactly)

    def __post_init__(self):
        if not 0 <= self.comma_backtrack < CHUNK_TOKENS:
            raise ValueError(f"comma_backtrack {self.comma_backtrack}: expected 0..{CHUNK_TOKENS - 1}")


@dataclasses.dataclass(frozen=True)
class PromptChunks:
    """One prompt's chunks: ids and per-token factors, [chunks, window] each."""

    ids: np.ndarray  # int64
    weights: np.ndarray  # float32, 1 at BOS, EOS and padding

    def __len__(self) -> int:
        return self.ids.shape[0]


# --- 1. emphasis syntax --------------------------------------------------------------------------


def parse_attention(text: str) -> list[tuple[str, float]]:
    """``text`` as (piece, factor) pairs, the way A1111's ``parse_prompt_attention`` reads it.

    Lenient as A1111 is: an unclosed bracket weights everything after it, a stray closing bracket or
    a colon outside ``(x:w)`` is text, ``(x: 1.3)`` (with a space) is ``x: 1.3`` at 1.1. Runs of equal
    factors merge; ``BREAK`` (a whole word, in plain text) gives the :data:`BREAK` pair. Raises
    :class:`PromptSyntaxError` only where A1111 fails too: a factor like ``(x:1.2.3)``."""
    pieces: list[list] = []
    open_round: list[int] = []
    open_square: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for m in _SCANNER.finditer(text):
        kind, token = m.lastgroup, m.group(0)
        if kind == "escape":
            pieces.append([token[1], 1.0])
        elif kind == "lone":
            pieces.append(["", 1.0])
        elif kind == "open":
            (open_round if token == "(" else open_square).append(len(pieces))
        elif kind == "weight" and open_round:
            scale_from(open_round.pop(), _factor(m.group("weight"), token))
        elif token == ")" and open_round:
            scale_from(open_round.pop(), _ROUND)
        elif token == "]" and open_square:
            scale_from(open_square.pop(), _SQUARE)
        else:  # text, a lone colon, a bracket with nothing open, or ":w)" outside brackets
            _append_text(pieces, token)
    for start in open_round:
        scale_from(start, _ROUND)
    for start in open_square:
        scale_from(start, _SQUARE)
    return _merge_equal(pieces) if pieces else [("", 1.0)]


def _factor(value: str, token: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise PromptSyntaxError(f"emphasis weight {value!r} in {token!r} is not a number (write it as (text:1.3))") from None


def _append_text(pieces: list[list], text: str) -> None:
    for i, part in enumerate(_BREAK_WORD.split(text)):
        if i:
            pieces.append(list(BREAK))
        pieces.append([part, 1.0])


def _merge_equal(pieces: list[list]) -> list[tuple[str, float]]:
    merged: list[list] = [pieces[0]]
    for text, factor in pieces[1:]:
        if factor == merged[-1][1]:
            merged[-1][0] += text
        else:
            merged.append([text, factor])
    return [(text, factor) for text, factor in merged]


# --- 2. chunks -----------------------------------------------------------------------------------


def chunk_prompt(tokenizer, text: str, options: PromptOptions = PromptOptions()) -> PromptChunks:
    """``text`` as chunks of at most 75 tokens, each framed like the tokenizer frames a prompt.

    Each piece of :func:`parse_attention` is tokenized on its own (with emphasis off the whole text is
    one piece), as A1111 does, so ``(red)car`` is ``red`` + ``car``, not ``redcar``."""
    pieces = parse_attention(text) if options.emphasis else [(text, 1.0)]
    bodies: list[tuple[list[int], list[float]]] = []
    ids: list[int] = []
    factors: list[float] = []
    last_comma = -1
    comma = tokenizer.encoder.get(",</w>")

    def close() -> None:
        nonlocal ids, factors, last_comma
        bodies.append((ids, factors))
        ids, factors, last_comma = [], [], -1

    for piece, factor in pieces:
        if (piece, factor) == BREAK:
            close()
            continue
        for token in tokenizer.encode(piece):
            if token == comma:
                last_comma = len(ids)
            elif (len(ids) == CHUNK_TOKENS and last_comma >= 0
                  and len(ids) - last_comma <= options.comma_backtrack):
                # the text after the last comma moves to the next chunk, whole
                keep = last_comma + 1
                moved = ids[keep:], factors[keep:]
                ids, factors = ids[:keep], factors[:keep]
                close()
                ids, factors = list(moved[0]), list(moved[1])
            if len(ids) == CHUNK_TOKENS:
                close()
            ids.append(token)
            factors.append(factor)
    if ids or not bodies:
        close()
    return _framed(tokenizer, bodies)


def _framed(tokenizer, bodies: Sequence[tuple[list[int], list[float]]]) -> PromptChunks:
    window = tokenizer.max_length
    if window - 2 < CHUNK_TOKENS:
        raise ValueError(f"a tokenizer window of {window} cannot hold {CHUNK_TOKENS}-token chunks")
    ids = np.full((len(bodies), window), tokenizer.pad_token_id, np.int64)
    weights = np.ones((len(bodies), window), np.float32)
    for row, (body, factors) in enumerate(bodies):
        n = len(body)
        ids[row, 0] = tokenizer.bos_token_id
        ids[row, 1:n + 1] = body
        ids[row, n + 1] = tokenizer.eos_token_id
        weights[row, 1:n + 1] = factors
    return PromptChunks(ids, weights)


def empty_chunk(tokenizer) -> PromptChunks:
    """What pads a shorter prompt: the empty prompt's window (BOS, EOS, padding), factors 1."""
    return _framed(tokenizer, [([], [])])


def chunk_batch(tokenizer, texts: Sequence[str], options: PromptOptions, n_chunks: int) -> PromptChunks:
    """Prompts chunked and padded with empty chunks to ``n_chunks`` each: ids and weights [n_chunks, B, window]."""
    per_text = [chunk_prompt(tokenizer, t, options) for t in texts]
    pad = empty_chunk(tokenizer)
    ids, weights = [], []
    for chunks in per_text:
        if len(chunks) > n_chunks:
            raise ValueError(f"a prompt of {len(chunks)} chunks does not fit in {n_chunks}")
        extra = n_chunks - len(chunks)
        ids.append(np.concatenate([chunks.ids, np.repeat(pad.ids, extra, axis=0)]))
        weights.append(np.concatenate([chunks.weights, np.repeat(pad.weights, extra, axis=0)]))
    return PromptChunks(np.stack(ids, axis=1), np.stack(weights, axis=1))


# --- 3. encoding ---------------------------------------------------------------------------------


def apply_emphasis(hidden: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """[B, T, D] hidden states times their tokens' factors [B, T], each prompt then rescaled so its
    mean over the chunk is what it was (A1111's "Original" emphasis). A prompt whose factors are all
    1 is returned unchanged, bit for bit."""
    out = hidden.astype(np.float32, copy=True)
    for b in range(out.shape[0]):
        if np.all(weights[b] == 1):
            continue
        before = out[b].mean(dtype=np.float32)
        out[b] *= weights[b][:, None].astype(np.float32)
        out[b] *= np.float32(before / out[b].mean(dtype=np.float32))
    return out


def encode_chunks(encode: Callable[[np.ndarray], np.ndarray], chunks: PromptChunks, emphasis: bool) -> np.ndarray:
    """Hidden states [B, chunks * window, D]: ``encode`` (ids [B, window] -> [B, window, D]) called once
    per chunk position, emphasis applied per chunk, results concatenated along the sequence."""
    outputs = []
    for ids, weights in zip(chunks.ids, chunks.weights):
        hidden = encode(ids)
        outputs.append(apply_emphasis(hidden, weights) if emphasis else hidden)
    return outputs[0] if len(outputs) == 1 else np.concatenate(outputs, axis=1)
