"""`prefcli rlhf` end to end: every algorithm, the frozen reference, failing reward functions,
exact resume from a checkpoint taken in the middle of a rollout, stop strings, the HF fallback."""

import json
import shutil

import pytest
import torch

from prefcli.algos.rlhf.sampling import apply_stop_strings
from prefcli.engine.rollout import Rollout

from .conftest import DATA, TINY_INIT, TOKENIZER, deep_update, last_json, losses


def rlhf_recipe(**upd):
    r = {
        "command": "rlhf",
        "model": {"init": json.loads(json.dumps(TINY_INIT)), "tokenizer": str(TOKENIZER)},
        "data": {
            "train": {"path": str(DATA / "tiny" / "prompts.jsonl"), "max_rows": 16},
            "eval": {"path": str(DATA / "tiny" / "prompts_eval.jsonl"), "max_rows": 4},
            "max_prompt_length": 16,
        },
        "rewards": [{"kind": "sentiment"}, {"kind": "length", "target": 4, "weight": 0.1}],
        "generation": {"max_new_tokens": 6},
        "rlhf": {"num_generations": 2, "prompts_per_rollout": 2, "kl_coef": 0.05},
        "train": {"max_steps": 2, "batch_size": 2, "lr": 1e-3},
        "output": {"plot": False},
    }
    return deep_update(r, upd)


@pytest.mark.parametrize("algo", ["ppo", "rloo", "grpo", "reinforce_pp"])
def test_each_algorithm_end_to_end(algo, tmp_path, write_recipe, cli):
    extra = {"rlhf": {"algorithm": algo}}
    if algo == "ppo":
        extra["rlhf"].update(epochs_per_rollout=2, minibatches_per_epoch=2)
    code, stdout, stderr = cli("rlhf", write_recipe(rlhf_recipe(**extra)), "-o", tmp_path / "run", "-q")
    assert code == 0, stderr
    s = last_json(stdout)
    f = s["final"]
    assert s["steps"] == 2 and s["rlhf"]["algorithm"] == algo and s["rlhf"]["sampler"] == "FastDecoder"
    for key in (
        "reward/mean",
        "reward/std",
        "reward/sentiment",
        "reward/length",
        "kl/mean",
        "length/mean",
        "reward/zero_var_groups",
        "policy/clipfrac",
        "policy/entropy",
        "perf/samples_per_s",
        "eval/reward",
        "eval/kl",
        f"loss/{algo}",
    ):
        assert key in f, key
    assert ("value/loss" in f) == (algo == "ppo")
    assert ("kl/k3" in f) == (algo == "grpo")
    assert s["rlhf"]["rollouts"] == (1 if algo == "ppo" else 2)
    assert (tmp_path / "run" / "samples.jsonl").exists()
    if algo == "ppo":
        assert (tmp_path / "run" / "final" / "value_head.safetensors").exists()


def _build(recipe_path, tmp_path):
    from prefcli.algos.rlhf import build
    from prefcli.engine.dist import Runtime
    from prefcli.recipe import load_recipe
    from prefcli.runner import RunContext

    rt = Runtime(device=torch.device("cpu"), precision="fp32")
    ctx = RunContext(recipe=load_recipe(recipe_path).recipe, rt=rt, run_dir=tmp_path)
    return build(ctx)


def _run_steps(task, n, tmp_path):
    from prefcli.engine.loop import Engine
    from prefcli.engine.progress import Progress

    task.ctx.recipe.train.max_steps = n
    task.learner.total_updates = n
    Engine(task, task.ctx.rt, task.ctx.recipe.train, Progress(False, n, "t", None), tmp_path).run()


def test_reference_gets_no_gradient_and_stays_frozen(tmp_path, write_recipe):
    task = _build(write_recipe(rlhf_recipe()), tmp_path)
    ref = {n: p.detach().clone() for n, p in task.learner.ref_policy.named_parameters()}
    pol = {n: p.detach().clone() for n, p in task.learner.policy.named_parameters()}
    _run_steps(task, 2, tmp_path)
    for n, p in task.learner.ref_policy.named_parameters():
        assert p.grad is None and not p.requires_grad and torch.equal(p, ref[n]), n
    assert any(not torch.equal(p, pol[n]) for n, p in task.learner.policy.named_parameters())
    opt_params = {id(p) for g in task.groups["policy"].optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in opt_params for p in task.learner.ref_policy.parameters())


def test_lora_reference_is_the_base_model(tmp_path, write_recipe):
    task = _build(write_recipe(rlhf_recipe(model={"lora": {"r": 4}})), tmp_path)
    assert task.learner.ref_policy is None  # no second copy: adapters off is the reference
    base = {n: p.detach().clone() for n, p in task.learner.lm.named_parameters() if "lora" not in n}
    _run_steps(task, 2, tmp_path)
    for n, p in task.learner.lm.named_parameters():
        if "lora" not in n:
            assert torch.equal(p, base[n]), n
    seq = task.learner.buffer
    from prefcli.engine.models import reference_mode

    with torch.no_grad(), reference_mode(task.learner.lm):
        lp_ref, _ = task.learner.policy(
            seq["input_ids"], seq["targets"], seq["attention_mask"], seq["position_ids"], start=int(seq["start"])
        )
    assert torch.allclose(lp_ref, seq["ref_logp"], atol=1e-5)


