"""Several processes on CPU with gloo, runtime.parallel ddp and fsdp (FSDP2): the same training as one
process (DDP and FSDP on two processes, FSDP as a single-process shard; KTO's reductions across processes),
sharded checkpoints that resume exactly and at another number of processes, per-rank memory halved on two
ranks, a two-node run on localhost, and a killed rank that stops the survivor instead of hanging.

Start-up dominates on a small machine, so the runs are shared: one module fixture trains the one-process
references in this process, one two-node launch (two torchrun agents, one process each) and one two-process
launch running several jobs (tests/dist_jobs.py); the tests then compare what those runs wrote.

Tolerance: losses and metrics of runs on different numbers of processes (or strategies) agree to 1e-4
relative or 1e-5 absolute (float32 reductions in another order); a resume on the same processes is
bit-identical."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from prefcli.engine import checkpoint as ckpt
from prefcli.runner import RunOptions, run_training

from .conftest import ROOT, last_json, losses, read_metrics, sft_recipe_dict
from .test_contrastive import pref_dict
from .test_rlhf import rlhf_recipe

pytestmark = pytest.mark.slow

TOL, REL = 1e-5, 1e-4
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def two_nodes(port: int, args: list[str]) -> list[subprocess.Popen]:
    """Two torchrun agents on localhost, one process each, one rendezvous: node 0 through `-m prefcli`, node 1
    through the installed console script (`--no-python prefcli`), the two documented forms."""
    script = Path(sys.executable).parent / "prefcli"
    forms = [["-m", "prefcli"], ["--no-python", str(script)]]
    return [
        subprocess.Popen(
            [*TORCHRUN, "--nnodes", "2", "--node-rank", str(r), "--nproc-per-node", "1"]
            + ["--rdzv-endpoint", f"127.0.0.1:{port}", *forms[r], *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env(),
        )
        for r in (0, 1)
    ]


def train(command: str, recipe: Path, out: Path, *sets: str, resume: bool = False) -> dict:
    return run_training(
        command, recipe, RunOptions(overrides=list(sets), output_dir=str(out), quiet=True, resume=resume)
    )


def copy_checkpoint(src: Path, step: int, dst: Path) -> None:
    (dst / "checkpoints").mkdir(parents=True)
    shutil.copytree(src / "checkpoints" / f"step-{step}", dst / "checkpoints" / f"step-{step}")


def metric(run: Path, key: str) -> dict[int, float]:
    return losses(run, key)


def near(x: float, y: float) -> bool:
    return x == pytest.approx(y, rel=REL, abs=TOL)


def close(a: dict, b: dict) -> bool:
    return sorted(a) == sorted(b) and all(near(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("fsdp")
    users = opposite_users(d)
    rec = {}
    for name, r in {
        "sft": sft_recipe_dict(train={"max_steps": 4, "save_every_steps": 2, "eval_every_steps": 2}),
        "dpo": pref_dict("dpo", train={"max_steps": 3, "batch_size": 4, "eval_every_steps": 3}),
        "grpo": rlhf_recipe(rlhf={"algorithm": "grpo"}, train={"max_steps": 3}),
        "kto": pref_dict("kto", train={"max_steps": 3, "eval_every_steps": 3}),
        "lora": sft_recipe_dict(
            model={"lora": {"r": 4}}, train={"max_steps": 3, "gradient_checkpointing": True, "lr": 1e-2}
        ),
        # personalised reward models: a user embedding (trains like one process), and the latent kind (its
        # training contexts are drawn per process, so two processes differ from one: it must run and save)
        "preward": personal_rm(users, "user_embedding"),
        "platent": personal_rm(users, "latent"),
    }.items():
        rec[name] = d / f"{name}.yaml"
        rec[name].write_text(yaml.safe_dump(r, sort_keys=False))
    fsdp = "runtime.parallel=fsdp"
    # one process: the references (batch 4 = 2 processes x 2)
    train("sft", rec["sft"], d / "sft_one")
    train("sft", rec["sft"], d / "sft_fsdp1", fsdp)  # fsdp without torchrun: a single-process shard
    train("contrastive", rec["dpo"], d / "dpo_one")
    train("sft", rec["lora"], d / "lora_one")
    train("reward", rec["preward"], d / "preward_one")
    train("contrastive", rec["kto"], d / "kto_one", "train.batch_size=4")
    # two nodes on localhost: fsdp sft, checkpoints at steps 2 and 4
    agents = two_nodes(
        free_port(),
        ["sft", str(rec["sft"]), "-o", str(d / "sft_2node"), "-q", "--set", fsdp] + ["--set", "train.batch_size=2"],
    )
    outs = [a.communicate(timeout=600) for a in agents]
    assert [a.returncode for a in agents] == [0, 0], outs[0][1][-3000:] + outs[1][1][-3000:]
    two_node_summary = last_json(outs[0][0])
    assert '"command"' not in outs[1][0]  # only rank 0 prints the summary
    # two processes, one launch: the other runs, and resumes from checkpoints of the runs above
    copy_checkpoint(d / "sft_2node", 2, d / "resume22")
    copy_checkpoint(d / "sft_one", 2, d / "resume12")
    b2 = "train.batch_size=2"
    jobs = [
        ("sft", "sft", "sft_ddp2", [b2], False),
        ("contrastive", "dpo", "dpo_fsdp2", [fsdp, b2], False),
        ("contrastive", "dpo", "dpo_ddp2", [b2], False),
        ("rlhf", "grpo", "grpo_fsdp2", [fsdp], False),
        ("rlhf", "grpo", "grpo_ddp2", [], False),
        ("sft", "lora", "lora_fsdp2", [fsdp, b2], False),
        ("reward", "preward", "preward_fsdp2", [fsdp, b2], False),
        ("reward", "preward", "preward_ddp2", [b2], False),
        ("reward", "platent", "platent_fsdp2", [fsdp, b2], False),
        ("contrastive", "kto", "kto_ddp2", [b2], False),
        ("sft", "sft", "resume22", [fsdp, b2], True),
        ("sft", "sft", "resume12", [fsdp, b2], True),  # written by one ddp process, resumed by two fsdp ones
    ]
    spec = [
        {"command": c, "recipe": str(rec[r]), "out": str(d / o), "set": s, "resume": res} for c, r, o, s, res in jobs
    ]
    (d / "jobs.json").write_text(json.dumps(spec))
    res = subprocess.run(
        [*TORCHRUN, "--nproc_per_node", "2", "--master_port", str(free_port()), str(ROOT / "tests" / "dist_jobs.py")]
        + [str(d / "jobs.json")],
        capture_output=True,
        text=True,
        timeout=900,
        env=env(),
    )
    assert res.returncode == 0, res.stderr[-5000:]
    # back to one process: the two-node run's step-2 shards resumed by a single-process shard, and by ddp
    copy_checkpoint(d / "sft_2node", 2, d / "resume21")
    train("sft", rec["sft"], d / "resume21", fsdp, resume=True)
    copy_checkpoint(d / "sft_2node", 2, d / "resume21_ddp")
    train("sft", rec["sft"], d / "resume21_ddp", resume=True)
    return d, rec, two_node_summary


def opposite_users(d: Path) -> Path:
    """Users a and b with opposite labels on the same pairs (tests/test_personal.py's constructed users)."""
    from .conftest import DATA

    rows = [json.loads(x) for x in (DATA / "tiny" / "pref_train.jsonl").read_text().splitlines()[:48]]
    flip = [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r in rows]
    out = d / "opposite.jsonl"
    out.write_text(
        "".join(json.dumps({**r, "rater": u}) + "\n" for a, b in zip(rows, flip) for r, u in ((a, "a"), (b, "b")))
    )
    return out


def personal_rm(data: Path, kind: str) -> dict:
    from .conftest import TINY_INIT, TOKENIZER

    return {
        "command": "reward",
        "model": {"init": json.loads(json.dumps(TINY_INIT)), "tokenizer": str(TOKENIZER)},
        "data": {"train": {"path": str(data)}, "eval_fraction": 0.25, "max_length": 64},
        "reward": {"personalisation": {"kind": kind, "new_user_labels": [0]}},
        "train": {"max_steps": 3, "batch_size": 4, "lr": 3e-3, "seed": 0, "eval_every_steps": 3},
        "output": {"plot": False},
    }


def test_fsdp_trains_like_ddp_and_like_one_process(runs):
    d, _, s = runs
    assert s["world_size"] == 2 and s["parallel"] == "fsdp" and s["steps"] == 4
    one = metric(d / "sft_one", "loss/sft")
    assert sorted(one) == [1, 2, 3, 4]
    assert metric(d / "sft_fsdp1", "loss/sft") == one  # a single-process shard is the plain run, bit for bit
    for run in ("sft_2node", "sft_ddp2"):
        assert close(metric(d / run, "loss/sft"), one), run
        assert close(metric(d / run, "eval/loss"), metric(d / "sft_one", "eval/loss")), run
    dpo = metric(d / "dpo_one", "loss/dpo")
    assert sorted(dpo) == [1, 2, 3]
    for run in ("dpo_fsdp2", "dpo_ddp2"):
        assert close(metric(d / run, "loss/dpo"), dpo), run
        assert close(metric(d / run, "reward/margin"), metric(d / "dpo_one", "reward/margin")), run
    # RL: each process samples with its own random stream, so two processes sample other completions than one;
    # FSDP and DDP on the same two processes must agree on everything the rollout and the update measure
    ddp, fsdp = read_metrics(d / "grpo_ddp2"), read_metrics(d / "grpo_fsdp2")
    assert len(ddp) == len(fsdp) == 4  # 3 steps + the final evaluation
    for a, b in zip(ddp, fsdp):
        for k, v in a.items():
            if isinstance(v, float) and not k.startswith("perf/") and k != "time_s":
                assert near(b[k], v), (k, b[k], v)
    assert any(r.get("reward/std", 0) > 0 for r in fsdp)  # the groups had something to learn from
    # a personalised reward model: the user vectors and the shared model train alike on 1 and 2 processes, and the
    # user part in final/ is the same
    one = metric(d / "preward_one", "loss/bradley_terry")
    assert sorted(one) == [1, 2, 3]
    for run in ("preward_fsdp2", "preward_ddp2"):
        assert close(metric(d / run, "loss/bradley_terry"), one), run
        assert close(metric(d / run, "eval/accuracy/a"), metric(d / "preward_one", "eval/accuracy/a")), run
        a = load_file(str(d / "preward_one" / "final" / "personalisation" / "model.safetensors"))
        b = load_file(str(d / run / "final" / "personalisation" / "model.safetensors"))
        assert sorted(a) == sorted(b) and all(torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4) for k in a), run
    s = json.loads((d / "platent_fsdp2" / "summary.json").read_text())
    assert s["status"] == "completed" and s["parallel"] == "fsdp" and s["world_size"] == 2
    cfg = json.loads((d / "platent_fsdp2" / "final" / "personalisation" / "config.json").read_text())
    assert cfg["kind"] == "latent" and cfg["users"] == ["a", "b"]


