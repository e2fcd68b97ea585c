"""Pretraining with human preferences (Korbak et al. 2023) in `prefcli sft`: every objective's loss against
hand-worked numbers, the data side (scores, threshold, filtering, control tokens, score caching), and the
saved model never sampling a control token."""

import json
import math

import pytest
import torch
import yaml

from prefcli.algos import phf, sft
from prefcli.algos.phf import (
    awr_loss,
    awr_terms,
    prefix_control,
    rwr_loss,
    rwr_terms,
    unit_hash,
    unlikelihood_loss,
    unlikelihood_terms,
)
from prefcli.algos.sft import OBJECTIVES
from prefcli.engine.data import TokenizedSet, pack_rows, packed_batch, pad_batch
from prefcli.engine.dist import Runtime
from prefcli.errors import DataError, RecipeError
from prefcli.recipe import load_recipe
from prefcli.runner import RunContext, RunOptions, run_training

from .conftest import DATA, NO_PLOT, ROOT, last_json, losses, read_metrics, sft_recipe_dict

LN2, LN4, LN10 = math.log(2), math.log(4), math.log(10)


# ----------------------------------------------------------------------------- losses by hand


def test_unlikelihood_terms_by_hand():
    # p = 0.5 (aligned row), 0.25 and 0.8 (misaligned rows), and a position without a target
    logp = torch.log(torch.tensor([0.5, 0.25, 0.8, 0.3])).requires_grad_()
    mask = torch.tensor([True, True, True, False])
    aligned = torch.tensor([True, False, False, True])
    loss, lik, unl = unlikelihood_terms(logp, mask, aligned, alpha=2.0)
    # -log 0.5 ; -log(1 - 0.25) - log(1 - 0.8) = log(4/3) + log 5
    assert lik.item() == pytest.approx(0.6931472, abs=1e-6)
    assert unl.item() == pytest.approx(0.2876821 + 1.6094379, abs=1e-6)
    assert loss.item() == pytest.approx(0.6931472 + 2 * 1.8971200, abs=1e-5)
    loss.backward()
    # d/dlogp: -1 on the aligned token; alpha * p / (1 - p) on misaligned ones: 2 * 1/3 and 2 * 4
    assert logp.grad.tolist() == pytest.approx([-1.0, 2 / 3, 8.0, 0.0], abs=1e-5)


def test_unlikelihood_is_finite_when_p_is_one():
    logp = torch.zeros(2, requires_grad=True)  # p = 1 exactly
    loss, _, unl = unlikelihood_terms(logp, torch.tensor([True, True]), torch.tensor([False, True]), alpha=1.0)
    assert unl.item() == pytest.approx(-math.log(1e-20), rel=1e-6)  # 1 - p clamped at 1e-20, as in the paper's code
    loss.backward()
    assert torch.isfinite(logp.grad).all()


def test_rwr_terms_by_hand():
    logp = torch.log(torch.tensor([0.5, 0.25, 0.9]))
    mask = torch.tensor([True, True, False])
    reward = torch.tensor([1.0, -2.0, 5.0])
    loss, w = rwr_terms(logp, mask, reward, beta=2.0)
    # exp(1/2) * ln 2 + exp(-2/2) * ln 4 ; the third position has no target
    assert w.tolist() == pytest.approx([1.6487213, 0.3678794, 0.0], abs=1e-6)
    assert loss.item() == pytest.approx(1.6487213 * LN2 + 0.3678794 * LN4, abs=1e-5)


def test_awr_terms_by_hand():
    logp = torch.log(torch.tensor([0.5, 0.25, 0.1]))
    values = torch.tensor([0.2, -0.5, 0.0], requires_grad=True)
    mask = torch.tensor([True, True, True])
    reward = torch.tensor([1.0, 1.0, 30.0])
    loss, wnll, mse, w, adv = awr_terms(logp, values, mask, reward, beta=1.0, alpha=0.5, max_weight=10.0)
    # advantages 0.8, 1.5, 30; weights e^0.8, e^1.5 and e^30 clipped to 10
    assert adv.tolist() == pytest.approx([0.8, 1.5, 30.0], abs=1e-6)
    assert w.tolist() == pytest.approx([2.2255409, 4.4816891, 10.0], abs=1e-5)
    assert wnll.item() == pytest.approx(2.2255409 * LN2 + 4.4816891 * LN4 + 10 * LN10, abs=1e-4)
    assert mse.item() == pytest.approx(0.64 + 2.25 + 900.0, abs=1e-3)
    assert loss.item() == pytest.approx(0.5 * 30.7814240 + 0.5 * 902.89, abs=1e-3)
    loss.backward()
    # the weights use V detached: V learns from (1 - alpha) * (V - R)^2 only
    assert values.grad.tolist() == pytest.approx([0.5 * 2 * -0.8, 0.5 * 2 * -1.5, 0.5 * 2 * -30.0], abs=1e-5)


class _FixedLM(torch.nn.Module):
    """Stands in for PolicyLM (and ValuePolicy): returns fixed log-probs (and values) per position."""

    def __init__(self, logp, values=None):
        super().__init__()
        self.logp, self.values = logp, values

    def forward(self, input_ids, targets, attention_mask=None, position_ids=None, mode="logprobs"):
        lp = torch.where(targets != -100, self.logp, torch.zeros_like(self.logp))
        if mode == "ce":
            return -lp.sum()
        return (lp, self.values) if self.values is not None else (lp, torch.zeros_like(lp))


def _packed_two_examples():
    """One packed row holding example 0 (3 tokens: 2 targets) and example 1 (2 tokens: 1 target), then padding."""
    data = TokenizedSet(input_ids=[[5, 6, 7], [8, 9]], labels=[[5, 6, 7], [8, 9]], n_rows=2, rows=[0, 1])
    return packed_batch([[0, 1]], data, pad_id=0, max_length=7)


