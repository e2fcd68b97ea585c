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
