r"""RL algorithms side by side on the quickstart task, and PPO on one reward model against PPO on an ensemble.

    python experiments/rl_comparison.py --jobs 2 --tag algos400 --out runs/rl-compare-400   # the methods table
    python experiments/rl_comparison.py --methods ppo_rm ppo_ens --jobs 2 --tag ensemble \
        --rm-dirs runs/rl-compare/rm-s0/final runs/rl-compare/rm-s1/final runs/rl-compare/rm-s2/final

The task is recipes/quickstart/rlhf.yaml (the bundled 4M-parameter KJV base model, 24 new tokens, groups of
4 completions for 8 prompts per rollout, 2 passes of 2 minibatches over each rollout, KL weight 0.05, lr 1e-4),
changed only by `--set` overrides, under seeds 0, 1, 2; every method draws the same rollouts (--steps / 4
of 32 completions; dynamic sampling draws more and the table says how many):

  ppo          the recipe: PPO with a value head, R = VADER (the human-score stand-in)
  grpo         group-normalised advantages, KL in the loss
  dapo         grpo_loss dapo (token mean, clip-higher 0.28) + dynamic sampling + overlong shaping over the
               last 6 tokens + truncated completions masked (the KL weight is kept, as for every method)
  gspo         grpo advantages, policy_loss gspo (sequence ratio, clip 3e-4 / 4e-4)
  online_dpo   best vs worst of each prompt's 4 completions under VADER, the DPO loss (beta 0.1)
  ppo_rm       PPO on a reward model (seed s: the one trained with seed s; --rm-dirs)
  ppo_ens      PPO on the ensemble of the 3 reward models, mean - 1 x std of the members (normalised)

Each run trains without held-out evaluation; then, per seed, `prefcli eval` scores every final model and the
base on the 200 held-out prompts (one completion each): gold reward = VADER, KL to the base (k1 per
completion), distinct-2, length. Rows (one per run, with the eval metrics and wall time) are appended to
experiments/results/rl-comparison.jsonl; the table (mean +- std over seeds) is printed.

The reward models: `prefcli reward recipes/quickstart/reward.yaml --set train.seed=S` (shortened with
--set train.max_steps=N when the machine is slow); pass their final/ folders with --rm-dirs.
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
RECIPE = ROOT / "recipes" / "quickstart" / "rlhf.yaml"
BASE = ROOT / "prefcli" / "assets" / "kjv-base"

METHODS: dict[str, list[str]] = {
    "ppo": [],
    "grpo": ["rlhf.algorithm=grpo"],
    "dapo": [
        "rlhf.algorithm=grpo",
        "rlhf.grpo_loss=dapo",
        "rlhf.dynamic_sampling=true",
        "rlhf.overlong_buffer=6",
        "rlhf.mask_truncated_completions=true",
    ],
    "gspo": ["rlhf.algorithm=grpo", "rlhf.policy_loss=gspo"],
    "online_dpo": ["rlhf.algorithm=online_dpo"],
    "ppo_rm": [],  # + the reward model of the seed
    "ppo_ens": [],  # + the ensemble
}


def run_sets(method: str, seed: int, steps: int, rm_dirs: list[str]) -> list[str]:
    sets = [
        f"train.seed={seed}",
        f"train.max_steps={steps}",
        "train.eval_on_start=false",
        "train.save_every_steps=100000",
        "data.eval=null",
        *METHODS[method],
    ]
    if method == "ppo_rm":
        sets.append(f"rewards=[{{kind: model, path: {rm_dirs[seed % len(rm_dirs)]}}}]")
    if method == "ppo_ens":
        members = ", ".join(f"{{kind: model, path: {d}}}" for d in rm_dirs)
        sets.append(f"rewards=[{{kind: ensemble, combine: mean_minus_std, std_coef: 1.0, members: [{members}]}}]")
    return sets


def launch(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = ["nice", "-n", "10", sys.executable, "-m", "prefcli", *args, "-q", "--overwrite"]
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=ROOT, env=env)


def run_pool(jobs: list[tuple[str, list[str], Path]], width: int) -> dict[str, float]:
    """Run (name, prefcli args, log) jobs, `width` at a time; a job whose folder holds a completed summary
    is skipped. Returns each job's wall seconds."""
    todo, running, wall = list(jobs), {}, {}
    while todo or running:
        while todo and len(running) < width:
            name, args, log = todo.pop(0)
            out = Path(args[args.index("-o") + 1])
            done = out / "summary.json"
            if done.exists() and json.loads(done.read_text()).get("status") == "completed":
                wall[name] = json.loads(done.read_text()).get("wall_s") or 0.0
                continue
            running[name] = (launch(args, log), time.perf_counter(), log)
            print(f"  start {name}", flush=True)
        for name, (p, t0, log) in list(running.items()):
            if p.poll() is not None:
                del running[name]
                wall[name] = time.perf_counter() - t0
                status = "done" if p.returncode == 0 else f"FAILED ({log})"
                print(f"  {status} {name} in {wall[name]:.0f} s", flush=True)
        time.sleep(2)
    return wall


