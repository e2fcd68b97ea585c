"""Pretraining with human preferences at small scale: a qualitative check of Korbak et al. 2023
("Pretraining Language Models with Human Preferences", ICML), whose finding was that conditional
training cuts undesirable outputs with little perplexity cost.

Setup (docs/phf-experiment.md has the results):
- model: the quickstart Llama (hidden 256, 4 layers, 4 heads, 2 KV heads, intermediate 688, tied
  embeddings) trained from scratch with `prefcli sft` on a random subset of the KJV training verses
  (data/kjv/train.jsonl.gz), the bundled tokenizer (data/tokenizer);
- every verse is a segment, preceded by <|endoftext|> as a document start (as in the paper's data), so
  every model learns the first token and can sample without a prompt: rows are prompt_completion with
  prompt "<|endoftext|>" (never a target) and the verse as completion;
- scorer, the human-score stand-in: VADER compound sentiment of the verse (`kind: sentiment`);
  undesirable = compound < 0, which is also the threshold of filter / conditional / unlikelihood;
- objectives mle, filter, conditional, unlikelihood, rwr, awr with the paper's knobs (1% dropped control
  tokens, alpha=1 for unlikelihood, beta=10, AWR alpha=0.5 and weight clip 1000); the same optimizer
  settings for all;
- measured per model: held-out perplexity on data/kjv/test.jsonl.gz (--heldout verses, every k-th;
  token-weighted, the `prefcli sft` eval path; a conditional model reads every held-out verse after
  <|aligned|> and is scored on the same target tokens as the others) and, on --samples unconditional
  samples (after <|aligned|> for conditional; transformers `generate`, temperature 1, no top-k/top-p,
  the saved generation_config blocking control tokens), the mean VADER score and the fraction of
  undesirable samples.

    PYTHONPATH=. nice -n 10 .venv/bin/python experiments/phf_experiment.py --out runs/phf-experiment
    PYTHONPATH=. nice -n 10 .venv/bin/python experiments/phf_experiment.py --out runs/phf-experiment --control-check
    PYTHONPATH=. .venv/bin/python experiments/phf_experiment.py --out runs/phf-experiment --report   # the tables

Each run is the same as `prefcli sft <out>/recipes/<objective>.yaml --set train.seed=<seed> -o <out>/runs/
<objective>-s<seed>` (it runs in this process to save the start-up time). Finished runs are skipped, so
an interrupted experiment continues where it stopped.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OBJECTIVES = ["mle", "filter", "conditional", "unlikelihood", "rwr", "awr"]
DOC_START = "<|endoftext|>"
LLAMA = {
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "tie_word_embeddings": True,
}
PHF = {
    "mle": {},
    "filter": {"threshold": 0.0},
    "conditional": {"threshold": 0.0, "drop_control_fraction": 0.01},
    "unlikelihood": {"threshold": 0.0, "unlikelihood_alpha": 1.0},
    "rwr": {"beta": 10.0},
    "awr": {"beta": 10.0, "awr_alpha": 0.5, "awr_max_weight": 1000.0},
}


# the PII task (--task pii): scores are -(PII per character), a PII verse of ~150 characters scores about
# -0.007, so RWR/AWR's beta = 10 of the sentiment task would weigh every verse 1.000; beta = 0.007 gives such a
# verse exp(-1) = 0.37 of a clean verse's weight (the paper's beta is in its own score's units too)
PHF_PII = {**PHF, "rwr": {"beta": 0.007}, "awr": {"beta": 0.007, "awr_alpha": 0.5, "awr_max_weight": 1000.0}}
PII_CHARS = set("0123456789@")
BY_CONTROL_KEYS = ("vader_mean", "undesirable_fraction", "sample_tokens_mean", "pii_like_fraction")
TASK_DATA = {"sentiment": ROOT / "data" / "kjv", "pii": ROOT / "data" / "pii"}


def task_reward(task: str) -> dict:
    """The recipe's scorer: VADER sentiment, or -(PII per character) by scrubadub (recipes/quickstart/pii.py)."""
    if task == "pii":
        return {"kind": "function", "function": str(ROOT / "recipes" / "quickstart" / "pii.py") + ":pii_score"}
    return {"kind": "sentiment"}


