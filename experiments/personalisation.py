"""Personalised reward models and policies on the bundled multi-rater task (data/multirater/), 3 seeds.

    python experiments/personalisation.py rewards                 # pooled, user_embedding, latent, lowrank x seeds
    python experiments/personalisation.py rewards --kinds latent --seeds 0
    python experiments/personalisation.py policies                # DPO pooled vs per rater, each rater's taste
    python experiments/personalisation.py report                  # the tables of docs/personalisation.md
    python experiments/personalisation.py collect                 # record finished runs whose launcher stopped

Each run is `prefcli reward recipes/quickstart/personal/reward-<kind>.yaml --set train.seed=S` in
runs/personalisation/reward-<kind>-s<S>/, started with `OMP_NUM_THREADS=1 nice -n 10`, at most --jobs at a
time, with a checkpoint every 100 steps: a run folder left without its summary.json continues with --resume
(its row's wall_s then counts the last launch only). Every finished run appends one row to --out (JSONL: date, commit, machine, the run's held-out figures);
a (stage, kind, seed) already in --out is skipped, so the script resumes where it stopped. `report` reads
--out and prints, per kind, mean ± standard deviation over seeds of: held-out accuracy over the seen users,
the worst seen user, each taste (the mean over its seen raters), the shared part alone, and the new-user curve
(accuracy of the 3 raters who appear only in the held-out file, given k of their labels), with the gap between
a new user at 20 labels and the seen users of the same taste.
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

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes" / "quickstart" / "personal"
KINDS = ("pooled", "user_embedding", "user_embedding_dim8", "latent", "lowrank", "latent_warm", "ceiling")
# latent_warm: the latent kind started from the `ceiling` reward model (below) instead of the base model, one
# epoch: a shared model that already encodes sentiment, as VPL's pretrained embeddings would; ceiling: a pooled
# reward model of the positive raters' rows alone (one taste, nobody to disagree with), seed 0 only: the most this
# base model reaches on a sentiment taste in this budget
TASTES = ("positive", "negative", "brief")
SEEN = [f"{t}-{i}" for t in TASTES for i in (1, 2, 3)]
NEW = [f"{t}-4" for t in TASTES]
LABELS = (0, 5, 10, 20, 50)


def commit() -> str:
    """The commit the runs' code is at: PREFCLI_COMMIT when the script runs from an exported copy of the tree (no
    .git), else git's."""
    if os.environ.get("PREFCLI_COMMIT"):
        return os.environ["PREFCLI_COMMIT"]
    return subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()


def machine() -> str:
    return f"{platform.machine()} {os.cpu_count()} CPU cores ({platform.processor() or platform.system()}), shared"


def done(out: Path) -> set[tuple]:
    if not out.exists():
        return set()
    return {(r["stage"], r["kind"], r["seed"]) for r in map(json.loads, out.read_text().splitlines()) if r}


def positive_only(runs: Path) -> tuple[Path, Path]:
    """The positive raters' training rows, and the held-out rows of the seen positive raters."""
    d = runs / "positive-only"
    d.mkdir(parents=True, exist_ok=True)
    for name, src, keep in (
        ("train.jsonl", "preferences.jsonl", lambda u: u.startswith("positive-")),
        ("eval.jsonl", "preferences_eval.jsonl", lambda u: u in ("positive-1", "positive-2", "positive-3")),
    ):
        rows = [
            x for x in (ROOT / "data" / "multirater" / src).read_text().splitlines() if keep(json.loads(x)["rater"])
        ]
        (d / name).write_text("\n".join(rows) + "\n")
    return d / "train.jsonl", d / "eval.jsonl"


def ready(kind: str, runs: Path) -> bool:
    return kind != "latent_warm" or (runs / "reward-ceiling-s0" / "final" / "config.json").exists()


