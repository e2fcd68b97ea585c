"""Faults that must never lose a run (docs/cli.md, "What a failure leaves behind"): kill -9 at chosen and at
random points of a run (during a checkpoint write, before its marker, during pruning, at the final
evaluation), each followed by --resume, ending with the weights of an uninterrupted run; a damaged newest
checkpoint; a full disk (a small tmpfs) and a file-size limit (ulimit -f) during a checkpoint and during
final/; two runs into one folder at once; an interrupt after the last step; non-finite weights; a reward
that turns inf; a collapsed run; read-only folders (as root: capabilities dropped with setpriv).

Real processes only where the fault needs one (kill -9, a second run at once, capabilities); they are forks
of this process (torch and prefcli already imported, so each starts at once) except the capability test,
which must exec. The rest runs the entry point in this process (a file-size limit is set and restored
around it).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from prefcli.engine import checkpoint as ckpt
from prefcli.engine import runfolder

from . import fault_driver
from .conftest import ROOT, TINY_INIT, deep_update, last_json, read_metrics, sft_recipe_dict
from .test_bad_inputs import MODEL_FILE, invoke, snapshot


def recipe(tmp_path: Path, name: str = "recipe.yaml", **upd) -> Path:
    d = sft_recipe_dict(
        **deep_update(
            {
                "train": {"max_steps": 8, "save_every_steps": 1, "keep_checkpoints": 2, "eval_every_steps": 4},
                "data": {"eval": {"max_rows": 4}},
            },
            upd,
        )
    )
    p = tmp_path / name
    p.write_text(yaml.safe_dump(d, sort_keys=False))
    return p


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Every run of this file uses one torch thread: the forks (which set it, as DataLoader workers do after a
    fork), and the runs in this process, the uninterrupted reference and the resumes included. The kill -9 chain
    compares final weights bit for bit with the reference, and fp32 sums split over 2 threads round differently
    from sums on 1: the same 8-step sft run on 1 and on 2 threads ends with different weights (measured on this
    project's 2-core machine), so a chain of 1-thread forks compared with a 2-thread reference failed although
    resume is exact. Like is compared with like."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def forked(argv: list, fault: str | None = None, log: Path | None = None):
    """The entry point in a fork of this process, with `fault` (tests/fault_driver.py) installed. Started;
    its exit code is the command's, or -9 when the fault killed it. Its output goes to `log`."""

    def target():
        torch.set_num_threads(1)  # as DataLoader workers do after a fork (and as one_thread does here)
        if fault:
            fault_driver.install(fault)
        code, out, err = invoke(argv)
        if log is not None:
            log.write_text(json.dumps({"out": out, "err": err}))
        os._exit(code)

    proc = multiprocessing.get_context("fork").Process(target=target)
    proc.start()
    return proc


def run_forked(argv: list, fault: str | None = None, log: Path | None = None) -> int:
    proc = forked(argv, fault, log)
    proc.join(timeout=600)
    return proc.exitcode


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def assert_each_row_once(run: Path, total: int, evals: list[int]) -> None:
    rows = read_metrics(run)
    train = [r["step"] for r in rows if any(k.startswith("loss/") for k in r)]
    ev = [r["step"] for r in rows if "eval/loss" in r]
    assert train == list(range(1, total + 1)), rows
    assert ev == evals, rows


def _stamps(run: Path) -> dict[str, int]:
    out = {}
    for _, c in runfolder.step_folders(run):
        try:
            out[c.name] = c.stat().st_mtime_ns
        except FileNotFoundError:  # pruned meanwhile
            pass
    return out


