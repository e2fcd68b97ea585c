"""Loop invariants: schedules, accumulation == larger batch, resume == uninterrupted, NaN guard,
checkpoints that are safetensors + JSON only."""

import json
import math
import shutil

import pytest
import torch
from torch import nn

from prefcli.engine import runfolder
from prefcli.engine.dist import Runtime
from prefcli.engine.loop import Engine
from prefcli.engine.progress import Progress
from prefcli.engine.task import Group, Micro, Plan, lr_factor
from prefcli.errors import TrainingError
from prefcli.recipe.sections import TrainSection
from prefcli.runner import RunOptions, run_training

from .conftest import losses, sft_recipe_dict


def test_lr_schedules_by_hand():
    # warmup 2 of 10 steps, cosine to 10%
    assert lr_factor(1, 10, 2, "cosine", 0.1) == 0.5
    assert lr_factor(2, 10, 2, "cosine", 0.1) == 1.0
    assert lr_factor(3, 10, 2, "cosine", 0.1) == pytest.approx(1.0)
    assert lr_factor(7, 10, 2, "cosine", 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(10, 10, 2, "linear", 0.0) == pytest.approx(1 - 7 / 8)
    assert lr_factor(5, 10, 0, "constant", 0.0) == 1.0


def run(tmp_path, write_recipe, name, overrides=(), **upd):
    p = write_recipe(sft_recipe_dict(**upd), name=f"{name}.yaml")
    out = tmp_path / name
    summary = run_training("sft", p, RunOptions(overrides=list(overrides), output_dir=str(out), quiet=True))
    return summary, out


@pytest.mark.slow
def test_gradient_accumulation_equals_the_larger_batch(tmp_path, write_recipe):
    """Token-weighted over the whole accumulated batch: 8 x 1 == 2 x 4 == 1 x 8."""
    base = {"train": {"max_steps": 3, "lr": 1e-2, "eval_every_steps": None}, "data": {"eval": None}}
    _, a = run(tmp_path, write_recipe, "b8", ["train.batch_size=8", "train.grad_accum_steps=1"], **base)
    _, b = run(tmp_path, write_recipe, "b2x4", ["train.batch_size=2", "train.grad_accum_steps=4"], **base)
    _, c = run(tmp_path, write_recipe, "b1x8", ["train.batch_size=1", "train.grad_accum_steps=8"], **base)
    la, lb, lc = losses(a), losses(b), losses(c)
    assert len(la) == 3
    for s in la:
        assert lb[s] == pytest.approx(la[s], abs=1e-5)
        assert lc[s] == pytest.approx(la[s], abs=1e-5)
    # and the weights they end with are the same
    from safetensors.torch import load_file

    wa, wc = load_file(str(a / "final" / "model.safetensors")), load_file(str(c / "final" / "model.safetensors"))
    assert max((wa[k] - wc[k]).abs().max().item() for k in wa) < 1e-5


@pytest.mark.slow
def test_resume_equals_the_uninterrupted_run(tmp_path, write_recipe):
    upd = {"train": {"max_steps": 6, "save_every_steps": 3, "eval_every_steps": 3}}
    full_summary, full = run(tmp_path, write_recipe, "full", **upd)
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-3", resumed / "checkpoints" / "step-3")
    p = write_recipe(sft_recipe_dict(**upd), name="again.yaml")
    s = run_training("sft", p, RunOptions(output_dir=str(resumed), resume=True, quiet=True))
    assert s["resumed_from"].endswith("step-3") and s["steps"] == 6
    lf, lr = losses(full), losses(resumed)
    assert sorted(lr) == [4, 5, 6]
    for step in lr:
        assert lr[step] == lf[step]  # bit-identical: same data order, RNG, optimizer state
    assert s["final"]["eval/loss"] == full_summary["final"]["eval/loss"]


@pytest.mark.slow
def test_checkpoint_holds_only_safetensors_and_json(tmp_path, write_recipe):
    _, out = run(tmp_path, write_recipe, "ck", train={"max_steps": 2, "save_every_steps": 1, "keep_checkpoints": 1})
    cps = runfolder.complete_checkpoints(out)
    assert [s for s, _ in cps] == [2]  # keep_checkpoints=1 pruned step-1
    files = sorted(p.name for p in cps[0][1].iterdir())
    # the completion marker, written last (engine/runfolder.py), and one safetensors file per writing process
    assert files == ["complete.json", "model-policy", "optim-policy", "rng-rank0.safetensors", "state.json"]
    for part in ("model-policy", "optim-policy"):
        assert [p.suffix for p in (cps[0][1] / part).iterdir()] == [".safetensors"]
    state = json.loads((cps[0][1] / "state.json").read_text())
    assert state["step"] == 2 and state["task"]["index"] >= 1
    assert not list(out.glob("checkpoints/.tmp-*"))


class _NaNTask:
    """A minimal Task (the protocol the loop trains through) whose loss turns NaN at step 3."""

    def __init__(self, rt, bad_step=3):
        torch.manual_seed(0)
        self.net = nn.Linear(4, 1)
        self.train = TrainSection(max_steps=5, lr=0.1, save_every_steps=2)
        self.groups = {"net": Group("net", self.net, rt, self.train, 5)}
        self.bad_step = bad_step
        self.step = 0

    def total_steps(self):
        return 5

    def plans(self, start_step):
        x = torch.randn(8, 4)
        while True:
            self.step += 1
            bad = self.step == self.bad_step

            def loss_fn(model, batch, bad=bad):
                out = model(batch).pow(2).sum()
                return (out * float("nan") if bad else out), {"x/mean": (out.detach(), 8)}

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


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_fused_optimizer_skips_the_update_when_found_inf_is_set(parallel):
    """The mechanism the loop relies on to launch the step before reading the gradient norm; under fsdp the
    parameters are DTensors (a single-process shard here) and fused AdamW must honour found_inf on them too."""
    from torch.distributed.tensor import DTensor

    from prefcli.engine.dist import setup_runtime, teardown

    rt = setup_runtime("cpu", "fp32", parallel=parallel)
    try:
        net = nn.Linear(3, 1)
        g = Group("g", net, rt, TrainSection(lr=0.1), 10)
        assert g.fused and isinstance(net.weight, DTensor) == (parallel == "fsdp")
        g.module(torch.ones(1, 3)).sum().backward()
        before = (net.weight.detach().full_tensor() if parallel == "fsdp" else net.weight.detach()).clone()
        g.optimizer.found_inf = torch.ones(())
        g.optimizer.step()
        after = net.weight.detach()
        assert torch.equal(before, after.full_tensor() if parallel == "fsdp" else after)
        g.optimizer.found_inf = torch.zeros(())
        g.optimizer.step()
        after = net.weight.detach()
        assert not torch.equal(before, after.full_tensor() if parallel == "fsdp" else after)
    finally:
        teardown(rt)


def test_nan_loss_stops_before_the_update_and_keeps_the_checkpoint(tmp_path):
    rt = Runtime(device=torch.device("cpu"), precision="fp32")
    task = _NaNTask(rt)
    progress = Progress(True, 5, "t", tmp_path, quiet=True)
    engine = Engine(task, rt, task.train, progress, tmp_path)
    after_updates = []
    orig_step = task.groups["net"].optimizer.step

    def spy():
        orig_step()
        after_updates.append(task.net.weight.detach().clone())

    task.groups["net"].optimizer.step = spy
    with pytest.raises(
        TrainingError,
        match=r"step 3: loss is nan; stopped before the optimizer step\. "
        r"Last good checkpoint: .*step-2",
    ):
        engine.run()
    progress.close()
    # the weights are those left by step 2's update: the NaN step's update was never applied (the
    # fused optimizer is launched with found_inf set and skips it; others are not called at all)
    assert task.groups["net"].fused is True
    assert len(after_updates) in (2, 3)
    assert torch.equal(task.net.weight.detach(), after_updates[1])
    assert task.net.weight.grad is None
    assert (tmp_path / "checkpoints" / "step-2" / "state.json").exists()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["x/mean"] == pytest.approx(rows[0]["loss/net"])  # both: summed output / 8 units


@pytest.mark.parametrize("width", [80, 100, 200])
def test_the_progress_bar_keeps_the_step_counter_and_eta_on_a_narrow_terminal(width, monkeypatch):
    """The metrics text is cut to what the terminal leaves: at 80 columns rich used to drop the step counter and the
    ETA to make room for it."""
    import io
    import re

    from rich.console import Console

    from prefcli.engine import progress as P

    buf = io.StringIO()
    console = Console(file=buf, width=width, force_terminal=True, color_system=None)
    monkeypatch.setattr(P, "Console", lambda **kw: console)
    p = P.Progress(True, 400, "prefcli contrastive", None)
    record = {"loss/dpo": 0.6931, "loss/sft": 2.345, "eval/loss": 0.6912, "lr": 2e-4, "perf/tokens_per_s": 12345.0}
    p.step(12, record)
    p._bar.refresh()
    p.close()
    line = buf.getvalue().replace("\x1b[2K", "\r").split("\r")[-1]
    line = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", line).strip()  # the cursor codes
    assert line.startswith("prefcli contrastive ") and " 12/400 " in line, line
    assert re.search(r" (\d:\d\d:\d\d|-:--:--) loss/dpo 0.6931", line), line
    assert len(line) <= width
    full = "loss/dpo 0.6931  loss/sft 2.345  eval/loss 0.6912  lr 0.0002  perf/tokens_per_s 12,345"
    assert line.endswith(full) if width == 200 else line.endswith("…")
