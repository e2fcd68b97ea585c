"""Build the bundled multi-rater task: the quickstart's pairs labelled again by simulated raters who disagree.

    python scripts/make_multirater_data.py          # writes data/multirater/ (deterministic)

The pairs: the quickstart's training pairs (data/quickstart/preferences.jsonl: two completions of the base
model per verse opening, with each completion's VADER compound score) and more of the same kind, two more
completions per quickstart prompt sampled from the base model twice over (`sample_pairs` of
make_quickstart_data.py, seeds 100 and 101; ~15 minutes on 2 CPU cores, or read from --cache); the held-out
pairs are the quickstart's (held-out chapters). Twelve simulated raters of three tastes label them, each with
Bradley-Terry noise: for completions A and B with utilities u_A, u_B the rater prefers A with probability
sigmoid((u_A - u_B) / tau), and skips a pair whose utilities differ by less than `tie` (as a person would answer
"tie"):

| taste | utility u(y) | tau | tie |
|---|---|---|---|
| positive (positive-1..4) | VADER compound of y | 0.1 | 0.2 |
| negative (negative-1..4) | minus the VADER compound: exactly the opposite taste | 0.1 | 0.2 |
| brief (brief-1..4) | minus the number of words of y | 1.5 words | 2 words |

Sentiment and length are almost uncorrelated on these pairs (r = 0.03), so a pooled reward model sees the
positive and the negative raters cancel and learns brevity: it is near chance for both sentiment tastes.

Raters 1-3 of each taste are the users seen in training; rater 4 of each taste is a *new* user, whose labels
appear only in the held-out file (the new-user curve of `prefcli reward`: accuracy given 0..50 of their labels).

Files (data/multirater/), rows {prompt, chosen, rejected, rater}:
- preferences.jsonl: the quickstart's 5,737 training pairs, each shown to 2 of the 9 seen raters, and the
  sampled pairs, each shown to 1 (ties skipped);
- preferences_eval.jsonl: the 445 held-out pairs (held-out chapters), each labelled by 4 of the 9 seen raters
  and by the 3 new users (ties skipped);
- context_negative-4.jsonl: 20 labels of the new user negative-4 on training pairs (none of them held out),
  the context file that personalises a few-shot reward model for that user without retraining;
- prompts.jsonl / prompts_eval.jsonl: the quickstart's prompts with a `rater` column (training prompts
  assigned to the 9 seen raters in turn; the first 100 held-out prompts once per seen rater), for
  personalised policies (`prefcli rlhf` with the user taken from the prompt row, `prefcli eval` per user);
- raters.json: each rater's taste and, per file, its label count and how often its noisy label agrees with
  its own noiseless preference (the ceiling of any model's accuracy on that rater).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

TASTES = {
    # name: (utility of a completion given its VADER score and text, tau, tie)
    "positive": (lambda v, text: v, 0.1, 0.2),
    "negative": (lambda v, text: -v, 0.1, 0.2),
    "brief": (lambda v, text: -float(len(text.split())), 1.5, 2.0),
}
SEEN = [f"{t}-{i}" for i in (1, 2, 3) for t in TASTES]
NEW = [f"{t}-4" for t in TASTES]
OVERLAP = 2  # seen raters shown each quickstart training pair (the sampled pairs: 1)
EVAL_SEEN = 4  # seen raters labelling each held-out pair (the new users label every one)
CONTEXT_USER, CONTEXT_PAIRS = "negative-4", 20
SAMPLE_SEEDS = (100, 101)
TIE_VADER = 0.05  # as the quickstart: a sampled pair whose completions' VADER scores differ by less is dropped


def taste(rater: str) -> str:
    return rater.rsplit("-", 1)[0]


def read(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def label(pair: dict, rater: str, rng: random.Random, stats: dict) -> dict | None:
    """The rater's answer on a quickstart pair (its two completions with their VADER scores), or None for a tie."""
    util, tau, tie = TASTES[taste(rater)]
    a, b = pair["chosen"], pair["rejected"]
    ua, ub = util(pair["score_chosen"], a), util(pair["score_rejected"], b)
    if abs(ua - ub) < tie:
        return None
    p_a = 1.0 / (1.0 + math.exp(-(ua - ub) / tau))
    picks_a = rng.random() < p_a
    st = stats.setdefault(rater, {"rows": 0, "agree": 0})
    st["rows"] += 1
    st["agree"] += picks_a == (ua > ub)
    chosen, rejected = (a, b) if picks_a else (b, a)
    return {"prompt": pair["prompt"], "chosen": chosen, "rejected": rejected, "rater": rater}


