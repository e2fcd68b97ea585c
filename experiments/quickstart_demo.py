r"""The quickstart pipeline end to end, over several seeds, ending with a comparison table.

    make demo            # = python experiments/quickstart_demo.py  (about 40 minutes on 2 CPU cores)

    base (prefcli/assets/kjv-base) --reward (once)--> reward model (RM)
         \--sft--> sft --+--rlhf (PPO, R = HumanScore: VADER itself)--> rlhf
                          +--rlhf (PPO, R = the reward model)----------> rlhf-rm
                          +--contrastive (DPO on the pairs)-------------> dpo
                          +--gan (RLOO vs a discriminator started from the RM)--> gan

Every stage runs through the prefcli CLI with the recipes in recipes/quickstart/ and `--set`
overrides for the chaining, under seeds 0, 1, 2 (the reward model is trained once). Then, per
seed, `prefcli eval` compares the base and each tuned model on held-out prompts and text:
the human-score stand-in (VADER sentiment of sampled completions), the win rate over the base
under the reward model, KL to the base, held-out perplexity and distinct-2. The table (mean ± std
over seeds) is printed and written to docs/quickstart-results.md with the check the issue asks
for: each tuned model beats the base on the stand-in by more than its spread over seeds.

Selected stages (to re-measure some columns after a change, without the whole 40 minutes):

    python experiments/quickstart_demo.py --stages sft gan

trains (or reuses) the reward model and each seed's SFT model, which every tuned model starts from, then
the listed stages, and evaluates the base and the listed models exactly as the full demo does (same eval
recipe, seeds and prompts; every model samples from the eval seed, so a model's figures do not depend on
which other models share its eval). A partial run prints its table and writes it, with the commit, to
<out>/results-<stages>.json; it writes docs/quickstart-results.md only when given --doc, since that file
holds every column.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
Q = ROOT / "recipes" / "quickstart"
BASE = ROOT / "prefcli" / "assets" / "kjv-base"
STAGES = ["sft", "rlhf", "rlhf-rm", "dpo", "gan"]  # the tuned models, in the table's order
STAGE_SECONDS: list[float] = []  # each stage's own wall time, reused stages included


def prefcli(*args: str) -> dict:
    """Run one stage; a stage whose run folder already holds a completed summary is reused, so an
    interrupted demo continues where it stopped."""
    if "-o" in args:
        done = Path(args[args.index("-o") + 1]) / "summary.json"
        if done.exists() and json.loads(done.read_text()).get("status") == "completed":
            print(f"  reused: {done.parent}", flush=True)
            summary = json.loads(done.read_text())
            STAGE_SECONDS.append(summary.get("wall_s") or 0.0)
            return summary
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "prefcli", *args, "-q", "--overwrite"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if res.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{res.stderr[-3000:]}")
    print(f"  done in {time.perf_counter() - t0:.0f} s: prefcli {' '.join(args[:2])}", flush=True)
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    STAGE_SECONDS.append(summary.get("wall_s") or time.perf_counter() - t0)
    return summary


def eval_recipe(
    out: Path, models: dict[str, Path], rewards: list[dict], metrics: list[str], name: str, seed: int
) -> Path:
    r = {
        "command": "eval",
        "models": [{"name": n, "path": str(p)} for n, p in models.items()],
        "baseline": {"name": "base", "path": str(BASE)},
        "data": {"prompts": {"path": str(ROOT / "data" / "quickstart" / "prompts_eval.jsonl"), "max_rows": 200}},
        "metrics": metrics,
        "generation": {"max_new_tokens": 24, "temperature": 1.0, "batch_size": 32},
        "rewards": rewards,
        "seed": seed,
        "output": {"dir": str(out / name)},
    }
    if "kl" in metrics:
        r["reference"] = {"name": "base", "path": str(BASE)}
    if "perplexity" in metrics:
        r["data"]["text"] = {"path": str(ROOT / "data" / "kjv" / "test.jsonl.gz"), "max_rows": 300}
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(r, sort_keys=False))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "quickstart-demo")
    ap.add_argument(
        "--stages",
        nargs="+",
        choices=STAGES,
        default=STAGES,
        help="the tuned models to train (or reuse) and evaluate next to the base; the reward model and the SFT "
        "models are always built, since the others start from them",
    )
    ap.add_argument(
        "--doc",
        type=Path,
        default=None,
        help="the Markdown report to write (default: docs/quickstart-results.md when every stage runs, none otherwise)",
    )
    a = ap.parse_args()
    stages = [n for n in STAGES if n in a.stages]
    full = stages == STAGES
    doc_path = a.doc or (ROOT / "docs" / "quickstart-results.md" if full else None)
    commit = (
        subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT, check=False
        ).stdout.strip()
        or None
    )
    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    print("reward model (once)", flush=True)
    rm = prefcli("reward", str(Q / "reward.yaml"), "-o", str(out / "reward"))
    rm_dir = Path(rm["final_model"])
    per_seed: dict[int, dict] = {}
    for seed in a.seeds:
        print(f"seed {seed}", flush=True)
        s = ["--set", f"train.seed={seed}"]
        sft = prefcli("sft", str(Q / "sft.yaml"), "-o", str(out / f"sft-s{seed}"), *s)
        sft_dir = sft["final_model"]
        frm = ["--set", f"model.path={sft_dir}"]
        runs = {  # stage: (command, recipe in recipes/quickstart/, extra overrides); all start from this SFT model
            "rlhf": ("rlhf", "rlhf.yaml", []),
            "rlhf-rm": ("rlhf", "rlhf.yaml", ["--set", f"rewards=[{{kind: model, path: {rm_dir}}}]"]),
            "dpo": ("contrastive", "contrastive.yaml", []),
            "gan": ("gan", "gan.yaml", ["--set", f"discriminator.path={rm_dir}"]),
        }
        models = {"sft": Path(sft_dir)} if "sft" in stages else {}
        for name in (n for n in stages if n != "sft"):
            command, recipe, extra = runs[name]
            done = prefcli(command, str(Q / recipe), "-o", str(out / f"{name}-s{seed}"), *s, *frm, *extra)
            models[name] = Path(done["final_model"])
        human = prefcli(
            "eval",
            "-o",
            str(out / f"eval-human-s{seed}"),
            str(
                eval_recipe(
                    out,
                    models,
                    [{"kind": "sentiment"}],
                    ["perplexity", "reward", "win_rate", "kl", "distinct", "length"],
                    f"eval-human-s{seed}",
                    seed,
                )
            ),
        )
        by_rm = prefcli(
            "eval",
            "-o",
            str(out / f"eval-rm-s{seed}"),
            str(
                eval_recipe(
                    out,
                    models,
                    [{"kind": "model", "path": str(rm_dir)}],
                    ["reward", "win_rate"],
                    f"eval-rm-s{seed}",
                    seed,
                )
            ),
        )
        per_seed[seed] = {
            "human": human["models"],
            "rm": by_rm["models"],
            "rm_accuracy": rm["final"].get("eval/accuracy"),
        }
    names = ["base", *stages]

    def col(seed_metrics, name, *path):
        v = seed_metrics.get(name, {})
        for p in path:
            v = v.get(p, {}) if isinstance(v, dict) else {}
        return v if isinstance(v, (int, float)) else None

    rows = {
        "human-score stand-in (VADER, mean)": lambda d, n: col(d["human"], n, "reward", "mean"),
        "win rate over base, reward model": lambda d, n: col(d["rm"], n, "win_rate", "win_rate"),
        "win rate over base, VADER": lambda d, n: col(d["human"], n, "win_rate", "win_rate"),
        "KL to base (k1 per completion)": lambda d, n: col(d["human"], n, "kl", "k1"),
        "held-out perplexity (KJV test)": lambda d, n: col(d["human"], n, "perplexity", "ppl"),
        "distinct-2": lambda d, n: col(d["human"], n, "distinct", "distinct-2"),
        "length (tokens)": lambda d, n: col(d["human"], n, "length", "tokens", "mean"),
    }
    table = {}
    for label, get in rows.items():
        table[label] = {}
        for n in names:
            vals = [get(per_seed[s], n) for s in a.seeds]
            vals = [v for v in vals if v is not None]
            table[label][n] = (
                (statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0) if vals else None
            )
    human = table["human-score stand-in (VADER, mean)"]
    base_mean = human["base"][0]
    checks = {}
    for n in names[1:]:
        m, sd = human[n]
        checks[n] = {"margin": m - base_mean, "spread": sd, "beats_base": (m - base_mean) > sd}
    lines = [f"| metric | {' | '.join(names)} |", "|---|" + "---|" * len(names)]
    for label, cells in table.items():
        fmt = [("-" if c is None else f"{c[0]:.3f} ± {c[1]:.3f}") for c in (cells[n] for n in names)]
        lines.append(f"| {label} | {' | '.join(fmt)} |")
    md_table = "\n".join(lines)
    check_lines = [
        f"- {n}: stand-in {human[n][0]:.3f} vs base {base_mean:.3f}: margin {c['margin']:+.3f}, spread over "
        f"seeds {c['spread']:.3f} -> {'beats the base' if c['beats_base'] else 'does NOT beat the base'}"
        for n, c in checks.items()
    ]
    minutes = sum(STAGE_SECONDS) / 60
    rm_acc = [per_seed[s]["rm_accuracy"] for s in a.seeds if per_seed[s]["rm_accuracy"] is not None]
    doc = [
        "# Quickstart results",
        "",
        f"Measured by `make demo` (experiments/quickstart_demo.py) on {datetime.date.today().isoformat()} "
        f"at commit {commit}, seeds {', '.join(map(str, a.seeds))}; its stages' wall times add up to "
        f"{minutes:.0f} minutes on this machine (2 CPU cores, shared with other work for some stages). Values are "
        "mean ± standard deviation over seeds; each seed also samples its evaluation completions with its own "
        "seed, and the base model is the same in every seed, so the base column's spread is that of sampling "
        "alone.",
        "",
        "Held-out prompts: 200 verse openings from held-out chapters (data/quickstart/prompts_eval.jsonl), one "
        "sampled completion each (temperature 1, 24 new tokens); perplexity on 300 verses of held-out chapters.",
        f"The reward model's held-out pairwise accuracy: {rm_acc[0]:.3f}." if rm_acc else "",
        "",
        md_table,
        "",
        "Does each tuned model beat the base on the human-score stand-in by more than its spread?",
        "",
        *check_lines,
        "",
    ]
    if doc_path is not None:
        doc_path.write_text("\n".join(doc))
    results = out / ("results.json" if full else f"results-{'+'.join(stages)}.json")
    results.write_text(
        json.dumps(
            {
                "date": datetime.date.today().isoformat(),
                "commit": commit,
                "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()}",
                "stages": stages,
                "seeds": a.seeds,
                "stage_wall_minutes": round(minutes, 1),
                "table": table,
                "table_md": md_table,
                "per_seed": per_seed,
                "checks": checks,
            },
            indent=2,
            default=str,
        )
    )
    print("\n" + md_table + "\n\n" + "\n".join(check_lines))
    print(f"\nwritten: {', '.join(str(p) for p in (doc_path, results) if p is not None)}")


if __name__ == "__main__":
    main()
