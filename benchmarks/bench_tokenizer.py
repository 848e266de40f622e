"""Tokenizer throughput: runtime.tokenizer (pure Python, merge cache) against transformers' CLIPTokenizer
(Rust `tokenizers` backend), on the test corpus of 2,400 varied prompts, padded to 77 ids.

    python benchmarks/bench_tokenizer.py [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, machine_info, markdown_table, write_results  # noqa: E402
from runtime.tokenizer import CLIPTokenizer  # noqa: E402
from sdexport.sources.clip_vocab import write_clip_vocab  # noqa: E402
from tests.prompt_corpus import generate  # noqa: E402


def rate(fn, prompts, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn(prompts)
        best = min(best, time.perf_counter() - start)
    return len(prompts) / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    corpus = generate(2400)
    vocab = Path(tempfile.mkdtemp())
    write_clip_vocab(vocab)
    from transformers import CLIPTokenizer as Reference

    reference = Reference.from_pretrained(str(vocab))
    rows = []
    cold = CLIPTokenizer.from_dir(vocab)
    start = time.perf_counter()
    cold(corpus)
    rows.append(["runtime.tokenizer, first pass (empty merge cache)", len(corpus) / (time.perf_counter() - start)])
    rows.append(["runtime.tokenizer, warm merge cache", rate(lambda p: cold(p), corpus, args.repeats)])
    rows.append(["runtime.tokenizer, one prompt at a time", rate(lambda p: [cold(x) for x in p], corpus, args.repeats)])
    rows.append(["transformers CLIPTokenizer (Rust), batch", rate(
        lambda p: reference(p, padding="max_length", max_length=77, truncation=True), corpus, args.repeats)])
    start = time.perf_counter()
    CLIPTokenizer.from_dir(vocab)
    load_ms = (time.perf_counter() - start) * 1e3
    md = "\n".join([
        "# Tokenizer throughput (2,400 prompts from tests/prompt_corpus.py, 77 ids each)",
        f"machine: {machine_info()['cpu']}; command: `{machine_info()['command']}`",
        "",
        markdown_table(["tokenizer", "prompts / s"], rows),
        "",
        f"Loading vocab.json + merges.txt: {load_ms:.0f} ms. One prompt costs well under 1 ms either way;",
        "a generation spends its time in the models (see pipeline-cpu-*.md for the runtime's overhead share).",
    ])
    write_results("tokenizer-cpu", {"machine": machine_info(), "prompts": len(corpus), "load_ms": load_ms,
                                    "prompts_per_second": {r[0]: r[1] for r in rows}}, md, args.out)
    print(md)


if __name__ == "__main__":
    main()