def leftovers(run: Path) -> list[str]:
    names = [p.name for p in (run / "checkpoints").iterdir()] if (run / "checkpoints").is_dir() else []
    return [n for n in names if n.startswith(".")] + [p.name for p in run.iterdir() if p.name.startswith(".tmp")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run every interrupted one must end like."""
    tmp = tmp_path_factory.mktemp("reference")
    code, out, err = invoke(["sft", recipe(tmp), "-o", tmp / "run", "-q"])
    assert code == 0, err
    return tmp / "run"


@pytest.mark.slow
def test_kill_9_anywhere_then_resume_ends_like_an_uninterrupted_run(tmp_path, reference):
    """A chain of kills into one run folder, each followed by --resume: during a checkpoint write, before a
    checkpoint's marker, in the middle of pruning, at a random moment, and while final/ is written after the
    newest checkpoint was damaged. The final weights equal the uninterrupted run's, bit for bit, and
    metrics.jsonl holds every step once."""
    p = recipe(tmp_path)
    run = tmp_path / "run"
    rng = random.Random(14)
    faults = ["kill-in-write:2", "kill-before-marker:4", "kill-in-prune:2", "random", "kill-in-final-write"]
    for i, fault in enumerate(faults):
        args = ["sft", p, "-o", run, "-q"] + (["--resume"] if i else [])
        if fault == "kill-in-final-write":  # the newest checkpoint is damaged: resume falls back past it
            newest = runfolder.complete_checkpoints(run)[-1][1]
            (newest / "state.json").write_text("{")
        log = tmp_path / f"log-{i}.txt"
        if fault == "random":  # once the run has written a checkpoint of its own, at a random moment after it
            seen = _stamps(run)
            proc = forked(args, log=log)
            deadline = time.time() + 300
            while time.time() < deadline and proc.is_alive():
                if any(seen.get(name) != t for name, t in _stamps(run).items()):
                    break
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.5))
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGKILL)
            proc.join(timeout=60)
        else:
            code = run_forked(args, fault, log)
            assert code == -signal.SIGKILL, f"{fault}: the fault did not fire (exit {code})"
        # whatever the kill left, every checkpoint with a marker verifies
        assert all(runfolder.verify_checkpoint(c) is None for _, c in runfolder.complete_checkpoints(run)), fault
    assert not (run / "final").exists() and (run / ".tmp-final" / "model.safetensors").exists()
    code, out, err = invoke(["sft", p, "-o", run, "-q", "--resume"])
    assert code == 0, err
    s = last_json(out)
    assert_same_weights(run / "final", reference / "final")
    assert_each_row_once(run, 8, [4, 8])
    assert s["final"]["eval/loss"] == json.loads((reference / "summary.json").read_text())["final"]["eval/loss"]
    assert not leftovers(run)
    assert [c.name for _, c in runfolder.step_folders(run)] == ["step-7", "step-8"]


@pytest.mark.slow
def test_damaged_newest_checkpoint_is_skipped_and_named(tmp_path, reference):
    """--resume verifies the newest checkpoint and falls back to the newest complete one, saying which it
    skipped and why; the run then ends like the uninterrupted one."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    shutil.rmtree(run / "final")
    newest = run / "checkpoints" / "step-8"
    f = newest / MODEL_FILE
    f.write_bytes(f.read_bytes()[:1000])
    code, out, err = invoke(["sft", recipe(tmp_path), "-o", run, "-q", "--resume"])
    assert code == 0, err
    s = last_json(out)
    assert s["resumed_from"].endswith("step-7")
    assert f"--resume: skipped {newest} ({MODEL_FILE} has 1000 bytes" in err
    assert any("skipped" in w and "step-8" in w for w in s["warnings"])
    assert_same_weights(run / "final", reference / "final")
    assert runfolder.verify_checkpoint(newest) is None  # step 8 was written again, whole


def test_a_resume_at_the_last_step_runs_the_final_evaluation_and_writes_final(tmp_path, reference):
    """Killed between the last checkpoint and the end: the resume trains nothing, evaluates once, writes final/."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    shutil.rmtree(run / "final")
    (run / "summary.json").unlink()
    code, out, err = invoke(["sft", recipe(tmp_path), "-o", run, "-q", "--resume"])
    assert code == 0, err
    s = last_json(out)
    assert s["resumed_from"].endswith("step-8") and s["steps"] == 8
    assert "eval/loss" in s["final"]
    assert_each_row_once(run, 8, [4, 8])  # the final evaluation logged after the checkpoint was cut, then redone
    assert_same_weights(run / "final", reference / "final")


@pytest.mark.slow
def test_an_interrupt_after_the_last_step_names_the_checkpoint_and_resumes_into_final(tmp_path, reference, monkeypatch):
    """A real SIGINT (to this process, where the loop's handler catches it) during the final evaluation."""
    from prefcli.engine.loop import Engine

    evaluate = Engine._evaluate

    def interrupted_final_eval(self, step, history):
        if step == self.task.total_steps():
            os.kill(os.getpid(), signal.SIGINT)
        return evaluate(self, step, history)

    p = recipe(tmp_path)
    run = tmp_path / "run"
    monkeypatch.setattr(Engine, "_evaluate", interrupted_final_eval)
    code, out, err = invoke(["sft", p, "-o", run, "-q"])
    monkeypatch.setattr(Engine, "_evaluate", evaluate)
    assert code == 130, err
    s = last_json(out)
    assert s["status"] == "interrupted" and s["checkpoint"].endswith("step-8")
    assert "after the last step" in s["error"] and "writes final/" in s["error"]
    assert not (run / "final").exists()
    code, out, err = invoke(["sft", p, "-o", run, "-q", "--resume"])
    assert code == 0, err
    assert_same_weights(run / "final", reference / "final")
    assert_each_row_once(run, 8, [4, 8])


# --------------------------------------------------------------------------------------------- disk full


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs (root only): room for one checkpoint of the tiny model (1.8 MB), not two."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root; the ulimit -f tests cover the same paths (EFBIG)")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    size = {"size": "3m"}

    def mount(s: str) -> Path:
        size["size"] = s
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={s}", "tmpfs", str(mnt)], capture_output=True)
        if res.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {res.stderr.decode().strip()}")
        return mnt

    yield mount
    subprocess.run(["umount", str(mnt)], capture_output=True)


@pytest.mark.slow
def test_disk_full_during_a_checkpoint(tmp_path, small_disk):
    """ENOSPC while the second checkpoint is written: exit 1, the message names the first checkpoint (intact),
    the partial one is gone, and the failure object is on stdout."""
    disk = small_disk("3m")
    run = disk / "run"
    code, out, err = invoke(["sft", recipe(tmp_path, train={"max_steps": 3}), "-o", run, "-q"])
    assert code == 1, err
    s = last_json(out)
    assert s["status"] == "failed" and s["checkpoint"].endswith("step-1")
    assert "step 2: could not write the checkpoint: the disk is full" in s["error"]
    assert "Last good checkpoint:" in s["error"] and "--resume" in s["error"]
    assert runfolder.verify_checkpoint(run / "checkpoints" / "step-1") is None
    assert not leftovers(run) and [c.name for _, c in runfolder.step_folders(run)] == ["step-1"]
    moved = tmp_path / "moved"  # once there is room, the run continues from step 1
    shutil.copytree(run, moved)
    code, out, err = invoke(["sft", recipe(tmp_path, train={"max_steps": 3}), "-o", moved, "-q", "--resume"])
    assert code == 0 and last_json(out)["resumed_from"].endswith("step-1"), err


@pytest.mark.slow
def test_disk_full_while_final_is_written(tmp_path, small_disk):
    """LoRA: checkpoints (adapters) fit on a 512 KiB disk, the merged final/ does not: exit 1 naming the last
    step's checkpoint; no partial final/; a resume on a larger disk writes it."""
    disk = small_disk("512k")
    run = disk / "run"
    p = recipe(tmp_path, train={"max_steps": 2, "keep_checkpoints": 1, "eval_every_steps": None})
    code, out, err = invoke(["sft", p, "-o", run, "-q", "--set", "model.lora.r=2"])
    assert code == 1, err
    s = last_json(out)
    assert "could not write final/: the disk is full" in s["error"] and s["checkpoint"].endswith("step-2")
    assert "--resume" in s["error"] and "writes final/" in s["error"]
    assert not (run / "final").exists() and not leftovers(run)
    moved = tmp_path / "moved"
    shutil.copytree(run, moved)
    code, out, err = invoke(["sft", p, "-o", moved, "-q", "--resume", "--set", "model.lora.r=2"])
    assert code == 0, err
    assert (moved / "final" / "model.safetensors").exists()


def limited(limit: int, argv: list) -> tuple[int, str, str]:
    """The entry point in this process under a file-size limit (ulimit -f), restored afterwards. main() ignores
    SIGXFSZ, so a write past the limit fails with EFBIG instead of killing the process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        return invoke(argv)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)


@pytest.mark.slow
def test_file_size_limit_during_a_checkpoint(tmp_path):
    """ulimit -f (EFBIG) on the resumed process: its first checkpoint cannot be written; exit 1 naming the
    checkpoint it resumed from, which stays intact."""
    p = recipe(tmp_path, train={"max_steps": 2, "eval_every_steps": None})
    run = tmp_path / "run"
    assert invoke(["sft", p, "-o", run, "-q"])[0] == 0
    before = snapshot(run / "checkpoints" / "step-2")
    code, out, err = limited(1_000_000, ["sft", p, "-o", run, "-q", "--resume", "--set", "train.max_steps=4"])
    assert code == 1, err
    s = last_json(out)
    assert "step 3: could not write the checkpoint: a file grew past the file-size limit" in s["error"]
    assert s["checkpoint"].endswith("step-2")
    assert snapshot(run / "checkpoints" / "step-2") == before
    assert runfolder.verify_checkpoint(run / "checkpoints" / "step-2") is None and not leftovers(run)


@pytest.mark.slow
def test_file_size_limit_while_final_is_written(tmp_path):
    """LoRA checkpoints are small, the merged final/model.safetensors (600 kB) is not: ulimit -f 400 kB."""
    p = recipe(tmp_path, train={"max_steps": 2, "eval_every_steps": None})
    run = tmp_path / "run"
    code, out, err = limited(400_000, ["sft", p, "-o", run, "-q", "--set", "model.lora.r=2"])
    assert code == 1, err
    s = last_json(out)
    assert "could not write final/: a file grew past the file-size limit" in s["error"]
    assert s["checkpoint"].endswith("step-2") and not (run / "final").exists() and not leftovers(run)


# ------------------------------------------------------------------------------------- two runs at once


@pytest.mark.slow
def test_two_runs_into_one_folder(tmp_path):
    """A second run into a folder while the first trains there: exit 2, nothing written by it; the first
    completes, and the folder holds its files only, each step once."""
    run = tmp_path / "run"
    upd = {"max_steps": 6, "eval_every_steps": None}
    first, second = (recipe(tmp_path, f"r{i}.yaml", train={"seed": i, **upd}) for i in (1, 2))
    log = tmp_path / "first.txt"
    proc = forked(["sft", first, "-o", run, "-q"], log=log)
    deadline = time.time() + 300
    while runfolder.RunLock.probe(run) is None and proc.is_alive() and time.time() < deadline:
        time.sleep(0.02)
    code, out, err = invoke(["sft", second, "-o", run, "-q", "--overwrite"])
    assert code == 2, err
    s = last_json(out)
    assert s["status"] == "invalid" and f"in use by another prefcli run (pid {proc.pid})" in s["error"], s
    proc.join(timeout=300)
    first_out = json.loads(log.read_text())
    assert proc.exitcode == 0, first_out["err"]
    assert last_json(first_out["out"])["recipe"] == str(first)
    assert yaml.safe_load((run / "recipe.yaml").read_text())["train"]["seed"] == 1
    assert json.loads((run / "summary.json").read_text())["recipe"] == str(first)
    assert_each_row_once(run, 6, [6])


def test_a_held_lock_refuses_and_a_dead_holder_does_not(tmp_path):
    """The lock is the kernel's: while a process holds it a second run is refused; once that process is
    gone (kill -9 included), the folder is free."""
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from prefcli.engine.runfolder import RunLock; RunLock(sys.argv[1]).acquire(); "
            "print('held', flush=True); time.sleep(600)",
            str(run),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    try:
        assert runfolder.RunLock.probe(run) == f"pid {holder.pid}"
        code, out, err = invoke(["sft", recipe(tmp_path), "-o", run, "-q"])
        assert code == 2 and f"in use by another prefcli run (pid {holder.pid})" in last_json(out)["error"]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert runfolder.RunLock.probe(run) is None
    lock = runfolder.RunLock(run)
    lock.acquire()  # not stuck
    lock.release()


def test_a_run_that_loses_the_race_for_the_lock_writes_nothing(tmp_path, monkeypatch):
    """Two runs that both found the folder free: the one that does not get the lock when it is about to write
    (the other took it meanwhile) exits 2 and writes nothing."""
    run = tmp_path / "run"
    other = runfolder.RunLock(run)
    other.acquire()
    p = recipe(tmp_path, "r.yaml")
    before = snapshot(tmp_path)
    monkeypatch.setattr(runfolder.RunLock, "probe", staticmethod(lambda run_dir: None))  # free when it looked
    try:
        code, out, err = invoke(["sft", p, "-o", run, "-q"])
    finally:
        other.release()
    assert code == 2, err
    assert f"in use by another prefcli run (pid {os.getpid()})" in last_json(out)["error"]
    assert snapshot(tmp_path) == before


# -------------------------------------------------------------------------------- numbers that go wrong


class _Blowup:
    """A minimal Task whose weights turn inf during step `bad` (the loss stays finite at that step)."""

    def __init__(self, rt, bad: int):
        from torch import nn

        from prefcli.engine.task import Group
        from prefcli.recipe.sections import TrainSection

        torch.manual_seed(0)
        self.net = nn.Linear(4, 1)
        self.train = TrainSection(max_steps=4, lr=0.1, save_every_steps=1)
        self.groups = {"net": Group("net", self.net, rt, self.train, 4)}
        self.bad, self.step = bad, 0
        opt = self.groups["net"].optimizer
        update = opt.step

        def step_that_overflows(*a, **k):  # the update of step `bad` leaves the weights non-finite
            update(*a, **k)
            if self.step == self.bad:
                with torch.no_grad():
                    self.net.weight.fill_(float("inf"))

        opt.step = step_that_overflows

    def total_steps(self):
        return 4

    def plans(self, start_step):
        from prefcli.engine.task import Micro, Plan

        x = torch.randn(8, 4)
        while True:
            self.step += 1

            def loss_fn(model, batch):
                return model(batch).pow(2).sum(), {}

            yield Plan(group="net", micro=[Micro(batch=x, n=8)], loss_fn=loss_fn)

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, state, extra):
        self.step = state["step"]

    def extra_tensors(self):
        return {}

    def has_eval(self):
        return False

    def evaluate(self):
        return {}


def test_non_finite_weights_are_never_checkpointed_nor_named(tmp_path):
    from prefcli.engine.dist import Runtime
    from prefcli.engine.loop import Engine
    from prefcli.engine.progress import Progress
    from prefcli.errors import TrainingError

    rt = Runtime(device=torch.device("cpu"), precision="fp32")
    task = _Blowup(rt, bad=3)
    progress = Progress(True, 4, "t", tmp_path, quiet=True)
    engine = Engine(task, rt, task.train, progress, tmp_path)
    with pytest.raises(
        TrainingError, match=r"step 3: the weights are no longer finite .*Last good checkpoint: .*step-2"
    ):
        engine.run()
    progress.close()
    assert [c.name for _, c in runfolder.complete_checkpoints(tmp_path)] == ["step-1", "step-2"]
    w = ckpt.read_tensors(tmp_path / "checkpoints" / "step-2" / "model-net")
    assert all(torch.isfinite(t).all() for t in w.values())
    with pytest.raises(TrainingError, match="final/ was not written"):
        engine.save_final(lambda folder: None)
    assert not (tmp_path / "final").exists()


@pytest.mark.slow
def test_a_reward_that_turns_inf_stops_naming_the_last_checkpoint(tmp_path):
    rules = tmp_path / "turns_inf.py"
    rules.write_text(
        "calls = [0]\n"
        "def score(prompts, completions):\n"
        "    calls[0] += 1\n"
        "    return [float('inf') if calls[0] >= 3 else 0.5 * (i % 2) for i in range(len(completions))]\n"
    )
    d = {
        "command": "rlhf",
        "model": {"init": json.loads(json.dumps(TINY_INIT)), "tokenizer": str(ROOT / "data" / "tokenizer")},
        "data": {
            "train": {"path": str(ROOT / "data" / "tiny" / "prompts.jsonl"), "max_rows": 8},
            "max_prompt_length": 16,
        },
        "rewards": [{"kind": "function", "function": f"{rules}:score"}],
        "generation": {"max_new_tokens": 4},
        "rlhf": {"algorithm": "grpo", "num_generations": 2, "prompts_per_rollout": 2},
        "train": {"max_steps": 4, "batch_size": 4, "lr": 1e-3, "save_every_steps": 1},
        "output": {"plot": False},
    }
    p = tmp_path / "rl.yaml"
    p.write_text(yaml.safe_dump(d))
    code, out, err = invoke(["rlhf", p, "-o", tmp_path / "run", "-q"])
    assert code == 1, err
    s = last_json(out)
    assert "reward" in s["error"] and "returned inf" in s["error"]
    assert "Last good checkpoint:" in s["error"] and s["checkpoint"].endswith("step-2")
    assert runfolder.verify_checkpoint(Path(s["checkpoint"])) is None


def test_an_environment_that_hangs_mid_run_with_on_error_fatal_stops_naming_the_last_checkpoint(tmp_path):
    """rlhf in an environment (docs/environments.md) whose step starts hanging in the third rollout: with
    env.on_error fatal the run stops with exit 1 within the timeout, naming the environment, the call and the
    last good checkpoint; the hung call's thread does not keep the process alive."""
    (tmp_path / "stalls.py").write_text(
        "import time\n"
        "from prefcli.envs import Observation\n"
        "class Stalls:\n"
        "    resets = 0\n"
        "    def reset(self, seed=None):\n"
        "        Stalls.resets += 1\n"
        "        return Observation(text='say something')\n"
        "    def step(self, action):\n"
        "        if Stalls.resets > 8:\n"
        "            time.sleep(60)\n"
        "        return Observation(done=True, reward=float(len(action) % 2))\n"
    )
    d = {
        "command": "rlhf",
        "model": {"init": json.loads(json.dumps(TINY_INIT)), "tokenizer": str(ROOT / "data" / "tokenizer")},
        "env": {"kind": "python", "path": "stalls.py:Stalls", "max_turns": 1, "max_episode_tokens": 48,
                "timeout_s": 0.5, "on_error": "fatal"},
        "generation": {"max_new_tokens": 4},
        "rlhf": {"algorithm": "grpo", "num_generations": 2, "prompts_per_rollout": 2},
        "train": {"max_steps": 4, "batch_size": 4, "lr": 1e-3, "save_every_steps": 1},
        "output": {"plot": False},
    }  # fmt: skip
    p = tmp_path / "rl.yaml"
    p.write_text(yaml.safe_dump(d))
    t0 = time.monotonic()
    code, out, err = invoke(["rlhf", p, "-o", tmp_path / "run", "-q"])
    assert code == 1, err
    assert time.monotonic() - t0 < 50
    s = last_json(out)
    assert s["status"] == "failed" and "Stalls" in s["error"] and "step timed out" in s["error"], s["error"]
    assert "env.on_error is fatal" in s["error"] and "Last good checkpoint:" in s["error"]
    assert s["checkpoint"].endswith("step-2") and runfolder.verify_checkpoint(Path(s["checkpoint"])) is None


@pytest.mark.slow
def test_a_collapsed_run_says_so(tmp_path):
    """lr=1e6 collapses the bundled model to a uniform next-token distribution: the loss sits at ln(4096) with a
    gradient of exactly 0. The run completes, with a warning in the summary."""
    d = sft_recipe_dict(
        train={"max_steps": 4, "batch_size": 2, "lr": 1e6, "warmup_steps": 0},
        data={"eval": None, "max_length": 24, "train": {"max_rows": 8}},
        output={"save_final": False},
    )
    d["model"] = {"path": str(ROOT / "prefcli" / "assets" / "kjv-base")}
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(d))
    code, out, err = invoke(["sft", p, "-o", tmp_path / "run", "-q"])
    assert code == 0, err
    s = last_json(out)
    collapse = [w for w in s["warnings"] if "was exactly 0 at every step" in w]
    assert collapse and "ln(vocabulary size)" in collapse[0] and "lower it" in collapse[0], s["warnings"]
    assert s["final"]["grad_norm"] == 0.0
    assert abs(s["final"]["loss/sft"] - __import__("math").log(4096)) < 1e-3


