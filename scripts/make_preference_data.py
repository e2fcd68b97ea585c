"""Tiny preference data with a learnable rule, cut from the bundled KJV corpus.

    python scripts/make_preference_data.py          # writes data/tiny/pref_*.jsonl

The rule: a preferred answer ends by naming its speaker, ", saith the LORD." (a phrase the KJV
itself uses hundreds of times); the other answer is the plain verse continuation. A tiny model
can learn it in a few dozen steps, so the tests and the tiny recipes can check that held-out
preference accuracy rises. Graded variants (", saith the LORD of hosts." > ", saith the LORD." >
plain) make scores and rankings.

Outputs (deterministic: the same corpus gives the same bytes). Training rows come from
data/kjv/train.jsonl.gz, held-out rows from data/kjv/test.jsonl.gz (chapters never seen in
training):
- pref_train.jsonl, pref_eval.jsonl: {prompt, chosen, rejected} (plain text pairs)
- pref_chat.jsonl: {prompt: [user message], chosen: [assistant message], rejected: [...]}
- pref_kto.jsonl: {prompt, completion, label}: unpaired, each prompt once, desirable or not
- pref_scores.jsonl: {text, score}: human-score rows (0 plain, 1 "saith the LORD", 2 "... of hosts")
- pref_rankings.jsonl: {prompt, completions}: three answers, best first
"""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LORD = ", saith the LORD."
HOSTS = ", saith the LORD of hosts."


def read(path: Path) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def usable(texts: list[str]) -> list[str]:
    # short verses keep the tiny recipes fast; none may already carry the marker
    return [t for t in texts if 6 <= len(t.split()) <= 16 and "saith" not in t and t[-1] in ".;:,"]


def split(text: str, rng: random.Random) -> tuple[str, str]:
    words = text.split()
    k = rng.randint(2, 4)
    return " ".join(words[:k]), " " + " ".join(words[k:])


def mark(completion: str, suffix: str) -> str:
    return completion.rstrip(".;:,") + suffix


def write(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main() -> None:
    rng = random.Random(2023)
    train = usable(read(ROOT / "data" / "kjv" / "train.jsonl.gz"))
    test = usable(read(ROOT / "data" / "kjv" / "test.jsonl.gz"))
    rng.shuffle(train)
    rng.shuffle(test)
    out = ROOT / "data" / "tiny"

    def pairs(texts):
        rows = []
        for t in texts:
            p, c = split(t, rng)
            rows.append({"prompt": p, "chosen": mark(c, LORD), "rejected": c})
        return rows

    write(out / "pref_train.jsonl", pairs(train[:256]))
    write(out / "pref_eval.jsonl", pairs(test[:64]))
    chat = []
    for r in pairs(train[256:304]):
        chat.append(
            {
                "prompt": [{"role": "user", "content": f"Continue the verse: {r['prompt']}"}],
                "chosen": [{"role": "assistant", "content": r["chosen"].strip()}],
                "rejected": [{"role": "assistant", "content": r["rejected"].strip()}],
            }
        )
    write(out / "pref_chat.jsonl", chat)
    kto = []
    for i, t in enumerate(train[304:464]):
        p, c = split(t, rng)
        good = i % 2 == 0
        kto.append({"prompt": p, "completion": mark(c, LORD) if good else c, "label": good})
    write(out / "pref_kto.jsonl", kto)
    scores = []
    for i, t in enumerate(train[464:624]):
        p, c = split(t, rng)
        level = i % 3
        scores.append({"text": p + [c, mark(c, LORD), mark(c, HOSTS)][level], "score": float(level)})
    write(out / "pref_scores.jsonl", scores)
    ranks = []
    for t in train[624:704]:
        p, c = split(t, rng)
        ranks.append({"prompt": p, "completions": [mark(c, HOSTS), mark(c, LORD), c]})
    write(out / "pref_rankings.jsonl", ranks)
    total = sum(
        (out / n).stat().st_size
        for n in (
            "pref_train.jsonl",
            "pref_eval.jsonl",
            "pref_chat.jsonl",
            "pref_kto.jsonl",
            "pref_scores.jsonl",
            "pref_rankings.jsonl",
        )
    )
    print(f"{len(train)} usable training verses, {len(test)} held-out; wrote {total / 1024:.0f} KB to {out}")


if __name__ == "__main__":
    main()
