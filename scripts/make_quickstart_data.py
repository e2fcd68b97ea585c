"""Build the quickstart's human-preference task on top of the bundled base model.

    python scripts/make_quickstart_data.py          # writes data/quickstart/ (deterministic, ~2 min on CPU)

The task: continue a KJV verse opening so that the continuation reads as *positive* to people.
The stand-in for human raters is VADER (Hutto & Gilbert 2014), a sentiment lexicon whose word
scores are the mean ratings of human judges. Labels get Bradley-Terry noise, as real raters
disagree: for two completions with VADER compound scores v_A, v_B the rater prefers A with
probability sigmoid((v_A - v_B) / TAU), so near-ties are coin flips and clear cases almost
always go the clear way. Pairs whose two scores differ by less than TIE (most often two neutral
completions, both 0) are left out, as a rater would answer "tie" (prefcli label records ties
apart from preferences too).

Files (data/quickstart/):
- prompts.jsonl / prompts_eval.jsonl: verse openings (4-7 words) for rlhf/gan, 2,000 from the
  training chapters (not used for pairs) / 200 from held-out chapters (data/kjv/test.jsonl.gz).
- sft.jsonl: demonstrations: real verses that VADER finds positive (compound >= 0.5), split into
  {prompt, completion}; what a person would write when asked for a positive continuation.
- preferences.jsonl / preferences_eval.jsonl: {prompt, chosen, rejected, score_chosen,
  score_rejected}: two completions sampled from the base model per prompt, labelled as above.
- gold.jsonl: {prompt, completion} = the chosen completions of training pairs whose rater score
  is clearly positive (VADER >= 0.3): the "human" side the GAN discriminator learns from.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TAU = 0.25  # Bradley-Terry temperature of the simulated raters (in VADER compound units)
TIE = 0.05  # |v_A - v_B| below this is a tie: no preference row
GOLD = 0.3  # a chosen answer at least this positive joins the GAN's gold set


def verses(split: str) -> list[str]:
    with gzip.open(ROOT / "data" / "kjv" / f"{split}.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(x)["text"] for x in f]


def opening(text: str, rng: random.Random) -> tuple[str, str]:
    words = text.split()
    k = max(3, min(len(words) - 3, rng.randint(4, 7)))
    return " ".join(words[:k]), " " + " ".join(words[k:])


def write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def sample_pairs(model_dir: Path, prompts: list[str], seed: int, max_new_tokens: int) -> list[tuple[str, str]]:
    """Two completions per prompt from the base model (prefcli's sampler, temperature 1)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prefcli.engine.rollout import FastDecoder
    from prefcli.engine.sampling import SamplingConfig, left_pad

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(model_dir)
    lm = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    B = 64
    cfg = SamplingConfig(
        max_new_tokens=max_new_tokens, temperature=1.0, stop_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id
    )
    ids = [tok(p)["input_ids"] for p in prompts]
    width = max(len(x) for x in ids)
    dec = FastDecoder(lm, batch=B, max_len=width + max_new_tokens, dtype=torch.float32)
    out: list[str] = []
    rows = [i for i in range(len(prompts)) for _ in range(2)]
    for s in range(0, len(rows), B):
        chunk = rows[s : s + B]
        chunk = chunk + [chunk[0]] * (B - len(chunk))
        pid, pmask = left_pad([ids[i] for i in chunk], tok.pad_token_id, "cpu")
        if pid.shape[1] < width:
            pad = width - pid.shape[1]
            pid = torch.cat([torch.full((B, pad), tok.pad_token_id), pid], 1)
            pmask = torch.cat([torch.zeros((B, pad), dtype=pmask.dtype), pmask], 1)
        r = dec.sample(pid, pmask, cfg)
        for j in range(min(B, len(rows) - s)):
            c = r.completion_ids[j][r.completion_mask[j].bool()].tolist()
            out.append(tok.decode(c, skip_special_tokens=True))
    return [(out[2 * i], out[2 * i + 1]) for i in range(len(prompts))]


def main() -> None:
    from prefcli.reward_sources import vader_compound

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "prefcli" / "assets" / "kjv-base"))
    ap.add_argument("--out", default=str(ROOT / "data" / "quickstart"))
    ap.add_argument("--pairs", type=int, default=8000, help="prompts sampled for training pairs (ties are dropped)")
    ap.add_argument("--eval-pairs", type=int, default=600, help="held-out prompts sampled for pairs")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    a = ap.parse_args()
    out = Path(a.out)
    rng = random.Random(2023)
    train_v = [v for v in verses("train") if 10 <= len(v.split()) <= 40]
    test_v = [v for v in verses("test") if 10 <= len(v.split()) <= 40]
    rng.shuffle(train_v)
    rng.shuffle(test_v)

    # demonstrations: positive real verses
    scores = vader_compound(train_v[:12000])
    positive = [v for v, s in zip(train_v[:12000], scores) if s >= 0.5]
    sft = [dict(zip(("prompt", "completion"), opening(v, rng))) for v in positive[:1500]]
    write(out / "sft.jsonl", sft)

    pool = train_v[12000:]
    train_prompts = [opening(v, rng)[0] for v in pool[: a.pairs + 2000]]
    eval_prompts = [opening(v, rng)[0] for v in test_v[: a.eval_pairs + 200]]
    write(out / "prompts.jsonl", [{"prompt": p} for p in train_prompts[a.pairs :]])
    write(out / "prompts_eval.jsonl", [{"prompt": p} for p in eval_prompts[a.eval_pairs :]])

    def label(prompts: list[str], seed: int) -> list[dict]:
        pairs = sample_pairs(Path(a.model), prompts, seed, a.max_new_tokens)
        rows = []
        lab = random.Random(seed)
        for p, (x, y) in zip(prompts, pairs):
            if x.strip() == y.strip() or not x.strip() or not y.strip():
                continue
            vx, vy = vader_compound([x, y])
            if abs(vx - vy) < TIE:
                continue
            p_x = 1.0 / (1.0 + math.exp(-(vx - vy) / TAU))
            if lab.random() < p_x:
                rows.append({"prompt": p, "chosen": x, "rejected": y, "score_chosen": vx, "score_rejected": vy})
            else:
                rows.append({"prompt": p, "chosen": y, "rejected": x, "score_chosen": vy, "score_rejected": vx})
        return rows

    prefs = label(train_prompts[: a.pairs], 1)
    prefs_eval = label(eval_prompts[: a.eval_pairs], 2)
    write(out / "preferences.jsonl", prefs)
    write(out / "preferences_eval.jsonl", prefs_eval)
    # the GAN's "human" side: answers raters clearly liked, from the same model as the generator's
    # samples (real verses would let the discriminator tell real from generated by style alone)
    gold = [
        {"prompt": r["prompt"], "completion": r["chosen"]}
        for r in prefs
        if r["score_chosen"] >= GOLD and r["score_chosen"] > r["score_rejected"]
    ]
    write(out / "gold.jsonl", gold)
    agree = sum(r["score_chosen"] > r["score_rejected"] for r in prefs_eval) / max(1, len(prefs_eval))
    print(
        f"sft {len(sft)}, pairs {len(prefs)} (+{len(prefs_eval)} held out; noisy labels agree with VADER on "
        f"{agree:.0%} of held-out pairs), gold {len(gold)} -> {out}"
    )


if __name__ == "__main__":
    main()