# ------------------------------------------------------------------------------- folders one cannot use


@pytest.mark.slow
def test_read_only_and_unreadable_paths(tmp_path):
    """A read-only parent folder, a read-only run folder (--resume), an unreadable recipe and an unreadable data
    file: exit 2, named, nothing written. As root, permissions bind only with the capabilities dropped, so the
    cases run in one child process under `setpriv --bounding-set=-dac_override,-dac_read_search`."""
    prefix: tuple[str, ...] = ()
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv (util-linux): permissions cannot be made to bind")
        prefix = ("setpriv", "--bounding-set=-dac_override,-dac_read_search")
    p = recipe(tmp_path, train={"max_steps": 2, "eval_every_steps": None})
    run = tmp_path / "done"
    assert invoke(["sft", p, "-o", run, "-q"])[0] == 0
    ro_parent = tmp_path / "ro"
    ro_parent.mkdir()
    unreadable = tmp_path / "secret.yaml"
    shutil.copy(p, unreadable)
    data = tmp_path / "rows.jsonl"
    data.write_text('{"text": "a b c"}\n' * 8)
    data_recipe = recipe(tmp_path, "data.yaml", data={"train": {"path": str(data)}, "eval": None})
    cases = {
        "parent": ["sft", p, "-o", ro_parent / "run", "-q"],
        "resume": ["sft", p, "-o", run, "-q", "--resume", "--set", "train.max_steps=3"],
        "recipe": ["sft", unreadable, "-o", tmp_path / "x", "-q"],
        "data": ["sft", data_recipe, "-o", tmp_path / "y", "-q"],
    }
    script = (
        "import json, sys\n"
        "from tests.test_bad_inputs import invoke\n"
        "cases = json.loads(sys.argv[1])\n"
        "print(json.dumps({k: invoke(v) for k, v in cases.items()}))\n"
    )
    before = snapshot(tmp_path)
    os.chmod(ro_parent, 0o555)
    os.chmod(run, 0o555)
    os.chmod(run / "checkpoints", 0o555)
    os.chmod(unreadable, 0o000)
    os.chmod(data, 0o000)
    try:
        res = subprocess.run(
            [*prefix, sys.executable, "-c", script, json.dumps({k: [str(a) for a in v] for k, v in cases.items()})],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=600,
        )
    finally:
        for path, mode in (
            (ro_parent, 0o755),
            (run, 0o755),
            (run / "checkpoints", 0o755),
            (unreadable, 0o644),
            (data, 0o644),
        ):
            os.chmod(path, mode)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    expect = {
        "parent": f"{ro_parent} is not writable",
        "resume": f"{run} is not writable",
        "recipe": f"path '{unreadable}' is not readable",
        "data": f"could not read file {data}",
    }
    for name, (code, out, err) in got.items():
        assert code == 2, (name, out, err)
        assert "Traceback" not in err
        msg = json.loads(out.strip().splitlines()[-1])["error"]
        assert expect[name] in msg, (name, msg)
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------- SIGTERM, and user code that ends the run


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["sigterm-at-startup", "sigterm-while-plotting"])
def test_sigterm_keeps_the_stdout_contract_like_sigint(tmp_path, fault):
    """SIGTERM (a scheduler, `timeout`, `kill`) outside the training loop's own handler: while the task is built, and
    after summary.json is written while the curves are drawn. Before, the process died of the signal: no JSON object
    on stdout, no exit code of prefcli's. Now it is an interrupt like SIGINT: exit 130 and the object."""
    import matplotlib.pyplot  # noqa: F401  (imported here once, not in each fork: the forks start at once)

    import prefcli.algos.sft  # noqa: F401

    p = recipe(tmp_path, train={"max_steps": 2, "eval_every_steps": None}, output={"plot": True})
    run = tmp_path / "run"
    log = tmp_path / "log.json"
    code = run_forked(["sft", p, "-o", run, "-q"], fault, log)
    got = json.loads(log.read_text())
    assert code == 130, got["err"]
    s = last_json(got["out"])
    assert s["status"] == "interrupted" and s["exit_code"] == 130, s
    assert "Traceback" not in got["err"]
    if fault == "sigterm-at-startup":
        assert "before training started; nothing was written" in s["error"] and not run.exists()
    else:  # the run itself is complete: final/ and summary.json are there
        assert (run / "summary.json").exists() and (run / "final" / "model.safetensors").exists()
        assert s["checkpoint"].endswith("step-2"), s


