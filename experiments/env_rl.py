r"""RL in the bundled environments (docs/environments.md, "Measured"): success rate before and after RL on
guess-the-number and on the secret-number tool task, tool-call validity before and after, wall time, and one row
per RL algorithm on guess-the-number; 3 training seeds, each model played at 3 sampling seeds.

    python experiments/env_rl.py all --jobs 2           # sft, then every rl run followed by its evaluations, report
    python experiments/env_rl.py sft                    # the format SFT (one, shared; below), the secret SFT
    python experiments/env_rl.py rl --algorithms grpo   # only the before/after runs (guess and secret, grpo)
    python experiments/env_rl.py rl                     # + one run per algorithm on guess, per training seed
    python experiments/env_rl.py eval                   # every finished model at every sampling seed
    python experiments/env_rl.py report                 # the Markdown tables of docs/environments.md
    python experiments/env_rl.py all --smoke --jobs 1   # the whole pipeline in minutes on tiny settings, writing
                                                        # runs/env-rl-smoke/ only (never experiments/results/)

The models:

  sft          `prefcli sft recipes/tiny/sft-env-format.yaml --set train.seed=0`: kjv-base taught the bundled
               environments' format on random play. One SFT, shared by every RL run: the issue measures what RL
               changes, and a shared start isolates it (the spread over training seeds is then RL's alone, not the
               SFT's too), at a third of the SFT cost. The "before" row of guess is this model.
  sft_secret   `prefcli sft recipes/tiny/sft-env-secret.yaml` from the format SFT's final/: the tool task's second
               stage, which teaches the model to repeat the number the tool returned (the format SFT calls the
               tool, then answers at chance). The "before" row of secret, and the start of its RL runs.
  guess-ALGO   `prefcli rlhf recipes/quickstart/rlhf-env-guess.yaml` from the SFT's final/, seeds 0 1 2 (grpo,
               100 optimizer steps of one rollout of 8 games x 8 attempts each), and for the algorithm table the
               same recipe changed only by the --set overrides of ALGORITHMS (same steps, same rollouts: every
               algorithm makes one optimizer step per rollout of 64 episodes, so ppo's passes per rollout are set
               to 1, against its default 4)
  secret-grpo  `prefcli rlhf recipes/quickstart/rlhf-env-secret.yaml` from sft_secret's final/ (the tool task,
               the same algorithm, group size, steps and learning rate as guess)

Each model is evaluated by `prefcli eval` on --eval-episodes held-out episodes of its environment (seeds
env.eval_seed, ...: the same episodes for every model; the environment and generation settings copied from the RL
recipe) at each sampling seed (eval recipe `seed`; every model is reseeded, so a model scores the same alone or
beside others); the format SFT on both environments, sft_secret on secret. Read from the eval summary's
models.<name>.env: success_rate, env_reward, turns, tool_calls and tool_errors (per episode), sampling_s; tool-call
validity = 1 - tool_errors / tool_calls where tool_calls > 0.

Runs are started with `OMP_NUM_THREADS=1 nice -n 10`, at most --jobs at a time, in --runs; each saves a checkpoint
every --checkpoint-every steps, and a run folder left with checkpoints and no summary.json continues with --resume
(its row's wall_s then counts the last launch only, and says resumed). Every finished run appends one row to --out
(JSONL: date, commit, machine, wall_s, the figures); a row already in --out is skipped, and a run folder that
finished without its row (the launcher stopped) is recorded from its summary.json without running again: an
interrupted call continues where it stopped. A prefcli process left running by a stopped call holds its run folder
(a new launch on it exits 2, "in use"): let it finish, or stop it by its process id (it checkpoints on SIGTERM).

`report` prints, from --out: before/after per environment (mean ± sd over training seeds, each seed the mean over
the sampling seeds; the SFT has one training seed, so its ± is over sampling seeds), tool-call validity before and
after on secret, one row per algorithm on guess, and wall time per run (and per optimizer step, and per episode
step of the evaluation's sampling).

Cost on the shared 2-core CPU this project runs on (2026-12-07, experiments/results/env-rl.jsonl; load average
1 to 4.3 during the runs): a 100-step RL run on guess took 3 to 10 minutes (ppo, with its value head, 8 to 9), one
on secret under 3, the format SFT (324 steps) and the secret SFT (576 steps) under 3 each, an evaluation call 10 to
70 s. `all` with the defaults is 27 RL runs (3 seeds x (8 algorithms on guess + grpo on secret)) and 84
evaluations: 2 to 3 hours at --jobs 1; `all --algorithms grpo` (the before/after rows) is 6
runs, under an hour.
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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SFT_RECIPE = ROOT / "recipes" / "tiny" / "sft-env-format.yaml"
SECRET_SFT_RECIPE = ROOT / "recipes" / "tiny" / "sft-env-secret.yaml"  # second stage of the tool task
ENV_RECIPES = {
    "guess": ROOT / "recipes" / "quickstart" / "rlhf-env-guess.yaml",
    "secret": ROOT / "recipes" / "quickstart" / "rlhf-env-secret.yaml",
}
RESULTS = ROOT / "experiments" / "results" / "env-rl.jsonl"

# each algorithm as --set overrides of the guess recipe (grpo, kl_coef 0, one optimizer step per rollout)
ALGORITHMS: dict[str, list[str]] = {
    "grpo": [],
    "ppo": ["rlhf.algorithm=ppo", "rlhf.epochs_per_rollout=1"],  # value head + GAE; one pass, like the others
    "dapo": [  # token-mean loss with clip-higher, dynamic sampling, truncated episodes out of the loss
        "rlhf.grpo_loss=dapo",
        "rlhf.dynamic_sampling=true",
        "rlhf.mask_truncated_completions=true",
    ],
    "gspo": ["rlhf.policy_loss=gspo"],
    "cispo": ["rlhf.policy_loss=cispo"],
    "rloo": ["rlhf.algorithm=rloo"],
    "reinforce_pp": ["rlhf.algorithm=reinforce_pp"],
    # online_dpo's KL weight is rlhf.preference.beta (default 0.1); the recipe's kl_coef 0 is set back to the
    # schema default, which online_dpo requires (its update has no KL term to weigh)
    "online_dpo": ["rlhf.algorithm=online_dpo", "rlhf.kl_coef=0.05"],
}

# --smoke: the pipeline end to end in minutes, nothing learned. The SFT's 60 steps (about a minute) are what it
# takes kjv-base to answer with digits at all: online_dpo needs a group whose episodes score differently
SMOKE_SFT = ["train.max_steps=60", "train.eval_every_steps=30"]
SMOKE_RL = [
    "train.max_steps=2",
    "train.batch_size=8",
    "train.eval_every_steps=1",
    "rlhf.prompts_per_rollout=2",
    "rlhf.num_generations=4",
    "env.eval_episodes=8",
]


def commit() -> str:
    if os.environ.get("PREFCLI_COMMIT"):
        return os.environ["PREFCLI_COMMIT"]
    return subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()


def machine() -> str:
    return f"{platform.machine()} {os.cpu_count()} CPU cores ({platform.processor() or platform.system()}), shared"


def read_rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def row_key(r: dict) -> tuple:
    """What identifies a row: the stage, the environment, the model (sft or an algorithm), its training seed and,
    for an evaluation, the sampling seed."""
    return r["stage"], r.get("env"), r.get("model"), r["seed"], r.get("sample_seed")


# ---------------------------------------------------------------------------------------------- the runs


@dataclass
class Step:
    """One prefcli command of a job, and the row it appends once its run folder holds a completed summary."""

    key: tuple
    cmd: list[str]
    run: Path
    row: Callable[[dict, float | None, bool], dict]  # (summary, wall s of this launch or None, resumed) -> row
    needs: Path | None = None  # a file that must exist before the command can start (the model it reads)


@dataclass
class Job:
    name: str
    steps: list[Step] = field(default_factory=list)


def completed(run: Path) -> dict | None:
    f = run / "summary.json"
    if not f.exists():
        return None
    s = json.loads(f.read_text())
    return s if s.get("status") == "completed" else None


def resumable(run: Path) -> bool:
    return completed(run) is None and any((run / "checkpoints").glob("step-*"))


def prefcli(command: str, recipe: Path, run: Path, sets: list[str], resume: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "prefcli", command, str(recipe), "-o", str(run), "-q"]
    cmd.append("--resume" if resume else "--overwrite")
    for s in sets:
        cmd += ["--set", s]
    return cmd


def resumed_step(summary: dict) -> int:
    """The step a resumed run continued from (0 when it started afresh): its last launch ran the steps after it."""
    src = summary.get("resumed_from") or ""
    tail = Path(str(src)).name
    return int(tail.split("-")[1]) if tail.startswith("step-") and tail.split("-")[1].isdigit() else 0


def stamp(row: dict, wall: float | None, summary: dict, resumed: bool) -> dict:
    w = summary.get("wall_s") if wall is None else wall
    return {
        **row,
        "date": datetime.date.today().isoformat(),
        "commit": commit(),
        "machine": machine(),
        "wall_s": None if w is None else round(w, 1),
        "resumed": resumed or bool(summary.get("resumed_from")),
        "load_avg_1m": round(os.getloadavg()[0], 1),
    }


def sft_step(a, model: str = "sft") -> Step:
    """The format SFT ("sft", from kjv-base) or the tool task's second stage ("sft_secret", from the format SFT)."""
    run = a.runs / f"{model.replace('_', '-')}-s{a.sft_seed}"
    sets = [f"train.seed={a.sft_seed}", f"train.save_every_steps={a.checkpoint_every}", *a.sft_set]
    recipe, needs = SFT_RECIPE, None
    if model == "sft_secret":
        recipe, needs = SECRET_SFT_RECIPE, sft_model(a) / "config.json"
        sets.insert(0, f"model.path={sft_model(a)}")

    def row(s: dict, wall: float | None, resumed: bool) -> dict:
        f = s.get("final", {})
        return stamp(
            {"stage": "sft", "model": model, "seed": a.sft_seed, "steps": s.get("steps"),
             "train_wall_s": s.get("wall_s"), "eval_loss": f.get("eval/loss"), "overrides": sets},
            wall, s, resumed,
        )  # fmt: skip

    cmd = prefcli("sft", recipe, run, sets, resumable(run))
    return Step(("sft", None, model, a.sft_seed, None), cmd, run, row, needs=needs)


