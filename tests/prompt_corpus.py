"""A deterministic corpus of prompts that stresses every branch of CLIP tokenization."""

from __future__ import annotations

import random

SUBJECTS = [
    "a photo of an astronaut riding a horse on mars", "portrait of a woman", "Cyberpunk city at NIGHT",
    "a red circle", "cat", "Mount Fuji", "the Eiffel Tower", "an old man's face", "Jean-Luc's café",
    "two dogs & a cat", "über-realistic Zürich skyline", "Ångström-scale crystals", "naïve façade",
]
STYLES = [
    "highly detailed", "8k", "trending on artstation", "by Greg Rutkowski", "oil painting",
    "f/1.8, 85mm", "4K UHD", "HDR", "octane render", "unreal engine 5", "ISO-100", "1990s",
]
PIECES = [
    "(masterpiece:1.2)", "((best quality))", "[blurry]", "{red|blue}", "<lora:detail:0.7>", "BREAK",
    "(word:1.5)", "\\(escaped\\)", "embedding:neg", "score_9, score_8_up", "1girl", "2boys",
    "&amp;", "&lt;b&gt;", "&quot;quoted&quot;", "&#39;", "&nbsp;", "<br/>", "<|endoftext|>",
    "<|startoftext|>", "<|ENDOFTEXT|>", "don't", "it's", "we're", "they've", "I'm", "you'll", "he'd",
    "DON'T", "rock'n'roll", "''s", "'re'", "3.14159", "1,000,000", "#hashtag", "@user", "50%",
    "$100", "C++", "e-mail", "A/B", "x_y_z", "...", "!!!", "?!", "---", "~~~", "***", "|||",
    "東京の夜景", "漢字", "한국어 텍스트", "中文提示词", "Ελληνικά", "ΣΑΣ", "Русский текст",
    "עברית", "العربية", "हिन्दी", "ไทย", "🙂", "🎨🖌️", "👩‍🚀", "🏳️‍🌈", "❤️", "★☆", "→", "©®™",
    "ﬁne", "e\u0301", "Å", "İstanbul", "straße", "ǅ", "Ⅻ", "½", "²", "٣", "\u00a0", "\u200b", "\u3000",
    "\t", "\n", "  ", "\x1c", "\u2028", "ÀÉÎÕÜ", "àéîõü", "MiXeD CaSe", "CAPS LOCK",
]


def generate(n: int = 2400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    corpus = ["", " ", "   ", "a", "A", "!", "1", "<|endoftext|>", "a" * 500]
    while len(corpus) < n:
        k = rng.random()
        parts = [rng.choice(SUBJECTS)]
        parts += rng.sample(STYLES, rng.randint(0, 4))
        parts += [rng.choice(PIECES) for _ in range(rng.randint(0, 6))]
        if k < 0.1:  # far over 77 tokens
            parts = parts * rng.randint(4, 12)
        elif k < 0.2:  # random characters across scripts
            parts.append("".join(chr(rng.choice([rng.randint(32, 0x24F), rng.randint(0x370, 0x4FF),
                                                   rng.randint(0x3040, 0x30FF), rng.randint(0x4E00, 0x4FFF),
                                                   rng.randint(0x1F300, 0x1F64F)])) for _ in range(rng.randint(1, 30))))
        rng.shuffle(parts)
        sep = rng.choice([", ", " ", ",", " | ", "\n", ". ", "; "])
        text = sep.join(parts)
        if rng.random() < 0.2:
            text = text.upper() if rng.random() < 0.5 else text.title()
        corpus.append(text)
    return corpus