def _rl_recipe(tmp_path: Path, function: str) -> Path:
    d = {
        "command": "rlhf",
        "model": {"init": json.loads(json.dumps(TINY_INIT)), "tokenizer": str(ROOT / "data" / "tokenizer")},
        "data": {
            "train": {"path": str(ROOT / "data" / "tiny" / "prompts.jsonl"), "max_rows": 8},
            "max_prompt_length": 16,
        },
        "rewards": [{"kind": "function", "function": function}],
        "generation": {"max_new_tokens": 4},
        "rlhf": {"algorithm": "grpo", "num_generations": 2, "prompts_per_rollout": 2},
        "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-3, "save_every_steps": 1},
        "output": {"plot": False},
    }
    p = tmp_path / "rl.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


@pytest.mark.parametrize(
    "body, says",
    [
        ("sys.exit(0)", "called sys.exit(0)"),
        ("exit()", "called sys.exit(None)"),
        ("raise KeyboardInterrupt", "raised KeyboardInterrupt with no interrupt received"),
    ],
)
def test_a_reward_function_that_ends_the_process_fails_naming_it(tmp_path, body, says):
    """A reward function's sys.exit(0) ended `prefcli rlhf` with exit 0, no JSON object and no final/. User code
    never ends a run: it is a failure (exit 1) naming the function and the last good checkpoint."""
    rules = tmp_path / "ends.py"
    rules.write_text(
        "import sys\ncalls = [0]\n"
        "def score(prompts, completions):\n"
        "    calls[0] += 1\n"
        f"    if calls[0] == 3:\n        {body}\n"
        "    return [0.5 * (i % 2) for i in range(len(completions))]\n"
    )
    code, out, err = invoke(["rlhf", _rl_recipe(tmp_path, f"{rules}:score"), "-o", tmp_path / "run", "-q"])
    assert code == 1, err
    s = last_json(out)
    assert s["status"] == "failed" and f"reward function '{rules}:score' {says}" in s["error"], s
    assert s["checkpoint"].endswith("step-2") and "Last good checkpoint" in s["error"]
    assert not (tmp_path / "run" / "final").exists()


