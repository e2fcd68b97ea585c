r"""RL algorithms side by side on the quickstart task, and PPO on one reward model against PPO on an ensemble.

    python experiments/rl_comparison.py --jobs 2 --tag algos400 --out runs/rl-compare-400   # the methods table
    python experiments/rl_comparison.py --methods ppo_rm ppo_ens --jobs 2 --tag ensemble \
        --rm-dirs runs/rl-compare/rm-s0/final runs/rl-compare/rm-s1/final runs/rl-compare/rm-s2/final
    python experiments/rl_comparison.py --sweep ppo:0.02 ppo:0.01 grpo:0.5 grpo:0.2 grpo:0.1 dapo:0.2 dapo:0.1 \
        gspo:0 online_dpo:1 online_dpo:0.5 --jobs 1 --tag frontier --out runs/rl-frontier   # the KL sweep
    python experiments/rl_comparison.py --boot-rms 3 --methods ppo_ens --jobs 1 --tag ensemble_boot \
        --out runs/rl-boot                               # PPO on an ensemble of reward models on bootstrap data
    python experiments/rl_comparison.py --frontier      # the matched-KL tables and docs/img/rl-frontier.png

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

The KL control of a method (--sweep METHOD:VALUE) is rlhf.kl_coef (default 0.05), or rlhf.preference.beta
for online_dpo (default 0.1), whose update has no KL term; each row records it (kl_knob, kl_value).

Each run trains without held-out evaluation; then `prefcli eval` scores its final model on the 200 held-out
prompts (one completion each, sampled with the run's seed): gold reward = VADER, KL to the base (k1 per
completion), distinct-2, length; the base is scored once per seed the same way (every model is sampled
from the same seed, so a model scores the same alone or beside others). One row per run (with the eval
metrics and wall time) is appended to experiments/results/rl-comparison.jsonl as soon as its evaluation
ends, and a run whose row is there already is skipped: an interrupted call continues where it stopped.

The reward models: `prefcli reward recipes/quickstart/reward.yaml --set train.seed=S` (shortened with
--set train.max_steps=N when the machine is slow); pass their final/ folders with --rm-dirs. --boot-rms K
trains K of them instead, member k with seed k on a bootstrap resample (seed k, with replacement, as many
pairs as the file has) of data/quickstart/preferences.jsonl, and uses them as --rm-dirs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
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


KL_KNOB = {"online_dpo": ("rlhf.preference.beta", 0.1)}  # every other method: ("rlhf.kl_coef", 0.05)


def kl_knob(method: str) -> tuple[str, float]:
    """The recipe field that sets how far the method may move from the base, and the recipe's value."""
    return KL_KNOB.get(method, ("rlhf.kl_coef", 0.05))


def run_sets(method: str, seed: int, steps: int, rm_dirs: list[str], kl_value: float | None = None) -> list[str]:
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
    if kl_value is not None:
        sets.append(f"{kl_knob(method)[0]}={kl_value:g}")
    return sets