def test_per_example_scores_reach_the_right_tokens_in_a_packed_row():
    batch = _packed_two_examples()
    assert batch["targets"].tolist() == [[6, 7, -100, 9, -100, -100, -100]]

    class T:  # the task's per-example tables
        ex_scores = torch.tensor([2.0, -1.0])
        ex_aligned = torch.tensor([True, False])
        ex_conditioned = torch.tensor([True, True])

    fields = sft.SFTTask._example_fields(T, batch, [[0, 1]])
    assert fields["example_index"].tolist() == [[0, 0, -1, 1, -1, -1, -1]]
    batch.update(fields)
    logp = torch.log(torch.tensor([[0.5, 0.25, 0.3, 0.5, 0.3, 0.3, 0.3]]))
    loss, mets = rwr_loss(_FixedLM(logp), batch, beta=2.0)
    # example 0 (score 2): e^1 (ln 2 + ln 4); example 1 (score -1): e^-0.5 ln 2
    assert loss.item() == pytest.approx(math.e * (LN2 + LN4) + math.exp(-0.5) * LN2, abs=1e-5)
    assert mets["phf/score_mean"][0].item() / mets["phf/score_mean"][1] == pytest.approx(0.5)
    loss, mets = unlikelihood_loss(_FixedLM(logp), batch, alpha=1.0)
    # example 0 aligned: ln 2 + ln 4; example 1 misaligned: -log(1 - 0.5) = ln 2
    assert loss.item() == pytest.approx(LN2 + LN4 + LN2, abs=1e-5)
    assert mets["phf/aligned_token_fraction"][0].item() == 2 and mets["phf/aligned_token_fraction"][1] == 3
    # filter and conditional are MLE on their (filtered / prefixed) rows: ln 2 + ln 4 + ln 2
    loss, mets = phf.filter_loss(_FixedLM(logp), batch)
    assert loss.item() == pytest.approx(2 * LN2 + LN4, abs=1e-5)
    batch["conditioned"] = torch.tensor([True, False])
    loss, mets = phf.conditional_loss(_FixedLM(logp), batch)
    assert loss.item() == pytest.approx(2 * LN2 + LN4, abs=1e-5)
    assert mets["phf/aligned_fraction"][0].item() == 1 and mets["phf/aligned_fraction"][1] == 2
    assert mets["phf/unconditioned_fraction"][0].item() == 1
    values = torch.tensor([[1.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0]])
    loss, mets = awr_loss(_FixedLM(logp, values), batch, beta=1.0, alpha=0.5, max_weight=1000.0)
    # advantages 2-1, 2-0, -1-(-1): weights e, e^2, 1; MSE 1 + 4 + 0
    assert loss.item() == pytest.approx(0.5 * (math.e * LN2 + math.e**2 * LN4 + LN2) + 0.5 * 5.0, abs=1e-4)
    assert mets["phf/value_loss"][0].item() == pytest.approx(5.0)


def test_registry_covers_every_objective_of_the_schema():
    from typing import get_args

    from prefcli.recipe.commands import SFTSection

    assert set(OBJECTIVES) == set(get_args(SFTSection.model_fields["objective"].annotation))
    for name, obj in OBJECTIVES.items():
        assert "Korbak" in (obj.loss.__doc__ or "") or name == "mle", name


def test_control_token_prefix():
    # no BOS: the control token comes first and is never a target; the first text token becomes a target
    assert prefix_control([5, 6, 7], [5, 6, 7], 99, None, mask_next=False) == ([99, 5, 6, 7], [-100, 5, 6, 7])
    # held-out rows keep the targets of an mle run: the first text token stays unscored
    assert prefix_control([5, 6, 7], [5, 6, 7], 99, None, mask_next=True) == ([99, 5, 6, 7], [-100, -100, 6, 7])
    # a leading BOS stays first
    assert prefix_control([1, 5, 6], [1, 5, 6], 99, 1, mask_next=True) == ([1, 99, 5, 6], [1, -100, 5, 6])


def test_control_token_position_in_unpacked_and_packed_rows():
    """start: first (after a BOS); after_prompt: right before the first trained token, i.e. after a masked
    prompt (a 'text' row has none: at the start). Never a target, in a padded row and in a packed one."""
    P = -100
    text = ([5, 6, 7], [5, 6, 7])  # a 'text' row: every token labelled, the first one no target
    pc = ([1, 2, 5, 6], [P, P, 5, 6])  # a prompt_completion row: prompt 1 2 masked
    assert prefix_control(*pc, 99, None, mask_next=False, position="start") == ([99, 1, 2, 5, 6], [P, P, P, 5, 6])
    assert prefix_control(*pc, 99, None, mask_next=False, position="after_prompt") == (
        [1, 2, 99, 5, 6],
        [P, P, P, 5, 6],
    )
    assert prefix_control(*text, 99, None, mask_next=False, position="after_prompt") == ([99, 5, 6, 7], [P, 5, 6, 7])
    # held out, after_prompt: the completion's targets are those of mle (nothing to mask: 5 was a target)
    assert prefix_control(*pc, 99, None, mask_next=True, position="after_prompt")[1] == [P, P, P, 5, 6]
    assert phf.control_context(*pc, 99, None, "after_prompt") == ([1, 2, 99], 2)
    assert phf.control_context(*pc, 99, None, "start") == ([99, 1, 2], 0)
    assert phf.control_context(*text, 99, None, "start") == ([99], 0)
    assert phf.control_context([3, 5, 6], [3, 5, 6], 99, 3, "after_prompt") == ([3, 99], 1)  # after a BOS
    # packed: each example keeps its token where it was put; the token before it is no target either
    a = prefix_control(*pc, 99, None, mask_next=False, position="after_prompt")
    b = prefix_control(*text, 98, None, mask_next=False, position="after_prompt")
    data = TokenizedSet(input_ids=[a[0], b[0]], labels=[a[1], b[1]], n_rows=2, rows=[0, 1])
    packed = packed_batch([[0, 1]], data, pad_id=0, max_length=12)
    assert packed["input_ids"][0, :9].tolist() == [1, 2, 99, 5, 6, 98, 5, 6, 7]
    assert packed["position_ids"][0, :9].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3]
    # targets[t] = the label of token t+1: 99 and 98 never appear, 5 after 99 and after 98 are targets
    assert packed["targets"][0, :9].tolist() == [P, P, 5, 6, P, 5, 6, 7, P]
    padded = pad_batch([a[0], b[0]], [a[1], b[1]], 0)
    assert padded["targets"].tolist() == [[P, P, 5, 6, P], [5, 6, 7, P, P]]


