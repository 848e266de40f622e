"""The real CLIP vocabulary, rebuilt offline from the BPE list that ``open_clip_torch`` ships.

No model hub is reachable here, so ``vocab.json`` and ``merges.txt`` are derived exactly as CLIP's
own tokenizer builds its encoder: the 256 byte symbols, the same with ``</w>``, one token per merge
(48,894 of them), then ``<|startoftext|>`` and ``<|endoftext|>``: 49,408 tokens in all.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

from runtime.tokenizer import BOS_TOKEN, EOS_TOKEN, END_OF_WORD, bytes_to_unicode

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
CLIP_VOCAB_SIZE = 49408
_N_MERGES = CLIP_VOCAB_SIZE - 2 * 256 - 2


class VocabSourceMissing(FileNotFoundError):
    pass


def find_bpe_list() -> Path:
    """Locate open_clip's BPE list without importing open_clip (its import needs torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise VocabSourceMissing(
            "the CLIP BPE list comes from the open_clip_torch wheel: "
            "pip install --no-deps open_clip_torch"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / BPE_FILE
        if path.is_file():
            return path
    raise VocabSourceMissing(f"open_clip is installed but has no {BPE_FILE}")


def clip_vocab_and_merges(bpe_path: Path | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    bpe_path = bpe_path or find_bpe_list()
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 1 + _N_MERGES]]  # line 0 is a header
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + END_OF_WORD for s in symbols] + ["".join(m) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: i for i, token in enumerate(tokens)}
    assert len(vocab) == CLIP_VOCAB_SIZE, len(vocab)
    return vocab, merges  # type: ignore[return-value]


def write_clip_vocab(directory: str | Path) -> tuple[Path, Path]:
    """Write ``vocab.json`` and ``merges.txt`` (Hugging Face layout) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges()
    vocab_path, merges_path = directory / "vocab.json", directory / "merges.txt"
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_path.write_text(
        "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n", encoding="utf-8"
    )
    return vocab_path, merges_path
