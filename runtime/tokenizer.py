"""CLIP byte-level BPE tokenizer in pure Python, ids identical to transformers' ``CLIPTokenizer``.

The pipeline of transformers' (tokenizers-backed) CLIP tokenizer, which this follows step by step:

1. special tokens written literally in the raw text (``<|startoftext|>``, ``<|endoftext|>``) are
   cut out first and map straight to their ids;
2. the rest is normalised: Unicode NFC, every run of whitespace becomes one space, lower case;
3. it is split into words: a contraction (``'s 't 're 've 'm 'll 'd``), a run of letters, a single
   digit, or a run of anything else that is not whitespace;
4. each word's UTF-8 bytes are mapped to printable characters (``bytes_to_unicode``), ``</w>`` is
   appended to its last character, and BPE merges are applied by rank.

Output is padded/truncated to ``max_length`` (77) as diffusers asks: BOS, up to 75 tokens, EOS,
then the pad id (EOS for SD 1.x tokenizers, ``!`` for SD 2.x ones, read from the tokenizer config).
"""

from __future__ import annotations

import functools
import json
import unicodedata
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

__all__ = ["CLIPTokenizer", "TokenizerError", "bytes_to_unicode"]

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
# The Unicode White_Space property (what \s means to the Rust regex engine of `tokenizers`).
# Python's str.isspace() differs: it also accepts U+001C..U+001F.
_WHITESPACE = frozenset(
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009"
    "\u200a\u2028\u2029\u202f\u205f\u3000"
)