def sft_model(a, model: str = "sft") -> Path:
    return a.runs / f"{model.replace('_', '-')}-s{a.sft_seed}" / "final"


def start_model(a, env: str) -> Path:
    """Where an environment's RL runs start: the tool task from its second SFT stage, guess from the format SFT."""
    return sft_model(a, "sft_secret" if env == "secret" else "sft")


def rl_step(a, env: str, algo: str, seed: int) -> Step:
    run = a.runs / f"{env}-{algo}-s{seed}"
    sets = [
        f"model.path={start_model(a, env)}",
        f"train.seed={seed}",
        f"train.save_every_steps={a.checkpoint_every}",
        *ALGORITHMS[algo],
        *a.rl_set,
    ]

    def row(s: dict, wall: float | None, resumed: bool) -> dict:
        f = s.get("final", {})
        steps = s.get("steps") or 0
        ran = steps - resumed_step(s)
        rl = s.get("rlhf", {})
        return stamp(
            {
                "stage": "rl", "env": env, "model": algo, "seed": seed, "sft_seed": a.sft_seed, "steps": steps,
                "train_wall_s": s.get("wall_s"),
                "s_per_step": round(s["wall_s"] / ran, 2) if s.get("wall_s") and ran > 0 else None,
                "rollouts": rl.get("rollouts"), "prompts_sampled": rl.get("prompts_sampled"),
                "final": {k: v for k, v in f.items() if k.startswith(("env/", "eval/", "reward/"))},
                "overrides": sets,
            },
            wall, s, resumed,
        )  # fmt: skip

    cmd = prefcli("rlhf", ENV_RECIPES[env], run, sets, resumable(run))
    return Step(("rl", env, algo, seed, None), cmd, run, row, needs=start_model(a, env) / "config.json")


