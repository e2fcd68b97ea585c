"""Prepare the bundled public-domain corpus: the King James Version of the Bible (1611).

Source: Debian's `bible-kjv-text` package (text of the KJV, public domain; retrieval program
by Chip Chapin, "unrestricted use"), read through its `bible` command. See data/README.md.

    apt-get install bible-kjv bible-kjv-text
    python scripts/prepare_kjv.py            # writes data/kjv/ and data/tiny/

Outputs (deterministic for a given source text):
- data/kjv/train.jsonl.gz, data/kjv/test.jsonl.gz: one verse per row {ref, book, chapter, verse,
  text}; the split is by chapter (5% of chapters held out), so no held-out verse shares a chapter
  with training text.
- data/tiny/: small files for tests and the tiny recipes (text rows, prompt/completion rows,
  chat rows), cut from the training split.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(r"^(?P<book>[1-3]?[A-Z][A-Za-z]*?)(?P<chapter>\d+):(?P<verse>\d+) (?P<text>.+)$")


def read_verses(source: str | None) -> list[dict]:
    if source:
        text = Path(source).read_text(encoding="utf-8")
    else:
        if shutil.which("bible") is None:
            raise SystemExit(
                "the `bible` command is missing: apt-get install bible-kjv bible-kjv-text "
                "(or pass --source FILE with the output of `bible -f Gen1:1-Rev22:21`)"
            )
        text = subprocess.run(["bible", "-f", "Gen1:1-Rev22:21"], check=True, capture_output=True, text=True).stdout
    verses = []
    for line in text.splitlines():
        m = LINE.match(line.strip())
        if m:
            verses.append(
                {
                    "ref": f"{m['book']}{m['chapter']}:{m['verse']}",
                    "book": m["book"],
                    "chapter": int(m["chapter"]),
                    "verse": int(m["verse"]),
                    "text": m["text"].strip(),
                }
            )
    if len(verses) < 30000:
        raise SystemExit(f"expected the whole KJV (31,102 verses), parsed {len(verses)}")
    return verses


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    if path.suffix == ".gz":  # gzip stores a timestamp: rewrite with mtime 0 for reproducible bytes
        data = gzip.decompress(path.read_bytes())
        with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as g:
            g.write(data)


def split_words(text: str, rng: random.Random) -> tuple[str, str]:
    words = text.split()
    k = max(2, min(len(words) - 2, rng.randint(4, 8)))
    return " ".join(words[:k]), " " + " ".join(words[k:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", help="a text file with `bible -f Gen1:1-Rev22:21` output (default: run it)")
    ap.add_argument("--out", default=str(ROOT / "data"))
    a = ap.parse_args()
    out = Path(a.out)
    verses = read_verses(a.source)
    rng = random.Random(1611)
    chapters = sorted({(v["book"], v["chapter"]) for v in verses}, key=lambda c: (c[0], c[1]))
    held = set(rng.sample(chapters, k=max(1, len(chapters) // 20)))
    train = [v for v in verses if (v["book"], v["chapter"]) not in held]
    test = [v for v in verses if (v["book"], v["chapter"]) in held]
    write_jsonl(out / "kjv" / "train.jsonl.gz", train)
    write_jsonl(out / "kjv" / "test.jsonl.gz", test)

    # tiny files: short verses keep tiny recipes fast
    short = [v for v in train if 8 <= len(v["text"].split()) <= 30]
    pick = rng.sample(short, 600)
    write_jsonl(out / "tiny" / "text.jsonl", [{"text": v["text"]} for v in pick[:300]])
    write_jsonl(out / "tiny" / "text_eval.jsonl", [{"text": v["text"]} for v in rng.sample(test, 64)])
    pc = []
    for v in pick[300:500]:
        p, c = split_words(v["text"], rng)
        pc.append({"prompt": p, "completion": c})
    write_jsonl(out / "tiny" / "prompt_completion.jsonl", pc)
    chat = []
    for v in pick[500:600]:
        p, c = split_words(v["text"], rng)
        chat.append(
            {
                "messages": [
                    {"role": "user", "content": f"Continue the verse: {p}"},
                    {"role": "assistant", "content": c.strip()},
                ]
            }
        )
    write_jsonl(out / "tiny" / "chat.jsonl", chat)
    # prompts for rlhf/gan: the opening words of verses (training prompts from the training split,
    # held-out prompts from held-out chapters)
    prompt_pool = [v for v in short if v not in pick]
    write_jsonl(
        out / "tiny" / "prompts.jsonl",
        [{"prompt": split_words(v["text"], rng)[0]} for v in rng.sample(prompt_pool, 200)],
    )
    write_jsonl(
        out / "tiny" / "prompts_eval.jsonl",
        [
            {"prompt": split_words(v["text"], rng)[0]}
            for v in rng.sample([v for v in test if len(v["text"].split()) >= 8], 48)
        ],
    )
    print(f"train {len(train)} verses, test {len(test)} verses ({len(held)} held-out chapters) -> {out}")


if __name__ == "__main__":
    main()