def reward_job(kind: str, seed: int, runs: Path, extra: list[str]) -> tuple[list[str], Path]:
    base = {"ceiling": "pooled", "latent_warm": "latent", "user_embedding_dim8": "user_embedding"}.get(kind, kind)
    recipe = RECIPES / f"reward-{base.replace('_', '-')}.yaml"
    run = runs / f"reward-{kind}-s{seed}"
    # a run stopped part way (its launcher or the machine stopped) continues from its newest checkpoint, which
    # trains exactly as an uninterrupted run (tests/test_faults.py); otherwise the folder is started afresh
    again = not (run / "summary.json").exists() and any((run / "checkpoints").glob("step-*"))
    cmd = [
        sys.executable,
        "-m",
        "prefcli",
        "reward",
        str(recipe),
        "-o",
        str(run),
        "--resume" if again else "--overwrite",
    ]
    cmd += ["-q"]
    sets = [f"train.seed={seed}", "train.save_every_steps=100"]
    if kind == "ceiling":
        train, held = positive_only(runs)
        sets += [f"data.train.path={train}", f"data.eval.path={held}"]
    if kind == "latent_warm":
        sets += [f"model.path={runs / 'reward-ceiling-s0' / 'final'}", "train.epochs=1"]
    if kind == "user_embedding_dim8":
        sets += ["reward.personalisation.dim=8"]
    for e in sets + list(extra):
        cmd += ["--set", e]
    return cmd, run


def reward_row(kind: str, seed: int, summary: dict, wall: float) -> dict:
    f = summary["final"]
    keep = {k: v for k, v in f.items() if k.startswith("eval/")}
    return {
        "stage": "reward",
        "kind": kind,
        "seed": seed,
        "date": datetime.date.today().isoformat(),
        "commit": commit(),
        "machine": machine(),
        "wall_s": round(wall, 1),
        "steps": summary.get("steps"),
        "final": keep,
    }


def collect(a) -> None:
    """Rows of finished runs in --runs that --out lacks (a run whose launcher stopped before recording it): each
    run folder's summary.json. The commit is $PREFCLI_COMMIT or the one the run's row would name."""
    have = done(a.out)
    for kind in a.kinds:
        for seed in a.seeds:
            summary = a.runs / f"reward-{kind}-s{seed}" / "summary.json"
            if ("reward", kind, seed) in have or not summary.exists():
                continue
            s = json.loads(summary.read_text())
            if s.get("status") != "completed":
                continue
            row = reward_row(kind, seed, s, s.get("wall_s", 0.0))
            with open(a.out, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"collected reward {kind} seed {seed}", flush=True)