def eval_recipe(a, env: str, name: str, model: Path, sample_seed: int, folder: Path) -> Path:
    """An eval recipe that plays the RL recipe's environment (its env and generation settings) with one model."""
    rl = yaml.safe_load(ENV_RECIPES[env].read_text())
    g = rl["generation"]
    r = {
        "command": "eval",
        "models": [{"name": name, "path": str(model)}],
        "env": {**rl["env"], "eval_episodes": a.eval_episodes},
        "generation": {"max_new_tokens": g["max_new_tokens"], "temperature": g.get("temperature", 1.0),
                       "batch_size": 64, **({"stop": g["stop_strings"]} if g.get("stop_strings") else {})},
        "metrics": ["env"],
        "seed": sample_seed,
        "output": {"dir": str(folder)},
    }  # fmt: skip
    path = a.runs / "eval-recipes" / f"{folder.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(r, sort_keys=False))
    return path


def validity(calls: float | None, errors: float | None) -> float | None:
    """The fraction of attempted tool calls that ran; None where no call was attempted."""
    return 1.0 - errors / calls if calls else None


def eval_step(a, env: str, model: str, seed: int, path: Path, sample_seed: int) -> Step:
    run = a.runs / f"eval-{env}-{model}-s{seed}-e{sample_seed}"
    recipe = eval_recipe(a, env, model, path, sample_seed, run)

    def row(s: dict, wall: float | None, resumed: bool) -> dict:
        e = s["models"][model]["env"]
        steps = e["episodes"] * e["turns"]
        return stamp(
            {
                "stage": "eval", "env": env, "model": model, "seed": seed, "sample_seed": sample_seed,
                "episodes": e["episodes"], "success_rate": e["success_rate"], "env_reward": e["env_reward"],
                "turns": e["turns"], "tool_calls": e["tool_calls"], "tool_errors": e["tool_errors"],
                "tool_call_validity": validity(e["tool_calls"], e["tool_errors"]),
                "truncated": e.get("truncated"), "env_errors": e.get("env_errors"),
                "sampling_s": e.get("sampling_s"),
                "ms_per_episode_step": round(1000 * e["sampling_s"] / steps, 2) if steps and e.get("sampling_s") else None,
                "model_path": str(path),
            },
            wall, s, resumed,
        )  # fmt: skip

    cmd = prefcli("eval", recipe, run, a.eval_set)
    return Step(("eval", env, model, seed, sample_seed), cmd, run, row, needs=path / "config.json")


