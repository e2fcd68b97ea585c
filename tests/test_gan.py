"""`prefcli gan`: the losses by hand, the alternation schedule, isolation of the two players, the
balance warnings, exact resume, and the CLI end to end."""

import json
import math
import shutil

import pytest
import torch

from prefcli.algos.gan import discriminator_loss, generator_reward

from .conftest import DATA, TINY_INIT, TOKENIZER, deep_update, last_json, losses


def t(x):
    return torch.tensor(x, dtype=torch.float64)


def test_discriminator_loss_by_hand():
    real, fake = t([2.0, -1.0]), t([-3.0, 0.5])
    # -log sigma(r) - log(1 - sigma(f)) = log(1 + e^-r) + log(1 + e^f)
    want = [math.log1p(math.exp(-2)) + math.log1p(math.exp(-3)), math.log1p(math.exp(1)) + math.log1p(math.exp(0.5))]
    assert discriminator_loss(real, fake).tolist() == pytest.approx(want)
    # one-sided smoothing: the real target is 0.9
    eps = 0.1
    want0 = (0.9 * math.log1p(math.exp(-2)) + eps * math.log1p(math.exp(2))) + math.log1p(math.exp(-3))
    assert discriminator_loss(real, fake, eps).tolist()[0] == pytest.approx(want0)


def test_generator_reward_by_hand():
    assert generator_reward(t([0.0, 2.0]), "log_sigmoid").tolist() == pytest.approx(
        [math.log(0.5), -math.log1p(math.exp(-2))]
    )
    assert generator_reward(t([0.0, 2.0]), "logit").tolist() == [0.0, 2.0]


def gan_recipe(**upd):
    r = {
        "command": "gan",
        "model": {"init": json.loads(json.dumps(TINY_INIT)), "tokenizer": str(TOKENIZER)},
        "data": {
            "train": {"path": str(DATA / "tiny" / "prompt_completion.jsonl"), "max_rows": 24},
            "eval_fraction": 0.2,
            "max_prompt_length": 16,
            "max_length": 32,
        },
        "discriminator": {"batch_size": 4, "lr": 1e-3},
        "gan": {"disc_warmup_steps": 2, "disc_steps": 1, "buffer_size": 16},
        "generation": {"max_new_tokens": 6},
        "rlhf": {"algorithm": "rloo", "num_generations": 2, "prompts_per_rollout": 2, "kl_coef": 0.05},
        "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-3, "eval_max_batches": 1},
        "output": {"plot": False},
    }
    return deep_update(r, upd)


def _build(path, tmp_path):
    from prefcli.algos.gan import build
    from prefcli.engine.dist import Runtime
    from prefcli.recipe import load_recipe
    from prefcli.runner import RunContext

    rt = Runtime(device=torch.device("cpu"), precision="fp32")
    return build(RunContext(recipe=load_recipe(path).recipe, rt=rt, run_dir=tmp_path))


@pytest.mark.slow
def test_schedule_alternates_after_the_warmup(tmp_path, write_recipe):
    task = _build(write_recipe(gan_recipe()), tmp_path)
    groups = [p.group for p in task.plans(0)]
    # 2 warm-up discriminator steps, then per rollout: 1 discriminator step and 1 generator step
    assert groups == ["discriminator"] * 2 + ["discriminator", "policy"] * 3
    assert task.total_steps() == len(groups)


@pytest.mark.slow
def test_each_player_update_leaves_the_other_untouched(tmp_path, write_recipe):
    from prefcli.engine.loop import Engine
    from prefcli.engine.progress import Progress

    task = _build(write_recipe(gan_recipe()), tmp_path)
    g0 = {n: p.detach().clone() for n, p in task.gen.model.named_parameters()}
    d0 = {n: p.detach().clone() for n, p in task.disc.model.named_parameters()}
    plans = task.plans(0)
    engine = Engine(task, task.rt, task.cfg.train, Progress(False, 8, "t", None), tmp_path)

    def step_once():
        task._total = 1
        it = iter([next(plans)])
        task.plans = lambda start: it
        engine.run()

    step_once()  # a discriminator step
    assert all(torch.equal(p, g0[n]) for n, p in task.gen.model.named_parameters())
    assert any(not torch.equal(p, d0[n]) for n, p in task.disc.model.named_parameters())
    next(plans)  # the second warm-up discriminator step (not run), then the rollout's own
    next(plans)
    d1 = {n: p.detach().clone() for n, p in task.disc.model.named_parameters()}
    step_once()  # the generator step
    assert all(torch.equal(p, d1[n]) for n, p in task.disc.model.named_parameters())
    assert any(not torch.equal(p, g0[n]) for n, p in task.gen.model.named_parameters())