def test_segments_split_and_encode_by_hand():
    assert phf.split_segments("a b\nc d\n", "\n") == ["a b\n", "c d\n"]
    assert phf.split_segments("a\n\n b\nc", "\n") == ["a\n\n", " b\n", "c"]  # an empty piece joins the one before
    assert phf.split_segments("\na", "\n") == ["\na"]
    for t in ("a b\nc d\n", "a\n\n b\nc", "\na", "x"):
        assert "".join(phf.split_segments(t, "\n")) == t
    P = -100
    # prompt 1 (masked), segments [5 6] after token 90 and [7] after 91, EOS 2: tokens never targets
    ids, labels, cut = phf.encode_segments([1], [P], [[5, 6], [7]], [90, 91], 2, max_length=16)
    assert (ids, labels, cut) == ([1, 90, 5, 6, 91, 7, 2], [P, P, 5, 6, P, 7, 2], False)
    # a dropped token (None); truncation
    ids, labels, cut = phf.encode_segments([], [], [[5, 6], [7]], [90, None], 2, max_length=4)
    assert (ids, labels, cut) == ([90, 5, 6, 7], [P, 5, 6, 7], True)
    targets = pad_batch([[1, 90, 5, 6, 91, 7, 2]], [[P, P, 5, 6, P, 7, 2]], 0)["targets"][0].tolist()
    assert targets == [P, 5, 6, P, 7, 2, P]


def test_dropped_control_tokens_are_a_seeded_one_percent():
    draws = [unit_hash(0, r) for r in range(20000)]
    assert draws == [unit_hash(0, r) for r in range(20000)]
    frac = sum(d < 0.01 for d in draws) / len(draws)
    assert 0.008 < frac < 0.012
    assert [unit_hash(1, r) for r in range(50)] != draws[:50]


# ----------------------------------------------------------------------------- the data side


