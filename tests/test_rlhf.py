"""`prefcli rlhf` end to end: every algorithm, the frozen reference, failing reward functions,
exact resume from a checkpoint taken in the middle of a rollout, stop strings, the HF fallback."""

import json
import shutil

import pytest
import torch

from prefcli.algos.rlhf.sampling import apply_stop_strings
from prefcli.engine.sampling import Rollout

from .conftest import DATA, NO_PLOT, ROOT, TINY_INIT, TOKENIZER, deep_update, last_json, losses, read_metrics


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


@pytest.mark.slow
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
    # the sampler's log-probs against the trainer's forward on the same tokens: ~0 on CPU in fp32 (measured at
    # rollout time for ppo/rloo/reinforce_pp, in the update for grpo's one-pass shortcut)
    assert f["mismatch/abs_max"] < 1e-4 and f["mismatch/abs_mean"] < 1e-5 and abs(f["mismatch/kl"]) < 1e-8
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
    task.total_updates = n
    Engine(task, task.ctx.rt, task.ctx.recipe.train, Progress(False, n, "t", None), tmp_path).run()


@pytest.mark.slow
def test_reference_gets_no_gradient_and_stays_frozen(tmp_path, write_recipe):
    task = _build(write_recipe(rlhf_recipe()), tmp_path)
    ref = {n: p.detach().clone() for n, p in task.ref_policy.named_parameters()}
    pol = {n: p.detach().clone() for n, p in task.policy.named_parameters()}
    _run_steps(task, 2, tmp_path)
    for n, p in task.ref_policy.named_parameters():
        assert p.grad is None and not p.requires_grad and torch.equal(p, ref[n]), n
    assert any(not torch.equal(p, pol[n]) for n, p in task.policy.named_parameters())
    opt_params = {id(p) for g in task.groups["policy"].optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in opt_params for p in task.ref_policy.parameters())


@pytest.mark.slow
def test_lora_reference_is_the_base_model(tmp_path, write_recipe):
    task = _build(write_recipe(rlhf_recipe(model={"lora": {"r": 4}})), tmp_path)
    assert task.ref_policy is None  # no second copy: adapters off is the reference
    base = {n: p.detach().clone() for n, p in task.lm.named_parameters() if "lora" not in n}
    _run_steps(task, 2, tmp_path)
    for n, p in task.lm.named_parameters():
        if "lora" not in n:
            assert torch.equal(p, base[n]), n
    seq = task.buffer
    from prefcli.engine.models import reference_mode

    with torch.no_grad(), reference_mode(task.lm):
        lp_ref, _ = task.policy(
            seq["input_ids"], seq["targets"], seq["attention_mask"], seq["position_ids"], start=int(seq["start"])
        )
    assert torch.allclose(lp_ref, seq["ref_logp"], atol=1e-5)


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_gpt2_samples_fast_and_dynamic_rope_falls_back_to_hf_generate(tmp_path, write_recipe, cli):
    d = rlhf_recipe()
    d["model"]["init"] = {
        "architecture": "gpt2",
        "config": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 128},
    }
    code, stdout, stderr = cli("rlhf", write_recipe(d), "-o", tmp_path / "run", "-q")
    assert code == 0, stderr
    assert last_json(stdout)["rlhf"]["sampler"] == "FastDecoder"
    d = rlhf_recipe()
    d["model"]["init"]["architecture"] = "llama"
    d["model"]["init"]["config"]["rope_parameters"] = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    code, stdout, stderr = cli("rlhf", write_recipe(d), "-o", tmp_path / "run2", "-q")
    assert code == 0, stderr
    assert "fast sampler does not support dynamic rope scaling" in stderr
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
    assert (small.gan.disc_warmup_steps, small.discriminator.batch_size) == (1, 4)  # 3 loop steps in all
    assert small.generation.max_new_tokens == SMOKE_NEW_TOKENS and small.rlhf.prompts_per_rollout == 2


@pytest.mark.slow
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


