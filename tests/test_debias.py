"""`data.debias` (dedup, held-out prompts, length balance) and R-DPO's length term: the transforms on
known data, their reports in the run summary, the loss arithmetic, and the recipe checks."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F

from prefcli.algos.contrastive import Hyper, PairLogps, dpo_loss
from prefcli.analysis.inspect import pair_baselines
from prefcli.engine.debias import (
    balance_subsample,
    duplicate_rows,
    leaked_rows,
    length_bins,
    length_weights,
    normalize_text,
)
from prefcli.engine.dist import setup_runtime
from prefcli.recipe import load_recipe
from prefcli.runner import RunContext, RunOptions, run_training

from .conftest import NO_PLOT, TINY_INIT, TOKENIZER, last_json, sft_recipe_dict


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def biased_lengths(n: int, share_longer: float, seed: int = 0) -> tuple[list[int], list[int]]:
    rng = random.Random(seed)
    lc, lr = [], []
    for i in range(n):
        a, d = rng.randint(5, 40), rng.randint(1, 20)
        if i < share_longer * n:
            lc.append(a + d), lr.append(a)
        else:
            lc.append(a), lr.append(a + d)
    return lc, lr


# ------------------------------------------------------------------------------- transforms


def test_normalize_dedup_and_leak():
    assert normalize_text("  Hello,\tWORLD!! ") == normalize_text("hello world") == "hello world"
    rows = [
        {"prompt": "P1", "chosen": "a", "rejected": "b", "rater": "x"},
        {"prompt": "P1", "chosen": "a", "rejected": "b", "rater": "y"},  # same content, other rater
        {"prompt": "p1!", "chosen": "A", "rejected": "b"},  # near duplicate
        {"prompt": "P1", "chosen": "b", "rejected": "a"},  # reversed label: not a duplicate
    ]
    cols = ["prompt", "chosen", "rejected"]
    assert duplicate_rows(rows, cols, normalized=False) == [1]
    assert duplicate_rows(rows, cols, normalized=True) == [1, 2]
    held = [{"prompt": "p1", "chosen": "z", "rejected": "w"}]
    assert leaked_rows(rows, held, cols) == [0, 1, 2, 3]
    from prefcli.engine.debias import prompt_of

    user = {"role": "user", "content": "hi"}
    assert prompt_of({"messages": [user]}) == [user]  # a prompt-only chat (rlhf) is all prompt
    assert prompt_of({"messages": [user, {"role": "assistant", "content": "yo"}]}) == [user]
    no_prompt = [{"chosen": "a", "rejected": "b"}, {"chosen": "c", "rejected": "d"}]
    assert leaked_rows(no_prompt, [{"chosen": "A!", "rejected": "b"}], ["chosen", "rejected"]) == [0]


def test_length_bins_are_equal_count_over_nonzero_differences():
    diffs = [0, 1, -2, 3, -4, 5, -6, 7, -8, 0]
    assert length_bins(diffs, 2) == [-1, 0, 0, 0, 0, 1, 1, 1, 1, -1]
    assert length_bins(diffs, 1) == [-1] + [0] * 8 + [-1]
    assert length_bins([0, 0], 3) == [-1, -1]


def test_subsample_balances_every_bin_and_the_length_baseline_falls_to_one_half():
    lc, lr = biased_lengths(600, 0.8)
    before = pair_baselines([(set(), set(), c - r) for c, r in zip(lc, lr)], None, 5, 0)
    assert before["length_only"] == pytest.approx(0.8, abs=0.03)
    keep, table = balance_subsample(lc, lr, 4, seed=0)
    assert keep == balance_subsample(lc, lr, 4, seed=0)[0]  # seeded
    for b in table["bins"]:
        assert b["kept"] == 2 * min(b["chosen_longer"], b["chosen_shorter"])
    kl, kr = [lc[i] for i in keep], [lr[i] for i in keep]
    longer = sum(1 for c, r in zip(kl, kr) if c > r)
    assert longer == sum(1 for c, r in zip(kl, kr) if c < r) == len(keep) // 2  # 120 per side
    after = pair_baselines([(set(), set(), c - r) for c, r in zip(kl, kr)], None, 5, 0)
    assert after["length_only"] == pytest.approx(0.5, abs=0.07)


def test_reweighting_gives_both_sides_of_every_bin_equal_weight():
    lc, lr = biased_lengths(300, 0.7)
    lc += [10, 10]  # two equal-length pairs: weight 1 before scaling
    lr += [10, 10]
    w, table = length_weights(lc, lr, 3)
    assert sum(w) / len(w) == pytest.approx(1.0)
    bins = length_bins([c - r for c, r in zip(lc, lr)], 3)
    for b in range(3):
        pos = sum(x for x, bb, c, r in zip(w, bins, lc, lr) if bb == b and c > r)
        neg = sum(x for x, bb, c, r in zip(w, bins, lc, lr) if bb == b and c < r)
        assert pos == pytest.approx(neg) and pos > 0
    weighted_longer = sum(x for x, c, r in zip(w, lc, lr) if c > r) / sum(x for x, c, r in zip(w, lc, lr) if c != r)
    assert weighted_longer == pytest.approx(0.5)
    assert w[-1] == w[-2] == pytest.approx(len(w) / (sum(w) / w[-1]))  # the equal pairs: the common scale
    assert 0 < table["effective_pairs"] <= len(w)
    # one-sided everywhere: nothing can be balanced
    with pytest.raises(Exception, match="one side only"):
        length_weights([5, 6, 7], [1, 2, 3], 2)


# ------------------------------------------------------------------------------------ R-DPO


def test_rdpo_adds_the_length_margin_inside_the_sigmoid():
    lp = PairLogps(
        chosen=torch.tensor([-10.0, -4.0]),
        rejected=torch.tensor([-12.0, -3.0]),
        ref_chosen=torch.tensor([-11.0, -4.5]),
        ref_rejected=torch.tensor([-11.5, -3.5]),
        chosen_len=torch.tensor([12.0, 3.0]),
        rejected_len=torch.tensor([4.0, 9.0]),
    )
    h = torch.tensor([(-10 + 11) - (-12 + 11.5), (-4 + 4.5) - (-3 + 3.5)])
    plain, m = dpo_loss(lp, Hyper(beta=0.1))
    assert torch.allclose(plain, -F.logsigmoid(0.1 * h))
    loss, m2 = dpo_loss(lp, Hyper(beta=0.1, length_alpha=0.05))
    # Park et al. 2024: -log sigma(beta h + alpha (|y_w| - |y_l|)); |y_w| - |y_l| = 8 and -6
    hand = [-math.log(1 / (1 + math.exp(-(0.1 * 1.5 + 0.05 * 8)))), -math.log(1 / (1 + math.exp(-(0.1 * 0.0 - 0.3))))]
    assert loss.tolist() == pytest.approx(hand, rel=1e-6)
    assert torch.equal(m["reward/chosen"], m2["reward/chosen"])  # the implicit rewards are unchanged
    # a longer chosen answer earns part of the margin from its length: less pull on the policy
    assert loss[0] < plain[0] and loss[1] > plain[1]


# --------------------------------------------------------------------------- in the commands


def pairs_with_problems(tmp_path):
    """30 training pairs (chosen longer in 24), 2 exact copies, 3 of whose prompts are held-out prompts."""
    train = []
    for i in range(30):
        long, short = f" and the king went up to the city number {i} with all his people", f" no {i}"
        c, r = (long, short) if i < 24 else (short, long)
        train.append({"prompt": f"Question {i}:", "chosen": c, "rejected": r})
    train += [dict(train[5]), dict(train[6])]
    held = [{"prompt": f"Question {i}:", "chosen": " yes", "rejected": " no no no"} for i in (0, 1, 2)]
    held += [{"prompt": f"Other {i}:", "chosen": " yes", "rejected": " no no no"} for i in range(5)]
    return write_jsonl(tmp_path / "train.jsonl", train), write_jsonl(tmp_path / "eval.jsonl", held)


def pref_recipe(command, train, held, **debias):
    r = {
        "command": command,
        "model": {"init": TINY_INIT, "tokenizer": str(TOKENIZER)},
        "data": {"train": {"path": str(train)}, "eval": {"path": str(held)}, "max_length": 40, "debias": debias},
        "train": {"max_steps": 1, "batch_size": 4, "lr": 1e-3, "seed": 0},
        "output": {"plot": False, "save_final": False},
    }
    if command == "contrastive":
        r["contrastive"] = {"objective": "dpo", "length_alpha": 0.01}
    return r


def test_reward_run_reports_what_debias_removed(tmp_path, write_recipe):
    train, held = pairs_with_problems(tmp_path)
    p = write_recipe(
        pref_recipe(
            "reward", train, held, dedup="exact", drop_eval_prompts=True, length_balance="subsample", length_bins=1
        )
    )
    s = run_training("reward", p, RunOptions(output_dir=str(tmp_path / "rm"), quiet=True))
    db = s["data"]["debias"]
    assert db["dedup"] == {"mode": "exact", "train_removed": 2, "eval_removed": 0}
    assert db["drop_eval_prompts"] == {"train_removed": 3}
    # 27 pairs left, chosen longer in 21 and shorter in 6: 6 + 6 kept
    lb = db["length_balance"]
    assert (lb["bins"][0]["chosen_longer"], lb["bins"][0]["chosen_shorter"], lb["train_removed"]) == (21, 6, 15)
    assert db["train_rows_after"] == 12 and s["data"]["train_examples"] == 12


def test_contrastive_reweight_weights_the_pair_loss(tmp_path, write_recipe):
    from prefcli.algos.contrastive import build

    train, held = pairs_with_problems(tmp_path)
    recipe = load_recipe(write_recipe(pref_recipe("contrastive", train, held, length_balance="reweight"))).recipe
    rt = setup_runtime("cpu", "fp32")
    task = build(RunContext(recipe=recipe, rt=rt, run_dir=tmp_path / "task"))
    assert task.hp.length_alpha == 0.01 and task.describe()["objective"]["length_alpha"] == 0.01
    w = task.weights
    assert len(w) == 32 and sum(w) / 32 == pytest.approx(1.0)
    longer = [i for i in range(32) if len(task.train_set.chosen[i]) > len(task.train_set.rejected[i])]
    assert len(longer) == 26 and w[longer[0]] == pytest.approx(32 / 2 / 26)  # one bin: each side weighs 16
    task._ensure_ref()
    items = list(range(8))
    b = task._batch(task.train_set, items)
    loss_w, _ = task._pair_loss(task.policy, b)
    del b["weight"]
    lp, _, _ = task._pair_inputs(task.policy, b, "train")
    per_pair, _ = task.obj.loss_fn(lp, task.hp)
    want = (per_pair.detach() * torch.tensor([w[i] for i in items])).sum()
    assert loss_w.item() == pytest.approx(want.item(), rel=1e-5)
    assert "weight" not in task._batch(task.eval_set, [0, 1])  # held-out metrics stay unweighted
    assert task.debias["length_balance"]["mode"] == "reweight"


def test_sft_dedup_and_held_out_prompts(tmp_path, write_recipe):
    rows = [{"prompt": f"Q{i}", "completion": f" answer {i}"} for i in range(12)]
    rows += [dict(rows[0]), {"prompt": "q1", "completion": " ANSWER 1."}]
    train = write_jsonl(tmp_path / "sft.jsonl", rows)
    held = write_jsonl(tmp_path / "sft_eval.jsonl", [{"prompt": "Q2", "completion": " x"}])
    d = sft_recipe_dict(
        data={"train": {"path": str(train)}, "eval": {"path": str(held)}, "debias": {"dedup": "normalized", "drop_eval_prompts": True}},
        train={"max_steps": 1},
    )  # fmt: skip
    s = run_training("sft", write_recipe(d), RunOptions(output_dir=str(tmp_path / "sft"), quiet=True))
    db = s["data"]["debias"]
    assert db["dedup"]["train_removed"] == 2 and db["drop_eval_prompts"]["train_removed"] == 1
    assert s["data"]["train_examples"] == 11


def test_debias_recipe_errors(tmp_path, write_recipe, cli):
    train, held = pairs_with_problems(tmp_path)
    d = pref_recipe("reward", train, held, length_bins=3)
    code, out, err = cli("validate", write_recipe(d))
    assert code == 2 and "length_bins applies only with length_balance" in err
    d = pref_recipe("reward", train, held, drop_eval_prompts=True)
    d["data"]["eval"] = None
    code, out, err = cli("validate", write_recipe(d))
    assert code == 2 and "drop_eval_prompts needs a held-out set" in err
    d = pref_recipe("contrastive", train, held)
    d["contrastive"]["objective"] = "ipo"
    code, out, err = cli("validate", write_recipe(d))
    assert code == 2 and "length_alpha (R-DPO's length term) applies to objective dpo only" in err
    d = sft_recipe_dict(data={"debias": {"length_balance": "subsample"}})
    code, out, err = cli("validate", write_recipe(d))
    assert code == 2 and "length_balance" in err
    # KTO rows are not pairs: refused before anything is written
    kto = write_jsonl(
        tmp_path / "kto.jsonl", [{"prompt": "p", "completion": f" c{i}", "label": i % 2 == 0} for i in range(8)]
    )
    d = pref_recipe("contrastive", kto, kto, length_balance="subsample")
    d["contrastive"] = {"objective": "kto"}
    d["data"]["eval"] = None
    code, out, err = cli("contrastive", write_recipe(d), "-o", tmp_path / "kto-run")
    assert code == 2 and "length_balance needs chosen/rejected pair rows" in last_json(out)["error"]
    assert not (tmp_path / "kto-run").exists()


@pytest.mark.slow
def test_tiny_debias_recipes_run(tmp_path, cli):
    from .conftest import ROOT

    code, out, err = cli(
        "reward", ROOT / "recipes/tiny/reward-debias.yaml", "--smoke", "-o", tmp_path / "rm", "-q", *NO_PLOT
    )
    assert code == 0, err
    db = last_json(out)["data"]["debias"]
    assert db["length_balance"]["mode"] == "subsample" and db["train_rows_after"] <= 16
    code, out, err = cli(
        "contrastive",
        ROOT / "recipes/tiny/contrastive-dpo-length.yaml",
        "--smoke",
        "-o",
        tmp_path / "dpo",
        "-q",
        *NO_PLOT,
    )
    assert code == 0, err
    s = last_json(out)
    assert s["objective"]["length_alpha"] == 0.02 and s["data"]["debias"]["length_balance"]["mode"] == "reweight"