def _task(tmp_path, d: dict, name="r.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(d, sort_keys=False))
    rec = load_recipe(p).recipe
    rt = Runtime(device=torch.device("cpu"), precision="fp32")
    torch.manual_seed(rec.train.seed)
    return sft.build(RunContext(recipe=rec, rt=rt, run_dir=tmp_path / "never"))


def _scored_rows(tmp_path, scores):
    f = tmp_path / "scored.jsonl"
    verses = [json.loads(x)["text"] for x in (DATA / "tiny" / "text.jsonl").read_text().splitlines()]
    f.write_text("".join(json.dumps({"text": verses[i], "rating": s}) + "\n" for i, s in enumerate(scores)))
    return f


def test_filter_drops_the_rejected_rows_and_counts_them(tmp_path):
    scores = [0.5, -0.2, 0.0, -1.0, 0.9, 0.3, -0.01, 0.2]
    d = sft_recipe_dict(
        data={"train": {"path": str(_scored_rows(tmp_path, scores))}},
        sft={"objective": "filter", "score_column": "rating", "threshold": 0.0},
    )
    task = _task(tmp_path, d)
    assert task.train_set.rows == [0, 2, 4, 5, 7]
    ph = task.describe()["data"]["phf"]
    assert ph["examples_kept"] == 5 and ph["examples_filtered"] == 3 and ph["threshold"] == 0.0
    assert ph["rows_scored"] == 8 and ph["score_mean"] == pytest.approx(sum(scores) / 8)
    assert task.describe()["data"]["train_examples"] == 5
    # the quantile rule: sorted -1, -0.2, -0.01, 0, ...; the 0.25 quantile sits at position 0.25 * 7 = 1.75,
    # -0.2 + 0.75 * (-0.01 + 0.2) = -0.0575 (linear interpolation); -1 and -0.2 fall below it
    d["sft"] = {"objective": "filter", "score_column": "rating"}
    ph = _task(tmp_path, d, "q.yaml").describe()["data"]["phf"]
    assert ph["threshold"] == pytest.approx(-0.0575) and ph["threshold_rule"] == "quantile 0.25"
    assert ph["examples_filtered"] == 2


def test_filter_that_keeps_nothing_and_bad_score_column(tmp_path):
    d = sft_recipe_dict(
        data={"train": {"path": str(_scored_rows(tmp_path, [-1.0, -2.0]))}},
        sft={"objective": "filter", "score_column": "rating", "threshold": 0.0},
    )
    with pytest.raises(DataError, match="keeps no row"):
        _task(tmp_path, d)
    d["sft"]["score_column"] = "stars"
    with pytest.raises(DataError, match="score_column 'stars' is not a column"):
        _task(tmp_path, d)
    f = tmp_path / "nan.jsonl"
    f.write_text('{"text": "a b c", "rating": 1}\n{"text": "d e f", "rating": "high"}\n')
    d = sft_recipe_dict(data={"train": {"path": str(f)}}, sft={"objective": "rwr", "score_column": "rating"})
    with pytest.raises(DataError, match="row 2: score column 'rating' holds 'high'"):
        _task(tmp_path, d)


def test_scores_are_cached_with_the_data(tmp_path):
    """The scorer runs once per row: a second run on the same data reads the scores back from the cache;
    editing the scorer's source scores again."""
    counter = tmp_path / "calls.txt"
    fn = tmp_path / "count_reward.py"
    src = (
        "def score(prompts, completions, log=''):\n"
        "    with open(log, 'a') as f:\n"
        "        f.write(f'{len(completions)}\\n')\n"
        "    return [len(c) / 100 for c in completions]\n"
    )
    fn.write_text(src)
    rows = tmp_path / "rows.jsonl"  # fresh rows: nothing of them is in the datasets cache yet
    verses = (DATA / "tiny" / "text.jsonl").read_text().splitlines()[:40]
    rows.write_text("\n".join(verses) + "\n")
    d = sft_recipe_dict(
        data={"train": {"path": str(rows)}},
        sft={
            "objective": "rwr",
            "rewards": [{"kind": "function", "function": f"{fn}:score", "kwargs": {"log": str(counter)}}],
            "score_batch_size": 16,
        },
    )
    t1 = _task(tmp_path, d)
    calls = [int(x) for x in counter.read_text().split()]
    assert calls == [16, 16, 8]  # every row scored once, in batches of score_batch_size
    t2 = _task(tmp_path, d, "again.yaml")
    assert [int(x) for x in counter.read_text().split()] == calls  # not called again
    assert torch.equal(t1.ex_scores, t2.ex_scores)
    assert t1.ex_scores[0].item() == pytest.approx(len(json.loads(verses[0])["text"]) / 100, abs=1e-6)
    fn.write_text(src.replace("/ 100", "/ 10"))  # a different scorer: a different cache entry
    t3 = _task(tmp_path, d, "edited.yaml")
    assert len(counter.read_text().split()) == 6
    assert t3.ex_scores[0].item() == pytest.approx(10 * t1.ex_scores[0].item(), rel=1e-5)


def test_conditional_prefixes_rows_and_keeps_the_eval_targets_of_mle(tmp_path):
    scores = [0.5, -0.2, 0.0, -1.0, 0.9, 0.3]
    # max_length 96: no row is truncated (a conditional row keeps max_length - 1 tokens for the control token)
    d = sft_recipe_dict(
        data={"train": {"path": str(_scored_rows(tmp_path, scores))}, "max_length": 96},
        sft={"objective": "conditional", "score_column": "rating", "threshold": 0.0, "drop_control_fraction": 0.0},
    )
    task = _task(tmp_path, d)
    assert task.eval_set.n_truncated == 0
    a, m = task.control_ids
    assert task.tok.convert_ids_to_tokens([a, m]) == ["<|aligned|>", "<|misaligned|>"]
    assert [ids[0] for ids in task.train_set.input_ids] == [a, m, a, m, a, a]
    assert all(lab[0] == -100 for lab in task.train_set.labels)
    mle = _task(
        tmp_path,
        sft_recipe_dict(data={"train": {"path": str(_scored_rows(tmp_path, scores))}, "max_length": 96}),
        "m.yaml",
    )
    assert [ids[1:] for ids in task.train_set.input_ids] == mle.train_set.input_ids
    # held out: every row after <|aligned|>, the same target tokens as the mle run
    assert all(ids[0] == a for ids in task.eval_set.input_ids)

    def n_targets(s):
        return sum(sum(t != -100 for t in lab[1:]) for lab in s.labels)

    assert n_targets(task.eval_set) == n_targets(mle.eval_set) > 0
    ph = task.describe()["data"]["phf"]
    assert ph["examples_aligned"] == 4 and ph["examples_misaligned"] == 2 and ph["examples_unconditioned"] == 0


def _pc_rows(tmp_path, verses):
    f = tmp_path / "pc.jsonl"
    f.write_text("".join(json.dumps({"prompt": "<|endoftext|>", "completion": v}) + "\n" for v in verses))
    return f


@pytest.mark.parametrize("packing", [False, True])
def test_control_position_in_the_task_batches(tmp_path, packing):
    """Through the task: after_prompt puts the token right after the '<|endoftext|>' prompt of every
    example (start: before it), and no batch, padded or packed, ever has a control token as a target."""
    verses = [json.loads(x)["text"] for x in (DATA / "tiny" / "text.jsonl").read_text().splitlines()[:12]]
    f = _pc_rows(tmp_path, verses)
    for pos in ("start", "after_prompt"):
        d = sft_recipe_dict(
            data={"train": {"path": str(f)}, "eval": {"path": str(f)}, "max_length": 96, "packing": packing},
            sft={
                "objective": "conditional",
                "threshold": 0.0,
                "drop_control_fraction": 0.0,
                "control_position": pos,
                **PHF,
            },
        )
        task = _task(tmp_path, d, f"{pos}-{packing}.yaml")
        eot = task.tok.convert_tokens_to_ids("<|endoftext|>")
        ctrl = set(task.control_ids)
        want = [0, 1] if pos == "start" else [1, 0]  # index of the control token, of <|endoftext|>
        for s_ in (task.train_set, task.eval_set):
            for ids in s_.input_ids:
                assert ids[want[0]] in ctrl and ids[want[1]] == eot
                assert sum(t in ctrl for t in ids) == 1
        batch, n, _ = task._collate(list(range(len(task.rows) if packing else 8)))
        tgt = batch["targets"]
        assert not torch.isin(tgt, torch.tensor(sorted(ctrl))).any()
        is_ctrl = torch.isin(batch["input_ids"], torch.tensor(sorted(ctrl)))
        assert int(is_ctrl.sum()) == (len(task.train_set) if packing else 8)
        # the token after every control token is a target (a verse's first token), whatever the position
        nxt = tgt[is_ctrl]
        assert (nxt != -100).all() if pos == "after_prompt" else (nxt == -100).all()
        assert task.describe()["data"]["phf"]["control_position"] == pos


def test_per_segment_scores_and_conditions_every_segment(tmp_path):
    """per_segment: each line of a row is scored on its own and gets its own token (VADER >= 0:
    <|aligned|>); a control token is never a target, in padded and in packed batches."""
    from prefcli.reward_sources import vader_compound

    verses = [json.loads(x)["text"] for x in (DATA / "tiny" / "text.jsonl").read_text().splitlines()[:24]]
    docs = ["\n".join(verses[i : i + 3]) for i in range(0, 24, 3)]
    f = tmp_path / "docs.jsonl"
    f.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    d = sft_recipe_dict(
        data={"train": {"path": str(f)}, "eval": {"path": str(f)}, "max_length": 200},
        sft={
            "objective": "conditional",
            "threshold": 0.0,
            "drop_control_fraction": 0.0,
            "control_position": "per_segment",
            **PHF,
        },
    )
    task = _task(tmp_path, d)
    a, m = task.control_ids
    ph = task.describe()["data"]["phf"]
    assert ph["segments_scored"] == 24 and ph["segments_per_example"] == 3
    segs = [phf.split_segments(t, "\n") for t in docs]
    want = [[a if v >= 0 else m for v in vader_compound(s_)] for s_ in segs]
    assert ph["examples_aligned"] == sum(x == a for w in want for x in w) and ph["examples_misaligned"] > 0
    for ids, labels, w, s_ in zip(task.train_set.input_ids, task.train_set.labels, want, segs):
        assert [t for t in ids if t in (a, m)] == w  # one token per segment, chosen by its own score
        at = [i for i, t in enumerate(ids) if t in (a, m)]
        assert at[0] == 0 and all(labels[i] == -100 for i in at)
        first = [ids[i + 1] for i in at]  # every segment starts with its own first token, right after its token
        assert first == [task.tok(x, add_special_tokens=False)["input_ids"][0] for x in s_]
    assert all([t for t in ids if t in (a, m)] == [a] * 3 for ids in task.eval_set.input_ids)
    assert task.eval_set.labels[0][1] == -100  # held out: the row's first token stays unscored, as in mle
    assert task.gap_contexts[0] == ([a], 0)
    for packing in (False, True):
        task.rows = pack_rows(list(range(len(task.train_set))), task.train_set, 200) if packing else None
        batch, _, _ = task._collate(list(range(len(task.rows))) if packing else [0, 1, 2])
        assert not torch.isin(batch["targets"], torch.tensor([a, m])).any()
        n_ctrl = int(torch.isin(batch["input_ids"], torch.tensor([a, m])).sum())
        assert n_ctrl == (24 if packing else 9)


def test_control_embedding_initialisation(tmp_path, tiny_model_dir):
    """control_init: 'mean' sets both rows to the mean of the other rows; 'random' draws distinct rows with
    the other rows' statistics, the same for the same seed; 'default' keeps transformers' resize, which
    starts both tokens almost at the mean."""
    d = sft_recipe_dict(sft={"objective": "conditional", "threshold": 0.0, **PHF})
    d["model"] = {"path": str(tiny_model_dir)}
    rows = {}
    for init in ("default", "mean", "random"):
        d["sft"]["control_init"] = init
        task = _task(tmp_path, d, f"{init}.yaml")
        w = task.lm.get_input_embeddings().weight.detach()
        a, m = task.control_ids
        others = w[: len(task.tok)][[i for i in range(len(task.tok)) if i not in (a, m)]]
        rows[init] = (w[[a, m]].clone(), others.mean(0), others)
    new, mean, others = rows["mean"]
    assert torch.allclose(new[0], mean, atol=1e-7) and torch.allclose(new[1], mean, atol=1e-7)
    new, mean, others = rows["default"]
    assert torch.allclose(new, mean.expand(2, -1), atol=1e-3)  # transformers' mean resizing
    new, mean, others = rows["random"]
    spread = (others - mean).norm(dim=1).mean()
    for r in new:
        assert 0.5 * spread < (r - mean).norm() < 2 * spread  # as far from the mean as a typical token
    assert (new[0] - new[1]).norm() > 0.5 * spread
    d["sft"]["control_init"] = "random"
    again = _task(tmp_path, d, "random2.yaml").lm.get_input_embeddings().weight.detach()
    assert torch.equal(again[list(_task(tmp_path, d, "r3.yaml").control_ids)], new)
    # an untied output layer gets its own rows from its own statistics
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir, tie_word_embeddings=False)
    lm.resize_token_embeddings(lm.get_input_embeddings().weight.shape[0] + 2)
    n = lm.get_input_embeddings().weight.shape[0]
    phf.init_control_embeddings(lm, (n - 2, n - 1), "mean", n, seed=0)
    out = lm.get_output_embeddings().weight.detach()
    assert torch.allclose(out[n - 1], out[: n - 2].mean(0), atol=1e-6)
    assert not torch.allclose(out[n - 1], lm.get_input_embeddings().weight[n - 1].detach())


