"""Training conveniences: early stopping, the best checkpoint and output.final: best, data mixtures; and the bad
input of each (exit 2 naming the field, before anything runs)."""

from __future__ import annotations

import json
import shutil
import typing

import pytest
from safetensors.torch import load_file

from prefcli.engine import checkpoint as ckpt
from prefcli.engine.monitor import Monitors
from prefcli.recipe.commands import SCHEMAS
from prefcli.recipe.sections import DataMixture, TrainSection

from .conftest import DATA, last_json, losses, read_metrics, sft_recipe_dict


def evals(run) -> list[tuple[int, float]]:
    return [(r["step"], r["eval/loss"]) for r in read_metrics(run) if "eval/loss" in r]


@pytest.mark.slow
def test_early_stopping_stops_when_the_metric_stops_improving(tmp_path, write_recipe, cli):
    # 'max' on a falling loss: the second evaluation already fails to improve, so patience 2 stops at the third
    r = write_recipe(
        sft_recipe_dict(
            train={
                "max_steps": 12,
                "eval_every_steps": 1,
                "early_stopping": {"metric": "eval/loss", "mode": "max", "patience": 2},
            }
        )
    )
    code, stdout, stderr = cli("sft", r, "-o", tmp_path / "run", "-q")
    assert code == 0, stderr
    s = last_json(stdout)
    ev = evals(tmp_path / "run")
    best, since, expected = None, 0, None  # the rule, recomputed from the logged evaluations
    for step, v in ev:
        if best is None or v > best:
            best, since = v, 0
        else:
            since += 1
        if since >= 2:
            expected = step
            break
    assert expected is not None and expected < 12
    assert s["status"] == "completed" and s["steps"] == expected and ev[-1][0] == expected
    assert s["stopped_early"] == {
        "step": expected, "metric": "eval/loss", "best_value": best, "best_step": ev[0][0], "patience": 2,
    }  # fmt: skip
    assert max(x["step"] for x in read_metrics(tmp_path / "run")) == expected
    # what keep_best/early_stopping may watch (the schema's eval_metrics) is what the evaluations log
    assert set(SCHEMAS["sft"].model_validate(sft_recipe_dict()).eval_metrics()) <= set(s["final"])


@pytest.mark.slow
def test_keep_best_and_final_best(tmp_path, write_recipe, cli):
    r = write_recipe(
        sft_recipe_dict(
            train={
                "max_steps": 4,
                "eval_every_steps": 1,
                "save_every_steps": 4,
                "keep_best": {"metric": "eval/loss", "mode": "max"},
            },
            output={"final": "best"},
        )
    )
    code, stdout, stderr = cli("sft", r, "-o", tmp_path / "run", "-q")
    assert code == 0, stderr
    s = last_json(stdout)
    ev = evals(tmp_path / "run")
    best_step, best_value = None, None
    for step, v in ev:
        if best_value is None or v > best_value:
            best_step, best_value = step, v
    assert s["best"]["step"] == best_step and s["best"]["value"] == best_value and best_step < 4

    def trained(path) -> dict:  # the checkpoint's trainable parameters, named as in the saved model
        return {k.removeprefix("lm."): v for k, v in ckpt.read_tensors(path / "model-policy").items()}

    best = trained(tmp_path / "run" / "best" / "checkpoints" / f"step-{best_step}")
    last = trained(tmp_path / "run" / "checkpoints" / "step-4")
    final = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    common = sorted(set(best) & set(final))
    assert len(common) >= len(best) - 1  # (a tied output head is saved once)
    assert all(final[k].equal(best[k]) for k in common)
    assert any(not final[k].equal(last[k]) for k in common)  # and not the last step's weights


def test_monitors_replay_a_resumed_run(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    rows = [{"step": 1, "loss/sft": 3.0}, {"step": 2, "eval/loss": 2.0}, {"step": 4, "eval/loss": 2.5}]
    rows += [{"step": 6, "eval/loss": 1.0}]  # after the checkpoint resumed from (step 4): not replayed
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "best" / "checkpoints" / "step-6").mkdir(parents=True)
    (tmp_path / "best" / "checkpoints" / "step-6" / "state.json").write_text("{}")
    train = TrainSection(
        eval_every_steps=2,
        keep_best={"metric": "eval/loss", "mode": "min"},
        early_stopping={"metric": "eval/loss", "mode": "min", "patience": 2},
    )
    m = Monitors(train, tmp_path)
    m.replay(metrics, upto=4)
    assert (m.keep.best, m.keep.best_step, m.stop.since_best) == (2.0, 2, 1)
    assert m.best_checkpoint() is None  # the best of a future the resumed run will redo is gone
    assert m.after_eval(6, {"eval/loss": 2.2}) == (False, True)  # second evaluation without improvement