def test_failing_reward_function_stops_with_exit_1_and_keeps_the_checkpoint(tmp_path, write_recipe, cli):
    (tmp_path / "flaky.py").write_text(
        "import pathlib\n"
        "def score(prompts, completions):\n"
        "    f = pathlib.Path(__file__).with_name('calls.txt')\n"
        "    n = int(f.read_text()) if f.exists() else 0\n"
        "    f.write_text(str(n + 1))\n"
        "    if n >= 2:\n"
        "        raise RuntimeError('the rater went home')\n"
        "    return [0.5] * len(completions)\n"
    )
    d = rlhf_recipe(
        rewards=[{"kind": "function", "function": "flaky.py:score"}], train={"max_steps": 6, "save_every_steps": 1}
    )
    d["data"]["eval"] = None
    code, stdout, stderr = cli("rlhf", write_recipe(d), "-o", tmp_path / "run", "-q")
    assert code == 1, stderr
    assert "reward '" in stderr and "flaky.py:score' raised RuntimeError: the rater went home" in stderr
    assert last_json(stdout)["status"] == "failed"
    assert (tmp_path / "run" / "checkpoints" / "step-2" / "state.json").exists()


def test_resume_from_the_middle_of_a_rollout_is_exact(tmp_path, write_recipe, cli):
    d = rlhf_recipe(
        rlhf={"algorithm": "ppo", "epochs_per_rollout": 2, "minibatches_per_epoch": 2},
        train={"max_steps": 6, "save_every_steps": 1, "keep_checkpoints": 10},
    )
    d["data"]["eval"] = None
    p = write_recipe(d)
    code, _, stderr = cli("rlhf", p, "-o", tmp_path / "full", "-q")
    assert code == 0, stderr
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-2", tmp_path / "resumed" / "checkpoints" / "step-2")
    code, stdout, stderr = cli("rlhf", p, "-o", tmp_path / "resumed", "-q", "--resume")
    assert code == 0, stderr
    a, b = losses(tmp_path / "full", "loss/ppo"), losses(tmp_path / "resumed", "loss/ppo")
    assert sorted(b) == [3, 4, 5, 6]  # steps 3-4 finish the rollout begun before the checkpoint
    for step in b:
        assert b[step] == a[step], step


def test_stop_strings_cut_and_finish(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    ids = tok("Let there be light. And there was", add_special_tokens=False)["input_ids"]
    n = len(ids)
    r = Rollout(
        prompt_ids=torch.zeros(1, 1, dtype=torch.long),
        prompt_mask=torch.ones(1, 1, dtype=torch.long),
        completion_ids=torch.tensor([ids]),
        completion_mask=torch.ones(1, n, dtype=torch.long),
        finished=torch.tensor([False]),
    )
    out = apply_stop_strings(r, tok, ["."], tok.pad_token_id)
    kept = int(out.completion_mask.sum())
    assert tok.decode(out.completion_ids[0, :kept]).endswith(".") and "And" not in tok.decode(
        out.completion_ids[0, :kept]
    )
    assert out.finished.item() and (out.completion_ids[0, kept:] == tok.pad_token_id).all()
    assert apply_stop_strings(r, tok, ["#"], tok.pad_token_id).completion_mask.sum() == n


def test_gpt2_falls_back_to_hf_generate(tmp_path, write_recipe, cli):
    d = rlhf_recipe()
    d["model"]["init"] = {
        "architecture": "gpt2",
        "config": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 128},
    }
    code, stdout, stderr = cli("rlhf", write_recipe(d), "-o", tmp_path / "run", "-q")
    assert code == 0, stderr
    assert "fast sampler does not support model type 'gpt2'" in stderr
    assert last_json(stdout)["rlhf"]["sampler"] == "HFSampler"


def test_smoke_shrinks_gpu_rollouts_to_seconds():
    """--smoke on a GPU-size rlhf recipe: short rollouts of 2 prompts x 2 completions, one pass, so a
    laptop proves the recipe in seconds (64 x 256-token rollouts on CPU would take many minutes)."""
    from pathlib import Path

    from prefcli.recipe import load_recipe
    from prefcli.recipe.commands.rl import SMOKE_NEW_TOKENS

    path = Path(__file__).resolve().parents[1] / "recipes" / "gpu" / "rlhf-grpo-qwen2.5-0.5b.yaml"
    full = load_recipe(path).recipe
    assert full.generation.max_new_tokens == 256 and full.rlhf.prompts_per_rollout == 8
    small = full.smoke()
    assert small.generation.max_new_tokens == SMOKE_NEW_TOKENS < 256
    assert (small.rlhf.prompts_per_rollout, small.rlhf.num_generations) == (2, 2)
    assert small.rlhf.epochs_per_rollout == small.rlhf.minibatches_per_epoch == 1
    assert small.rlhf.algorithm == full.rlhf.algorithm and small.rewards == full.rewards
    gan = load_recipe(path.with_name("gan-qwen2.5-0.5b.yaml")).recipe
    assert gan.gan.disc_warmup_steps == 20 and gan.discriminator.batch_size == 32
    small = gan.smoke()
    assert (small.gan.disc_warmup_steps, small.discriminator.batch_size) == (2, 4)
    assert small.generation.max_new_tokens == SMOKE_NEW_TOKENS and small.rlhf.prompts_per_rollout == 2


def test_grpo_with_the_adaptive_kl_controller(tmp_path, write_recipe, cli):
    """GRPO's one-pass shortcut skips the rollout's policy forward; the adaptive KL controller needs the
    rollout's KL, so with kl_target the forward stays (this crashed with KeyError 'kl/mean')."""
    d = rlhf_recipe(rlhf={"algorithm": "grpo", "kl_target": 1.0, "kl_horizon": 10})
    code, stdout, stderr = cli("rlhf", write_recipe(d), "-o", tmp_path / "run", "-q")
    assert code == 0, stderr
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    coefs = [r["kl/coef"] for r in rows if "kl/coef" in r]
    assert len(coefs) == 2 and coefs[0] == 0.05 and coefs[1] != 0.05  # the controller moved beta
    assert all("kl/mean" in r for r in rows if "kl/coef" in r)
