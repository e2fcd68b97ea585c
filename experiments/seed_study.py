"""Run one recipe under several seeds and report how held-out metrics move from step 0.

    python experiments/seed_study.py rlhf recipes/tiny/rlhf-grpo.yaml --metrics eval/reward eval/kl --seeds 0 1 2
    python experiments/seed_study.py gan recipes/tiny/gan.yaml --metrics eval/real_word_fraction --seeds 0 1 2
    python experiments/seed_study.py gan recipes/tiny/gan.yaml --metrics eval/real_word_fraction --report-only

Each run is `prefcli <command> RECIPE --set train.seed=S --set train.eval_on_start=true`, in
runs/seed-study/<recipe folder>-<recipe>-seed<S>/ (or --runs; recipes/tiny/gan.yaml and
recipes/quickstart/gan.yaml share a file name, so the folder is part of the name). Prints, and appends to
--out (JSONL), the start and end value of every metric per seed and their mean and standard deviation over
seeds.

`{seed}` in a --set value or in --runs stands for the seed, so each seed can start from its own model, and
--report-only can read runs another script trained. The GAN rows of docs/commands/gan.md's APO-style set-up
are the `make demo` gan stages (each seed's generator starts from that seed's SFT model), reported with:

    python experiments/seed_study.py gan recipes/quickstart/gan.yaml --report-only \
        --runs 'runs/quickstart-demo/gan-s{seed}' --metrics eval/sentiment eval/kl eval/disc_fake_prob \
        --set 'model.path=runs/quickstart-demo/sft-s{seed}/final' \
        --set 'discriminator.path=runs/quickstart-demo/reward/final' --note 'the make-demo gan stages'
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(command: str, recipe: Path, seed: int, out: Path, extra: list[str]) -> dict:
    args = [
        sys.executable,
        "-m",
        "prefcli",
        command,
        str(recipe),
        "-o",
        str(out),
        "-q",
        "--overwrite",
        "--set",
        f"train.seed={seed}",
        "--set",
        "train.eval_on_start=true",
    ]
    for e in extra:
        args += ["--set", e]
    res = subprocess.run(args, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"seed {seed} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command")
    ap.add_argument("recipe", type=Path)
    ap.add_argument("--metrics", nargs="+", required=True)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument(
        "--set", dest="extra", action="append", default=[], help="a recipe override; {seed} stands for the seed"
    )
    ap.add_argument(
        "--runs",
        default="runs/seed-study/{folder}-{stem}-seed{seed}",
        help="each seed's run folder, relative to the repository root ({folder}: the recipe's folder name, "
        "{stem}: its file name without .yaml, {seed})",
    )
    ap.add_argument("--note", default=None, help="a sentence stored with the row (where the runs came from)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: report on the runs an earlier call (or another script) left in --runs",
    )
    a = ap.parse_args()
    rows = []
    for seed in a.seeds:
        out = ROOT / a.runs.format(folder=a.recipe.resolve().parent.name, stem=a.recipe.stem, seed=seed)
        if a.report_only:
            summary = json.loads((out / "summary.json").read_text())
        else:
            summary = run(a.command, a.recipe, seed, out, [e.replace("{seed}", str(seed)) for e in a.extra])
        evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        evals = [e for e in evals if any(k.startswith("eval/") for k in e)]
        start, end = evals[0], evals[-1]
        rows.append(
            {
                "seed": seed,
                "steps": summary["steps"],
                "wall_s": summary["wall_s"],
                **{f"{m}@start": start.get(m) for m in a.metrics},
                **{f"{m}@end": end.get(m) for m in a.metrics},
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    commit = (
        subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT, check=False
        ).stdout.strip()
        or None
    )
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()}"
    report = {
        "date": datetime.date.today().isoformat(),
        "commit": commit,
        "machine": machine,
        "recipe": str(a.recipe),
        "command": a.command,
        "sets": a.extra,
        "runs_dir": a.runs,
        "seeds": a.seeds,
        "runs": rows,
    }
    if a.report_only:
        report["report_only"] = True  # `commit` is the one reported at: the note should say where the runs trained
    if a.note:
        report["note"] = a.note
    print(f"\n{a.recipe} over seeds {a.seeds}:")
    for m in a.metrics:
        s = [r[f"{m}@start"] for r in rows]
        e = [r[f"{m}@end"] for r in rows]
        if None in s or None in e:
            print(f"  {m}: not logged at both ends of every run (a metric name the run does not write?)")
            report[m] = None
            continue
        d = [y - x for x, y in zip(s, e)]

        def sd(v):
            return statistics.stdev(v) if len(v) > 1 else 0.0

        report[m] = {
            "start_mean": statistics.mean(s),
            "start_std": sd(s),
            "end_mean": statistics.mean(e),
            "end_std": sd(e),
            "rise_mean": statistics.mean(d),
            "rise_std": sd(d),
        }
        print(
            f"  {m}: {statistics.mean(s):.4f} ± {sd(s):.4f} -> {statistics.mean(e):.4f} ± {sd(e):.4f} "
            f"(change {statistics.mean(d):+.4f} ± {sd(d):.4f})"
        )
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        with open(a.out, "a") as f:
            f.write(json.dumps(report) + "\n")


if __name__ == "__main__":
    main()