def eval_steps(a, env: str, model: str, seed: int, path: Path) -> list[Step]:
    return [eval_step(a, env, model, seed, path, e) for e in a.sample_seeds]


def rl_runs(a) -> list[tuple[str, str, int]]:
    """(env, algorithm, seed): the before/after runs first (grpo on each environment, seed-major, so a partial call
    has every environment of its first seeds), then the other algorithms on guess."""
    out = [(env, "grpo", s) for s in a.seeds for env in a.envs if "grpo" in a.algorithms or env != "guess"]
    if "guess" in a.envs:
        out += [("guess", m, s) for s in a.seeds for m in a.algorithms if m != "grpo"]
    return out


def jobs_for(a, stage: str) -> list[Job]:
    sft_evals = Job("eval-sft", [x for env in a.envs for x in eval_steps(a, env, "sft", a.sft_seed, sft_model(a))])
    if "secret" in a.envs:
        sft_evals.steps += eval_steps(a, "secret", "sft_secret", a.sft_seed, sft_model(a, "sft_secret"))
    if stage == "sft":
        return [Job("sft", [sft_step(a), *([sft_step(a, "sft_secret")] if "secret" in a.envs else [])])]
    if stage == "rl":
        return [Job(f"{env}-{m}-s{s}", [rl_step(a, env, m, s)]) for env, m, s in rl_runs(a)]
    if stage == "eval":
        return [sft_evals] + [
            Job(f"eval-{env}-{m}-s{s}", eval_steps(a, env, m, s, a.runs / f"{env}-{m}-s{s}" / "final"))
            for env, m, s in rl_runs(a)
        ]
    # all: each rl run followed by its evaluations (the sft first, alone)
    return [sft_evals] + [
        Job(f"{env}-{m}-s{s}", [rl_step(a, env, m, s), *eval_steps(a, env, m, s, a.runs / f"{env}-{m}-s{s}" / "final")])
        for env, m, s in rl_runs(a)
    ]