def sampled_pairs(prompts: list[str], model: Path, cache: Path | None) -> list[dict]:
    """Two more completions per prompt from the base model, once per seed of SAMPLE_SEEDS, as quickstart pairs
    {prompt, chosen, rejected, score_chosen, score_rejected} (chosen: the higher VADER score; raters relabel
    them). `cache`: a JSONL file of these pairs, read when it exists, written when it does not."""
    if cache is not None and cache.exists():
        return read(cache)
    from make_quickstart_data import sample_pairs

    from prefcli.reward_sources import vader_compound

    order = sorted(set(prompts))
    random.Random(0).shuffle(order)
    out = []
    for seed in SAMPLE_SEEDS:
        for p, (x, y) in zip(order, sample_pairs(model, order, seed, 24)):
            if x.strip() == y.strip() or not x.strip() or not y.strip():
                continue
            vx, vy = vader_compound([x, y])
            if abs(vx - vy) < TIE_VADER:
                continue
            (c, r, vc, vr) = (x, y, vx, vy) if vx > vy else (y, x, vy, vx)
            out.append({"prompt": p, "chosen": c, "rejected": r, "score_chosen": vc, "score_rejected": vr})
    if cache is not None:
        write(cache, out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default=str(ROOT / "data" / "quickstart"))
    ap.add_argument("--out", default=str(ROOT / "data" / "multirater"))
    ap.add_argument("--model", default=str(ROOT / "prefcli" / "assets" / "kjv-base"))
    ap.add_argument("--cache", type=Path, default=None, help="the sampled pairs: read if it exists, else written")
    a = ap.parse_args()
    src, out = Path(a.source), Path(a.out)
    train_pairs = read(src / "preferences.jsonl")
    eval_pairs = read(src / "preferences_eval.jsonl")
    extra = sampled_pairs([p["prompt"] for p in train_pairs], Path(a.model), a.cache)
    rng = random.Random(2024)

    stats_train: dict = {}
    train = []
    for pair in train_pairs:
        for rater in rng.sample(SEEN, OVERLAP):
            row = label(pair, rater, rng, stats_train)
            if row is not None:
                train.append(row)
    for pair in extra:
        row = label(pair, rng.choice(SEEN), rng, stats_train)
        if row is not None:
            train.append(row)
    stats_eval: dict = {}
    held = []
    for pair in eval_pairs:
        for rater in rng.sample(SEEN, EVAL_SEEN) + NEW:
            row = label(pair, rater, rng, stats_eval)
            if row is not None:
                held.append(row)
    # the new user's context: labels on training pairs (never held-out pairs), drawn in a seeded order
    stats_ctx: dict = {}
    context = []
    for i in random.Random(7).sample(range(len(train_pairs)), len(train_pairs)):
        row = label(train_pairs[i], CONTEXT_USER, rng, stats_ctx)
        if row is not None:
            context.append(row)
        if len(context) == CONTEXT_PAIRS:
            break

    prompts = read(src / "prompts.jsonl")
    prompts_eval = read(src / "prompts_eval.jsonl")
    write(out / "preferences.jsonl", train)
    write(out / "preferences_eval.jsonl", held)
    write(out / f"context_{CONTEXT_USER}.jsonl", context)
    write(out / "prompts.jsonl", [{"prompt": p["prompt"], "rater": SEEN[i % len(SEEN)]} for i, p in enumerate(prompts)])
    write(out / "prompts_eval.jsonl", [{"prompt": p["prompt"], "rater": r} for r in SEEN for p in prompts_eval[:100]])

    raters = {}
    for r in SEEN + NEW:
        _, tau, tie = TASTES[taste(r)]
        entry = {"taste": taste(r), "seen_in_training": r in SEEN, "tau": tau, "tie": tie}
        for name, st in (("train", stats_train), ("eval", stats_eval)):
            if r in st:
                entry[name] = {
                    "rows": st[r]["rows"],
                    "label_agrees_with_taste": round(st[r]["agree"] / st[r]["rows"], 4),
                }
        raters[r] = entry
    (out / "raters.json").write_text(json.dumps(raters, indent=2) + "\n", encoding="utf-8")
    for r, e in raters.items():
        parts = [f"{k} {e[k]['rows']} rows, labels agree with the taste {e[k]['label_agrees_with_taste']:.3f}"
                 for k in ("train", "eval") if k in e]  # fmt: skip
        print(f"{r:12s} {'; '.join(parts)}")
    print(f"train {len(train)} rows, held out {len(held)} rows, context {len(context)} rows -> {out}")


if __name__ == "__main__":
    main()