def test_balance_warnings(tmp_path, write_recipe):
    task = _build(write_recipe(gan_recipe(gan={"saturation_steps": 3, "stop_on_saturation": True})), tmp_path)
    seen = []
    task.ctx.warn = seen.append
    task.disc.steps = 10  # past the warm-up
    task.disc._pending_acc = [torch.tensor(0.5)] * 3
    task.disc.watch()
    assert any("not learning" in w for w in seen) and task.disc.stop_reason is None
    task.disc._pending_acc = [torch.tensor(1.0)] * 3
    task.disc.watch()
    assert any(">= 99% accurate for 3 steps" in w for w in seen)
    assert task.disc.stop_reason and list(task.plans(0)) == []  # stop_on_saturation ends the run


@pytest.mark.slow
def test_gan_end_to_end_and_exact_resume(tmp_path, write_recipe, cli):
    d = gan_recipe(train={"max_steps": 3, "save_every_steps": 2, "keep_checkpoints": 10, "eval_on_start": True})
    d["gan"]["eval_rewards"] = [{"kind": "length", "target": 4, "name": "len_rule"}]
    p = write_recipe(d)
    code, stdout, stderr = cli("gan", p, "-o", tmp_path / "full", "-q")
    assert code == 0, stderr
    s = last_json(stdout)
    assert s["gan"]["generator_steps"] == 3 and s["gan"]["discriminator_steps"] == 5 and s["steps"] == 8
    for key in (
        "loss/disc",
        "disc/accuracy",
        "disc/real_prob",
        "disc/fake_prob",
        "loss/rloo",
        "reward/discriminator",
        "kl/mean",
        "eval/disc_accuracy",
        "eval/len_rule",
        "eval/reward",
    ):
        assert key in s["final"], key
    rows = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 0 and "eval/len_rule" in rows[0]  # eval_on_start: the baseline
    assert (tmp_path / "full" / "final" / "discriminator" / "config.json").exists()
    (tmp_path / "res" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-4", tmp_path / "res" / "checkpoints" / "step-4")
    code, stdout, stderr = cli("gan", p, "-o", tmp_path / "res", "-q", "--resume")
    assert code == 0, stderr
    for key in ("loss/disc", "loss/rloo"):
        a, b = losses(tmp_path / "full", key), losses(tmp_path / "res", key)
        assert b and all(b[k] == a[k] for k in b), key


def test_gold_column_is_required(tmp_path, write_recipe, cli):
    d = gan_recipe()
    d["data"]["train"] = {"path": str(DATA / "tiny" / "prompts.jsonl")}
    code, stdout, stderr = cli("gan", write_recipe(d), "-o", tmp_path / "x", "-q")
    assert code == 2 and "gan needs a 'completion' column" in stderr


@pytest.mark.slow
def test_each_player_follows_its_own_lr_schedule(tmp_path, write_recipe, cli):
    """The generator and the discriminator alternate; each group's cosine schedule counts its own updates
    (a schedule on the loop's step ran both ahead: the generator's LR reached 0 from its third update)."""
    from prefcli.engine.task import lr_factor

    d = gan_recipe(
        train={
            "max_steps": 4,
            "lr": 1e-3,
            "lr_schedule": "cosine",
            "min_lr_ratio": 0.0,
            "save_every_steps": 3,
            "keep_checkpoints": 10,
        }
    )
    code, stdout, stderr = cli("gan", write_recipe(d), "-o", tmp_path / "run", "-q")
    assert code == 0, stderr
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    gen = [r["lr/policy"] for r in rows if "lr/policy" in r]
    disc = [r["lr/discriminator"] for r in rows if "lr/discriminator" in r]
    assert len(gen) == 4 and len(disc) == 2 + 4  # warm-up 2, then 1 per rollout
    assert gen == pytest.approx([1e-3 * lr_factor(i, 4, 0, "cosine", 0.0) for i in range(1, 5)])
    assert disc == pytest.approx([1e-3 * lr_factor(i, 6, 0, "cosine", 0.0) for i in range(1, 7)])
    assert gen[1] > 0.5e-3 and gen[2] > 0  # the bug had the generator at LR 0 from its third update
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-3" / "state.json").read_text())
    assert state["updates"] == {"policy": 0, "discriminator": 3}  # step 3 = warm-up 2 + the first rollout's D step
