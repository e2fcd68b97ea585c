"""Rule scores for the tiny recipes (used through `kind: function` reward entries)."""

import re
from functools import lru_cache
from pathlib import Path

_WORD = re.compile(r"[A-Za-z]+")


@lru_cache(maxsize=1)
def _kjv_words() -> frozenset:
    """Every word of the bundled KJV training verses (data/tiny/text.jsonl and prompt_completion.jsonl)."""
    root = Path(__file__).resolve().parents[2] / "data" / "tiny"
    words = set()
    for name in ("text.jsonl", "prompt_completion.jsonl", "chat.jsonl"):
        for line in (root / name).read_text(encoding="utf-8").splitlines():
            words.update(w.lower() for w in _WORD.findall(line))
    return frozenset(words)


def real_word_fraction(prompts, completions):
    """The fraction of a completion's words that are real KJV words: 0 for gibberish, near 1 for
    scripture-like text (a fixed judge the generator never trains on)."""
    vocab = _kjv_words()
    out = []
    for c in completions:
        words = [w.lower() for w in _WORD.findall(c)]
        out.append(sum(w in vocab for w in words) / len(words) if words else 0.0)
    return out