@pytest.mark.parametrize("fused", [False, True])
def test_control_lr_scale_is_a_learning_rate_for_those_rows(fused):
    """RowLRScale(scale=3) on row 1 under AdamW (with weight decay) at lr 1e-2 moves row 1 exactly as AdamW at
    lr 3e-2 does, and every other row as at lr 1e-2. The loss is linear in the weights, so the gradients,
    and with them the optimizer states, are the same in all three runs."""
    torch.manual_seed(0)
    w0 = torch.randn(4, 3)
    c = torch.randn(4, 3)

    def run(lr, scale=None):
        w = torch.nn.Parameter(w0.clone())
        opt = torch.optim.AdamW([w], lr=lr, weight_decay=0.1, fused=fused)
        if scale is not None:
            phf.RowLRScale(opt, [w], [1], scale)
        for _ in range(5):
            opt.zero_grad()
            (w * c).sum().backward()
            opt.step()
        return w.detach()

    scaled, slow, fast = run(1e-2, 3.0), run(1e-2), run(3e-2)
    assert torch.allclose(scaled[1], fast[1], atol=1e-6) and not torch.allclose(scaled[1], slow[1], atol=1e-4)
    assert torch.allclose(scaled[[0, 2, 3]], slow[[0, 2, 3]], atol=1e-7)