def test_kto_on_two_processes_equals_one(runs):
    """Reference tables computed in shards and all-reduced, and KTO's KL estimate reduced across processes:
    2 processes x 2 rows train like 1 process x 4 rows."""
    d, _, _ = runs
    s = json.loads((d / "kto_ddp2" / "summary.json").read_text())
    one = json.loads((d / "kto_one" / "summary.json").read_text())
    assert s["world_size"] == 2
    a, b = metric(d / "kto_ddp2", "loss/kto"), metric(d / "kto_one", "loss/kto")
    assert sorted(a) == [1, 2, 3] and all(a[k] == pytest.approx(b[k], abs=1e-5) for k in a)
    for k in ("eval/loss", "eval/accuracy", "eval/kl_estimate", "kl/estimate"):
        assert s["final"][k] == pytest.approx(one["final"][k], abs=1e-5), k


def test_sharded_checkpoints_resume_exactly_and_at_another_world_size(runs):
    d, _, _ = runs
    cp = d / "sft_2node" / "checkpoints" / "step-2"
    assert len(list((cp / "model-policy").glob("*.safetensors"))) == 2  # each rank wrote its own shard
    assert len(list((cp / "optim-policy").glob("*.safetensors"))) == 2
    state = json.loads((cp / "state.json").read_text())
    assert state["world_size"] == 2 and state["parallel"] == "fsdp"
    full = metric(d / "sft_2node", "loss/sft")
    r22 = metric(d / "resume22", "loss/sft")
    assert sorted(r22) == [3, 4] and all(r22[k] == full[k] for k in r22)  # same processes: bit-identical
    assert metric(d / "resume22", "eval/loss")[4] == metric(d / "sft_2node", "eval/loss")[4]
    one = metric(d / "sft_one", "loss/sft")
    for run in ("resume21", "resume21_ddp", "resume12"):  # 2 -> 1 (fsdp -> fsdp, fsdp -> ddp), 1 -> 2 (ddp -> fsdp)
        got = metric(d / run, "loss/sft")
        assert sorted(got) == [3, 4] and all(near(got[k], one[k]) for k in got), run
    # the shards read back whole equal the one-process checkpoint of the same step
    a = ckpt.read_tensors(cp / "model-policy")
    b = ckpt.read_tensors(d / "sft_one" / "checkpoints" / "step-2" / "model-policy")
    assert sorted(a) == sorted(b) and all(torch.allclose(a[k], b[k], atol=TOL) for k in a)