def run_rewards(a) -> None:
    collect(a)
    todo = [
        (k, s)
        for s in a.seeds
        for k in a.kinds
        if ("reward", k, s) not in done(a.out) and not (k == "ceiling" and s != 0)
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    running: list[tuple] = []
    logs = Path(a.logs)
    logs.mkdir(parents=True, exist_ok=True)
    while todo or running:
        while todo and len(running) < a.jobs:
            nxt = next((t for t in todo if ready(t[0], a.runs)), None)
            if nxt is None:  # latent_warm waits for the ceiling model
                break
            todo.remove(nxt)
            kind, seed = nxt
            cmd, run = reward_job(kind, seed, a.runs, a.extra)
            log = open(logs / f"reward-{kind}-s{seed}.log", "w")
            p = subprocess.Popen(["nice", "-n", "10", *cmd], stdout=subprocess.PIPE, stderr=log, text=True, env=env)
            running.append((p, kind, seed, time.time(), log))
            print(f"started reward {kind} seed {seed}", flush=True)
        time.sleep(10)
        for item in list(running):
            p, kind, seed, t0, log = item
            if p.poll() is None:
                continue
            running.remove(item)
            log.close()
            out = p.stdout.read()
            if p.returncode != 0:
                print(f"reward {kind} seed {seed} failed (exit {p.returncode}); see {log.name}", flush=True)
                continue
            row = reward_row(kind, seed, json.loads(out.strip().splitlines()[-1]), time.time() - t0)
            with open(a.out, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"done reward {kind} seed {seed}: {row['final'].get('eval/accuracy_worst_user')}", flush=True)


# ---------------------------------------------------------------------------------------- policies


def policy_jobs(seed: int, runs: Path) -> list[tuple[str, list[str], Path]]:
    """DPO pooled and personalised (6,000 rows), then the per-rater evaluation of both (eval.yaml)."""
    out = []
    for name, recipe in (("pooled", "contrastive-pooled.yaml"), ("personal", "contrastive.yaml")):
        run = runs / f"policy-{name}-s{seed}"
        cmd = [sys.executable, "-m", "prefcli", "contrastive", str(RECIPES / recipe), "-o", str(run), "--overwrite"]
        out.append((name, cmd + ["-q", "--set", f"train.seed={seed}"], run))
    ev = runs / f"policy-eval-s{seed}"
    models = (
        f"models=[{{name: personal, path: {runs / f'policy-personal-s{seed}' / 'final'}}}, "
        f"{{name: base, path: {ROOT / 'prefcli' / 'assets' / 'kjv-base'}}}]"
    )
    cmd = [sys.executable, "-m", "prefcli", "eval", str(RECIPES / "eval.yaml"), "-o", str(ev), "--overwrite", "-q"]
    cmd += ["--set", models, "--set", f"baseline={{name: pooled, path: {runs / f'policy-pooled-s{seed}' / 'final'}}}"]
    cmd += ["--set", f"seed={seed}"]
    out.append(("eval", cmd, ev))
    return out


def words_per_user(eval_dir: Path) -> dict[str, dict[str, float]]:
    """{model: {user: mean words of the completions generated for that user}} from an eval run's examples.jsonl
    (a personalised policy may serve one rater short completions and another long ones)."""
    sums: dict[str, dict[str, list[int]]] = {}
    for line in (eval_dir / "examples.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("kind") == "generation" and r.get("user"):
            sums.setdefault(r["model"], {}).setdefault(r["user"], []).append(len(r["completion"].split()))
    return {m: {u: round(statistics.fmean(v), 2) for u, v in sorted(us.items())} for m, us in sums.items()}


def run_policies(a) -> None:
    """Each seed's three commands in order (the two policies one after the other, then their evaluation); the
    row is written when the evaluation is done."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    logs = Path(a.logs)
    logs.mkdir(parents=True, exist_ok=True)
    for seed in a.seeds:
        if ("policy", "dpo", seed) in done(a.out):
            continue
        t0 = time.time()
        results = {}
        for name, cmd, run in policy_jobs(seed, a.runs):
            if (run / "summary.json").exists() and json.loads((run / "summary.json").read_text())[
                "status"
            ] == "completed":
                results[name] = json.loads((run / "summary.json").read_text())
                continue
            print(f"started policy {name} seed {seed}", flush=True)
            with open(logs / f"policy-{name}-s{seed}.log", "w") as log:
                p = subprocess.run(["nice", "-n", "10", *cmd], stdout=subprocess.PIPE, stderr=log, text=True, env=env)
            if p.returncode != 0:
                raise SystemExit(f"policy {name} seed {seed} failed (exit {p.returncode}); see {log.name}")
            results[name] = json.loads(p.stdout.strip().splitlines()[-1])
        ev = results["eval"]["models"]
        row = {
            "stage": "policy",
            "kind": "dpo",
            "seed": seed,
            "date": datetime.date.today().isoformat(),
            "commit": commit(),
            "machine": machine(),
            "wall_s": round(time.time() - t0, 1),
            "taste_per_user": {m: ev[m]["reward"]["per_user"] for m in ev},
            "win_rate_vs_pooled_per_user": {m: ev[m]["win_rate"]["per_user"] for m in ev if "win_rate" in ev[m]},
            "win_rate_vs_pooled": {m: ev[m]["win_rate"]["win_rate"] for m in ev if "win_rate" in ev[m]},
            "words_per_user": words_per_user(a.runs / f"policy-eval-s{seed}"),
            "implicit_accuracy": {
                n: {k: v for k, v in results[n]["final"].items() if k.startswith("eval/accuracy")}
                for n in ("pooled", "personal")
            },
        }
        with open(a.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"done policy seed {seed}", flush=True)


# -------------------------------------------------------------------------------------- diagnosis


def curve(metrics: Path) -> list[dict]:
    """Per evaluation of a run: the mean held-out accuracy of each taste's seen raters."""
    out = []
    for line in metrics.read_text().splitlines():
        r = json.loads(line)
        if "eval/accuracy" not in r:
            continue
        row = {"step": r["step"]}
        for t in TASTES:
            vals = [r[f"eval/accuracy/{u}"] for u in SEEN if u.startswith(t + "-") and f"eval/accuracy/{u}" in r]
            if vals:
                row[t] = round(statistics.fmean(vals), 4)
        out.append(row)
    return out


def diagnose(a) -> None:
    """--curves LABEL=metrics.jsonl ...: each run's per-taste accuracy at every evaluation, one row per run in
    --diagnosis-out (runs stopped early included: their metrics.jsonl is all that is left of them)."""
    with open(a.diagnosis_out, "a") as f:
        for spec in a.curves:
            label, _, path = spec.partition("=")
            row = {
                "label": label,
                "date": datetime.date.today().isoformat(),
                "commit": commit(),
                "curve": curve(Path(path)),
            }
            f.write(json.dumps(row) + "\n")
            print(label, row["curve"])


# ------------------------------------------------------------------------------------------ report


def _ms(vals: list[float]) -> str:
    vals = [v for v in vals if v is not None]
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.3f}"
    return f"{statistics.fmean(vals):.3f} ± {statistics.stdev(vals):.3f}"


def figures(f: dict) -> dict:
    """The table's figures of one run's final evaluation."""
    seen = {u: f.get(f"eval/accuracy/{u}") for u in SEEN}
    have = [v for v in seen.values() if v is not None]
    out = {
        "accuracy": statistics.fmean(have) if have else None,
        "worst": min(have) if have else None,
        "shared": f.get("eval/accuracy_shared"),
    }
    for t in TASTES:
        vals = [seen[u] for u in SEEN if u.startswith(t + "-") and seen[u] is not None]
        out[t] = statistics.fmean(vals) if vals else None
    for k in LABELS:
        out[f"new@{k}"] = f.get(f"eval/new_user/accuracy@{k}")
        for t in TASTES:
            out[f"new@{k}/{t}"] = f.get(f"eval/new_user/accuracy@{k}/{t}-4")
    if out["new@0"] is None:  # a pooled model: the new users' accuracy, the same whatever labels they give
        out["new@0"] = f.get("eval/new_user/accuracy@0")
    out["gap@20"] = (
        statistics.fmean(out[t] - out[f"new@20/{t}"] for t in TASTES) if out.get("new@20/brief") is not None else None
    )
    return out


def report(a) -> None:
    rows = [json.loads(x) for x in a.out.read_text().splitlines() if x.strip()]
    by: dict[str, list[dict]] = {}
    for r in rows:
        if r["stage"] == "reward":
            by.setdefault(r["kind"], []).append(figures(r["final"]))
    kinds = [k for k in KINDS if k in by]
    seeds = {k: len(by[k]) for k in kinds}
    print(f"seeds per kind: {seeds}\n")
    cols = ["accuracy", "worst", *TASTES, "shared"]
    names = {"accuracy": "seen users", "worst": "worst seen user", "shared": "shared part alone"}
    print("| held-out accuracy | " + " | ".join(kinds) + " |")
    print("|---" * (len(kinds) + 1) + "|")
    for c in cols:
        label = names.get(c, f"{c} raters (mean of 3)")
        print(f"| {label} | " + " | ".join(_ms([x[c] for x in by[k]]) for k in kinds) + " |")
    print("\nnew users (held-out raters), accuracy given k of their labels:\n")
    print("| k | " + " | ".join(kinds) + " |")
    print("|---" * (len(kinds) + 1) + "|")
    for k in LABELS:
        print(f"| {k} | " + " | ".join(_ms([x[f"new@{k}"] for x in by[kk]]) for kk in kinds) + " |")
    print("\nseen users of a taste minus the new user of that taste at 20 labels (mean over tastes):\n")
    for k in kinds:
        print(f"- {k}: {_ms([x['gap@20'] for x in by[k]])}")
    pol = [r for r in rows if r["stage"] == "policy"]
    if pol:
        print(f"\npolicies (DPO, {len(pol)} seeds): each rater's taste on completions generated for them\n")
        users = sorted(pol[0]["taste_per_user"]["personal"])
        print("| rater | taste: base | taste: pooled | taste: personalised | win rate of personalised over pooled |")
        print("|---|---|---|---|---|")
        for u in users:
            cells = [_ms([r["taste_per_user"][m][u] for r in pol]) for m in ("base", "pooled", "personal")]
            cells.append(_ms([r["win_rate_vs_pooled_per_user"]["personal"][u] for r in pol]))
            print(f"| {u} | " + " | ".join(cells) + " |")
        if all("words_per_user" in r for r in pol):
            print("\nmean words of the completions generated for each taste's raters:\n")
            print("| taste | base | pooled | personalised |")
            print("|---|---|---|---|")
            for t in TASTES:
                cells = [
                    _ms([statistics.fmean(v for u, v in r["words_per_user"][m].items() if u.startswith(t + "-"))
                         for r in pol])
                    for m in ("base", "pooled", "personal")
                ]  # fmt: skip
                print(f"| {t} | " + " | ".join(cells) + " |")
        worst = [min(r["win_rate_vs_pooled_per_user"]["personal"].values()) for r in pol]
        print(
            f"\nworst rater's win rate: {_ms(worst)}; overall: {_ms([r['win_rate_vs_pooled']['personal'] for r in pol])}"
        )
        for n in ("pooled", "personal"):
            acc = [r["implicit_accuracy"][n].get("eval/accuracy_worst_user") for r in pol]
            print(f"{n} policy: implicit-reward held-out accuracy, worst rater {_ms(acc)}; overall "
                  f"{_ms([r['implicit_accuracy'][n].get('eval/accuracy') for r in pol])}")  # fmt: skip
    for k in kinds:
        print(f"\n{k}: new user at k labels, per taste")
        for t in TASTES:
            print(f"  {t}: " + ", ".join(f"{n}: {_ms([x[f'new@{n}/{t}'] for x in by[k]])}" for n in LABELS))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["rewards", "policies", "collect", "diagnose", "report"])
    ap.add_argument("--curves", nargs="*", default=[], help="diagnose: LABEL=path/to/metrics.jsonl")
    ap.add_argument(
        "--diagnosis-out", type=Path, default=ROOT / "experiments" / "results" / "personalisation-diagnosis.jsonl"
    )
    ap.add_argument(
        "--kinds", nargs="+", default=["pooled", "user_embedding", "lowrank", "ceiling", "latent_warm"], choices=KINDS
    )
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time")
    ap.add_argument("--set", dest="extra", action="append", default=[], help="a recipe override for every run")
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "personalisation")
    ap.add_argument("--logs", default=str(ROOT / "runs" / "personalisation" / "logs"))
    ap.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "personalisation.jsonl")
    a = ap.parse_args()
    if a.stage == "rewards":
        run_rewards(a)
    elif a.stage == "policies":
        run_policies(a)
    elif a.stage == "collect":
        collect(a)
    elif a.stage == "diagnose":
        diagnose(a)
    else:
        report(a)


if __name__ == "__main__":
    main()
