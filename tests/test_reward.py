"""`prefcli reward`: the score position, the head, ModelSource agreement, learning, bad input, the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from prefcli.algos.reward_model import build
from prefcli.engine.dist import setup_runtime
from prefcli.engine.models import init_score_head
from prefcli.recipe import load_recipe
from prefcli.recipe.reward_specs import ModelReward
from prefcli.reward_sources import ModelSource
from prefcli.runner import RunContext, RunOptions, run_training

from .conftest import DATA, TINY_INIT, TOKENIZER, deep_update, last_json, losses, read_metrics


def rm_dict(**upd) -> dict:
    r = {
        "command": "reward",
        "model": {"init": json.loads(json.dumps(TINY_INIT)), "tokenizer": str(TOKENIZER)},
        "data": {
            "train": {"path": str(DATA / "tiny" / "pref_train.jsonl"), "max_rows": 64},
            "eval": {"path": str(DATA / "tiny" / "pref_eval.jsonl"), "max_rows": 32},
            "max_length": 64,
        },
        "train": {"max_steps": 3, "batch_size": 8, "lr": 3e-3, "seed": 0},
        "output": {"plot": False},
    }
    return deep_update(r, upd)


def run(tmp_path, write_recipe, name, d, *overrides):
    p = write_recipe(d, name=f"{name}.yaml")
    out = tmp_path / name
    return run_training("reward", p, RunOptions(overrides=list(overrides), output_dir=str(out), quiet=True)), out


def make_task(write_recipe, d):
    recipe = load_recipe(write_recipe(d, name="task.yaml")).recipe
    return build(RunContext(recipe=recipe, rt=setup_runtime("cpu", "fp32"), run_dir=None))


def eval_rows(n=32):
    return [json.loads(x) for x in (DATA / "tiny" / "pref_eval.jsonl").read_text().splitlines()[:n]]


def test_score_is_read_at_the_last_real_token_and_padding_changes_nothing(write_recipe):
    task = make_task(write_recipe, rm_dict())
    assert task.model.config.pad_token_id == task.tok.pad_token_id != task.tok.eos_token_id
    rows = eval_rows(3)
    prompts, comps = [r["prompt"] for r in rows], [r["chosen"] for r in rows]
    together = task.score_texts(prompts, comps)
    alone = [task.score_texts([p], [c])[0] for p, c in zip(prompts, comps)]
    assert together == pytest.approx(alone, abs=1e-5)
    # the head applied to the hidden state of the last real token, computed by hand
    ids = task.tok(prompts[0] + comps[0])["input_ids"]
    with torch.no_grad():
        h = task.model.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
        assert task.model.score(h).item() == pytest.approx(alone[0], abs=1e-5)


def test_new_head_is_initialised_with_std_one_over_sqrt_d_plus_1():
    head = torch.nn.Linear(4095, 1, bias=False)
    model = type("M", (), {"score": head})()
    torch.manual_seed(0)
    init_score_head(model)
    assert head.weight.std().item() == pytest.approx(1 / math.sqrt(4096), rel=0.05)


def test_a_causal_lm_checkpoint_gets_a_new_head(write_recipe, tiny_model_dir):
    task = make_task(write_recipe, rm_dict(model={"init": None, "path": str(tiny_model_dir), "tokenizer": None}))
    w = task.model.score.weight
    assert w.shape == (1, 32) and w.std().item() > 0.08  # N(0, 1/33), not transformers' N(0, 0.02)
    assert task.model.config.pad_token_id == task.tok.pad_token_id


@pytest.mark.slow
def test_modelsource_reproduces_training_time_scores(tmp_path, write_recipe):
    """The RL-time scorer (prefcli.reward_sources.ModelSource) on final/ gives the scores training computed:
    the held-out mean reward logged at the end, and the task's own scoring of each text."""
    s, out = run(tmp_path, write_recipe, "rm", rm_dict(train={"max_steps": 4}))
    final = out / "final"
    cfg = json.loads((final / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForSequenceClassification"] and len(cfg["id2label"]) == 1
    AutoModelForSequenceClassification.from_pretrained(final)  # transformers alone
    rows = eval_rows()
    src = ModelSource(ModelReward(kind="model", path=str(final), batch_size=5, max_length=64))
    chosen = src([r["prompt"] for r in rows], [r["chosen"] for r in rows])
    rejected = src([r["prompt"] for r in rows], [r["rejected"] for r in rows])
    assert sum(chosen) / 32 == pytest.approx(s["final"]["eval/reward_chosen"], abs=1e-4)
    assert sum(rejected) / 32 == pytest.approx(s["final"]["eval/reward_rejected"], abs=1e-4)
    task = make_task(write_recipe, rm_dict(model={"init": None, "path": str(final), "tokenizer": None}))
    assert task.score_texts([r["prompt"] for r in rows], [r["chosen"] for r in rows]) == pytest.approx(chosen, abs=1e-5)


@pytest.mark.slow
def test_held_out_accuracy_rises_and_calibration_is_logged(tmp_path, write_recipe):
    d = rm_dict(train={"max_steps": 6, "eval_every_steps": 3, "lr": 2e-3})
    before = make_task(write_recipe, d).evaluate()
    s, out = run(tmp_path, write_recipe, "learn", d)
    evals = [(r["step"], round(r["eval/accuracy"], 3)) for r in read_metrics(out) if "eval/accuracy" in r]
    print(f"reward held-out accuracy: (0, {before['eval/accuracy']:.3f})", evals)
    assert before["eval/accuracy"] < 0.8
    f = s["final"]
    assert f["eval/accuracy"] >= 0.95 and f["eval/margin"] > 1.0 and f["eval/accuracy"] > before["eval/accuracy"]
    assert 0 <= f["eval/ece"] <= f["eval/mce"] <= 1 and f["eval/pairs"] == 32
    assert {"loss/bradley_terry", "reward/chosen", "reward/rejected", "reward/margin", "reward/accuracy"} <= set(f)


@pytest.mark.slow
def test_margin_column_and_centering(tmp_path, write_recipe):
    rows = [json.loads(x) for x in (DATA / "tiny" / "pref_train.jsonl").read_text().splitlines()[:16]]
    f = tmp_path / "margin.jsonl"
    f.write_text("".join(json.dumps({**r, "margin": 3.0}) + "\n" for r in rows))
    d = rm_dict(data={"train": {"path": str(f)}, "eval": None}, train={"max_steps": 1})
    s0, _ = run(tmp_path, write_recipe, "m0", d, "reward.use_margin=false")
    s1, _ = run(tmp_path, write_recipe, "m1", d)
    s2, _ = run(tmp_path, write_recipe, "m2", d, "reward.center_rewards_coefficient=0.5")
    assert s1["objective"]["margin_column"] and not s0["objective"]["margin_column"]
    # same init and batch: the margin moves the loss exactly as -log sigmoid(d - 3) instead of -log sigmoid(d)
    assert s1["final"]["reward/margin"] == pytest.approx(s0["final"]["reward/margin"])
    assert s1["final"]["loss/bradley_terry"] > s0["final"]["loss/bradley_terry"] + 1.0
    assert s2["final"]["loss/bradley_terry"] > s1["final"]["loss/bradley_terry"]


def test_regression_on_human_scores_and_rankings(tmp_path, write_recipe):
    d = rm_dict(
        data={
            "train": {"path": str(DATA / "tiny" / "pref_scores.jsonl"), "max_rows": 96},
            "eval": None,
            "eval_fraction": 0.25,
        },
        reward={"objective": "regression"},
        train={"max_steps": 24, "lr": 5e-3},
    )
    s, _ = run(tmp_path, write_recipe, "reg", d)
    f = s["final"]
    print("regression held-out:", {k: round(v, 3) for k, v in f.items() if k.startswith("eval/")})
    assert f["eval/pearson"] > 0.6 and f["eval/accuracy"] > 0.8 and f["eval/mse"] < 0.6
    d = rm_dict(
        data={
            "train": {"path": str(DATA / "tiny" / "pref_rankings.jsonl"), "max_rows": 48},
            "eval": None,
            "eval_fraction": 0.25,
        },
        reward={"objective": "ranking"},
        train={"max_steps": 2},
    )
    s, out = run(tmp_path, write_recipe, "rank", d)
    assert s["data"]["rows"] == "rankings" and s["final"]["eval/pairs"] == 12 * 3  # 3 ordered pairs per row
    assert math.isfinite(s["final"]["loss/ranking"])


@pytest.mark.slow
def test_gradient_accumulation_equals_the_larger_batch(tmp_path, write_recipe):
    d = rm_dict(data={"train": {"max_rows": 16}, "eval": None}, train={"lr": 1e-2, "max_steps": 2})
    _, a = run(tmp_path, write_recipe, "b8", d, "train.batch_size=8", "train.grad_accum_steps=1")
    _, b = run(tmp_path, write_recipe, "b2x4", d, "train.batch_size=2", "train.grad_accum_steps=4")
    la, lb = losses(a, "loss/bradley_terry"), losses(b, "loss/bradley_terry")
    assert len(la) == 2 and all(lb[k] == pytest.approx(la[k], abs=1e-5) for k in la)


def test_bad_rows_and_bad_data_exit_2(tmp_path, write_recipe, cli):
    bad = [{"prompt": "a", "chosen": "", "rejected": "b"}, {"prompt": "a", "chosen": "x", "rejected": "x"}]
    f = tmp_path / "bad.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in bad))
    d = rm_dict(data={"train": {"path": str(f), "max_rows": None}, "eval": None})
    code, stdout, stderr = cli("reward", write_recipe(d), "-o", tmp_path / "never", "-q")
    assert code == 2 and last_json(stdout)["status"] == "invalid", stderr
    assert (
        "no usable row left of 2 (1 with a missing or empty chosen/rejected, 1 with chosen identical to rejected)"
    ) in stderr and not (tmp_path / "never").exists()
    d = rm_dict(
        data={"train": {"path": str(DATA / "tiny" / "pref_train.jsonl")}, "eval": None},
        reward={"objective": "regression"},
    )
    code, _, stderr = cli("reward", write_recipe(d), "-o", tmp_path / "never", "-q")
    assert code == 2 and "missing column(s) score" in stderr
    f = tmp_path / "scores.jsonl"
    f.write_text(json.dumps({"text": "a b c", "score": "high"}) + "\n")
    d = rm_dict(data={"train": {"path": str(f)}, "eval": None}, reward={"objective": "regression"})
    code, _, stderr = cli("reward", write_recipe(d), "-o", tmp_path / "never", "-q")
    assert code == 2 and "row 1: score 'high' is not a number" in stderr


@pytest.mark.slow
def test_reward_end_to_end_with_lora(tmp_path, write_recipe, cli):
    """Through the CLI in this process (tests/test_cli_sft.py runs the real entry point in a process of its own)."""
    p = write_recipe(rm_dict(model={"lora": {"r": 4, "alpha": 8}}, train={"max_steps": 3}))
    code, stdout, stderr = cli("reward", p, "-o", tmp_path / "run")
    assert code == 0, stderr
    lines = stdout.strip().splitlines()
    assert len(lines) == 1
    s = json.loads(lines[0])
    assert (
        s["command"] == "reward" and s["steps"] == 3 and {"eval/accuracy", "eval/ece", "eval/margin"} <= set(s["final"])
    )
    assert 0 < s["model"]["trainable_parameters"] < s["model"]["parameters"]
    m = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "final")  # merged: no peft needed
    assert m.config.num_labels == 1 and m.config.pad_token_id is not None
    assert (tmp_path / "run" / "final" / "adapter" / "adapter_config.json").exists()
