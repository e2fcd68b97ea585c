"""`prefcli contrastive`: reference handling, invariants, learning, bad rows, the CLI contract."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from prefcli.engine.dist import setup_runtime
from prefcli.engine.loop import Engine
from prefcli.engine.pairs import encode_completion, pair_batch, tokenize_pairs
from prefcli.engine.progress import Progress
from prefcli.recipe import load_recipe
from prefcli.runner import RunContext, RunOptions, run_training

from .conftest import (
    DATA,
    NO_PLOT,
    ROOT,
    TINY_INIT,
    TOKENIZER,
    deep_update,
    last_json,
    losses,
    read_metrics,
)

LN2 = math.log(2)


def pref_dict(objective: str = "dpo", **upd) -> dict:
    kto = objective == "kto"
    r = {
        "command": "contrastive",
        "model": {"init": json.loads(json.dumps(TINY_INIT)), "tokenizer": str(TOKENIZER)},
        "data": {
            "train": {
                "path": str(DATA / "tiny" / ("pref_kto.jsonl" if kto else "pref_train.jsonl")),
                "max_rows": 48 if kto else 32,
            },
            "eval": None if kto else {"path": str(DATA / "tiny" / "pref_eval.jsonl"), "max_rows": 16},
            "eval_fraction": 0.25 if kto else 0.0,
            "max_length": 48,
        },
        "contrastive": {"objective": objective},
        "train": {"max_steps": 3, "batch_size": 8, "lr": 3e-3, "seed": 0},
        "output": {"plot": False},
    }
    return deep_update(r, upd)


def run(tmp_path, write_recipe, name, d, *overrides, resume=False):
    p = write_recipe(d, name=f"{name}.yaml")
    out = tmp_path / name
    s = run_training(
        "contrastive", p, RunOptions(overrides=list(overrides), output_dir=str(out), quiet=True, resume=resume)
    )
    return s, out


def make_task(write_recipe, d, tmp_path):
    from prefcli.algos.contrastive import build

    recipe = load_recipe(write_recipe(d, name="task.yaml")).recipe
    rt = setup_runtime("cpu", "fp32")
    torch.manual_seed(recipe.train.seed)
    ctx = RunContext(recipe=recipe, rt=rt, run_dir=tmp_path / "task")
    return build(ctx), rt, recipe


# ---------------------------------------------------------------------- masks, padding


def test_completion_mask_includes_eos_and_skips_prompt_and_padding():
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    p, c = encode_completion(tok, "plain", "And God said", " Let there be light.")
    assert c[-1] == tok.eos_token_id and tok.decode(c[:-1]) == " Let there be light."
    _, r = encode_completion(tok, "plain", "And God said", " no.")
    b = pair_batch([p], [c], [r], tok.pad_token_id)
    assert b["input_ids"].shape[0] == 2  # chosen and rejected in one batch
    tgt = b["targets"]
    # targets (shifted by one): prompt tokens have none, every completion token has one, EOS included
    assert tgt[0].tolist() == [-100] * (len(p) - 1) + c + [-100]  # the last position has no next token
    assert tgt[1].tolist()[: len(p) - 1 + len(r)] == [-100] * (len(p) - 1) + r
    assert (tgt[1, len(p) - 1 + len(r) :] == -100).all() and (b["attention_mask"][1, len(p) + len(r) :] == 0).all()
    # chat rows: the completion is what the conversation adds after the generation prompt; EOS closes the turn
    pc, cc = encode_completion(
        tok, "chat", [{"role": "user", "content": "hi"}], [{"role": "assistant", "content": "yo"}]
    )
    assert tok.decode(pc).endswith("<|im_start|>assistant\n") and tok.eos_token_id in cc


def test_padding_does_not_change_sequence_logps(write_recipe, tmp_path):
    task, rt, _ = make_task(write_recipe, pref_dict(), tmp_path)
    s = task.train_set
    lens = [len(s.prompt[i]) + max(len(s.chosen[i]), len(s.rejected[i])) for i in range(8)]
    short, long_ = lens.index(min(lens)), lens.index(max(lens))
    with torch.no_grad():
        alone, _ = task._seq(task.policy, task._batch(s, [short]))
        both, _ = task._seq(task.policy, task._batch(s, [short, long_]))
    assert torch.allclose(alone, both[[0, 2]], atol=1e-4)  # rows: [c_short, c_long, r_short, r_long]


# ---------------------------------------------------------------------- the reference


@pytest.mark.slow
def test_first_dpo_loss_is_ln2_and_the_reference_is_checkpointed(tmp_path, write_recipe):
    s, out = run(tmp_path, write_recipe, "dpo", pref_dict(train={"max_steps": 2, "save_every_steps": 2}))
    m = read_metrics(out)
    assert m[0]["loss/dpo"] == pytest.approx(LN2, abs=1e-6)
    assert m[0]["reward/accuracy"] == 0.5 and m[0]["reward/margin"] == pytest.approx(0.0, abs=1e-6)
    extra = load_file(str(out / "checkpoints" / "step-2" / "extra-rank0.safetensors"))
    assert extra["train"].shape == (32, 2) and extra["eval"].shape == (16, 2)
    assert s["objective"]["reference"] is True and s["objective"]["beta"] == 0.1


@pytest.mark.slow
def test_reference_free_objectives_compute_no_reference(tmp_path, write_recipe):
    for obj in ("simpo", "orpo"):
        s, out = run(tmp_path, write_recipe, obj, pref_dict(obj, train={"max_steps": 1, "save_every_steps": 1}))
        assert s["objective"]["reference"] is False
        assert not (out / "checkpoints" / "step-1" / "extra-rank0.safetensors").exists()
    assert s["objective"]["reduce"] == "mean" and math.isfinite(s["final"]["loss/orpo"])


@pytest.mark.slow
def test_reference_gets_no_gradient_and_stays_the_initial_model(tmp_path, write_recipe):
    """With LoRA the reference is the same weights with adapters off: after training, recomputing it
    gives the stored values exactly (nothing trained the reference), while the policy moved."""
    d = pref_dict(
        model={"lora": {"r": 4, "alpha": 8}},
        data={"train": {"max_rows": 16}, "eval": None},
        train={"max_steps": 3, "lr": 1e-2},
    )
    task, rt, recipe = make_task(write_recipe, d, tmp_path)
    task._ensure_ref()
    ref0 = task.ref["train"].clone()
    assert not ref0.requires_grad
    b = task._batch(task.train_set, list(range(8)))
    loss, _ = task._pair_loss(task.policy, b)
    loss.backward()
    assert task.ref["train"].grad is None
    assert all(p.grad is None for n, p in task.lm.named_parameters() if "lora_" not in n)  # frozen base
    task.lm.zero_grad(set_to_none=True)
    Engine(task, rt, recipe.train, Progress(False, 3, "t", None, quiet=True), tmp_path / "e").run()
    assert torch.equal(task.ref["train"], ref0)
    task.ref = {}
    task._ensure_ref()  # recomputed now, adapters off
    assert torch.allclose(task.ref["train"], ref0, atol=1e-4)
    with torch.no_grad():
        now, _ = task._seq(task.policy, b)
    assert (now[:8] - ref0[:8, 0]).abs().max() > 1e-3  # the policy did move


@pytest.mark.slow
def test_gradient_accumulation_equals_the_larger_batch(tmp_path, write_recipe):
    """Losses are normalised by the pairs (kto: rows) of the whole accumulated batch; KTO's KL estimate
    spans the whole step."""
    for obj in ("dpo", "kto"):
        d = pref_dict(
            obj,
            data={"train": {"max_rows": 16}, "eval": None, "eval_fraction": 0.0},
            train={"lr": 1e-2, "max_steps": 2},
        )
        _, a = run(tmp_path, write_recipe, f"{obj}8", d, "train.batch_size=8", "train.grad_accum_steps=1")
        _, b = run(tmp_path, write_recipe, f"{obj}2x4", d, "train.batch_size=2", "train.grad_accum_steps=4")
        la, lb = losses(a, f"loss/{obj}"), losses(b, f"loss/{obj}")
        assert len(la) == 2
        for s in la:
            assert lb[s] == pytest.approx(la[s], abs=1e-5), (obj, s)
        wa = load_file(str(a / "final" / "model.safetensors"))
        wb = load_file(str(b / "final" / "model.safetensors"))
        # Adam turns float-rounding differences of near-zero gradients into up to ~lr-sized steps of a few
        # weights; 1e-4 is 1% of one step at lr 1e-2
        assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4, obj


@pytest.mark.slow
def test_resume_reuses_the_stored_reference(tmp_path, write_recipe, monkeypatch):
    d = pref_dict(train={"max_steps": 4, "save_every_steps": 2})
    _, full = run(tmp_path, write_recipe, "full", d)
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-2", resumed / "checkpoints" / "step-2")
    from prefcli.algos.contrastive import ContrastiveTask

    def no_recompute(*a, **k):
        raise AssertionError("reference log-probs recomputed on resume")

    monkeypatch.setattr(ContrastiveTask, "_ref_table", no_recompute)
    s, _ = run(tmp_path, write_recipe, "resumed", d, resume=True)
    lf, lr = losses(full, "loss/dpo"), losses(resumed, "loss/dpo")
    assert sorted(lr) == [3, 4] and all(lr[k] == pytest.approx(lf[k], abs=1e-6) for k in lr)
    assert s["final"]["eval/accuracy"] == pytest.approx(read_metrics(full)[-1]["eval/accuracy"])


# ---------------------------------------------------------------------- learning


@pytest.mark.slow
def test_held_out_preference_accuracy_rises(tmp_path, write_recipe):
    """Pairs with a learnable rule (the chosen answer ends ', saith the LORD.'), held-out verses from
    chapters never seen in training. Before the first step the policy is the reference: every
    implicit reward is 0, a tie, counted 1/2, and the loss is ln 2."""
    d = pref_dict(train={"max_steps": 8, "eval_every_steps": 2, "lr": 2e-3})
    s, out = run(tmp_path, write_recipe, "learn", d)
    m = read_metrics(out)
    assert m[0]["reward/accuracy"] == 0.5 and m[0]["loss/dpo"] == pytest.approx(LN2, abs=1e-6)
    evals = [(r["step"], round(r["eval/accuracy"], 3), round(r["eval/margin"], 3)) for r in m if "eval/accuracy" in r]
    print("dpo held-out (step, accuracy, margin): (0, 0.5, 0.0)", evals)
    assert s["final"]["eval/accuracy"] >= 0.9 and s["final"]["eval/margin"] > 0.2
    assert s["final"]["eval/loss"] < 0.6


# ---------------------------------------------------------------------- data


@pytest.mark.slow
def test_chat_pairs_with_explicit_and_implicit_prompts(tmp_path, write_recipe):
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    rows = [json.loads(x) for x in (DATA / "tiny" / "pref_chat.jsonl").read_text().splitlines()[:4]]
    implicit = tmp_path / "implicit.jsonl"
    implicit.write_text(
        "".join(
            json.dumps({"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]}) + "\n"
            for r in rows
        )
    )
    import datasets

    a = tokenize_pairs(datasets.Dataset.from_list(rows), tok, "chat", 96, "x")
    b = tokenize_pairs(datasets.load_dataset("json", data_files=str(implicit), split="train"), tok, "chat", 96, "y")
    assert a.prompt == b.prompt and a.chosen == b.chosen and a.rejected == b.rejected
    assert tok.decode(a.prompt[0]).startswith("<|im_start|>user\nContinue the verse:")
    d = pref_dict(
        data={"train": {"path": str(DATA / "tiny" / "pref_chat.jsonl")}, "eval": None, "max_length": 96},
        train={"max_steps": 2},
    )
    s, _ = run(tmp_path, write_recipe, "chat", d)
    assert s["data"]["format"] == "chat" and s["steps"] == 2


def _bad(cli, tmp_path, recipe, match):
    code, stdout, stderr = cli("contrastive", recipe, "-o", tmp_path / "never", "-q")
    assert code == 2, stderr
    assert match in stderr, stderr
    assert last_json(stdout)["status"] == "invalid" and not (tmp_path / "never").exists()


@pytest.mark.slow
def test_bad_rows_are_counted_and_no_usable_row_exits_2(tmp_path, write_recipe, cli):
    good = [json.loads(x) for x in (DATA / "tiny" / "pref_train.jsonl").read_text().splitlines()[:8]]
    bad = [
        {"prompt": "a", "chosen": None, "rejected": "b"},
        {"prompt": "a", "chosen": "b", "rejected": ""},
        {"prompt": "a", "chosen": "same", "rejected": "same"},
        {"prompt": "word " * 80, "chosen": "b", "rejected": "c"},
    ]
    f = tmp_path / "mixed.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in good + bad))
    d = pref_dict(data={"train": {"path": str(f), "max_rows": None}, "eval": None}, train={"max_steps": 1})
    code, stdout, stderr = cli("contrastive", write_recipe(d), "-o", tmp_path / "ok", "-q")
    assert code == 0, stderr
    assert (
        "skipped 4 of 12 rows: 2 with a missing or empty chosen/rejected, 1 with chosen identical to rejected, "
        "1 with a prompt of max_length=48 tokens or more"
    ) in stderr
    s = last_json(stdout)
    assert s["data"]["skipped"] == {"missing": 2, "identical": 1, "long_prompt": 1} and s["data"]["train_examples"] == 8
    f = tmp_path / "bad.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in bad))
    d["data"]["train"]["path"] = str(f)
    _bad(cli, tmp_path, write_recipe(d), "no usable row left of 4")
    d["data"]["train"]["columns"] = {"chosen": "better"}
    _bad(cli, tmp_path, write_recipe(d), "maps 'chosen' to column 'better', which is not in the data")
    d = pref_dict("kto", data={"train": {"path": str(f), "max_rows": None}})
    _bad(cli, tmp_path, write_recipe(d), "missing column(s) completion, label")


# ---------------------------------------------------------------------- InfoNCE


@pytest.mark.slow
def test_infonce_encoder_learns_and_reloads_as_a_scorer(tmp_path, write_recipe):
    from prefcli.algos.infonce import EncoderScorer

    d = pref_dict(
        "infonce",
        data={"train": {"max_rows": 64}, "eval": {"max_rows": 32}},
        train={"max_steps": 10, "eval_every_steps": 5, "lr": 3e-3},
    )
    task, *_ = make_task(write_recipe, d, tmp_path)
    before = task.evaluate()
    s, out = run(tmp_path, write_recipe, "infonce", d)
    evals = [r for r in read_metrics(out) if "eval/accuracy" in r]
    print(
        f"infonce held-out accuracy: (0, {before['eval/accuracy']:.3f})",
        [(r["step"], round(r["eval/accuracy"], 3)) for r in evals],
    )
    assert s["final"]["eval/accuracy"] >= 0.8 and s["final"]["eval/accuracy"] > before["eval/accuracy"] + 0.2
    assert s["final"]["eval/loss"] < before["eval/loss"]
    assert json.loads((out / "final" / "config.json").read_text())["architectures"] == ["Qwen2Model"]
    AutoModel.from_pretrained(out / "final")  # transformers alone
    rows = [json.loads(x) for x in (DATA / "tiny" / "pref_eval.jsonl").read_text().splitlines()[:32]]
    scorer = EncoderScorer(out / "final")
    cos_c = scorer([r["prompt"] for r in rows], [r["chosen"] for r in rows])
    cos_r = scorer([r["prompt"] for r in rows], [r["rejected"] for r in rows])
    assert sum(cos_c) / 32 == pytest.approx(s["final"]["eval/cos_chosen"], abs=1e-4)
    acc = sum((a > b) + 0.5 * (a == b) for a, b in zip(cos_c, cos_r)) / 32
    assert acc == pytest.approx(s["final"]["eval/accuracy"])


# ---------------------------------------------------------------------- CLI, recipes


@pytest.mark.slow
def test_contrastive_end_to_end(tmp_path, write_recipe, cli):
    """Through the CLI in this process (tests/test_cli_sft.py runs the real entry point in a process of its own)."""
    p = write_recipe(pref_dict(train={"max_steps": 4, "eval_every_steps": 2}))
    code, stdout, stderr = cli("contrastive", p, "-o", tmp_path / "run")
    assert code == 0, stderr
    lines = stdout.strip().splitlines()
    assert len(lines) == 1
    s = json.loads(lines[0])
    assert s["command"] == "contrastive" and s["steps"] == 4
    assert set(s["final"]) >= {
        "loss/dpo",
        "reward/chosen",
        "reward/rejected",
        "reward/margin",
        "reward/accuracy",
        "logps/chosen",
        "logps/rejected",
        "eval/accuracy",
        "eval/margin",
        "eval/loss",
    }
    assert "step 4/4" in stderr and "eval @ step 2" in stderr
    AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    AutoTokenizer.from_pretrained(tmp_path / "run" / "final")


@pytest.mark.slow
def test_every_tiny_contrastive_recipe_runs_with_smoke(tmp_path, cli):
    recipes = sorted((ROOT / "recipes" / "tiny").glob("contrastive-*.yaml"))
    from prefcli.recipe.commands import CONTRASTIVE_OBJECTIVES

    # contrastive-<objective>[-<variant>].yaml: every objective has one; variants switch a feature on
    assert {p.stem.split("-")[1] for p in recipes} == set(CONTRASTIVE_OBJECTIVES)
    for p in recipes:
        code, stdout, stderr = cli("contrastive", p, "--smoke", "-o", tmp_path / p.stem, "-q", *NO_PLOT)
        assert code == 0, (p, stderr)
        s = last_json(stdout)
        assert s["objective"]["name"] == p.stem.split("-")[1] and s["steps"] == 3
