"""Reward sources: rules by hand, VADER, human-score lookup, user functions and their failures."""

import json

import pytest
from pydantic import TypeAdapter

from prefcli.errors import TrainingError, UsageError
from prefcli.recipe.reward_specs import RewardSpec
from prefcli.reward_sources import build_rewards


def specs(*items, base_dir=None):
    ta = TypeAdapter(RewardSpec)
    return [ta.validate_python(i, context={"base_dir": str(base_dir)} if base_dir else None) for i in items]


def test_rules_by_hand():
    rs = build_rewards(
        specs(
            {"kind": "length", "target": 4},
            {"kind": "keyword", "keywords": ["light", "day"], "weight": 2.0},
            {"kind": "keyword", "regex": r"\bdark", "mode": "penalty", "name": "dark"},
        )
    )
    total, parts = rs.score(["p", "p"], ["let there be light", "darkness was upon the deep"])
    assert parts["length"] == [0.0, -0.25]
    assert parts["keyword"] == [0.5, 0.0]
    assert parts["dark"] == [0.0, -1.0]
    assert total == [0.0 + 2 * 0.5 + 0.0, -0.25 + 0.0 - 1.0]


def test_keyword_matches_whole_words_case_insensitively():
    rs = build_rewards(specs({"kind": "keyword", "keywords": ["Light"]}))
    assert rs.score(["", ""], ["the LIGHT shone", "lightning"])[0] == [1.0, 0.0]


def test_sentiment_matches_vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    texts = ["I love this wonderful day", "This is terrible and sad"]
    want = [SentimentIntensityAnalyzer().polarity_scores(t)["compound"] for t in texts]
    pos = build_rewards(specs({"kind": "sentiment"})).score(["", ""], texts)[0]
    neg = build_rewards(specs({"kind": "sentiment", "target": "negative"})).score(["", ""], texts)[0]
    assert pos == want and neg == [-w for w in want]
    assert want[0] > 0.5 and want[1] < -0.5


def test_human_scores_lookup(tmp_path):
    f = tmp_path / "scores.jsonl"
    f.write_text(json.dumps({"q": "hi", "a": "hello", "rating": 4}) + "\n")
    rs = build_rewards(
        specs(
            {"kind": "human_scores", "path": str(f), "columns": {"prompt": "q", "completion": "a", "score": "rating"}}
        )
    )
    assert rs.score(["hi"], ["hello"])[0] == [4.0]
    with pytest.raises(TrainingError, match="no score in"):
        rs.score(["hi"], ["bye"])
    rs2 = build_rewards(
        specs(
            {
                "kind": "human_scores",
                "path": str(f),
                "missing": "default",
                "default": -1,
                "columns": {"prompt": "q", "completion": "a", "score": "rating"},
            }
        )
    )
    assert rs2.score(["hi"], ["bye"])[0] == [-1.0]


def test_user_function_from_a_file_and_its_failures(tmp_path):
    (tmp_path / "myreward.py").write_text(
        "def good(prompts, completions, bonus=0.0):\n    return [len(c) + bonus for c in completions]\n"
        "def boom(prompts, completions):\n    raise ValueError('no scores today')\n"
        "def nan(prompts, completions):\n    return [float('nan')] * len(completions)\n"
        "def short(prompts, completions):\n    return [1.0]\n"
    )
    ok = build_rewards(
        specs({"kind": "function", "function": "myreward.py:good", "kwargs": {"bonus": 1}}, base_dir=tmp_path)
    )
    assert ok.score(["a", "b"], ["xy", "xyz"])[0] == [3.0, 4.0]
    for fn, msg in (
        ("boom", "raised ValueError: no scores today"),
        ("nan", "returned nan for completion #0"),
        ("short", "returned 1 values for 2 completions"),
    ):
        rs = build_rewards(specs({"kind": "function", "function": f"myreward.py:{fn}"}, base_dir=tmp_path))
        with pytest.raises(TrainingError, match=f"reward '.*myreward.py:{fn}' {msg}"):
            rs.score(["a", "b"], ["x", "y"])
    with pytest.raises(UsageError, match="has no callable 'missing'"):
        build_rewards(specs({"kind": "function", "function": "myreward.py:missing"}, base_dir=tmp_path))
    with pytest.raises(Exception, match="no such file"):
        specs({"kind": "function", "function": "nope.py:f"}, base_dir=tmp_path)
    builtin = build_rewards(specs({"kind": "function", "function": "math:fsum"}))  # wrong signature: clear error
    with pytest.raises(TrainingError, match="reward 'math:fsum' raised TypeError"):
        builtin.score(["a"], ["b"])


# ------------------------------------------------------------------------------------------ judge


def _judge(tiny_model_dir, **kw):
    spec = {
        "kind": "judge",
        "path": str(tiny_model_dir),
        "template": "{prompt}{completion}\nIs this good or evil? It is",
        "answers": {" good": 1.0, " evil": 0.0},
        "batch_size": 2,
        **kw,
    }
    return build_rewards(specs(spec)).sources[0]