def test_a_real_interrupt_inside_user_code_stays_an_interrupt():
    """user_code() tells the user's KeyboardInterrupt from a person's: after a SIGINT/SIGTERM was received (the
    handlers count them), a KeyboardInterrupt is the interrupt and passes through."""
    from prefcli import interrupts
    from prefcli.errors import TrainingError

    with pytest.raises(TrainingError, match="'f' raised KeyboardInterrupt with no interrupt received"):
        with interrupts.user_code("'f'", TrainingError):
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        with interrupts.user_code("'f'", TrainingError):
            interrupts.note()  # what the SIGINT/SIGTERM handlers do
            raise KeyboardInterrupt


# ------------------------------------------------------------------------- failures named for their cause


def _planted(monkeypatch, at_call: int, exc: BaseException) -> None:
    from prefcli.algos.sft import SFTTask

    plan_for = SFTTask.plan_for
    calls = [0]

    def planted(self, items):
        calls[0] += 1
        if calls[0] == at_call:
            raise exc
        return plan_for(self, items)

    monkeypatch.setattr(SFTTask, "plan_for", planted)


def test_out_of_memory_during_training_is_not_called_a_bug(tmp_path, monkeypatch):
    """torch's CPU allocator failing (what a batch too large for the machine raises) was reported as "unexpected
    RuntimeError ... a bug in prefcli". It is out of memory, with what to lower, exit 1, the checkpoint named."""
    _planted(monkeypatch, 3, RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate "
                                          "memory: you tried to allocate 68719476736 bytes"))  # fmt: skip
    code, out, err = invoke(["sft", recipe(tmp_path, train={"max_steps": 4}), "-o", tmp_path / "run", "-q"])
    assert code == 1 and "Traceback" not in err
    s = last_json(out)
    assert s["error"].startswith("step 3: out of memory (cpu) (RuntimeError: [enforce fail"), s
    assert "Lower train.batch_size" in s["error"] and "bug" not in s["error"] and s["checkpoint"].endswith("step-2")


