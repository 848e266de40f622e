"""README's measured figures come from committed result files.

README's benchmark section and the demo's printout are split into blocks (paragraphs, tables, code
blocks). Each block names its result files (`benchmarks/results/x.md` or just `x.md`/`x.json`), or
inherits those of the block before it in the same section (a table under its caption). Every number in
a block must be found in one of its files, at the precision README gives it: a figure typed from a
run that was never committed, or copied wrong, fails.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
CHECKED_SECTIONS = ("## See it work", "## Benchmarks")

FILE_REF = re.compile(r"`(?:benchmarks/results/)?([\w./-]+\.(?:md|json))`")
# 1,765 / 0.31 / 45.5 / 2.31x / 87.6 dB / 6 ... but not the digits inside names such as sd15, F(2x2,3x3), 2x64x64.
NUMBER = re.compile(r"(?<![\w.,/-])(\d{1,3}(?:,\d{3})+|\d+(?:\.\d+)?)(?![\w,/](?!\s)|\.\d)")
# Settings and names rather than measurements (each occurs in the text around the figures).
NOT_FIGURES = re.compile(
    r"\d+x\d+(?:x\d+)*|batch \d+|\d+ steps|\d+ threads?|\d+-core|\d+ cores|SD \d\.\d|F\(\d+x\d+,\d+x\d+\)|"
    r"F\(\d\)|3x3|AVX-\d+|BF16|DPM\+\+ 2M|x86|arm64|\bfp(?:16|32)\b|\bint[48]\b|float16|\d+-D|"
    r"--[\w-]+(?: \d+)?|up_blocks\.\d|[\w-]+\.(?:md|json|png|py|sh)|[\d,]+-token|[\d.]+x / [\d.]+x fewer"
)


def _sections() -> dict[str, str]:
    text = README.read_text(encoding="utf-8")
    parts = re.split(r"(?m)^(## .*)$", text)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def _blocks(section: str) -> list[str]:
    """Paragraphs, tables and fenced code blocks (a code block is one block even with blank lines)."""
    blocks, current, fenced = [], [], False
    for line in section.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        if not line.strip() and not fenced:
            if current:
                blocks.append("\n".join(current))
            current = []
        else:
            current.append(line)
    if current:
        blocks.append("\n".join(current))
    return blocks


def _figures(block: str) -> list[str]:
    text = NOT_FIGURES.sub(" ", block)
    return NUMBER.findall(text)


def _values(paths: list[Path]) -> list[float]:
    values = []
    for path in paths:
        for token in re.findall(r"-?\d[\d,]*(?:\.\d+)?(?:[eE]-?\d+)?", path.read_text(encoding="utf-8")):
            try:
                values.append(float(token.replace(",", "")))
            except ValueError:
                continue
    return values


def _found(figure: str, values: list[float]) -> bool:
    """Is ``figure`` one of ``values`` rounded as README writes it (also as a % of a fraction, or ms as s)?"""
    decimals = len(figure.split(".")[1]) if "." in figure else 0
    target = float(figure.replace(",", ""))
    for v in values:
        for scaled in (v, v * 100, v / 1000, v * 1000):
            if abs(round(scaled, decimals) - target) < 1e-9 or (decimals == 0 and abs(scaled - target) <= 0.5):
                return True
    return False


def _checked_blocks() -> list[tuple[str, list[Path]]]:
    out = []
    for title, body in _sections().items():
        if not title.startswith(CHECKED_SECTIONS):
            continue
        refs: list[Path] = []
        for block in _blocks(body):
            named = [RESULTS / name if (RESULTS / name).exists() else ROOT / name for name in FILE_REF.findall(block)]
            refs = named or refs
            if refs and _figures(block):
                out.append((block, refs))
    return out


def test_readme_cites_result_files_that_exist():
    blocks = _checked_blocks()
    assert len(blocks) >= 8, "README's benchmark section was not found or cites no result files"
    for block, refs in blocks:
        for path in refs:
            assert path.is_file(), f"README cites {path.relative_to(ROOT)}, which is not committed"


@pytest.mark.parametrize("block, refs", _checked_blocks(), ids=lambda x: None)
def test_every_figure_is_in_its_result_file(block, refs):
    values = _values([p for p in refs if p.is_file()])
    missing = [f for f in _figures(block) if not _found(f, values)]
    names = ", ".join(p.name for p in refs)
    assert not missing, f"README figures {missing} are not in {names}:\n{block[:300]}"


def test_a_wrong_figure_is_caught():
    block, refs = next((b, r) for b, r in _checked_blocks() if "715 ms" in b)
    values = _values(refs)
    assert _found("715", values)
    assert not _found("716", values) and not _found("1,765", values)


def test_no_gpu_figures_without_a_gpu_result():
    gpu_results = [p for p in RESULTS.iterdir() if "gpu" in p.name.lower()]
    text = README.read_text(encoding="utf-8")
    if not gpu_results:
        assert not re.search(r"measures[^.]*on an H100", text), "README describes GPU results that are not committed"
