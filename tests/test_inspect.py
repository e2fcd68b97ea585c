"""`prefcli data inspect`: the figures it reports equal the ones planted in constructed data; rater
agreement against hand-worked numbers and the literature; the CLI contract and bad input."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from prefcli.analysis.agreement import cohen_kappa, krippendorff_alpha, pairwise_kappas
from prefcli.analysis.inspect import length_rule, nb_weights

from .conftest import DATA, TINY_INIT, TOKENIZER, last_json


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------ agreement maths


def test_cohen_kappa_hand_worked():
    # rater X picks answer a on items 0-5, Y on items 0-3 and 9: they agree on 0-3 and 6-8 (p_o = 7/10);
    # X says a 6 times in 10, Y 5 times in 10: chance agreement p_e = 0.6*0.5 + 0.4*0.5 = 0.5;
    # kappa = (0.7 - 0.5) / (1 - 0.5) = 0.4
    x = [1, 1, 1, 1, 1, 1, 0, 0, 0, 0]
    y = [1, 1, 1, 1, 0, 0, 0, 0, 0, 1]
    assert cohen_kappa(x, y) == pytest.approx(0.4)
    assert cohen_kappa(x, x) == pytest.approx(1.0)
    assert math.isnan(cohen_kappa([1, 1], [1, 1]))  # no variation: chance agreement is 1
    pk = pairwise_kappas({"X": dict(enumerate(x)), "Y": dict(enumerate(y)), "Z": {0: 1}}, min_shared=2)
    assert [(p["raters"], p["shared_items"], p["agreement"]) for p in pk] == [(["X", "Y"], 10, 0.7)]


def test_krippendorff_alpha_matches_krippendorff_2011():
    # "Computing Krippendorff's Alpha-Reliability" (Krippendorff 2011), the worked example: 4 observers,
    # 12 units, missing values; alpha = 0.743 (nominal), 0.849 (interval)
    N = None
    A = [1, 2, 3, 3, 2, 1, 4, 1, 2, N, N, N]
    B = [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, N, 3]
    C = [N, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, N]
    D = [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, N]
    units = [list(col) for col in zip(A, B, C, D)]
    assert krippendorff_alpha(units, "nominal") == pytest.approx(0.743, abs=5e-4)
    assert krippendorff_alpha(units, "interval") == pytest.approx(0.849, abs=5e-4)


def test_krippendorff_alpha_two_raters_hand_worked():
    # the kappa example above as units: coincidences o_aa = 2*4, o_bb = 2*3, o_ab = o_ba = 3;
    # n_a = 11, n_b = 9, n = 20; alpha = 1 - (n-1)(o_ab + o_ba) / (2 n_a n_b) = 1 - 19*6/198
    x = [1, 1, 1, 1, 1, 1, 0, 0, 0, 0]
    y = [1, 1, 1, 1, 0, 0, 0, 0, 0, 1]
    assert krippendorff_alpha([[a, b] for a, b in zip(x, y)]) == pytest.approx(1 - 19 * 6 / 198)
    assert math.isnan(krippendorff_alpha([[1], [2]]))  # no unit rated twice


def test_length_rule_and_naive_bayes_weights():
    assert length_rule([3, 5, -1], [2, -4, 0]) == pytest.approx((1 + 0 + 0.5) / 3)  # fitted direction: longer
    assert length_rule([-3, -5, 1], [2, -4]) == pytest.approx(0.5)  # fitted direction: shorter
    # binarized NB (Wang & Manning 2012), alpha 1, vocabulary {good, day}: p = 1 + [1, 1], |p| = 4;
    # q = 1 + [0, 1], |q| = 3; r_good = log(2/4) - log(1/3), r_day = log(2/4) - log(2/3)
    r = nb_weights([{"good", "day"}], [{"day"}])
    assert r["good"] == pytest.approx(math.log(2 / 4) - math.log(1 / 3))
    assert r["day"] == pytest.approx(math.log(2 / 4) - math.log(2 / 3))


# ------------------------------------------------------------------------------ planted figures


def planted(tmp_path):
    """40 training pairs whose chosen answer is always longer, 3 exact and 2 near duplicates
    appended; 10 held-out pairs, 4 of them with a training prompt; the chosen answer shown first
    in 30 of the 40 pairs."""
    train = []
    for i in range(40):
        train.append(
            {
                "prompt": f"Question {i}: what grows in field {i}?",
                "chosen": f"In field {i} there grows wheat and barley and good corn for {i} seasons",
                "rejected": f"Weeds {i}",
                "chosen_position": "A" if i < 30 else "B",
            }
        )
    dups = [dict(train[0]), dict(train[1]), dict(train[2])]
    near = []
    for k in (3, 4):
        r = dict(train[k])
        r["chosen"] = r["chosen"].upper() + "!"
        r["prompt"] = "  " + r["prompt"].replace("?", " ?")
        near.append(r)
    held = []
    for j in range(10):
        p = train[j]["prompt"] if j < 4 else f"Held-out question {j}?"
        held.append({"prompt": p, "chosen": f"Held-out answer {j} that is long and good indeed", "rejected": "No"})
    return (
        write_jsonl(tmp_path / "train.jsonl", train + dups + near),
        write_jsonl(tmp_path / "eval.jsonl", held),
    )


def test_inspect_reports_the_planted_biases(tmp_path, cli):
    train, held = planted(tmp_path)
    code, out, err = cli(
        "data", "inspect", train, "--eval", held, "--tokenizer", TOKENIZER, "--max-length", 16, "--plots",
        tmp_path / "plots",
    )  # fmt: skip
    assert code == 0, err
    s = last_json(out)
    assert out.strip().count("\n") == 0  # one JSON line on stdout
    assert s["command"] == "data inspect" and s["status"] == "completed" and s["kind"] == "pairs"
    tr = s["train"]
    assert (tr["rows"], tr["duplicates_exact"], tr["duplicates_near"]) == (45, 3, 2)
    assert tr["lengths"]["chosen_longer"] == 1.0 and tr["lengths"]["chosen_shorter"] == 0.0
    assert s["baselines"]["method"] == "held-out rows" and s["baselines"]["length_only"] == 1.0
    assert s["baselines"]["length_direction"] == "longer"
    lk = s["leakage"]
    assert (lk["eval_rows"], lk["eval_rows_with_train_prompt"], lk["shared_prompts"]) == (10, 4, 4)
    assert lk["train_rows_with_eval_prompt"] == 4 + 3 + 1  # rows 0-3, the copies of rows 0-2, the near copy of 3
    pos = s["position"]
    assert pos["pairs"] == 45 and pos["chosen_shown_first"] == pytest.approx((30 + 3 + 2) / 45)
    # chosen answers hold words the rejected never do: they top the chosen side's list
    assert {w["word"] for w in s["words"]["chosen"][:5]} <= {"in", "field", "there", "grows", "wheat", "and",
                                                           "barley", "good", "corn", "for", "seasons"}  # fmt: skip
    # truncation at 16 tokens, counted directly: prompt (special tokens) + completion + EOS, as DPO encodes
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    rows = [json.loads(x) for x in train.read_text().splitlines()]
    n = lambda t, special=False: len(tok(t, add_special_tokens=special)["input_ids"])  # noqa: E731
    fills = [r for r in rows if n(r["prompt"], True) >= 16]
    cut = [
        [max(0, n(r["prompt"], True) + n(r[k]) + 1 - 16) for k in ("chosen", "rejected")]
        for r in rows
        if r not in fills
    ]
    assert tr["truncated"]["rows"] == sum(1 for c in cut if any(c)) > 0
    assert tr["truncated"]["tokens_removed"] == sum(map(sum, cut))
    assert tr["truncated"]["prompt_fills_max_length"] == len(fills)
    loud = " ".join(s["warnings"])
    assert "length alone predicts the label" in loud and "100.0%" in loud and "leakage" in loud
    assert "length alone predicts the label" in err  # the report on stderr says it too
    assert sorted(p.split("/")[-1] for p in s["plots"]) == ["length_diff.png", "lengths.png"]
    assert all((tmp_path / "plots" / n).stat().st_size > 1000 for n in ("lengths.png", "length_diff.png"))


def test_inspect_raters_kappa_alpha_and_reward_agreement(tmp_path, cli):
    x = [1, 1, 1, 1, 1, 1, 0, 0, 0, 0]  # 1: the rater chose answer a (the kappa example above)
    y = [1, 1, 1, 1, 0, 0, 0, 0, 0, 1]
    rows = []
    for rater, labels in (("X", x), ("Y", y)):
        for i, lab in enumerate(labels):
            a, b = f"a good answer {i}", f"another answer {i}"
            chosen, rejected = (a, b) if lab else (b, a)
            rows.append({"prompt": f"p{i}", "chosen": chosen, "rejected": rejected, "rater": rater})
    data = write_jsonl(tmp_path / "raters.jsonl", rows)
    code, out, err = cli("data", "inspect", data, "--reward", "{kind: keyword, keywords: [good]}", "--folds", 2)
    assert code == 0, err
    ra = last_json(out)["raters"]
    assert ra["raters"] == 2 and ra["shared_items"] == 10
    assert ra["kappa"] == pytest.approx(0.4) and ra["krippendorff_alpha"] == pytest.approx(1 - 19 * 6 / 198)
    per = {r["rater"]: r for r in ra["per_rater"]}
    # the keyword reward prefers the answer with 'good' (answer a): it agrees with X on 6 of 10, Y on 5
    assert per["X"]["reward_agreement"] == pytest.approx(0.6) and per["Y"]["reward_agreement"] == pytest.approx(0.5)
    assert last_json(out)["reward_agreement"]["agreement"] == pytest.approx(0.55)
    assert "Cohen's kappa X vs Y: 0.400" in err


def test_inspect_reads_every_row_kind(cli):
    expect = {
        "pref_kto.jsonl": "unpaired",
        "pref_scores.jsonl": "scores",
        "pref_rankings.jsonl": "rankings",
        "text.jsonl": "sft",
        "prompts.jsonl": "prompts",
        "pref_chat.jsonl": "pairs",
    }
    for name, kind in expect.items():
        code, out, err = cli("data", "inspect", DATA / "tiny" / name, "--tokenizer", TOKENIZER, "-q", "--max-rows", 40)
        assert code == 0, (name, err)
        s = last_json(out)
        assert s["kind"] == kind and s["train"]["rows"] == min(40, s["train"]["rows"]), name
        if kind == "unpaired":
            assert {"majority", "length_only", "bag_of_words"} <= set(s["baselines"])
            assert 0 < s["train"]["lengths"]["desirable_share"] < 1
        if kind == "scores":
            assert -1 <= s["train"]["lengths"]["pearson_length_score"] <= 1
        if kind == "rankings":
            assert 0 <= s["baselines"]["length_only"] <= 1
        if name == "pref_chat.jsonl":
            assert s["format"] == "chat"


def test_inspect_a_recipe_as_training_reads_it(tmp_path, write_recipe, cli):
    # 24 pairs, chosen longer in 18: the recipe's length-balanced subsample keeps 6 + 6
    rows = []
    for i in range(24):
        long, short = f"a long answer number {i} with many words", f"short {i}"
        c, r = (long, short) if i < 18 else (short, long)
        rows.append({"question": f"q{i}", "chosen": c, "rejected": r})
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    rec = write_recipe(
        {
            "command": "reward",
            "model": {"init": TINY_INIT, "tokenizer": str(TOKENIZER)},
            "data": {
                "train": {"path": str(data), "columns": {"prompt": "question"}},
                "eval_fraction": 0.25,
                "max_length": 12,
                "debias": {"length_balance": "subsample", "length_bins": 1},
            },
        }
    )
    code, out, err = cli("data", "inspect", rec)
    assert code == 0, err
    s = last_json(out)
    assert s["recipe"] == str(rec) and s["kind"] == "pairs" and s["held_out"].startswith("data.eval_fraction")
    assert s["train"]["rows"] == 18 and s["eval"]["rows"] == 6  # the split training makes
    assert s["train"]["truncated"]["max_length"] == 12
    db = s["debias"]
    assert db["length_balance"]["mode"] == "subsample" and db["chosen_longer_after"] == pytest.approx(0.5)
    assert db["train_rows_after"] % 2 == 0 and 2 <= db["train_rows_after"] <= 12  # at most 6 shorter + 6 longer
    # length predicts the label: the advice names what this command has (a reward recipe has no length_alpha)
    (loud,) = [w for w in s["warnings"] if w.startswith("length alone predicts the label")]
    assert "Consider data.debias.length_balance (subsample or reweight) in this reward recipe" in loud
    assert "length_alpha" not in " ".join(s["warnings"]) + err
    code, out, err = cli("data", "inspect", rec, "--eval", data)
    assert code == 2 and "apply to a data file" in err and last_json(out)["status"] == "invalid"
    for objective, says in (
        ("dpo", "data.debias.length_balance (subsample or reweight) in this contrastive recipe, or "
                "contrastive.length_alpha (R-DPO)"),
        ("ipo", "data.debias.length_balance (subsample or reweight) in this contrastive recipe"),
    ):  # fmt: skip
        d = yaml.safe_load(rec.read_text())
        d.update(command="contrastive", contrastive={"objective": objective})
        code, out, err = cli("data", "inspect", write_recipe(d, f"{objective}.yaml"), "-q")
        loud = " ".join(last_json(out)["warnings"])
        assert code == 0 and f"Consider {says}" in loud and (objective == "dpo") == ("length_alpha" in loud), loud


def test_inspect_bad_input_exits_2(tmp_path, cli):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"foo": 1, "bar": "x"}])
    code, out, err = cli("data", "inspect", bad)
    s = last_json(out)
    assert code == 2 and s["status"] == "invalid" and s["command"] == "data inspect"
    assert "none of the expected columns" in s["error"] and "columns: foo, bar" in s["error"]
    assert "--columns" in s["error"]
    code, out, err = cli("data", "inspect", bad, "--columns", "chosen=foo", "--columns", "rejected=nope")
    assert code == 2 and "'rejected' to column 'nope'" in last_json(out)["error"]
    code, out, err = cli("data", "inspect", tmp_path / "missing.jsonl")
    assert code == 2 and "no such file" in last_json(out)["error"]
    code, out, err = cli("data", "inspect", bad, "--kind", "pairs")
    assert code == 2 and "--kind pairs needs column(s) chosen, rejected" in last_json(out)["error"]
    code, out, err = cli("data", "inspect", bad, "--columns", "oops")
    assert code == 2 and "NAME=COLUMN" in last_json(out)["error"]


def test_loud_findings_bar():
    from prefcli.analysis.inspect import loud_findings

    def summary(kind, **b):
        h = {"rows": 10, "duplicates_exact": 0, "duplicates_near": 0, "empty": 0, "lengths": {}}
        return {"kind": kind, "train": h, "baselines": {"method": "held-out rows", **b}}

    # unpaired rows, 70% desirable: a baseline must beat always answering "desirable" by 10 points
    assert loud_findings(summary("unpaired", majority=0.7, length_only=0.72, bag_of_words=0.75)) == []
    loud = loud_findings(summary("unpaired", majority=0.7, length_only=0.81, bag_of_words=0.9))
    assert len(loud) == 2 and "desirable vs undesirable on 81.0%" in loud[0] and "bag-of-words" in loud[1]
    loud = loud_findings(summary("pairs", length_only=0.6, length_direction="shorter", bag_of_words=0.55))
    assert len(loud) == 1 and "picking the shorter answer is right on 60.0%" in loud[0]