def eval_recipe(out: Path, models: dict[str, Path], seed: int, prompts: int, tag: str) -> Path:
    r = {
        "command": "eval",
        "models": [{"name": n, "path": str(p)} for n, p in models.items()],
        "baseline": {"name": "base", "path": str(BASE)},
        "reference": {"name": "base", "path": str(BASE)},
        "data": {"prompts": {"path": str(ROOT / "data" / "quickstart" / "prompts_eval.jsonl"), "max_rows": prompts}},
        "metrics": ["reward", "kl", "distinct", "length"],
        "generation": {"max_new_tokens": 24, "temperature": 1.0, "batch_size": 40},
        "rewards": [{"kind": "sentiment"}],
        "seed": seed,
        "output": {"dir": str(out / f"eval-{tag}-s{seed}")},
    }
    path = out / f"eval-{tag}-s{seed}.yaml"
    path.write_text(yaml.safe_dump(r, sort_keys=False))
    return path


def print_table(rows: list[dict]) -> None:
    """Mean +- standard deviation over seeds of each method's rows."""

    def cell(m, key, fmt="{:.3f}"):
        v = [r[key] for r in rows if r["method"] == m and r.get(key) is not None]
        if not v:
            return "-"
        sd = statistics.stdev(v) if len(v) > 1 else 0.0
        return f"{fmt.format(statistics.mean(v))} ± {fmt.format(sd)}"

    cols = [("gold_reward", "gold reward (VADER)"), ("kl", "KL to base"), ("distinct2", "distinct-2"),
            ("length", "length"), ("prompts_sampled", "prompts sampled"), ("wall_s", "wall s / run")]  # fmt: skip
    print("\n| method | " + " | ".join(c[1] for c in cols) + " |")
    print("|---|" + "---|" * len(cols))
    for m in dict.fromkeys(r["method"] for r in rows):
        print(f"| {m} | " + " | ".join(cell(m, k, "{:.0f}" if k in ("prompts_sampled", "wall_s") else "{:.3f}")
                                      for k, _ in cols) + " |")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument(
        "--steps", type=int, default=400, help="optimizer steps per run (4 per rollout of 32; the recipe's 400)"
    )
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--rm-dirs", nargs="*", default=[], help="the reward models' final/ folders (ppo_rm, ppo_ens)")
    ap.add_argument("--jobs", type=int, default=3, help="runs at a time (each on one torch thread)")
    ap.add_argument("--eval-prompts", type=int, default=200)
    ap.add_argument("--tag", default="algos", help="names this call's evaluation folders (eval-TAG-sSEED)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "rl-compare")
    ap.add_argument("--results", type=Path, default=ROOT / "experiments" / "results" / "rl-comparison.jsonl")
    ap.add_argument("--report", action="store_true", help="train nothing: the table of the rows of --tag in --results")
    a = ap.parse_args()
    if a.report:
        rows = [json.loads(x) for x in a.results.read_text().splitlines()]
        print_table([r for r in rows if r.get("tag") == a.tag])
        return
    methods = [m for m in a.methods if not m.startswith("ppo_") or a.rm_dirs]
    a.out = a.out.resolve()  # written into the eval recipes, whose relative paths start at the recipe's folder
    a.out.mkdir(parents=True, exist_ok=True)
    jobs = []
    for seed in a.seeds:
        for m in methods:
            out = a.out / f"{m}-s{seed}"
            args = ["rlhf", str(RECIPE), "-o", str(out)]
            for s in run_sets(m, seed, a.steps, a.rm_dirs):
                args += ["--set", s]
            jobs.append((f"{m}-s{seed}", args, a.out / f"{m}-s{seed}.log"))
    print(f"{len(jobs)} training runs, {a.jobs} at a time", flush=True)
    wall = run_pool(jobs, a.jobs)
    evals = []
    for seed in a.seeds:
        models = {m: a.out / f"{m}-s{seed}" / "final" for m in methods}
        path = eval_recipe(a.out, models, seed, a.eval_prompts, a.tag)
        name = f"eval-{a.tag}-s{seed}"
        evals.append((name, ["eval", str(path), "-o", str(a.out / name)], a.out / f"{name}.log"))
    wall.update(run_pool(evals, a.jobs))

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores (shared), {platform.system()}"
    rows = []
    for seed in a.seeds:
        ev = json.loads((a.out / f"eval-{a.tag}-s{seed}" / "summary.json").read_text())["models"]
        for m in ["base", *methods]:
            e = ev[m]
            row = {
                "date": datetime.date.today().isoformat(),
                "commit": commit.strip(),
                "machine": machine,
                "method": m,
                "tag": a.tag,
                "seed": seed,
                "steps": a.steps,
                "gold_reward": e["reward"]["mean"],
                "kl": e.get("kl", {}).get("k1"),
                "distinct2": e["distinct"]["distinct-2"],
                "length": e["length"]["tokens"]["mean"],
            }
            if m != "base":
                s = json.loads((a.out / f"{m}-s{seed}" / "summary.json").read_text())
                f = s["final"]
                row.update(
                    wall_s=round(wall.get(f"{m}-s{seed}", s.get("wall_s") or 0.0), 1),
                    prompts_sampled=s["rlhf"].get("prompts_sampled"),
                    train_reward=f.get("reward/mean"),
                    train_kl=f.get("kl/mean"),
                )
            rows.append(row)
    a.results.parent.mkdir(parents=True, exist_ok=True)
    with open(a.results, "a") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")

    print_table(rows)
    print(f"\nrows appended to {a.results}")


if __name__ == "__main__":
    main()