def test_per_rank_memory_halves_on_two_ranks(runs):
    d, _, s = runs
    one = json.loads((d / "sft_fsdp1" / "summary.json").read_text())["memory"]["policy"]
    two = s["memory"]["policy"]
    ddp = json.loads((d / "sft_ddp2" / "summary.json").read_text())["memory"]["policy"]
    for k in ("params_bytes", "grads_bytes", "optim_bytes"):
        assert len(two[k]) == 2 and one[k][0] > 0
        for b in two[k]:  # measured after the first step: each rank holds half (AdamW's step counters are whole)
            assert 0.49 <= b / one[k][0] <= 0.51, (k, b, one[k][0])
        assert ddp[k] == [one[k][0]] * 2  # DDP: every rank holds everything


def test_final_folder_is_plain_hugging_face_and_lora_with_checkpointing_works(runs):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    d, _, _ = runs
    a = AutoModelForCausalLM.from_pretrained(d / "sft_2node" / "final").state_dict()
    b = AutoModelForCausalLM.from_pretrained(d / "sft_one" / "final").state_dict()
    assert sorted(a) == sorted(b) and all(torch.allclose(a[k], b[k], atol=TOL) for k in a)
    assert close(metric(d / "lora_fsdp2", "loss/sft"), metric(d / "lora_one", "loss/sft"))
    for f in ("model.safetensors", "adapter/adapter_model.safetensors"):  # merged model, and the adapter alone
        x, y = load_file(str(d / "lora_fsdp2" / "final" / f)), load_file(str(d / "lora_one" / "final" / f))
        assert sorted(x) == sorted(y) and all(torch.allclose(x[k], y[k], atol=TOL) for k in x), f
    assert any("lora_A" in k for k in x)