def test_control_lr_scale_reaches_the_task_optimizer(tmp_path):
    """One step of a conditional run with control_lr_scale 10 moves the control rows 10 times as far as
    the same step without it, and every other row the same."""
    from transformers import AutoModelForCausalLM

    d = sft_recipe_dict(
        train={"max_steps": 1, "lr": 1e-3, "warmup_ratio": 0.0},
        data={"eval": None},
        sft={"objective": "conditional", "threshold": 0.0, **PHF},
    )
    start = _task(tmp_path, d, "start.yaml").lm.get_input_embeddings().weight.detach().clone()
    moved = {}
    for scale in (1.0, 10.0):
        d["sft"]["control_lr_scale"] = scale
        _, out = _run(tmp_path, f"x{scale:g}", d)
        moved[scale] = (
            AutoModelForCausalLM.from_pretrained(out / "final").get_input_embeddings().weight.detach() - start
        )
    ctrl = [start.shape[0] - 2, start.shape[0] - 1]
    assert moved[1.0][ctrl].abs().max() > 1e-5
    assert torch.allclose(moved[10.0][ctrl], 10 * moved[1.0][ctrl], atol=1e-6)
    assert torch.allclose(moved[10.0][:-2], moved[1.0][:-2], atol=1e-7)


def test_recipe_combinations_are_checked(tmp_path, cli):
    def problems(sft_section, **extra):
        d = sft_recipe_dict(sft=sft_section, **extra)
        p = tmp_path / "bad.yaml"
        p.write_text(yaml.safe_dump(d, sort_keys=False))
        with pytest.raises(RecipeError) as e:
            load_recipe(p)
        return " ".join(e.value.problems)

    assert "objective 'filter' needs a scorer" in problems({"objective": "filter"})
    assert "not both" in problems({"objective": "rwr", "score_column": "s", "rewards": [{"kind": "sentiment"}]})
    assert "sft.beta applies to objective rwr or awr only, not 'conditional'" in problems(
        {"objective": "conditional", "score_column": "s", "beta": 2.0}
    )
    assert "sft.threshold applies to objective" in problems({"objective": "awr", "score_column": "s", "threshold": 0})
    assert "must differ" in problems(
        {"objective": "conditional", "score_column": "s", "aligned_token": "<x>", "misaligned_token": "<x>"}
    )
    assert "LoRA" in problems({"objective": "conditional", "score_column": "s"}, model={"lora": {"r": 4}})
    assert "did you mean 'conditional'" in problems({"objective": "conditonal"})
    assert "sft.control_position applies to objective conditional only" in problems(
        {"objective": "filter", "score_column": "s", "control_position": "after_prompt"}
    )
    assert "segment_separator applies to control_position per_segment only" in problems(
        {"objective": "conditional", "score_column": "s", "segment_separator": "."}
    )
    assert "needs a scorer (sft.rewards)" in problems(
        {"objective": "conditional", "score_column": "s", "control_position": "per_segment"}
    )
    assert "a score_column cannot score new text" in problems(
        {"objective": "conditional", "score_column": "s", "control_gap_samples": 8}
    )
    assert "did you mean 'per_segment'" in problems({"objective": "conditional", **PHF, "control_position": "segment"})
    # the CLI turns them into exit 2, nothing written
    d = sft_recipe_dict(sft={"objective": "unlikelihood"})
    p = tmp_path / "cli.yaml"
    p.write_text(yaml.safe_dump(d))
    code, stdout, stderr = cli("sft", p, "-o", tmp_path / "never", "-q")
    assert code == 2 and "needs a scorer" in stderr and not (tmp_path / "never").exists()


# ----------------------------------------------------------------------------- training through the loop


def _run(tmp_path, name, d, overrides=()):
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(d, sort_keys=False))
    out = tmp_path / name
    return run_training("sft", p, RunOptions(overrides=list(overrides), output_dir=str(out), quiet=True)), out


PHF = {"rewards": [{"kind": "sentiment"}]}


@pytest.mark.slow
def test_conditional_tokens_are_added_embeddings_resized_and_trained(tmp_path, tiny_model_dir):
    d = sft_recipe_dict(
        train={"max_steps": 3, "lr": 1e-2, "save_every_steps": 1, "keep_checkpoints": 5},
        sft={"objective": "conditional", "threshold": 0.0, **PHF},
    )
    d["model"] = {"path": str(tiny_model_dir)}  # a pretrained model whose vocabulary ends at the tokenizer
    s, out = _run(tmp_path, "cond", d)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prefcli.engine import checkpoint as ckpt

    tok = AutoTokenizer.from_pretrained(out / "final")
    before = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert len(tok) == len(before) + 2
    a, m = tok.convert_tokens_to_ids(["<|aligned|>", "<|misaligned|>"])
    assert (a, m) == (len(before), len(before) + 1)
    assert tok("<|aligned|>In the beginning")["input_ids"][0] == a  # kept whole
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    assert model.generation_config.bad_words_ids == [[a], [m]]
    assert s["data"]["phf"]["control_token_ids"] == [a, m]
    step1 = ckpt.read_tensors(out / "checkpoints" / "step-1" / "model-policy")
    key = next(k for k in step1 if "embed_tokens" in k)
    final = model.get_input_embeddings().weight.detach()
    assert not torch.allclose(step1[key][[a, m]], final[[a, m]])  # the new rows train
    rows = read_metrics(out)
    assert all(0 < r["phf/aligned_fraction"] <= 1 for r in rows if "phf/aligned_fraction" in r)