def score_texts(task: str, texts: list[str]) -> list[float]:
    """The same scorer outside training; undesirable = score < 0 in both tasks."""
    if task == "pii":
        sys.path.insert(0, str(ROOT / "recipes" / "quickstart"))
        from pii import pii_score

        return pii_score([""] * len(texts), texts)
    from prefcli.reward_sources import vader_compound

    return vader_compound(texts)


def read_verses(path: Path) -> list[str]:
    with gzip.open(path, "rt") as f:
        return [json.loads(line)["text"] for line in f]


def read_chapters(path: Path) -> list[list[str]]:
    chapters: dict[tuple, list[str]] = {}
    with gzip.open(path, "rt") as f:
        for line in f:
            r = json.loads(line)
            chapters.setdefault((r["book"], r["chapter"]), []).append(r["text"])
    return list(chapters.values())


def prepare_data(d: Path, n_train: int, n_heldout: int, per_row: int = 1, task: str = "sentiment") -> dict:
    """per_row > 1: each training row is a document of per_row consecutive verses of one chapter, one verse
    a line (the segments of control_position per_segment); n_train counts verses. Held-out rows stay single
    verses. Written to the folder d (shared between experiments, so the scores are cached once)."""
    d.mkdir(parents=True, exist_ok=True)
    if per_row == 1:
        train = read_verses(TASK_DATA[task] / "train.jsonl.gz")
        random.Random(0).shuffle(train)
        train = train[:n_train]
    else:
        blocks = [
            "\n".join(ch[i : i + per_row])
            for ch in read_chapters(ROOT / "data" / "kjv" / "train.jsonl.gz")
            for i in range(0, len(ch) - per_row + 1, per_row)
        ]
        random.Random(0).shuffle(blocks)
        train = blocks[: n_train // per_row]
    heldout = read_verses(TASK_DATA[task] / "test.jsonl.gz")
    heldout = heldout[:: max(1, len(heldout) // n_heldout)][:n_heldout]  # evenly spread over its 59 chapters
    for name, rows in (("train", train), ("heldout", heldout)):
        p = d / f"{name}.jsonl"
        text = "".join(json.dumps({"prompt": DOC_START, "completion": t}) + "\n" for t in rows)
        if not p.exists() or p.read_text() != text:
            p.write_text(text)
    stats = {}
    for name, rows in (("train", [v for t in train for v in t.split("\n")]), ("heldout", heldout)):
        s = score_texts(task, rows)
        stats[name] = {
            "verses": len(rows),
            "vader_mean": statistics.fmean(s),  # the mean score (-PII per character for the PII task)
            "undesirable_fraction": sum(x < 0 for x in s) / len(s),
        }
    return stats


def recipe(objective: str, args) -> dict:
    if args.base:  # the finetuning setting: continue training a pretrained model
        model = {"path": str(Path(args.base).resolve())}
    else:
        cfg = dict(LLAMA)
        if args.hidden:
            cfg.update(hidden_size=args.hidden, intermediate_size=int(args.hidden * 688 / 256) // 8 * 8)
        if args.layers:
            cfg["num_hidden_layers"] = args.layers
        model = {"init": {"architecture": "llama", "config": cfg}, "tokenizer": str(ROOT / "data" / "tokenizer")}
    r = {
        "command": "sft",
        "model": model,
        "data": {
            "train": {"path": str(args.data_dir / "train.jsonl")},
            "eval": {"path": str(args.data_dir / "heldout.jsonl")},
            "max_length": 128,
            "packing": True,
        },
        "train": {
            "max_steps": args.steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "warmup_ratio": 0.05,
            "min_lr_ratio": 0.1,
            "weight_decay": 0.1,
            "seed": 0,
        },
        "log": {"every_steps": 20},
        "output": {"plot": False},
    }
    if args.eval_every:
        r["train"]["eval_every_steps"] = args.eval_every
    if objective != "mle":
        knobs = (PHF_PII if args.task == "pii" else PHF)[objective]
        r["sft"] = {"objective": objective, "rewards": [task_reward(args.task)], **knobs}
    if objective == "conditional":
        r["sft"].update(
            control_position=args.control_position,
            control_init=args.control_init,
            control_lr_scale=args.control_lr_scale,
            control_gap_samples=args.gap_samples,
        )
    return r


def context(objective: str, control: str | None, position: str) -> str:
    """The text sampling starts from: the document start, with the control token where training put it."""
    if objective != "conditional" or control is None:
        return DOC_START
    return control + DOC_START if position == "start" else DOC_START + control


def sample_and_score(
    final_dir: Path,
    objective: str,
    n: int,
    max_new_tokens: int,
    seed: int,
    control: str | None = "<|aligned|>",
    position: str = "start",
    task: str = "sentiment",
) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(final_dir)
    model = AutoModelForCausalLM.from_pretrained(final_dir).eval()
    start = tok(context(objective, control, position), add_special_tokens=False)["input_ids"]
    bad = model.generation_config.bad_words_ids
    if objective == "conditional":
        ids = tok.convert_tokens_to_ids(["<|aligned|>", "<|misaligned|>"])
        assert bad == [[i] for i in ids], bad  # saved by prefcli sft
    torch.manual_seed(10_000 + seed)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([start] * n),
            attention_mask=torch.ones(n, len(start), dtype=torch.long),
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max_new_tokens,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
    gen = out[:, len(start) :]
    lengths = []
    texts = []
    for row in gen.tolist():
        if tok.eos_token_id in row:
            row = row[: row.index(tok.eos_token_id)]
        lengths.append(len(row))
        text = tok.decode(row, skip_special_tokens=True)
        if position == "per_segment":
            text = text.split("\n")[0]
        texts.append(text.strip())
    if bad:
        blocked = {t for b in bad for t in b}
        assert not any(t in blocked for t in gen.flatten().tolist()), "a control token was generated"
    scores = score_texts(task, texts)
    out = {}
    if task == "pii":  # the KJV text has no digit and no "@": any is PII-like, whether scrubadub validates it or not
        out["pii_like_fraction"] = sum(any(c in PII_CHARS for c in t) for t in texts) / n
    return (
        out
        | {
            "vader_mean": statistics.fmean(scores),  # the mean score (-PII per character for the PII task)
            "undesirable_fraction": sum(s < 0 for s in scores) / n,
            "sample_tokens_mean": statistics.fmean(lengths),
            "empty_fraction": sum(not t for t in texts) / n,
            "examples": texts[:3],
        }
    )


def control_llr(final_dir: Path, heldout: Path, position: str, task: str = "sentiment") -> dict:
    """Has the model learned what the tokens mean, measured without sampling: for every held-out verse x,
    llr = log p(x | <|aligned|>) - log p(x | <|misaligned|>) (summed over the verse's tokens and EOS), and
    the AUC of -llr as a detector of undesirable verses (VADER < 0): 0.5 = the tokens mean nothing."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(final_dir)
    model = AutoModelForCausalLM.from_pretrained(final_dir).eval()
    rows = [json.loads(x) for x in heldout.read_text().splitlines()]
    verses = [r["completion"] for r in rows]
    bad = torch.tensor([v < 0 for v in score_texts(task, verses)])
    llr = []
    for v in verses:
        ids = tok(v, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        lp = []
        for c in ("<|aligned|>", "<|misaligned|>"):
            ctx = tok(context("conditional", c, position), add_special_tokens=False)["input_ids"]
            x = torch.tensor([ctx + ids])
            with torch.no_grad():
                logp = model(x).logits[0, len(ctx) - 1 : -1].log_softmax(-1)
            lp.append(float(logp.gather(1, torch.tensor(ids)[:, None]).sum()))
        llr.append(lp[0] - lp[1])
    t = torch.tensor(llr)
    pos, neg = -t[bad], -t[~bad]
    auc = float((pos[:, None] > neg[None, :]).float().mean() + 0.5 * (pos[:, None] == neg[None, :]).float().mean())
    return {
        "llr_auc": auc,
        "llr_mean_desirable": float(t[~bad].mean()),
        "llr_mean_undesirable": float(t[bad].mean()),
    }


def gap_history(run_dir: Path) -> list[list[float]]:
    """[step, eval/control_gap, eval/ppl] at every evaluation of a conditional run."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [[r["step"], r["eval/control_gap"], r.get("eval/ppl")] for r in rows if "eval/control_gap" in r]


def run_one(out: Path, objective: str, seed: int, args) -> dict:
    from prefcli.runner import RunOptions, run_training

    run_dir = out / "runs" / f"{objective}-s{seed}"
    done = run_dir / "experiment.json"
    if args.results:  # a row of this setting, objective and seed in the results file: done already
        for row in read_rows(args.results):
            if (row.get("label"), row["objective"], row["seed"]) == (args.label, objective, seed):
                return row
    if done.exists():
        return json.loads(done.read_text())
    t0 = time.time()
    summary = run_training(
        "sft",
        out / "recipes" / f"{objective}.yaml",
        RunOptions(overrides=[f"train.seed={seed}"], output_dir=str(run_dir), overwrite=True, quiet=True),
    )
    t_train = time.time() - t0
    pos, task = args.control_position, args.task
    res = sample_and_score(
        run_dir / "final", objective, args.samples, args.max_new_tokens, seed, position=pos, task=task
    )
    if objective == "conditional":
        by = {}
        for control, name in CONTROLS.items():
            r = res  # the samples after <|aligned|> are the ones above (same seed): not drawn twice
            if control != "<|aligned|>":
                r = sample_and_score(
                    run_dir / "final", objective, args.samples, args.max_new_tokens, seed, control, pos, task
                )
            by[name] = {k: r[k] for k in BY_CONTROL_KEYS if k in r}
        res["by_control"] = by
        res.update(control_llr(run_dir / "final", args.data_dir / "heldout.jsonl", pos, task))
        res["gap_history"] = gap_history(run_dir)
    res.update(
        {
            "objective": objective,
            "seed": seed,
            "heldout_ppl": summary["final"]["eval/ppl"],
            "heldout_tokens": summary["final"]["eval/tokens"],
            "train_loss": summary["final"]["loss/sft"],
            "train_examples": summary["data"]["train_examples"],
            "phf": summary["data"].get("phf"),
            "train_s": round(t_train, 1),
            "train_tokens_per_s": summary["perf"]["tokens_per_s"],
            "finished": datetime.datetime.now().isoformat(timespec="seconds"),
            "wall_s": round(time.time() - t0, 1),
        }
    )
    done.write_text(json.dumps(res, indent=2) + "\n")
    if args.results:
        res = {"label": args.label, "task": args.task, "commit": git_commit(), **res}
        res["setting"] = {k: getattr(args, k) for k in SETTING_ARGS}
        res["load_avg_1m"] = round(os.getloadavg()[0], 1)
        args.results.parent.mkdir(parents=True, exist_ok=True)
        with open(args.results, "a") as fh:
            fh.write(json.dumps(res) + "\n")
    return res


SETTING_ARGS = ("base", "train_verses", "heldout", "steps", "batch_size", "lr", "samples", "max_new_tokens",
                "control_position", "control_init", "control_lr_scale")  # fmt: skip


def read_rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def git_commit() -> str:
    import subprocess

    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return r.stdout.strip()


CONTROLS = {"<|aligned|>": "aligned", "<|misaligned|>": "misaligned", None: "none"}


def split_ppl(final_dir: Path, heldout: Path, objective: str, position: str, task: str) -> dict:
    """Held-out perplexity over all held-out verses, the clean ones and the undesirable ones (by the task's
    scorer), each verse read after the document start (and <|aligned|> for a conditional model), token-weighted
    over the verse's tokens and EOS: does an objective's perplexity cost fall on the undesirable text only?"""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(final_dir)
    model = AutoModelForCausalLM.from_pretrained(final_dir).eval()
    verses = [json.loads(x)["completion"] for x in heldout.read_text().splitlines()]
    bad = [v < 0 for v in score_texts(task, verses)]
    ctx = tok(context(objective, "<|aligned|>", position), add_special_tokens=False)["input_ids"]
    nll = {True: 0.0, False: 0.0}
    n = {True: 0, False: 0}
    for v, b in zip(verses, bad):
        ids = tok(v, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        with torch.no_grad():
            logp = model(torch.tensor([ctx + ids])).logits[0, len(ctx) - 1 : -1].log_softmax(-1)
        nll[b] -= float(logp.gather(1, torch.tensor(ids)[:, None]).sum())
        n[b] += len(ids)
    return {
        "ppl_all": math.exp((nll[True] + nll[False]) / (n[True] + n[False])),
        "ppl_clean": math.exp(nll[False] / n[False]),
        "ppl_undesirable": math.exp(nll[True] / n[True]),
        "heldout_undesirable_verses": sum(bad),
    }


def posthoc(args) -> None:
    """Measures added after a row was written, into --posthoc (one row per label, objective and seed; the
    results file is never rewritten, so this can run beside an experiment): the split perplexity, and for rows
    written before it was measured, the PII-like share, by sampling again (the sampling is seeded, so the
    samples are the same ones, which the stored undesirable share checks)."""
    done = {(r["label"], r["objective"], r["seed"]) for r in read_rows(args.posthoc)}
    for row in read_rows(args.results):
        key = (row.get("label"), row["objective"], row["seed"])
        if row.get("label") != args.label or key in done:
            continue
        final = args.out.resolve() / "runs" / f"{row['objective']}-s{row['seed']}" / "final"
        st = row["setting"]
        pos = st["control_position"]
        res = {"label": key[0], "objective": key[1], "seed": key[2]}
        res.update(split_ppl(final, args.data_dir / "heldout.jsonl", row["objective"], pos, row["task"]))
        if row["task"] == "pii" and "pii_like_fraction" not in row:
            for control, name in CONTROLS.items():
                if row["objective"] != "conditional" and control != "<|aligned|>":
                    continue
                r = sample_and_score(
                    final, row["objective"], st["samples"], st["max_new_tokens"], row["seed"], control, pos, "pii"
                )
                stored = row if control == "<|aligned|>" else row["by_control"][name]
                if abs(r["undesirable_fraction"] - stored["undesirable_fraction"]) > 1e-12:
                    raise SystemExit(f"{final}: the samples differ from the stored ones ({r['undesirable_fraction']})")
                res[f"pii_like_fraction_{name}" if control != "<|aligned|>" else "pii_like_fraction"] = r[
                    "pii_like_fraction"
                ]
        args.posthoc.parent.mkdir(parents=True, exist_ok=True)
        with open(args.posthoc, "a") as fh:
            fh.write(json.dumps(res) + "\n")
        print(f"{key}: {res}", file=sys.stderr, flush=True)


def control_check(out: Path, args) -> None:
    """Sample every finished conditional model after each control token and after none (the 1% of rows
    trained without one): did the model learn what the tokens mean, and how strongly?"""
    for run in sorted((out / "runs").glob("conditional-s*/experiment.json")):
        res = json.loads(run.read_text())
        by = {}
        for control, name in CONTROLS.items():
            r = sample_and_score(
                run.parent / "final",
                "conditional",
                args.samples,
                args.max_new_tokens,
                res["seed"],
                control,
                position=args.control_position,
            )
            by[name] = {k: r[k] for k in BY_CONTROL_KEYS if k in r}
        res["by_control"] = by
        run.write_text(json.dumps(res, indent=2) + "\n")
        print(
            f"conditional seed {res['seed']}: "
            + "  ".join(
                f"{k}: vader {v['vader_mean']:+.3f} undesirable {v['undesirable_fraction']:.3f}" for k, v in by.items()
            ),
            file=sys.stderr,
            flush=True,
        )


def control_table(results: list[dict]) -> str:
    rs = [r for r in results if r["objective"] == "conditional" and "by_control" in r]
    if not rs:
        return ""
    rows = [
        "| conditional model sampled after | VADER mean of samples | undesirable samples (VADER < 0) |",
        "|---|---|---|",
    ]
    for token, name in CONTROLS.items():
        v = [r["by_control"][name]["vader_mean"] for r in rs]
        u = [r["by_control"][name]["undesirable_fraction"] for r in rs]
        rows.append(
            f"| {token or 'no control token'} (n={len(rs)}) | {'{:+.3f} ± {:.3f}'.format(*mean_std(v))} | "
            f"{'{:.3f} ± {:.3f}'.format(*mean_std(u))} |"
        )
    gap = [
        r["by_control"]["misaligned"]["undesirable_fraction"] - r["by_control"]["aligned"]["undesirable_fraction"]
        for r in rs
    ]
    rows.append("")
    rows.append(f"sampling gap (misaligned - aligned undesirable share): {'{:+.3f} ± {:.3f}'.format(*mean_std(gap))}")
    if all("llr_auc" in r for r in rs):
        auc = [r["llr_auc"] for r in rs]
        d = [r["llr_mean_desirable"] - r["llr_mean_undesirable"] for r in rs]
        rows.append(
            f"held-out LLR AUC: {'{:.3f} ± {:.3f}'.format(*mean_std(auc))}  (per seed {', '.join(f'{x:.3f}' for x in auc)}); "
            f"mean LLR desirable - undesirable: {'{:+.3f} ± {:.3f}'.format(*mean_std(d))} nats"
        )
    return "\n".join(rows)


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else float("nan"))


def table(results: list[dict], data_stats: dict) -> str:
    rows = [
        "| objective | held-out ppl | VADER mean of samples | undesirable samples (VADER < 0) "
        "| sample length (tokens) |",
        "|---|---|---|---|---|",
    ]
    for obj in OBJECTIVES:
        rs = [r for r in results if r["objective"] == obj]
        if not rs:
            continue
        cells = []
        for key, fmt in (
            ("heldout_ppl", "{:.1f} ± {:.1f}"),
            ("vader_mean", "{:+.3f} ± {:.3f}"),
            ("undesirable_fraction", "{:.3f} ± {:.3f}"),
            ("sample_tokens_mean", "{:.1f} ± {:.1f}"),
        ):
            cells.append(fmt.format(*mean_std([r[key] for r in rs])))
        rows.append(f"| {obj} (n={len(rs)}) | " + " | ".join(cells) + " |")
    tr, ho = data_stats["train"], data_stats["heldout"]
    rows.append(f"| *data: training verses* | | {tr['vader_mean']:+.3f} | {tr['undesirable_fraction']:.3f} | |")
    rows.append(f"| *data: held-out verses* | | {ho['vader_mean']:+.3f} | {ho['undesirable_fraction']:.3f} | |")
    return "\n".join(rows)


def per_seed(results: list[dict]) -> str:
    rows = [
        "| objective | seed | held-out ppl | VADER mean | undesirable | last-step loss/sft | wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(results, key=lambda r: (OBJECTIVES.index(r["objective"]), r["seed"])):
        rows.append(
            f"| {r['objective']} | {r['seed']} | {r['heldout_ppl']:.1f} | {r['vader_mean']:+.3f} | "
            f"{r['undesirable_fraction']:.3f} | {r['train_loss']:.3f} | {r['wall_s']:.0f} |"
        )
    return "\n".join(rows)


def fmt(xs: list[float], spec: str = "{:.3f}") -> str:
    if not xs:
        return "-"
    m, sd = mean_std(xs)
    return spec.format(m) + ("" if len(xs) < 2 else " ± " + spec.format(sd))


def pii_report(rows: list[dict]) -> str:
    """The PII task's tables from its --results rows: per objective (mean ± sd over seeds), the conditional
    models after each control token, and per seed."""
    out = [
        "| objective | seeds | held-out ppl | ppl, clean verses | ppl, PII verses | PII samples (scrubadub) "
        "| PII-like samples (digit or @) | PII per 1,000 characters of samples | sample length (tokens) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for obj in OBJECTIVES:
        rs = [r for r in rows if r["objective"] == obj]
        if not rs:
            continue
        like = [r["pii_like_fraction"] for r in rs if "pii_like_fraction" in r]
        out.append(
            f"| {obj} | {len(rs)} | {fmt([r['heldout_ppl'] for r in rs], '{:.1f}')} | "
            f"{fmt([r['ppl_clean'] for r in rs if 'ppl_clean' in r], '{:.1f}')} | "
            f"{fmt([r['ppl_undesirable'] for r in rs if 'ppl_clean' in r], '{:.1f}')} | "
            f"{fmt([r['undesirable_fraction'] for r in rs])} | {fmt(like)}{'' if len(like) == len(rs) else f' (n={len(like)})'} | "
            f"{fmt([-1000 * r['vader_mean'] for r in rs], '{:.3f}')} | {fmt([r['sample_tokens_mean'] for r in rs], '{:.1f}')} |"
        )
    cond = [r for r in rows if r["objective"] == "conditional" and "by_control" in r]
    if cond:
        out += ["", "| conditional model sampled after | PII samples (scrubadub) | PII-like samples |", "|---|---|---|"]
        for token, name in CONTROLS.items():
            bc = [r["by_control"][name] for r in cond]
            like = [b["pii_like_fraction"] for b in bc if "pii_like_fraction" in b]
            out.append(
                f"| {token or 'no control token'} | {fmt([b['undesirable_fraction'] for b in bc])} | {fmt(like)} |"
            )
        auc = [r["llr_auc"] for r in cond]
        d = [r["llr_mean_desirable"] - r["llr_mean_undesirable"] for r in cond]
        out += [
            "",
            f"held-out LLR AUC {fmt(auc)} (per seed {', '.join(f'{x:.3f}' for x in auc)}); mean LLR of clean minus "
            f"PII verses {fmt(d, '{:+.2f}')} nats",
        ]
    out += [
        "",
        "| objective | seed | held-out ppl | PII samples | PII-like | train s | wall s | load |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (OBJECTIVES.index(r["objective"]), r["seed"])):
        like = r.get("pii_like_fraction")
        out.append(
            f"| {r['objective']} | {r['seed']} | {r['heldout_ppl']:.1f} | {r['undesirable_fraction']:.3f} | "
            f"{'-' if like is None else f'{like:.3f}'} | {r['train_s']:.0f} | {r['wall_s']:.0f} | {r.get('load_avg_1m', '-')} |"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/phf-experiment"))
    ap.add_argument("--objectives", nargs="+", default=OBJECTIVES, choices=OBJECTIVES)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--train-verses", type=int, default=3000, help="random subset of the KJV training verses")
    ap.add_argument("--heldout", type=int, default=320, help="N verses of data/kjv/test.jsonl.gz, every k-th")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=2, help="packed rows of 128 tokens per step")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--base", default=None, help="finetune this pretrained model (e.g. prefcli/assets/kjv-base)")
    ap.add_argument("--hidden", type=int, default=None, help="from scratch: hidden size (intermediate scales)")
    ap.add_argument("--layers", type=int, default=None, help="from scratch: number of layers")
    ap.add_argument("--data-dir", type=Path, default=None, help="where the data files go (default: OUT/data)")
    ap.add_argument("--verses-per-row", type=int, default=1, help="training rows of N consecutive verses")
    ap.add_argument("--control-position", default="start", choices=["start", "after_prompt", "per_segment"])
    ap.add_argument("--control-init", default="default", choices=["default", "mean", "random"])
    ap.add_argument("--control-lr-scale", type=float, default=1.0)
    ap.add_argument("--gap-samples", type=int, default=0, help="conditional: eval/control_gap samples per token")
    ap.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: at the end only)")
    ap.add_argument("--task", default="sentiment", choices=list(TASK_DATA), help="the scorer and its corpus")
    ap.add_argument("--results", type=Path, default=None, help="append one row per finished run to this file")
    ap.add_argument("--label", default=None, help="names this setting's rows in --results")
    ap.add_argument("--report", action="store_true", help="print the tables of the finished runs and exit")
    ap.add_argument("--posthoc", type=Path, default=None, help="where the measures added afterwards go")
    ap.add_argument(
        "--posthoc-only", action="store_true", help="add the split perplexity (and older rows' PII-like share)"
    )
    ap.add_argument(
        "--control-check",
        action="store_true",
        help="sample the finished conditional models after each control token and after none",
    )
    args = ap.parse_args()
    out = args.out.resolve()
    args.data_dir = (args.data_dir or out / "data").resolve()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    if args.report and args.task == "pii":
        post = {(r["label"], r["objective"], r["seed"]): r for r in read_rows(args.posthoc)} if args.posthoc else {}
        rows = [r for r in read_rows(args.results) if r.get("label") == args.label]
        for r in rows:  # the measures added afterwards
            p = post.get((r["label"], r["objective"], r["seed"]), {})
            r.update({k: v for k, v in p.items() if k.startswith("ppl_")})
            if "pii_like_fraction" in p:
                r["pii_like_fraction"] = p["pii_like_fraction"]
                for name in ("misaligned", "none"):
                    if f"pii_like_fraction_{name}" in p:
                        r["by_control"][name]["pii_like_fraction"] = p[f"pii_like_fraction_{name}"]
                if "by_control" in r:
                    r["by_control"]["aligned"]["pii_like_fraction"] = p["pii_like_fraction"]
        print(pii_report(rows))
        return
    if args.report:
        meta = json.loads((out / "experiment.json").read_text())
        results = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/experiment.json"))]
        print(table(results, meta["data"]))
        print()
        print(control_table(results))
        print()
        print(per_seed(results))
        return
    if args.control_check:
        control_check(out, args)
        return
    if args.posthoc_only:
        posthoc(args)
        return

    import yaml

    stats = prepare_data(args.data_dir, args.train_verses, args.heldout, args.verses_per_row, args.task)
    (out / "recipes").mkdir(parents=True, exist_ok=True)
    for obj in args.objectives:
        (out / "recipes" / f"{obj}.yaml").write_text(yaml.safe_dump(recipe(obj, args), sort_keys=False))
    meta = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "data": stats,
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
    }
    import torch
    import transformers

    meta.update(
        {"torch": torch.__version__, "transformers": transformers.__version__, "torch_threads": torch.get_num_threads()}
    )
    (out / "experiment.json").write_text(json.dumps(meta, indent=2) + "\n")
    t0 = time.time()
    results = []
    for seed in args.seeds:  # seed-major: a partial experiment still covers every objective
        for obj in args.objectives:
            r = run_one(out, obj, seed, args)
            results.append(r)
            print(
                f"[{time.time() - t0:7.0f}s] {obj:12s} seed {seed}: ppl {r['heldout_ppl']:.1f}  "
                f"vader {r['vader_mean']:+.3f}  undesirable {r['undesirable_fraction']:.3f}  "
                f"({r['wall_s']:.0f}s)",
                file=sys.stderr,
                flush=True,
            )
    meta["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    meta["wall_s"] = round(time.time() - t0, 1)
    (out / "experiment.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(table(results, stats))
    print()
    print(per_seed(results))


if __name__ == "__main__":
    main()