@pytest.mark.slow
def test_a_mixture_is_seeded_and_a_resumed_run_continues_it_exactly(tmp_path, write_recipe, cli):
    import datasets

    from prefcli.engine.data import load_rows

    spec = [
        {"path": str(DATA / "tiny" / "text.jsonl"), "weight": 3, "max_rows": 40},
        {"path": str(DATA / "tiny" / "text_eval.jsonl"), "weight": 1, "max_rows": 20},
    ]
    mix = DataMixture.model_validate(spec)
    ds = load_rows(mix, what="data.train")
    a = datasets.load_dataset("json", data_files=spec[0]["path"], split="train").select(range(40))
    b = datasets.load_dataset("json", data_files=spec[1]["path"], split="train").select(range(20))
    want = datasets.interleave_datasets([a, b], probabilities=[0.75, 0.25], seed=0, stopping_strategy="first_exhausted")
    assert ds["text"] == want["text"] and set(ds["text"]) & set(b["text"])
    assert load_rows(DataMixture.model_validate({"sources": spec, "seed": 1}))["text"] != ds["text"]

    d = sft_recipe_dict(data={"train": spec}, train={"max_steps": 4, "save_every_steps": 2})
    r = write_recipe(d)
    code, _, stderr = cli("sft", r, "-o", tmp_path / "full", "-q")
    assert code == 0, stderr
    shutil.copytree(tmp_path / "full", tmp_path / "cut")  # as if stopped after the step-2 checkpoint
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step-4")
    code, stdout, stderr = cli("sft", r, "-o", tmp_path / "cut", "-q", "--resume")
    assert code == 0, stderr
    assert last_json(stdout)["steps"] == 4 and last_json(stdout)["resumed_from"].endswith("step-2")
    assert losses(tmp_path / "cut") == pytest.approx(losses(tmp_path / "full"), abs=1e-6)


def test_mixtures_for_reward_contrastive_and_rlhf_prompts():
    for command, files in (
        ("reward", ("pref_train.jsonl", "pref_eval.jsonl")),
        ("contrastive", ("pref_train.jsonl", "pref_eval.jsonl")),
        ("rlhf", ("prompts.jsonl", "prompts_eval.jsonl")),
    ):
        schema = SCHEMAS[command]
        d = {"data": {"train": [{"path": str(DATA / "tiny" / f), "weight": w} for f, w in zip(files, (1, 2))]}}
        ann = schema.model_fields["data"].annotation  # rlhf's is PromptData | None (None: env instead)
        ann = next((a for a in typing.get_args(ann) if a is not type(None)), ann)
        section = ann.model_validate(d["data"])
        assert isinstance(section.train, DataMixture) and [s.weight for s in section.train.sources] == [1, 2]


def test_bad_conveniences_are_exit_2_naming_the_field(tmp_path, write_recipe, cli):
    def run(d, *args):
        code, stdout, stderr = cli("sft", write_recipe(d), "-o", tmp_path / "run", *args)
        assert code == 2 and not (tmp_path / "run").exists(), stderr
        return stderr

    err = run(sft_recipe_dict(train={"eval_every_steps": 2, "early_stopping": {"metric": "eval/acc", "mode": "max"}}))
    assert "train.early_stopping.metric: prefcli sft never logs 'eval/acc'" in err and "eval/loss, eval/ppl" in err
    d = sft_recipe_dict(train={"eval_every_steps": 2, "early_stopping": {"metric": "eval/loss", "mode": "min"}})
    d["data"]["eval"] = None
    assert "train.early_stopping: needs held-out data" in run(d)
    assert "train.keep_best: needs train.eval_every_steps" in run(
        sft_recipe_dict(train={"keep_best": {"metric": "eval/loss", "mode": "min"}})
    )
    assert "output.final: 'best' needs train.keep_best" in run(sft_recipe_dict(output={"final": "best"}))
    zero = [{"path": str(DATA / "tiny" / "text.jsonl"), "weight": 0}] * 2
    assert "data.train: the weights of the mixture's sources sum to 0" in run(sft_recipe_dict(data={"train": zero}))
    (tmp_path / "other.jsonl").write_text('{"content": "x"}\n')
    mixed = [{"path": str(DATA / "tiny" / "text.jsonl")}, {"path": str(tmp_path / "other.jsonl")}]
    err = run(sft_recipe_dict(data={"train": mixed}))
    assert f"data.train[1]: {tmp_path / 'other.jsonl'}: columns (content) differ from data.train[0]" in err