@pytest.mark.slow
def test_control_tokens_are_never_generated(tmp_path):
    """A model whose output bias strongly favours the control tokens samples them all the time, unless the
    saved generation_config (bad_words_ids) blocks them: then never, in 2,048 sampled tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = sft_recipe_dict(
        train={"max_steps": 1}, data={"eval": None}, sft={"objective": "conditional", "threshold": 0.0, **PHF}
    )
    _, out = _run(tmp_path, "gen", d)
    tok = AutoTokenizer.from_pretrained(out / "final")
    model = AutoModelForCausalLM.from_pretrained(out / "final").eval()
    ctrl = tok.convert_tokens_to_ids(["<|aligned|>", "<|misaligned|>"])
    bias = torch.zeros(len(tok))
    bias[ctrl] = 30.0
    model.get_output_embeddings().register_forward_hook(lambda mod, inp, logits: logits + bias)
    prompt = torch.tensor([[ctrl[0]]] * 32)
    kw = dict(do_sample=True, max_new_tokens=64, min_new_tokens=64, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    free = model.generate(prompt, bad_words_ids=None, **kw)[:, 1:]
    assert torch.isin(free, torch.tensor(ctrl)).float().mean() > 0.9  # the bias works: the test can fail
    torch.manual_seed(0)
    blocked = model.generate(prompt, **kw)[:, 1:]  # the saved generation_config
    assert blocked.numel() == 32 * 64
    assert not torch.isin(blocked, torch.tensor(ctrl)).any()


@pytest.mark.slow
def test_awr_accumulation_equals_the_larger_batch_and_resume_is_exact(tmp_path):
    """The value head trains with the policy in one group: 4 x 1 equals 1 x 4, and a resumed run (value head
    restored from the checkpoint) repeats the uninterrupted one bit for bit."""
    base = sft_recipe_dict(
        train={"max_steps": 4, "lr": 1e-2, "save_every_steps": 2}, data={"eval": None}, sft={"objective": "awr", **PHF}
    )
    _, a = _run(tmp_path, "b4", base, ["train.batch_size=4"])
    _, b = _run(tmp_path, "b1x4", base, ["train.batch_size=1", "train.grad_accum_steps=4"])
    la, lb = losses(a), losses(b)
    assert len(la) == 4
    for k in la:
        assert lb[k] == pytest.approx(la[k], abs=1e-5)
    va = [r["phf/value_loss"] for r in read_metrics(a)]
    assert va[-1] < va[0]  # the value head learns the scores
    import shutil

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(a / "checkpoints" / "step-2", resumed / "checkpoints" / "step-2")
    p = tmp_path / "again.yaml"
    p.write_text(yaml.safe_dump(base, sort_keys=False))
    s = run_training(
        "sft", p, RunOptions(overrides=["train.batch_size=4"], output_dir=str(resumed), resume=True, quiet=True)
    )
    assert s["steps"] == 4
    lr_ = losses(resumed)
    assert sorted(lr_) == [3, 4] and all(lr_[k] == la[k] for k in lr_)


def test_packed_unlikelihood_matches_unpacked_on_one_batch(tmp_path):
    """Per-example labels follow their tokens into packed rows: with the whole data in one step, packing
    changes no number of the loss."""
    base = sft_recipe_dict(
        train={"max_steps": 1, "batch_size": 64},
        data={"eval": None, "train": {"max_rows": 24}},
        sft={"objective": "unlikelihood", "threshold": 0.0, **PHF},
    )
    s2, _ = _run(tmp_path, "packed", base, ["data.packing=true", "data.max_length=96"])
    s3, _ = _run(tmp_path, "plain96", base, ["data.max_length=96"])
    assert s3["final"]["loss/sft"] == pytest.approx(s2["final"]["loss/sft"], rel=1e-5)
    assert s3["final"]["phf/unlikelihood_loss"] == pytest.approx(s2["final"]["phf/unlikelihood_loss"], rel=1e-5)
    assert 0 < s2["final"]["phf/aligned_token_fraction"] < 1


# ----------------------------------------------------------------------------- bundled recipes


PHF_RECIPES = sorted((ROOT / "recipes" / "tiny").glob("sft-phf-*.yaml"))


def test_every_objective_has_a_tiny_recipe_that_validates():
    names = {p.stem.removeprefix("sft-phf-") for p in PHF_RECIPES}
    assert names == set(OBJECTIVES) - {"mle"}
    for p in PHF_RECIPES:
        r = load_recipe(p).recipe
        assert r.sft.objective == p.stem.removeprefix("sft-phf-") and r.sft.rewards[0].kind == "sentiment"


@pytest.mark.slow
@pytest.mark.parametrize("recipe", PHF_RECIPES, ids=[p.stem for p in PHF_RECIPES])
def test_tiny_recipe_smoke(recipe, tmp_path, cli):
    code, stdout, stderr = cli("sft", recipe, "--smoke", "-o", tmp_path / "s", "-q", *NO_PLOT)
    assert code == 0, stderr
    s = last_json(stdout)
    assert s["steps"] == 3 and s["data"]["phf"]["rows_scored"] == 16
    assert math.isfinite(s["final"]["loss/sft"]) and "phf/score_mean" in s["final"]


@pytest.mark.slow
def test_per_segment_tiny_recipe_smoke(tmp_path, cli):
    """recipes/tiny/sft-conditional-per-segment.yaml: every clause of a verse gets its own token."""
    recipe = ROOT / "recipes" / "tiny" / "sft-conditional-per-segment.yaml"
    code, stdout, stderr = cli("sft", recipe, "--smoke", "-o", tmp_path / "s", "-q", *NO_PLOT)
    assert code == 0, stderr
    ph = last_json(stdout)["data"]["phf"]
    assert ph["control_position"] == "per_segment" and ph["rows"] == 16
    assert ph["segments_scored"] > 16 and ph["segments_per_example"] > 1  # verses have clauses
    assert ph["segments_aligned"] + ph["segments_misaligned"] == ph["segments_scored"]


@pytest.mark.slow
def test_conditional_recipe_end_to_end(tmp_path, cli):
    out = tmp_path / "run"
    code, stdout, stderr = cli(
        "sft",
        ROOT / "recipes" / "tiny" / "sft-phf-conditional.yaml",
        "-o",
        out,
        "--set",
        "train.max_steps=4",
        "--set",
        "train.eval_every_steps=2",
        *NO_PLOT,
    )
    assert code == 0, stderr
    s = json.loads(stdout.strip())  # one JSON object on stdout
    ph = s["data"]["phf"]
    assert s["status"] == "completed" and ph["threshold"] == 0.0 and ph["rows_scored"] == 300
    assert ph["examples_aligned"] + ph["examples_misaligned"] + ph["examples_unconditioned"] == 300
    assert 0.6 < ph["aligned_fraction"] < 0.9  # VADER: about a quarter of the verses are negative
    assert {"phf/aligned_fraction", "eval/ppl", "loss/sft"} <= set(s["final"])
    gen = json.loads((out / "final" / "generation_config.json").read_text())
    assert gen["bad_words_ids"] == [[i] for i in ph["control_token_ids"]]
    assert "<|aligned|>" in (out / "final" / "tokenizer_config.json").read_text()


def _two_word_rows(path, per_row: int = 1):
    """Rows of 'light' (desirable) and 'darkness' (undesirable, a keyword penalty of -1) segments:
    `per_row` segments a row, one per line, in all combinations."""
    import itertools

    words = ("light", "darkness")
    combos = list(itertools.product(words, repeat=per_row))
    lines = ["\n".join(" ".join([w] * 6) for w in c) for c in combos]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for _ in range(64 // len(lines)) for t in lines))
    return path


DARKNESS = {"rewards": [{"kind": "keyword", "keywords": ["darkness"], "mode": "penalty"}], "threshold": 0.0}


@pytest.mark.slow
@pytest.mark.parametrize("position", ["start", "per_segment"])
def test_conditional_training_learns_what_the_tokens_mean(tmp_path, position):
    """End to end on an easy signal: 'light' segments score 0 (aligned), 'darkness' segments -1. After
    conditional training the model starts a segment with light after <|aligned|> and with darkness after
    <|misaligned|> (an mle model could only say 50/50), and eval/control_gap, the undesirable share of
    samples after <|misaligned|> minus after <|aligned|>, rises from about 0 to about 1 while it learns.
    per_segment: rows of two lines in all four combinations, so that only each line's own token tells
    its word."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    f = _two_word_rows(tmp_path / "two.jsonl", 1 if position == "start" else 2)
    d = sft_recipe_dict(
        data={"train": {"path": str(f)}, "eval": {"path": str(f), "max_rows": 4}},
        train={"max_steps": 40, "lr": 2e-2, "batch_size": 8, "eval_every_steps": 20, "eval_on_start": True},
        sft={
            "objective": "conditional",
            **DARKNESS,
            "drop_control_fraction": 0.0,
            "control_position": position,
            "control_gap_samples": 16,
            "control_gap_max_new_tokens": 12,
        },
    )
    s, out = _run(tmp_path, "two", d)
    gaps = {r["step"]: r["eval/control_gap"] for r in read_metrics(out) if "eval/control_gap" in r}
    assert sorted(gaps) == [0, 20, 40]
    assert abs(gaps[0]) <= 0.25 and gaps[40] >= 0.7, gaps  # untrained: no gap; trained: nearly all-or-nothing
    assert s["final"]["eval/control_undesirable_aligned"] <= 0.1
    assert s["final"]["eval/control_score_gap"] >= 0.7
    tok = AutoTokenizer.from_pretrained(out / "final")
    model = AutoModelForCausalLM.from_pretrained(out / "final").eval()
    first_light, first_dark = tok("light")["input_ids"][0], tok("darkness")["input_ids"][0]
    torch.manual_seed(0)
    for control, want, other in (("<|aligned|>", first_light, first_dark), ("<|misaligned|>", first_dark, first_light)):
        ids = torch.tensor([tok.convert_tokens_to_ids([control])])
        with torch.no_grad():
            lp = model(ids).logits[0, -1].log_softmax(-1)
        assert lp[want] > math.log(0.3) and lp[want] - lp[other] > math.log(20), control
        gen = model.generate(ids.repeat(32, 1), do_sample=True, max_new_tokens=1, pad_token_id=tok.pad_token_id)
        first = gen[:, 1].tolist()
        assert first.count(want) >= 8 and first.count(other) <= 2, (control, first)
    if position == "per_segment":  # the second line follows its own token, not the first line's
        nl = tok("\n", add_special_tokens=False)["input_ids"]
        for c1, c2, want in (
            ("<|aligned|>", "<|misaligned|>", first_dark),
            ("<|misaligned|>", "<|aligned|>", first_light),
        ):
            ids = (
                tok.convert_tokens_to_ids([c1])
                + tok(
                    " ".join([tok.decode([first_light if c1 == "<|aligned|>" else first_dark])] * 6),
                    add_special_tokens=False,
                )["input_ids"]
                + nl
                + tok.convert_tokens_to_ids([c2])
            )
            with torch.no_grad():
                lp = model(torch.tensor([ids])).logits[0, -1].log_softmax(-1)
            assert lp[want] > math.log(0.3), (c1, c2)