def test_out_of_memory_outside_training_is_not_called_a_bug(tmp_path, monkeypatch):
    import prefcli.recipe

    def no_memory(*a, **k):
        raise MemoryError()

    monkeypatch.setattr(prefcli.recipe, "load_recipe", no_memory)
    code, out, err = invoke(["validate", recipe(tmp_path)])
    s = last_json(out)
    assert code == 1 and s["status"] == "failed" and s["error"].startswith("out of memory (MemoryError"), s
    assert "bug" not in s["error"] and "bug" not in err


def test_a_refused_write_gets_advice_for_its_cause(tmp_path, monkeypatch):
    """A checkpoint write refused for permissions was told to free disk space. Each refusal gets its own advice."""
    import errno

    commit = runfolder.commit_checkpoint

    def refused(tmp, step, *a, **k):
        if step == 2:
            raise PermissionError(errno.EACCES, "Permission denied", str(tmp / "state.json"))
        return commit(tmp, step, *a, **k)

    monkeypatch.setattr(runfolder, "commit_checkpoint", refused)
    code, out, err = invoke(["sft", recipe(tmp_path, train={"max_steps": 3}), "-o", tmp_path / "run", "-q"])
    assert code == 1, err
    s = last_json(out)
    assert "step 2: could not write the checkpoint: permission denied (PermissionError: [Errno 13]" in s["error"]
    assert "Fix the run folder's permissions" in s["error"] and "Free space" not in s["error"], s
    for n, fix in [(errno.ENOSPC, "Free space"), (errno.EFBIG, "ulimit -f"), (errno.EROFS, "writable")]:
        assert (
            runfolder.disk_fix(OSError(n, "x")).startswith(runfolder.DISK_FIXES[n]) and fix in runfolder.DISK_FIXES[n]
        )