def launch(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = ["nice", "-n", "15", sys.executable, "-m", "prefcli", *args, "-q", "--overwrite"]
    return subprocess.Popen(cmd, stdout=open(log, "a"), stderr=subprocess.STDOUT, cwd=ROOT, env=env)


def completed(out: Path) -> bool:
    done = out / "summary.json"
    return done.exists() and json.loads(done.read_text()).get("status") == "completed"


def run_pool(jobs: list[tuple[str, list[list[str]], Path]], width: int, on_done=None) -> dict[str, float]:
    """Run jobs `width` at a time. A job is (name, its prefcli commands, log): the commands run one after
    the other, each skipped when its -o folder holds a completed summary; the job stops at a failed one.
    on_done(name, wall seconds or None when nothing ran) is called when all of a job's commands have succeeded. Returns each job's wall seconds."""
    todo, running, wall = list(jobs), {}, {}

    def start_next(name, cmds, log):
        while cmds and completed(Path(cmds[0][cmds[0].index("-o") + 1])):
            cmds = cmds[1:]
        if not cmds:
            return None
        return launch(cmds[0], log), cmds[1:]

    while todo or running:
        while todo and len(running) < width:
            name, cmds, log = todo.pop(0)
            started = start_next(name, cmds, log)
            if started is None:
                wall[name] = 0.0
                if on_done:
                    on_done(name, None)
                continue
            running[name] = (*started, time.perf_counter(), log)
            print(f"  start {name}", flush=True)
        for name, (p, rest, t0, log) in list(running.items()):
            if p.poll() is None:
                continue
            if p.returncode != 0:
                del running[name]
                print(f"  FAILED {name} ({log})", flush=True)
                continue
            started = start_next(name, rest, log)
            if started is not None:
                running[name] = (*started, t0, log)
                continue
            del running[name]
            wall[name] = time.perf_counter() - t0
            print(f"  done {name} in {wall[name]:.0f} s", flush=True)
            if on_done:
                on_done(name, wall[name])
        time.sleep(2)
    return wall


def eval_recipe(out: Path, models: dict[str, Path], seed: int, prompts: int, name: str) -> Path:
    r = {
        "command": "eval",
        "models": [{"name": n, "path": str(p)} for n, p in models.items()],
        "reference": {"name": "reference", "path": str(BASE)},
        "data": {"prompts": {"path": str(ROOT / "data" / "quickstart" / "prompts_eval.jsonl"), "max_rows": prompts}},
        "metrics": ["reward", "kl", "distinct", "length"],
        "generation": {"max_new_tokens": 24, "temperature": 1.0, "batch_size": 40},
        "rewards": [{"kind": "sentiment"}],
        "seed": seed,
        "output": {"dir": str(out / name)},
    }
    path = out / f"{name}.yaml"
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


def bootstrap_rms(out: Path, k: int, width: int) -> list[str]:
    """K reward models, member i trained with seed i on a bootstrap resample (seed i) of the quickstart pairs:
    members that disagree where their data differ (the same pairs under other seeds share one blind spot)."""
    pairs = (ROOT / "data" / "quickstart" / "preferences.jsonl").read_text().splitlines()
    jobs, dirs = [], []
    for i in range(k):
        data = out / f"preferences-boot{i}.jsonl"
        rng = random.Random(i)
        data.write_text("".join(pairs[rng.randrange(len(pairs))] + "\n" for _ in pairs))
        rm = out / f"rm-boot{i}"
        sets = [f"train.seed={i}", f"data.train.path={data}"]
        jobs.append((f"rm-boot{i}", [["reward", str(ROOT / "recipes" / "quickstart" / "reward.yaml"), "-o", str(rm),
                                      *[x for s in sets for x in ("--set", s)]]], out / f"rm-boot{i}.log"))  # fmt: skip
        dirs.append(str(rm / "final"))
    run_pool(jobs, width)
    for d in dirs:
        acc = json.loads((Path(d).parent / "summary.json").read_text())["final"].get("eval/accuracy")
        print(f"  {d}: held-out pair accuracy {acc}", flush=True)
    return dirs


def read_rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def row_key(r: dict) -> tuple:
    """What identifies a row: a row without kl_value (the first tables) ran at the recipe's KL control."""
    v = r.get("kl_value")
    if v is None and r["method"] != "base":
        v = kl_knob(r["method"])[1]
    return r["tag"], r["method"], v, r["seed"], r["steps"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument(
        "--steps", type=int, default=400, help="optimizer steps per run (4 per rollout of 32; the recipe's 400)"
    )
    ap.add_argument("--methods", nargs="*", default=list(METHODS), help="none: only train the --boot-rms")
    ap.add_argument(
        "--sweep", nargs="+", default=None, metavar="METHOD:VALUE",
        help="runs at another KL control (rlhf.kl_coef, or rlhf.preference.beta for online_dpo) instead of --methods",
    )  # fmt: skip
    ap.add_argument("--rm-dirs", nargs="*", default=[], help="the reward models' final/ folders (ppo_rm, ppo_ens)")
    ap.add_argument("--boot-rms", type=int, default=0, help="train K reward models on bootstrap data as --rm-dirs")
    ap.add_argument("--order", choices=["seed", "setting"], default="seed", help="which runs go first")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (each on one torch thread)")
    ap.add_argument("--eval-prompts", type=int, default=200)
    ap.add_argument("--tag", default="algos", help="names this call's rows (tag) and evaluation folders")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "rl-compare")
    ap.add_argument("--results", type=Path, default=ROOT / "experiments" / "results" / "rl-comparison.jsonl")
    ap.add_argument("--report", action="store_true", help="train nothing: the table of the rows of --tag in --results")
    ap.add_argument(
        "--frontier", action="store_true",
        help="train nothing: gold reward at matched KL from the rows of --frontier-tags, and the figure --figure",
    )  # fmt: skip
    ap.add_argument("--frontier-tags", nargs="+", default=["algos400", "frontier", "ensemble", "ensemble_boot"])
    ap.add_argument("--figure", type=Path, default=ROOT / "docs" / "img" / "rl-frontier.png")
    a = ap.parse_args()
    if a.report:
        print_table([r for r in read_rows(a.results) if r.get("tag") == a.tag])
        return
    if a.frontier:
        from rl_frontier import report

        report(read_rows(a.results), a.frontier_tags, a.figure)
        return
    a.out = a.out.resolve()  # written into the eval recipes, whose relative paths start at the recipe's folder
    a.out.mkdir(parents=True, exist_ok=True)
    if a.boot_rms:
        a.rm_dirs = bootstrap_rms(a.out, a.boot_rms, a.jobs)
        if not a.methods and not a.sweep:
            return
    if a.sweep:
        runs = [(m, float(v)) for m, v in (x.split(":") for x in a.sweep)]
        unknown = [m for m, _ in runs if m not in METHODS]
        if unknown:
            ap.error(f"--sweep: unknown method(s) {unknown}; choose from {list(METHODS)}")
    else:
        runs = [(m, None) for m in a.methods if not m.startswith("ppo_") or a.rm_dirs]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores (shared), {platform.system()}"
    have = {row_key(r) for r in read_rows(a.results)}
    new_rows: list[dict] = []

    def append(row: dict) -> None:
        row = {"date": datetime.date.today().isoformat(), "commit": commit.strip(), "machine": machine,
               "tag": a.tag, "steps": a.steps, **row}  # fmt: skip
        a.results.parent.mkdir(parents=True, exist_ok=True)
        with open(a.results, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        new_rows.append(row)

    def eval_metrics(folder: Path, model: str) -> dict:
        e = json.loads((folder / "summary.json").read_text())["models"][model]
        return {
            "gold_reward": e["reward"]["mean"],
            "kl": e.get("kl", {}).get("k1"),
            "distinct2": e["distinct"]["distinct-2"],
            "length": e["length"]["tokens"]["mean"],
        }

    jobs, meta = [], {}
    for seed in a.seeds:  # the base, once per seed and tag: the check that the evaluation is unchanged
        if (a.tag, "base", None, seed, a.steps) in have:
            continue
        name = f"eval-{a.tag}-base-s{seed}"
        path = eval_recipe(a.out, {"base": BASE}, seed, a.eval_prompts, name)
        jobs.append((name, [["eval", str(path), "-o", str(a.out / name)]], a.out / f"{name}.log"))
        meta[name] = ("base", None, seed, a.out / name)
    order = [(seed, m, v) for seed in a.seeds for m, v in runs]  # seed-major: a partial call covers every method
    if a.order == "setting":  # setting-major: a partial call has every seed of its first settings
        order = [(seed, m, v) for m, v in runs for seed in a.seeds]
    for seed, m, v in order:
        knob, default = kl_knob(m)
        value = default if v is None else v
        if (a.tag, m, value, seed, a.steps) in have:
            continue
        name = f"{m}-s{seed}" if v is None else f"{m}-k{v:g}-s{seed}"
        out = a.out / name
        train = ["rlhf", str(RECIPE), "-o", str(out)]
        for s in run_sets(m, seed, a.steps, a.rm_dirs, v):
            train += ["--set", s]
        path = eval_recipe(a.out, {m: out / "final"}, seed, a.eval_prompts, f"eval-{name}")
        jobs.append((name, [train, ["eval", str(path), "-o", str(a.out / f"eval-{name}")]], a.out / f"{name}.log"))
        meta[name] = (m, (knob, value), seed, a.out / f"eval-{name}")
    print(f"{len(jobs)} jobs (training + evaluation), {a.jobs} at a time", flush=True)

    def on_done(name: str, wall: float | None) -> None:
        m, kl, seed, ev = meta[name]
        row = {"method": m, "seed": seed, **eval_metrics(ev, m)}
        if m != "base":
            run = ev.parent / name
            s = json.loads((run / "summary.json").read_text())
            f = s["final"]
            row.update(
                kl_knob=kl[0],
                kl_value=kl[1],
                wall_s=round(wall or 0.0, 1),  # training + evaluation, this call
                train_wall_s=s.get("wall_s"),
                prompts_sampled=s["rlhf"].get("prompts_sampled"),
                train_reward=f.get("reward/mean"),
                train_kl=f.get("kl/mean"),
                load_avg_1m=round(os.getloadavg()[0], 1),
            )
            if m.startswith("ppo_"):
                row["rm_dirs"] = a.rm_dirs
        append(row)

    run_pool(jobs, a.jobs, on_done)
    if new_rows:
        print_table(new_rows)
        print(f"\n{len(new_rows)} rows appended to {a.results}")


if __name__ == "__main__":
    main()