def run_jobs(a, jobs: list[Job]) -> int:
    """Run the jobs --jobs at a time, each one's steps in order; append each finished step's row. A step whose row
    is in --out is skipped; one whose run folder finished without its row is recorded from its summary. A job
    whose next step needs a model that is not there (its training failed or has not run) is left out. Returns
    the number of failed steps."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    a.logs.mkdir(parents=True, exist_ok=True)
    have = {row_key(r) for r in read_rows(a.out)}
    todo, running, failed = [(j.name, list(j.steps)) for j in jobs], [], 0

    def append(row: dict) -> None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        with open(a.out, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        have.add(row_key(row))

    def advance(name: str, steps: list[Step]):
        """Skip or record what is done; start the next step. Returns a running entry, or None."""
        while steps:
            st = steps[0]
            if st.key in have:
                steps.pop(0)
                continue
            s = completed(st.run)
            if s is not None:
                append(st.row(s, None, False))
                print(f"  recorded {st.run.name} (finished before)", flush=True)
                steps.pop(0)
                continue
            if st.needs is not None and not st.needs.exists():
                print(f"  skipped {name}: {st.needs.parent} is not there yet", flush=True)
                return None
            resumed = "--resume" in st.cmd
            log = a.logs / f"{st.run.name}.log"
            fh = open(log, "a")
            p = subprocess.Popen(["nice", "-n", "10", *st.cmd], stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
            print(f"  start {st.run.name}{' (resumed)' if resumed else ''}", flush=True)
            return p, fh, name, steps, time.time(), resumed
        return None

    while todo or running:
        while todo and len(running) < a.jobs:
            name, steps = todo.pop(0)
            entry = advance(name, steps)
            if entry is not None:
                running.append(entry)
        time.sleep(a.poll)
        for entry in list(running):
            p, fh, name, steps, t0, resumed = entry
            if p.poll() is None:
                continue
            running.remove(entry)
            fh.close()
            st = steps[0]
            s = completed(st.run)
            if p.returncode != 0 or s is None:
                failed += 1
                print(f"  FAILED {st.run.name} (exit {p.returncode}; {a.logs / (st.run.name + '.log')})", flush=True)
                continue
            wall = time.time() - t0
            append(st.row(s, wall, resumed))
            print(f"  done {st.run.name} in {wall:.0f} s", flush=True)
            steps.pop(0)
            nxt = advance(name, steps)
            if nxt is not None:
                running.append(nxt)
    return failed


# ------------------------------------------------------------------------------------------------ report


def mean_sd(vals: list[float]) -> tuple[float, float] | None:
    vals = [v for v in vals if v is not None]
    if not vals:
        return None
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def aggregate(rows: list[dict], env: str, model: str, key: str) -> dict | None:
    """One figure of a model's evaluations in an environment: the mean over sampling seeds per training seed, then
    the mean and standard deviation over training seeds. With one training seed, the sd is over sampling seeds.
    Returns {mean, sd, over, train_seeds, sample_seeds} or None without values."""
    per: dict[int, list[float]] = {}
    for r in rows:
        if r["stage"] == "eval" and r["env"] == env and r["model"] == model and r.get(key) is not None:
            per.setdefault(r["seed"], []).append(r[key])
    if not per:
        return None
    samples = max(len(v) for v in per.values())
    if len(per) == 1:
        m, sd = mean_sd(next(iter(per.values())))
        over = "sampling"
    else:
        m, sd = mean_sd([statistics.fmean(v) for v in per.values()])
        over = "training"
    return {"mean": m, "sd": sd, "over": over, "train_seeds": len(per), "sample_seeds": samples}


def fmt(x: dict | None, digits: int = 3) -> str:
    if x is None:
        return "-"
    return f"{x['mean']:.{digits}f} ± {x['sd']:.{digits}f}"


def seeds_cell(x: dict | None) -> str:
    return "-" if x is None else f"{x['train_seeds']} × {x['sample_seeds']}"


def delta(after: dict | None, before: dict | None) -> str:
    return "-" if after is None or before is None else f"{after['mean'] - before['mean']:+.3f}"


# each environment's models in the before/after table; the first with "(before)" is what "change" is against
BEFORE_AFTER = {
    "guess": (("sft", "format SFT (before)"), ("grpo", "grpo (after)")),
    "secret": (("sft", "format SFT"), ("sft_secret", "secret SFT (before)"), ("grpo", "grpo (after)")),
}


def report_lines(rows: list[dict]) -> list[str]:
    """The Markdown tables (a list of lines) of docs/environments.md from the rows of --out."""
    out: list[str] = []
    envs = [e for e in ENV_RECIPES if any(r.get("env") == e and r["stage"] == "eval" for r in rows)]
    out += [
        "**Before and after RL** (grpo; `prefcli eval` on the held-out episodes; ± is the sd over training seeds,",
        "each the mean over the sampling seeds; an SFT is one model, its ± over sampling seeds):",
        "",
        "| environment | model | seeds (training × sampling) | success rate | change | env reward | turns "
        "| tool calls / episode | tool-call validity |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for env in envs:
        first = next(m for m, label in BEFORE_AFTER[env] if label.endswith("(before)"))
        before = aggregate(rows, env, first, "success_rate")
        for model, label in BEFORE_AFTER[env]:
            sr = aggregate(rows, env, model, "success_rate")
            if sr is None:
                continue
            cells = [
                seeds_cell(sr), fmt(sr), delta(sr, before) if model not in ("sft", "sft_secret") else "",
                fmt(aggregate(rows, env, model, "env_reward")), fmt(aggregate(rows, env, model, "turns"), 2),
                fmt(aggregate(rows, env, model, "tool_calls"), 2), fmt(aggregate(rows, env, model, "tool_call_validity")),
            ]  # fmt: skip
            out.append(f"| {env} | {label} | " + " | ".join(cells) + " |")
    if "secret" in envs:
        out += [
            "",
            "**Tool-call validity** on secret (1 - tool errors / tool calls, over the episodes with a call):",
            "",
            "| model | tool calls / episode | tool errors / episode | tool-call validity | success rate |",
            "|---|---|---|---|---|",
        ]
        for model, label in BEFORE_AFTER["secret"]:
            v = aggregate(rows, "secret", model, "tool_call_validity")
            calls = aggregate(rows, "secret", model, "tool_calls")
            if calls is None:
                continue
            cells = [fmt(calls, 2), fmt(aggregate(rows, "secret", model, "tool_errors"), 2), fmt(v),
                     fmt(aggregate(rows, "secret", model, "success_rate"))]  # fmt: skip
            out.append(f"| {label} | " + " | ".join(cells) + " |")
    algos = [m for m in ALGORITHMS if aggregate(rows, "guess", m, "success_rate") is not None]
    if algos:
        before = aggregate(rows, "guess", "sft", "success_rate")
        out += [
            "",
            "**One row per algorithm** on guess-the-number (the same recipe, steps and rollouts; ± over training seeds):",
            "",
            "| algorithm | seeds (training × sampling) | success rate | change vs SFT | turns | s per optimizer step "
            "| prompts sampled |",
            "|---|---|---|---|---|---|---|",
        ]
        if before is not None:
            out.append(f"| format SFT (before) | {seeds_cell(before)} | {fmt(before)} | | "
                       f"{fmt(aggregate(rows, 'guess', 'sft', 'turns'), 2)} | | |")  # fmt: skip
        for m in algos:
            sr = aggregate(rows, "guess", m, "success_rate")
            train = [r for r in rows if r["stage"] == "rl" and r["env"] == "guess" and r["model"] == m]
            step = mean_sd([r.get("s_per_step") for r in train])
            sampled = mean_sd([r.get("prompts_sampled") for r in train])
            cells = [seeds_cell(sr), fmt(sr), delta(sr, before), fmt(aggregate(rows, "guess", m, "turns"), 2),
                     "-" if step is None else f"{step[0]:.1f} ± {step[1]:.1f}",
                     "-" if sampled is None else f"{sampled[0]:.0f}"]  # fmt: skip
            out.append(f"| {m} | " + " | ".join(cells) + " |")
    out += wall_lines(rows)
    return out


def wall_lines(rows: list[dict]) -> list[str]:
    """Wall time per run (this machine, mean ± sd over runs), per optimizer step, and per episode step of the
    evaluation's sampling."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["stage"], r.get("env"), r["model"]), []).append(r)
    if not groups:
        return []
    out = [
        "",
        "**Wall time** (the shared 2-core CPU, mean ± sd over runs; a resumed run counts its last launch only):",
        "",
        "| stage | environment | model | runs | steps | wall s per run | s per optimizer step | ms per episode step |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def ms(vals):
        x = mean_sd(vals)
        return "-" if x is None else f"{x[0]:.1f} ± {x[1]:.1f}"

    order = {"sft": 0, "rl": 1, "eval": 2}
    models = ["sft", "sft_secret", *ALGORITHMS]

    def place(kv):
        (stage, env, model), _ = kv
        return order[stage], list(ENV_RECIPES).index(env) if env in ENV_RECIPES else -1, models.index(model)

    for (stage, env, model), rs in sorted(groups.items(), key=place):
        steps = {r.get("steps") for r in rs} - {None}
        cells = [stage, env or "", model, str(len(rs)), ",".join(str(s) for s in sorted(steps)) or "",
                 ms([r.get("wall_s") for r in rs]), ms([r.get("s_per_step") for r in rs]),
                 ms([r.get("ms_per_episode_step") for r in rs])]  # fmt: skip
        out.append("| " + " | ".join(cells) + " |")
    dates = sorted({r["date"] for r in rows})
    commits = sorted({r["commit"] for r in rows})
    out += ["", f"Rows: {len(rows)}, {dates[0]} to {dates[-1]}, commits {', '.join(commits)}; {rows[0]['machine']}."]
    return out


# -------------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["sft", "rl", "eval", "report", "all"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds of the RL runs")
    ap.add_argument("--sample-seeds", nargs="+", type=int, default=[0, 1, 2], help="sampling seeds of each eval")
    ap.add_argument("--sft-seed", type=int, default=0, help="the training seed of the one, shared, format SFT")
    ap.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=list(ALGORITHMS),
                    help="the algorithms run on guess (grpo is also the before/after run of each environment)")  # fmt: skip
    ap.add_argument("--envs", nargs="+", default=list(ENV_RECIPES), choices=list(ENV_RECIPES))
    ap.add_argument("--eval-episodes", type=int, default=256, help="held-out episodes per evaluation")
    ap.add_argument("--jobs", type=int, default=2, help="prefcli processes at a time (each on one torch thread)")
    ap.add_argument("--checkpoint-every", type=int, default=10, help="train.save_every_steps of every run")
    ap.add_argument("--set", dest="rl_set", action="append", default=[], help="a recipe override of every RL run")
    ap.add_argument("--sft-set", action="append", default=[], help="a recipe override of the SFT")
    ap.add_argument("--eval-set", action="append", default=[], help="an override of every eval recipe")
    ap.add_argument(
        "--smoke", action="store_true",
        help="tiny settings (60-step SFTs, 2 RL steps on rollouts of 2 x 4, 8 evaluation episodes) in runs/env-rl-smoke: the pipeline, "
        "not a measurement; its rows never go to experiments/results/",
    )  # fmt: skip
    ap.add_argument("--runs", type=Path, default=None, help="run folders (default runs/env-rl)")
    ap.add_argument("--out", type=Path, default=None, help=f"the rows (default {RESULTS.relative_to(ROOT)})")
    ap.add_argument("--logs", type=Path, default=None, help="logs (default RUNS/logs)")
    ap.add_argument("--poll", type=float, default=5.0, help="seconds between looks at the running processes")
    a = ap.parse_args()
    if a.smoke:
        a.runs = a.runs or ROOT / "runs" / "env-rl-smoke"
        a.out = a.out or a.runs / "env-rl.jsonl"
        if a.out.resolve() == RESULTS.resolve():
            ap.error(f"--smoke writes no rows to {RESULTS}: give another --out")
        a.sft_set = SMOKE_SFT + a.sft_set
        a.rl_set = SMOKE_RL + a.rl_set
        if a.eval_episodes == ap.get_default("eval_episodes"):
            a.eval_episodes = 8
        a.checkpoint_every = min(a.checkpoint_every, 1)
    a.runs = (a.runs or ROOT / "runs" / "env-rl").resolve()  # absolute: written into the eval recipes
    a.out = (a.out or RESULTS).resolve()
    a.logs = (a.logs or a.runs / "logs").resolve()
    if a.stage == "report":
        print("\n".join(report_lines(read_rows(a.out))))
        return
    a.runs.mkdir(parents=True, exist_ok=True)
    failed = 0
    if a.stage in ("sft", "all"):
        failed += run_jobs(a, jobs_for(a, "sft"))
    if a.stage != "sft":
        jobs = jobs_for(a, a.stage)
        print(f"{sum(len(j.steps) for j in jobs)} commands in {len(jobs)} jobs, {a.jobs} at a time", flush=True)
        failed += run_jobs(a, jobs)
    if a.stage == "all":
        print("\n".join(report_lines(read_rows(a.out))))
    if failed:
        raise SystemExit(f"{failed} command(s) failed; see {a.logs}")


if __name__ == "__main__":
    main()
