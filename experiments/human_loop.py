"""The whole human loop on one machine, offline: from raters who disagree to a model for each of them.

    python experiments/human_loop.py                       # runs/human-loop/ (resumes: a finished stage is kept)
    python experiments/human_loop.py --report              # the table, from runs/human-loop/results.json
    python experiments/human_loop.py --report --results experiments/results/human-loop-300.json  # the docs' run

1. candidates: the bundled base model answers --prompts training prompts of the quickstart twice
   (`prefcli generate`, two seeds);
2. a labelling task over them (`prefcli label serve`: pairs, every item answered by all three raters);
3. three simulated raters with different tastes (positive sentiment, the opposite, brevity; Bradley-Terry
   noise, a tie when they do not care: the tastes of scripts/make_multirater_data.py) answer through the web
   app's own HTTP interface (`prefcli label invite` for their links, then GET /api/next and POST /api/answer
   with their bearer tokens, docs/labelling.md), never by writing the database;
4. `prefcli label export`: one row per answer with its rater;
5. a personalised reward model on the export (`reward.personalisation: user_embedding`, 20% held out);
6. personalised RLHF: one policy, each prompt's rater token before it, rewarded by the personalised reward
   model for that prompt's rater (GRPO);
7. `prefcli eval` per rater: each rater's own taste (recipes/quickstart/personal/tastes.py, without noise) on
   completions generated for that rater, the personalised policy against the base model.

Every command runs as `OMP_NUM_THREADS=1 nice -n 10 python -m prefcli ...`. runs/human-loop/results.json holds
the figures (with the date, commit and machine); docs/personalisation.md has the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BASE = ROOT / "prefcli" / "assets" / "kjv-base"
TASTES_PY = ROOT / "recipes" / "quickstart" / "personal" / "tastes.py"
RATERS = {
    "positive-ann": ("positive", 0.1, 0.2),
    "negative-bob": ("negative", 0.1, 0.2),
    "brief-cy": ("brief", 1.5, 2.0),
}


def prefcli(*args: str, out: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = ["nice", "-n", "10", sys.executable, "-m", "prefcli", *args]
    print("$ prefcli " + " ".join(args), flush=True)
    if out is not None:
        with open(out, "w") as f:
            res = subprocess.run(cmd, stdout=f, stderr=subprocess.PIPE, text=True, env=env)
    else:
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if check and res.returncode != 0:
        raise SystemExit(f"prefcli {args[0]} failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
    return res


def summary(res: subprocess.CompletedProcess) -> dict:
    return json.loads(res.stdout.strip().splitlines()[-1])


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------- raters


def utility(taste: str, text: str, vader: float) -> float:
    return {"positive": vader, "negative": -vader, "brief": -float(len(text.split()))}[taste]


class Rater:
    """A simulated rater answering through the HTTP interface: Bradley-Terry noise with temperature tau on
    their utility, "tie" when the two candidates differ by less than `tie`."""

    def __init__(self, name: str, token: str, base: str, seed: int):
        self.name, self.token, self.base = name, token, base
        self.taste, self.tau, self.tie = RATERS[name]
        self.rng = random.Random(f"{seed}|{name}")
        self.answered = 0
        self.agree = 0  # answers that pick the candidate their taste prefers (ties left out)
        self.decided = 0

    def call(self, method: str, path: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        for attempt in range(5):
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    return json.loads(r.read())
            except urllib.error.HTTPError as e:
                raise SystemExit(f"{self.name}: {method} {path}: HTTP {e.code} {e.read()[:300]!r}") from None
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(1 + attempt)
        raise SystemExit(f"{self.name}: {method} {path}: the server does not answer")

    def run(self) -> None:
        from prefcli.reward_sources import vader_compound

        n = 0
        while True:
            nxt = self.call("GET", "/api/next")
            if nxt.get("done"):
                return
            if nxt.get("wait"):
                time.sleep(float(nxt.get("retry_after_s", 1)))
                continue
            a, b = nxt["item"]["candidates"]
            va, vb = vader_compound([a, b])
            ua, ub = utility(self.taste, a, va), utility(self.taste, b, vb)
            if abs(ua - ub) < self.tie:
                answer = "tie"
            else:
                p_a = 1.0 / (1.0 + math.exp(-(ua - ub) / self.tau))
                answer = "A" if self.rng.random() < p_a else "B"
                self.decided += 1
                self.agree += (answer == "A") == (ua > ub)
            n += 1
            got = self.call(
                "POST",
                "/api/answer",
                {"assignment": nxt["assignment"], "answer": answer, "client_id": f"{self.name}-{n:06d}"},
            )
            assert got.get("ok"), got
            self.answered += 1


# ------------------------------------------------------------------------------------------ stages


def stage_candidates(d: Path, a) -> None:
    if (d / "a.jsonl").exists() and (d / "b.jsonl").exists():
        return
    rows = [json.loads(x) for x in (ROOT / "data" / "quickstart" / "prompts.jsonl").read_text().splitlines()]
    write_jsonl(d / "prompts.jsonl", rows[: a.prompts])
    for name, seed in (("a", 1), ("b", 2)):
        if (d / f"{name}.part").exists():
            continue
        prefcli("generate", str(BASE), "--prompts", str(d / "prompts.jsonl"), "--max-new-tokens", "24",
                "--seed", str(seed), "--batch-size", "32", "-q", out=d / f"{name}.tmp")  # fmt: skip
        (d / f"{name}.tmp").rename(d / f"{name}.part")
    # label serve refuses a pair of identical completions (nobody can prefer one): the two samples of a prompt
    # are the same now and then (an empty completion twice), and such a prompt is left out of the task
    a_rows, b_rows = ([json.loads(x) for x in (d / f"{n}.part").read_text().splitlines()] for n in "ab")
    keep = [i for i, (x, y) in enumerate(zip(a_rows, b_rows)) if x["completion"] != y["completion"]]
    print(f"candidates: {len(keep)} of {len(a_rows)} prompts answered differently", flush=True)
    for name, rows in (("a", a_rows), ("b", b_rows)):
        write_jsonl(d / f"{name}.jsonl", [rows[i] for i in keep])
        (d / f"{name}.part").unlink()


def stage_label(d: Path, a) -> dict:
    """Serve the task, invite the raters, let them answer over HTTP, stop the server, export."""
    if (d / "prefs.jsonl").exists():
        return json.loads((d / "labelling.json").read_text())
    port = free_port()
    task = d / "task.yaml"
    task.write_text(
        "command: label\ntitle: Which continuation do you prefer?\n"
        "items:\n  path: [a.jsonl, b.jsonl]\nmode: pair\noverlap: 3\n"
        "instructions: Pick the continuation you like better; t for a tie.\n"
        f"server:\n  host: 127.0.0.1\n  port: {port}\n"
    )
    for p in d.glob("task.db*"):
        p.unlink()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    server = subprocess.Popen(
        [sys.executable, "-m", "prefcli", "label", "serve", str(task)],
        stdout=subprocess.PIPE,
        stderr=open(d / "serve.log", "w"),
        text=True,
        env=env,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                with urllib.request.urlopen(base + "/healthz", timeout=5) as r:
                    if json.loads(r.read()).get("ok"):
                        break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.5)
        else:
            raise SystemExit(f"the labelling server did not start; see {d / 'serve.log'}")
        raters = []
        for name in RATERS:
            link = summary(prefcli("label", "invite", str(task), "--rater", name))["link"]
            raters.append(Rater(name, link.rsplit("/r/", 1)[1], base, a.seed))
        t0 = time.time()
        threads = [threading.Thread(target=r.run) for r in raters]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.time() - t0
        stats = summary(prefcli("label", "stats", str(task)))
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
    prefcli("label", "export", str(task), "-o", str(d / "prefs.part"))
    (d / "prefs.part").rename(d / "prefs.jsonl")
    info = {
        "answers": sum(r.answered for r in raters),
        "answers_per_s": round(sum(r.answered for r in raters) / wall, 1),
        "raters": {
            r.name: {"answered": r.answered, "label_agrees_with_taste": round(r.agree / max(1, r.decided), 3)}
            for r in raters
        },  # fmt: skip
        "exported_rows": len((d / "prefs.jsonl").read_text().splitlines()),
        "agreement": stats.get("agreement"),
    }
    (d / "labelling.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def stage_reward(d: Path, a) -> dict:
    out = d / "reward"
    if (out / "summary.json").exists():
        return json.loads((out / "summary.json").read_text())
    recipe = d / "reward.yaml"
    recipe.write_text(
        f"command: reward\nmodel: {{path: {BASE}}}\n"
        "data:\n  train: {path: prefs.jsonl}\n  eval_fraction: 0.2\n  max_length: 64\n"
        "reward:\n  personalisation: {kind: user_embedding, new_user_labels: [0]}\n"
        f"train: {{epochs: {a.reward_epochs}, batch_size: 32, lr: 1.0e-3, warmup_ratio: 0.05, seed: {a.seed}}}\n"
        "output: {plot: false}\n"
    )
    return summary(prefcli("reward", str(recipe), "-o", str(out), "-q", "--overwrite"))


def stage_rlhf(d: Path, a) -> dict:
    out = d / "rlhf"
    if (out / "summary.json").exists():
        return json.loads((out / "summary.json").read_text())
    rows = [json.loads(x) for x in (ROOT / "data" / "quickstart" / "prompts.jsonl").read_text().splitlines()]
    names = list(RATERS)
    write_jsonl(
        d / "rl_prompts.jsonl",
        [{"prompt": r["prompt"], "rater": names[i % 3]} for i, r in enumerate(rows[a.prompts :])],
    )
    recipe = d / "rlhf.yaml"
    recipe.write_text(
        f"command: rlhf\nmodel: {{path: {BASE}}}\n"
        "data:\n  train: {path: rl_prompts.jsonl}\n  max_prompt_length: 24\n"
        f"rewards:\n  - {{kind: model, path: {d / 'reward' / 'final'}, max_length: 64}}\n"
        "generation: {max_new_tokens: 24, temperature: 1.0}\n"
        "rlhf:\n  personalisation: {kind: user_token}\n  algorithm: grpo\n  num_generations: 4\n"
        "  prompts_per_rollout: 8\n  kl_coef: 0.05\n  missing_eos_penalty: 0.1\n"
        f"train: {{max_steps: {a.rlhf_steps}, batch_size: 16, lr: 1.0e-4, warmup_ratio: 0.05, seed: {a.seed}}}\n"
        "output: {plot: false}\n"
    )
    return summary(prefcli("rlhf", str(recipe), "-o", str(out), "-q", "--overwrite"))


def stage_eval(d: Path, a) -> dict:
    out = d / "eval"
    if (out / "summary.json").exists():
        return json.loads((out / "summary.json").read_text())
    rows = [json.loads(x) for x in (ROOT / "data" / "quickstart" / "prompts_eval.jsonl").read_text().splitlines()]
    write_jsonl(
        d / "eval_prompts.jsonl", [{"prompt": r["prompt"], "rater": u} for u in RATERS for r in rows[: a.eval_prompts]]
    )
    recipe = d / "eval.yaml"
    recipe.write_text(
        "command: eval\n"
        f"models:\n  - {{name: personalised, path: {d / 'rlhf' / 'final'}}}\n"
        f"baseline: {{name: base, path: {BASE}}}\n"
        "data:\n  prompts: {path: eval_prompts.jsonl}\n"
        "metrics: [reward, win_rate]\n"
        "generation: {max_new_tokens: 24, temperature: 1.0, batch_size: 32}\n"
        f"rewards:\n  - {{kind: function, function: '{TASTES_PY}:taste', name: taste}}\n"
        f"seed: {a.seed}\n"
    )
    return summary(prefcli("eval", str(recipe), "-o", str(out), "-q", "--overwrite"))


def report(results: Path) -> None:
    r = json.loads(results.read_text())
    lab, rm, rl, ev = r["labelling"], r["reward"], r["rlhf"], r["eval"]
    print(f"{r['date']}, commit {r['commit']}, {r['machine']}; wall {r['wall_s'] / 60:.0f} min in all\n")
    print(
        f"labelling: {lab['answers']} answers over HTTP ({lab['answers_per_s']}/s), {lab['exported_rows']} exported rows"
    )
    print(
        "\n| rater | answers | label agrees with taste | reward model held-out accuracy | taste: base | taste: personalised | win rate vs base |"
    )
    print("|---|---|---|---|---|---|---|")
    pm, bm = ev["models"]["personalised"], ev["models"]["base"]
    for u in RATERS:
        print(
            f"| {u} | {lab['raters'][u]['answered']} | {lab['raters'][u]['label_agrees_with_taste']:.3f} "
            f"| {rm['final'].get(f'eval/accuracy/{u}', float('nan')):.3f} "
            f"| {bm['reward']['per_user'][u]:.3f} | {pm['reward']['per_user'][u]:.3f} "
            f"| {pm['win_rate']['per_user'][u]:.3f} |"
        )
    print(f"\nreward model: held-out accuracy {rm['final']['eval/accuracy']:.3f}, worst rater "
          f"{rm['final']['eval/accuracy_worst_user']:.3f}, shared part {rm['final']['eval/accuracy_shared']:.3f}")  # fmt: skip
    f = rl["final"]
    print(f"rlhf: {rl['steps']} steps; last rollout: reward (the reward model, each for its rater) "
          f"{f['reward/mean']:.3f}, length {f['length/mean']:.1f} tokens, KL {f['kl/mean']:.3f}")  # fmt: skip
    wr = pm["win_rate"]
    print(f"eval: win rate over base {wr['win_rate']:.3f} [{wr['ci_low']:.2f}, {wr['ci_high']:.2f}] "
          f"({wr['wins']} wins, {wr['ties']} ties, {wr['losses']} losses); length-controlled "
          f"{wr['length_controlled']['lc_win_rate']:.3f}, completions "
          f"{-wr['length_controlled']['mean_length_diff']:.1f} words shorter than base's")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=ROOT / "runs" / "human-loop")
    ap.add_argument("--prompts", type=int, default=600, help="training prompts answered twice: the items to label")
    ap.add_argument("--eval-prompts", type=int, default=100, help="held-out prompts per rater in the evaluation")
    ap.add_argument("--reward-epochs", type=int, default=3)
    ap.add_argument("--rlhf-steps", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--results", type=Path, help="--report: this results file instead of DIR/results.json")
    a = ap.parse_args()
    d = a.dir
    if a.report:
        report(a.results or d / "results.json")
        return
    d.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    stage_candidates(d, a)
    labelling = stage_label(d, a)
    rm = stage_reward(d, a)
    rl = stage_rlhf(d, a)
    ev = stage_eval(d, a)
    commit = (
        os.environ.get("PREFCLI_COMMIT")
        or subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip()
    )
    res = {
        "date": datetime.date.today().isoformat(),
        "commit": commit,
        "machine": f"{platform.machine()} {os.cpu_count()} CPU cores, shared",
        "wall_s": round(time.time() - t0, 1),
        "settings": {k: v for k, v in vars(a).items() if k not in ("dir", "report")},
        "labelling": labelling,
        "reward": {"final": rm["final"], "data": rm.get("data")},
        "rlhf": {"steps": rl["steps"], "final": rl["final"]},
        "eval": {"models": ev["models"]},
    }
    (d / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    report(d / "results.json")


if __name__ == "__main__":
    main()