def test_judge_reads_the_answer_probabilities(tiny_model_dir):
    """The score is P(' good') / (P(' good') + P(' evil')) after the rendered template, read from the judge's
    logits at the last token: the same number as one unpadded forward by hand, whatever the batch and its
    left padding; verdicts are cached per (prompt, completion)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    judge = _judge(tiny_model_dir)
    prompts = ["And God said,", "And God said,", "Jesus wept; and the"]
    comps = [" Let there be light.", " the darkness was upon the face of the deep and void", " people"]
    got = judge(prompts, comps)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    good, evil = (tok(w, add_special_tokens=False)["input_ids"][0] for w in (" good", " evil"))
    for p, c, g in zip(prompts, comps, got):
        ids = tok(f"{p}{c}\nIs this good or evil? It is", return_tensors="pt")["input_ids"]
        with torch.no_grad():
            z = lm(input_ids=ids).logits[0, -1]
        want = torch.softmax(z[[good, evil]], -1)[0].item()
        assert g == pytest.approx(want, abs=1e-5)
    assert judge.forwards == 3 and 0 < min(got) and max(got) < 1
    assert judge(prompts[:1], comps[:1]) == got[:1] and judge.forwards == 3  # cached: no forward


def test_pairwise_judge_scores_mean_win_rates(tiny_model_dir):
    """Pairwise: win(i, j) = (P(i first better) + 1 - P(j first better)) / 2, both orders asked, so the wins
    of a pair add up to 1 and a group's scores average 1/2; a lone completion scores 1/2."""
    judge = _judge(
        tiny_model_dir, mode="pairwise", template="{prompt}\nA:{completion_a}\nB:{completion_b}\nBetter:",
        answers={" A": 1.0, " B": 0.0},
    )  # fmt: skip
    prompts = ["And God said,"] * 3 + ["Jesus"]
    comps = [" Let there be light.", " darkness", " and it was so", " wept"]
    got = judge(prompts, comps)
    assert judge.forwards == 6  # the ordered pairs of the first group
    assert sum(got[:3]) / 3 == pytest.approx(0.5) and got[3] == 0.5
    fb = {(a, b): v for (p, a, b), v in judge.cache.items()}
    win01 = (fb[(comps[0], comps[1])] + 1 - fb[(comps[1], comps[0])]) / 2
    win02 = (fb[(comps[0], comps[2])] + 1 - fb[(comps[2], comps[0])]) / 2
    assert got[0] == pytest.approx((win01 + win02) / 2)


def test_judge_bad_input_names_the_field(tiny_model_dir, tmp_path):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=r"template has no \{completion\} placeholder"):
        specs({"kind": "judge", "path": str(tiny_model_dir), "template": "{prompt} good?"})
    with pytest.raises(ValidationError, match=r"no \{completion_a\}, \{completion_b\}"):
        specs({"kind": "judge", "path": str(tiny_model_dir), "mode": "pairwise", "template": "{completion}"})
    with pytest.raises(ValidationError, match="no such file or folder"):
        specs({"kind": "judge", "path": "./no-judge-here", "template": "{completion}"}, base_dir=tmp_path)
    with pytest.raises(UsageError, match=r"rewards\[0\].answers: ' yes' is 2 tokens"):
        _judge(tiny_model_dir, answers={" yes": 1.0, " no": 0.0})
    with pytest.raises(UsageError, match=r"rewards\[0\].path: could not load the judge model"):
        _judge(tmp_path)  # a folder without a model


# --------------------------------------------------------------------------------------- ensemble


def _ensemble(combine, normalize=False, **kw):
    members = [{"kind": "length", "target": 4}, {"kind": "keyword", "keywords": ["light"]}]
    spec = {"kind": "ensemble", "members": members, "combine": combine, "normalize": normalize, **kw}
    return build_rewards(specs(spec))


@pytest.mark.parametrize(
    "combine,want",
    [
        ("mean", [0.5, -0.125]),
        ("min", [0.0, -0.25]),
        ("mean_minus_std", [0.5 - 2 * 0.5**0.5, -0.125 - 2 * 0.25 * 0.5**0.5]),
    ],
)
def test_ensemble_combines_its_members(combine, want):
    """Members on ['let there be light', 'and the earth was void']: length (target 4 words) [0, -0.25], keyword
    [1, 0]. mean, min, mean - 2 std (sample std over the 2 members: |a - b| / sqrt 2)."""
    rs = _ensemble(combine, std_coef=2.0)
    total, parts = rs.score(["p", "p"], ["let there be light", "and the earth was void"])
    assert total == pytest.approx(want)
    assert parts["ensemble_spread"] == pytest.approx([1 / 2**0.5, 0.25 / 2**0.5])


def test_ensemble_normalises_members_on_their_first_batch_and_checkpoints_it():
    rs = _ensemble("mean", normalize=True)
    first = ["let there be light", "and the earth was", "light light", "void"]
    total, _ = rs.score(["p"] * 4, first)
    assert sum(total) == pytest.approx(0.0, abs=1e-9)  # each member standardised on this very batch
    later, _ = rs.score(["p"], ["void and light"])
    state = rs.state_dict()
    fresh = _ensemble("mean", normalize=True)
    fresh.load_state_dict(state)
    assert fresh.score(["p"], ["void and light"])[0] == later  # the statistics came back, not re-fitted


def test_an_ensemble_of_one_is_refused():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="an ensemble needs at least two members, got 1"):
        specs({"kind": "ensemble", "members": [{"kind": "sentiment"}]})