class TokenizerError(ValueError):
    """A tokenizer file is missing or malformed; the message names the file and the problem."""


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """Map each byte to a printable character, so BPE can work on text without whitespace or
    control characters in its vocabulary: printable Latin-1 bytes map to themselves, the other
    68 bytes to code points from 256 up."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _char_class(c: str) -> str:
    """'L' for letters, 'N' for numbers, ' ' for the (normalised) space, '?' for the rest."""
    if c == " ":
        return " "
    major = unicodedata.category(c)[0]
    return major if major in "LN" else "?"


def _normalize(text: str) -> str:
    text = unicodedata.normalize("NFC", text)
    out: list[str] = []
    for c in text:
        if c in _WHITESPACE:
            if not out or out[-1] != " ":
                out.append(" ")
        else:
            out.append(c)
    # Lower case one character at a time, as `tokenizers` does: no final-sigma rule (Σ -> σ, never ς).
    return "".join(out).replace("Σ", "σ").lower()


def _split_words(text: str) -> list[str]:
    """Leftmost-first scan equal to the regex
    ``<\\|startoftext\\|>|<\\|endoftext\\|>|'s|'t|'re|'ve|'m|'ll|'d|\\p{L}+|\\p{N}|[^\\s\\p{L}\\p{N}]+``
    over normalised text (whose only whitespace is the plain space)."""
    words: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == " ":
            i += 1
            continue
        if c == "<" and text.startswith((BOS_TOKEN, EOS_TOKEN), i):
            special = BOS_TOKEN if text.startswith(BOS_TOKEN, i) else EOS_TOKEN
            # The byte-level pre-tokenizer splits it again with GPT-2's pattern: "<|", name, "|>".
            words.extend(("<|", special[2:-2], "|>"))
            i += len(special)
            continue
        if c == "'":
            contraction = next((t for t in _CONTRACTIONS if text.startswith(t, i)), None)
            if contraction:
                words.append(contraction)
                i += len(contraction)
                continue
        kind = _char_class(c)
        j = i + 1
        if kind == "L":
            while j < n and _char_class(text[j]) == "L":
                j += 1
        elif kind == "?":
            while j < n and _char_class(text[j]) == "?":
                j += 1
        words.append(text[i:j])
        i = j
    return words


class CLIPTokenizer:
    """CLIP BPE tokenizer: ``tok("a prompt") -> int64 [77]``, ``tok(["a", "b"]) -> int64 [2, 77]``."""

    def __init__(
        self,
        vocab_path: str | Path,
        merges_path: str | Path,
        *,
        max_length: int = 77,
        pad_token: str | None = None,
        cache_size: int = 65536,
    ):
        self.vocab_path, self.merges_path = Path(vocab_path), Path(merges_path)
        self.encoder = _read_vocab(self.vocab_path)
        self.bpe_ranks = _read_merges(self.merges_path)
        self.decoder = {i: t for t, i in self.encoder.items()}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        for token in (BOS_TOKEN, EOS_TOKEN):
            if token not in self.encoder:
                raise TokenizerError(f"{self.vocab_path}: special token {token!r} is not in the vocabulary")
        self.bos_token_id = self.encoder[BOS_TOKEN]
        self.eos_token_id = self.encoder[EOS_TOKEN]
        pad_token = pad_token or EOS_TOKEN
        if pad_token not in self.encoder:
            raise TokenizerError(f"{self.vocab_path}: pad token {pad_token!r} is not in the vocabulary")
        self.pad_token = pad_token
        self.pad_token_id = self.encoder[pad_token]
        # A pad token like SD 2.x's "!" is special too: typed in a prompt it maps to its own id.
        self.special_tokens = tuple(dict.fromkeys((BOS_TOKEN, EOS_TOKEN, pad_token)))
        if max_length < 2:
            raise TokenizerError(f"max_length must be at least 2, got {max_length}")
        self.max_length = int(max_length)
        # Bounded: a long-running server must not grow without limit on unique words.
        self._bpe_cached = functools.lru_cache(maxsize=cache_size)(self._bpe)

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, directory: str | Path, **overrides) -> "CLIPTokenizer":
        """Read ``vocab.json`` and ``merges.txt``, plus pad token and max length from the
        ``tokenizer_config.json`` / ``special_tokens_map.json`` that transformers writes."""
        directory = Path(directory)
        if not directory.is_dir():
            raise TokenizerError(f"{directory}: tokenizer directory not found")
        settings: dict = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            path = directory / name
            if path.is_file():
                try:
                    settings.update(json.loads(path.read_text(encoding="utf-8")))
                except json.JSONDecodeError as e:
                    raise TokenizerError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        kwargs: dict = {}
        pad = settings.get("pad_token")
        if isinstance(pad, dict):  # AddedToken serialisation
            pad = pad.get("content")
        if pad:
            kwargs["pad_token"] = pad
        max_length = settings.get("model_max_length")
        if isinstance(max_length, int) and 2 <= max_length <= 4096:
            kwargs["max_length"] = max_length
        kwargs.update(overrides)
        vocab, merges = directory / "vocab.json", directory / "merges.txt"
        if not vocab.exists() and (directory / "tokenizer.json").is_file():
            # transformers 5 saves only tokenizer.json; its BPE model holds the same two tables.
            return cls(directory / "tokenizer.json", directory / "tokenizer.json", **kwargs)
        return cls(vocab, merges, **kwargs)

    # -- encoding ------------------------------------------------------------------------------

    def _bpe(self, word: str) -> tuple[str, ...]:
        parts = list(word[:-1]) + [word[-1] + END_OF_WORD]
        ranks = self.bpe_ranks
        while len(parts) > 1:
            pairs = {(parts[k], parts[k + 1]) for k in range(len(parts) - 1)}
            best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
            if best not in ranks:
                break
            first, second = best
            merged: list[str] = []
            k = 0
            while k < len(parts):
                if k < len(parts) - 1 and parts[k] == first and parts[k + 1] == second:
                    merged.append(first + second)
                    k += 2
                else:
                    merged.append(parts[k])
                    k += 1
            parts = merged
        return tuple(parts)

    def tokenize(self, text: str) -> list[str]:
        """BPE pieces of ``text`` without BOS/EOS."""
        pieces: list[str] = []
        for segment, is_special in self._split_special(text):
            if is_special:
                pieces.append(segment)
                continue
            for word in _split_words(_normalize(segment)):
                mapped = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
                pieces.extend(self._bpe_cached(mapped))
        return pieces

    def _split_special(self, text: str) -> Iterable[tuple[str, bool]]:
        """Cut out special tokens written in the text (leftmost, then longest, as `tokenizers` does)."""
        start = 0
        while True:
            hits = [(text.find(t, start), -len(t), t) for t in self.special_tokens]
            hits = [h for h in hits if h[0] >= 0]
            if not hits:
                break
            pos, _, token = min(hits)
            if pos > start:
                yield text[start:pos], False
            yield token, True
            start = pos + len(token)
        if start < len(text):
            yield text[start:], False

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS/EOS, padding or truncation."""
        unk = self.eos_token_id  # transformers' CLIP tokenizer uses <|endoftext|> as unknown token
        return [self.encoder.get(piece, unk) for piece in self.tokenize(text)]

    def _frame(self, ids: Sequence[int]) -> np.ndarray:
        body = list(ids[: self.max_length - 2])
        row = [self.bos_token_id, *body, self.eos_token_id]
        row += [self.pad_token_id] * (self.max_length - len(row))
        return np.asarray(row, dtype=np.int64)

    def __call__(self, text: str | Sequence[str]) -> np.ndarray:
        """``max_length`` ids per prompt: BOS, tokens (truncated), EOS, padding."""
        if isinstance(text, str):
            return self._frame(self.encode(text))
        return np.stack([self._frame(self.encode(t)) for t in text]) if len(text) else np.zeros(
            (0, self.max_length), np.int64
        )

    def encode_chunks(self, text: str) -> np.ndarray:
        """Prompts longer than one window, as [n_chunks, max_length]: each chunk holds up to
        ``max_length - 2`` tokens framed by BOS/EOS (the A1111 convention for long prompts)."""
        ids = self.encode(text)
        width = self.max_length - 2
        chunks = [ids[k : k + width] for k in range(0, len(ids), width)] or [[]]
        return np.stack([self._frame(c) for c in chunks])

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        specials = {self.bos_token_id, self.eos_token_id, self.pad_token_id}
        pieces = [
            self.decoder.get(int(i), "")
            for i in ids
            if not (skip_special_tokens and int(i) in specials)
        ]
        text = "".join(pieces)
        data = bytearray(self.byte_decoder[c] for c in text if c in self.byte_decoder)
        return data.decode("utf-8", errors="replace").replace(END_OF_WORD, " ").strip()

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)