def test_resume_refuses_what_it_cannot_continue(runs, tmp_path, cli):
    d, rec, _ = runs
    # 2 -> 1 process with the batch unchanged: 2 examples per step instead of 4
    copy_checkpoint(d / "sft_2node", 2, tmp_path / "r")
    code, out, _ = cli("sft", rec["sft"], "-o", tmp_path / "r", "--resume", "-q", "--set", "train.batch_size=2")
    err = last_json(out)["error"]
    assert code == 2 and "2 process(es)" in err and "train.batch_size x train.grad_accum_steps to 4" in err
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["checkpoints"]  # nothing written
    # 2 -> 3 processes cannot keep 4 examples per step; 2 -> 4 can, with 1 per process; same world: no problem
    assert "does not split evenly over 3 processes" in ckpt.world_change_problem(2, 4, 3, 6)
    assert "train.batch_size x train.grad_accum_steps to 1" in ckpt.world_change_problem(2, 4, 4, 8)
    assert ckpt.world_change_problem(2, 4, 2, 8) is None and ckpt.world_change_problem(2, 4, 1, 4) is None
    # a checkpoint of the earlier single-file layout: refused, not misread
    old = tmp_path / "old" / "checkpoints" / "step-1"
    old.mkdir(parents=True)
    (old / "state.json").write_text(json.dumps({"step": 1, "task": {}, "updates": {"policy": 1}}))
    (old / "model-policy.safetensors").write_bytes(b"")
    code, out, _ = cli("sft", rec["sft"], "-o", tmp_path / "old", "--resume", "-q", "--set", "runtime.parallel=fsdp")
    assert code == 2 and "earlier prefcli" in last_json(out)["error"]
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == ["checkpoints"]