def test_a_checkpoint_exception_is_named_by_the_failure_it_holds(tmp_path, monkeypatch):
    """torch.distributed.checkpoint wraps each rank's failure in CheckpointException, whose message is only
    "CheckpointException ranks:dict_keys([0])". Messages name the failure inside it."""
    from torch.distributed.checkpoint.api import CheckpointException, _wrap_exception

    try:
        raise ValueError("size mismatch for model.embed_tokens.weight: [4096, 32] against [4096, 64]")
    except ValueError as e:
        wrapped = CheckpointException("load", {0: _wrap_exception(e)})
    assert runfolder.error_text(wrapped).startswith("ValueError: size mismatch for model.embed_tokens.weight")

    p = recipe(tmp_path, train={"max_steps": 2, "eval_every_steps": None})
    run = tmp_path / "run"
    assert invoke(["sft", p, "-o", run, "-q"])[0] == 0

    def failing_load(*a, **k):
        raise wrapped

    monkeypatch.setattr(ckpt, "load_checkpoint", failing_load)
    code, out, err = invoke(["sft", p, "-o", run, "-q", "--resume", "--set", "train.max_steps=3"])
    assert code == 2, err
    s = last_json(out)
    assert "does not fit this recipe (ValueError: size mismatch for model.embed_tokens.weight" in s["error"], s
    assert "CheckpointException" not in s["error"]