def _read_json(path: Path, what: str):
    if not path.is_file():
        raise TokenizerError(f"{path}: {what} file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from None


def _bpe_model(path: Path) -> dict:
    """The BPE model section of a `tokenizers` tokenizer.json."""
    data = _read_json(path, "tokenizer")
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE":
        raise TokenizerError(f"{path}: no BPE model in this tokenizer.json")
    return model


def _read_vocab(path: Path) -> dict[str, int]:
    if path.name == "tokenizer.json":
        vocab = _bpe_model(path).get("vocab")
    else:
        vocab = _read_json(path, "vocabulary")
    if not isinstance(vocab, dict) or not all(
        isinstance(k, str) and isinstance(v, int) for k, v in vocab.items()
    ):
        raise TokenizerError(f"{path}: vocabulary must be a JSON object of token -> integer id")
    return vocab


def _read_merges(path: Path) -> dict[tuple[str, str], int]:
    if path.name == "tokenizer.json":
        entries = _bpe_model(path).get("merges") or []
        # merges are "a b" strings in older files and [a, b] pairs in newer ones
        lines = [e if isinstance(e, str) else " ".join(map(str, e)) for e in entries]
    else:
        if not path.is_file():
            raise TokenizerError(f"{path}: merges file not found")
        try:
            lines = path.read_text(encoding="utf-8").split("\n")
        except UnicodeDecodeError as e:
            raise TokenizerError(f"{path}: not UTF-8 text ({e})") from None
        if lines and lines[0].startswith("#version"):
            lines[0] = ""
    ranks: dict[tuple[str, str], int] = {}
    for lineno, line in enumerate(lines, start=1):
        if not line:
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts):
            raise TokenizerError(f"{path}:{lineno}: bad merges line {line!r} (expected two tokens separated by one space)")
        ranks.setdefault((parts[0], parts[1]), len(ranks))
    if not ranks:
        raise TokenizerError(f"{path}: no merges found")
    return ranks