@pytest.mark.parametrize("how", ["kill", "stall"])
def test_a_dead_or_stalled_rank_stops_the_survivor(tmp_path, write_recipe, how):
    """Two nodes; after the step-2 checkpoint, node 1's training process is killed (or stopped, SIGSTOP: a
    stall, no connection is closed). The survivor exits 1 within runtime.timeout_s plus a margin for
    start-up of the error path, naming the step and the last checkpoint."""
    timeout_s = 15
    p = write_recipe(sft_recipe_dict(train={"max_steps": 10_000, "save_every_steps": 2, "keep_checkpoints": 5}))
    out = tmp_path / "run"
    args = ["sft", str(p), "-o", str(out), "-q", "--set", "runtime.parallel=fsdp", "--set", "train.batch_size=2"]
    agents = two_nodes(free_port(), args + ["--set", f"runtime.timeout_s={timeout_s}"])
    worker = None
    try:
        t0 = time.time()
        while not (out / "checkpoints" / "step-2").exists():
            assert time.time() - t0 < 300 and agents[0].poll() is None, "the run did not reach its first checkpoint"
            time.sleep(0.5)
        pids = subprocess.run(["ps", "-o", "pid=", "--ppid", str(agents[1].pid)], capture_output=True, text=True)
        worker = int(pids.stdout.split()[0])  # node 1's training process (the torchrun agent's child)
        os.kill(worker, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        t_kill = time.time()
        stdout, stderr = agents[0].communicate(timeout=timeout_s + 120)
        waited = time.time() - t_kill
    finally:
        for proc in agents:
            if proc.poll() is None:
                proc.kill()
        if worker is not None and how == "stall":
            os.kill(worker, signal.SIGKILL)
    assert agents[0].returncode == 1, stderr[-3000:]
    assert waited < timeout_s + 45, waited
    err = last_json(stdout)
    assert err["exit_code"] == 1 and err["status"] == "failed"
    assert "a collective operation across the 2 processes failed" in err["error"]
    assert f"runtime.timeout_s={timeout_s}" in err["error"] and "--resume" in err["error"]
    assert "Last good checkpoint: " in err["error"] and str(out / "checkpoints" / "step-") in err["error"]
    assert err["error"].startswith("step ")


def test_cpu_offload_refuses_what_it_cannot_serve(tmp_path, write_recipe, cli):
    p = write_recipe(sft_recipe_dict())
    for sets, expected in (
        (["runtime.fsdp.cpu_offload=true"], "runtime.parallel is 'ddp'"),  # offloading needs sharding
        (["runtime.parallel=fsdp", "runtime.fsdp.cpu_offload=true"], "nothing to offload"),  # CPU device
    ):
        out = tmp_path / "x"
        code, stdout, _ = cli("sft", p, "-o", out, "-q", *[a for s in sets for a in ("--set", s)])
        assert code == 2 and expected in last_json(stdout)["error"], stdout
        assert not out.exists()


def test_a_sharded_lora_root_saves_like_the_plain_model(tmp_path):
    """A reward model with LoRA is itself the FSDP root: FSDP2 turns its class into a subclass of its own, and
    final/ must still hold the merged model and the adapter, equal to what the unsharded model saves."""
    import copy

    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from prefcli.engine.dist import setup_runtime, teardown
    from prefcli.engine.models import apply_lora, is_peft, save_hf
    from prefcli.recipe.sections import LoraSection

    from .conftest import TINY_INIT, TOKENIZER

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    cfg = AutoConfig.for_model("qwen2", vocab_size=len(tok), num_labels=1, **TINY_INIT["config"])
    cfg.pad_token_id = tok.pad_token_id
    torch.manual_seed(0)
    model = apply_lora(AutoModelForSequenceClassification.from_config(cfg), LoraSection(r=4), "SEQ_CLS")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()  # a non-zero adapter, so that merging changes the weights
    plain = copy.deepcopy(model)
    rt = setup_runtime("cpu", "fp32", parallel="fsdp")
    try:
        rt.wrap(model)
        assert is_peft(model) and type(model).__name__.startswith("FSDP")
        save_hf(model, tok, tmp_path / "sharded", rt)
    finally:
        teardown(rt)
    save_hf(plain, tok, tmp_path / "plain", setup_runtime("cpu", "fp32"))
    for f in ("model.safetensors", "adapter/adapter_model.safetensors"):
        a, b = load_file(str(tmp_path / "sharded" / f)), load_file(str(tmp_path / "plain" / f))
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a), f
    cfg_a = json.loads((tmp_path / "sharded" / "config.json").read_text())
    assert cfg_a["architectures"] == ["Qwen2ForSequenceClassification"]