# ------------------------------------------------------------------------------------ final/ and bugs


def test_final_is_replaced_only_once_the_new_one_is_whole(tmp_path):
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "model.safetensors").write_text("the earlier model")

    def fails_half_way(folder: Path) -> None:
        (folder / "config.json").write_text("{}")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        runfolder.write_final(tmp_path, fails_half_way)
    assert (tmp_path / "final" / "model.safetensors").read_text() == "the earlier model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    runfolder.write_final(tmp_path, lambda folder: (folder / "model.safetensors").write_text("the new model"))
    assert (tmp_path / "final" / "model.safetensors").read_text() == "the new model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_a_first_interrupt_while_final_is_written_lets_it_finish(tmp_path):
    from prefcli.engine.dist import Runtime
    from prefcli.engine.loop import Engine
    from prefcli.engine.progress import Progress

    rt = Runtime(device=torch.device("cpu"), precision="fp32")
    task = _Blowup(rt, bad=-1)
    engine = Engine(task, rt, task.train, Progress(True, 4, "t", None, quiet=True), tmp_path)

    def save(folder: Path) -> None:
        os.kill(os.getpid(), signal.SIGINT)  # caught by save_final's handler: the write goes on
        (folder / "model.safetensors").write_text("whole")

    assert engine.save_final(save) == tmp_path / "final"
    assert (tmp_path / "final" / "model.safetensors").read_text() == "whole"


def test_an_unexpected_error_during_training_names_the_last_checkpoint(tmp_path, monkeypatch):
    """A bug (here: an exception planted in the SFT task at step 3) is exit 1 with the failure object, no
    traceback, and the last good checkpoint."""
    from prefcli.algos.sft import SFTTask

    plan_for = SFTTask.plan_for
    calls = [0]

    def buggy(self, items):
        calls[0] += 1
        if calls[0] == 3:
            raise ZeroDivisionError("planted")
        return plan_for(self, items)

    monkeypatch.setattr(SFTTask, "plan_for", buggy)
    code, out, err = invoke(["sft", recipe(tmp_path, train={"max_steps": 4}), "-o", tmp_path / "run", "-q"])
    assert code == 1 and "Traceback" not in err
    s = last_json(out)
    assert s["status"] == "failed" and s["error"].startswith("step 3: unexpected ZeroDivisionError: planted")
    assert s["checkpoint"].endswith("step-2") and "please report it" in s["error"]


def test_an_unexpected_error_outside_training_keeps_the_contract(tmp_path, monkeypatch):
    import prefcli.recipe

    def broken(*a, **k):
        raise KeyError("planted")

    monkeypatch.setattr(prefcli.recipe, "load_recipe", broken)
    code, out, err = invoke(["validate", recipe(tmp_path)])
    assert code == 1 and "Traceback" not in err and "unexpected KeyError" in err
    assert last_json(out) == {
        "command": "validate",
        "status": "failed",
        "exit_code": 1,
        "error": "unexpected KeyError: 'planted'",
    }


@pytest.mark.slow
def test_label_store_read_only(tmp_path):
    """`prefcli label serve` on a read-only store (file 0444), and on a task whose folder is read-only with no store
    yet: exit 2, named, nothing written. As root, in a child without dac_override (see above)."""
    pytest.importorskip("uvicorn", reason="pip install 'prefcli[label]'")
    from .label_tasks import make_task

    prefix: tuple[str, ...] = ()
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv (util-linux): permissions cannot be made to bind")
        prefix = ("setpriv", "--bounding-set=-dac_override,-dac_read_search")
    task = make_task(tmp_path / "a", server={"port": 0})
    assert invoke(["label", "invite", task, "--rater", "ann"])[0] == 0
    fresh = make_task(tmp_path / "b", server={"port": 0})
    cases = {"file": ["label", "serve", task], "folder": ["label", "serve", fresh]}
    script = (
        "import json, sys\n"
        "from tests.test_bad_inputs import invoke\n"
        "print(json.dumps({k: invoke(v) for k, v in json.loads(sys.argv[1]).items()}))\n"
    )
    before = snapshot(tmp_path)
    os.chmod(task.parent / "task.db", 0o444)
    os.chmod(fresh.parent, 0o555)
    try:
        res = subprocess.run(
            [*prefix, sys.executable, "-c", script, json.dumps({k: [str(a) for a in v] for k, v in cases.items()})],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=300,
        )
    finally:
        os.chmod(task.parent / "task.db", 0o644)
        os.chmod(fresh.parent, 0o755)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    expect = {
        "file": "task.db is read-only; nothing was changed",
        "folder": f"the folder {fresh.parent} is not writable",
    }
    for name, (code, out, err) in got.items():
        assert code == 2 and "Traceback" not in err, (name, out, err)
        assert expect[name] in json.loads(out.strip().splitlines()[-1])["error"], (name, out)
    assert snapshot(tmp_path) == before