NEW_TINY = {
    "dapo": ["rollout/sample_rounds", "rollout/resampled_prompts", "reward/overlong_penalty", "policy/clipfrac_high"],
    "gspo": ["policy/clipfrac", "mismatch/is_weight", "mismatch/is_clipfrac"],
    "cispo": ["policy/clipfrac", "mismatch/is_weight"],
    "online-dpo": ["loss/online_dpo", "reward/margin", "reward/accuracy", "reward/real_word_fraction"],
    "judge": ["reward/judge"],
    "ensemble": ["reward/ensemble", "reward/ensemble_spread"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(NEW_TINY))
def test_new_tiny_rlhf_recipes_run_with_smoke(name, tmp_path, cli):
    """Each tiny recipe of issue 15 runs as shipped under --smoke and logs what it is about; the
    sampler/trainer mismatch reads ~0 on CPU in fp32 whatever the algorithm."""
    from .conftest import ROOT

    code, stdout, stderr = cli(
        "rlhf", ROOT / "recipes" / "tiny" / f"rlhf-{name}.yaml", "--smoke", "-o", tmp_path, "-q", *NO_PLOT
    )
    assert code == 0, stderr
    f = last_json(stdout)["final"]
    for key in NEW_TINY[name]:
        assert key in f, key
    assert f["mismatch/abs_max"] < 1e-4
    if "mismatch/is_weight" in f:
        assert f["mismatch/is_weight"] == pytest.approx(1.0, abs=1e-4) and f["mismatch/is_clipfrac"] == 0


@pytest.mark.slow
def test_dynamic_sampling_draws_fresh_prompts_for_tied_groups(tmp_path, write_recipe, cli):
    """A reward that gives every completion of some prompts the same score: those groups are dropped and
    fresh prompts drawn (the data cursor moves past them); every prompt drawn is counted."""
    (tmp_path / "ties.py").write_text(
        "def score(prompts, completions):\n"
        "    return [0.0 if len(p) % 2 == 0 else float(len(c) % 7) for p, c in zip(prompts, completions)]\n"
    )
    d = rlhf_recipe(
        rewards=[{"kind": "function", "function": "ties.py:score"}],
        rlhf={"dynamic_sampling": True, "dynamic_sampling_max_rounds": 3},
        train={"max_steps": 3},
    )
    d["data"]["eval"] = None
    code, stdout, stderr = cli("rlhf", write_recipe(d), "-o", tmp_path / "run", "-q")
    assert code == 0, stderr
    rows = [r for r in read_metrics(tmp_path / "run") if "rollout/sample_rounds" in r]
    rounds = [r["rollout/sample_rounds"] for r in rows]
    assert len(rows) == 3 and max(rounds) > 1  # some rollout drew again
    assert sum(r["rollout/resampled_prompts"] for r in rows) == 2 * (sum(rounds) - 3)
    assert last_json(stdout)["rlhf"]["prompts_sampled"] == 2 * sum(rounds)
    for r in rows:  # a rollout that found enough untied groups kept no tied one
        assert r["rollout/tied_groups_kept"] == 0 or r["rollout/sample_rounds"] == 4


@pytest.mark.slow
def test_online_dpo_resume_from_the_middle_of_a_rollout_is_exact(tmp_path, write_recipe, cli):
    d = rlhf_recipe(
        rlhf={"algorithm": "online_dpo", "epochs_per_rollout": 2, "minibatches_per_epoch": 2,
              "num_generations": 3, "dynamic_sampling": True, "preference": {"objective": "ipo"}},
        train={"max_steps": 6, "save_every_steps": 1, "keep_checkpoints": 10},
    )  # fmt: skip
    d["rlhf"].pop("kl_coef")
    d["data"]["eval"] = None
    p = write_recipe(d)
    code, stdout, stderr = cli("rlhf", p, "-o", tmp_path / "full", "-q")
    assert code == 0, stderr
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-2", tmp_path / "resumed" / "checkpoints" / "step-2")
    code, stdout2, stderr = cli("rlhf", p, "-o", tmp_path / "resumed", "-q", "--resume")
    assert code == 0, stderr
    a, b = losses(tmp_path / "full", "loss/online_dpo"), losses(tmp_path / "resumed", "loss/online_dpo")
    assert sorted(b) == [3, 4, 5, 6]
    for step in b:
        assert b[step] == a[step], step
    s = last_json(stdout2)["rlhf"]
    assert s["objective"] == "ipo" and s["prompts_sampled"] == last_json(stdout)["rlhf"]["prompts_sampled"]


BAD = [
    ({"rlhf": {"clip_low": 0.3, "clip_high": 0.2}}, "rlhf: clip_high (0.2) is below clip_low (0.3): the bounds are out of order"),
    ({"rlhf": {"clip_high": -0.1}}, "rlhf.clip_high: Input should be greater than or equal to 0"),
    ({"rlhf": {"clip_low": 1.5}}, "rlhf.clip_low: Input should be less than or equal to 1"),
    ({"rlhf": {"clip_eps": 0.1}}, "rlhf: clip_eps is the old name of clip_low, no longer read: write clip_low: 0.1"),
    ({"rlhf": {"clip_eps_high": 0.3}}, "rlhf: clip_eps_high is the old name of clip_high, no longer read: write clip_high: 0.3"),
    ({"rlhf": {"algorithm": "ppo", "num_generations": 1, "dynamic_sampling": True}}, "rlhf: dynamic_sampling drops prompts"),
    ({"rlhf": {"algorithm": "ppo", "policy_loss": "gspo"}}, "rlhf: policy_loss gspo clips one ratio per completion"),
    ({"rlhf": {"is_correction": "token_truncate", "is_floor": 3.0}}, "rlhf: is_floor (3.0) must be below is_cap (2.0)"),
    ({"rlhf": {"algorithm": "online_dpo", "kl_coef": 0.1}}, "rlhf: kl_coef: not used by online_dpo"),
    ({"rlhf": {"overlong_buffer": 10}}, "rlhf.overlong_buffer (10) exceeds generation.max_new_tokens (6)"),
    ({"rewards": [{"kind": "judge", "path": str(ROOT / "prefcli" / "assets" / "kjv-base"), "template": "{prompt} good?"}]},
     "rewards[0].judge: template has no {completion} placeholder"),
    ({"rewards": [{"kind": "judge", "path": "./no-such-judge", "template": "{completion}"}]},
     "rewards[0].path: no such file or folder"),
    ({"rewards": [{"kind": "ensemble", "members": [{"kind": "sentiment"}]}]},
     "rewards[0].members: an ensemble needs at least two members, got 1"),
]  # fmt: skip


@pytest.mark.parametrize("upd,message", BAD, ids=[m[:40] for _, m in BAD])
def test_bad_rl_input_exits_2_naming_the_field(upd, message, tmp_path, write_recipe, cli):
    d = rlhf_recipe()
    for k, v in upd.items():
        d[k] = {**d[k], **v} if isinstance(v, dict) else v
    code, stdout, stderr = cli("rlhf", write_recipe(d), "-o", tmp_path / "run", "-q")
    assert code == 2, stderr
    assert message in stderr, stderr
    assert not (tmp_path / "run").exists()
