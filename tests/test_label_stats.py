"""The labelling task's figures (prefcli/label/stats.py) against outside references: Krippendorff's alpha from
the `krippendorff` package and an independent hand-written implementation, Cohen's kappa from scikit-learn,
Fleiss' kappa from a worked example, gold accuracy and position bias from hand counts."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

krippendorff = pytest.importorskip("krippendorff", reason="pip install 'prefcli[label]'")
sklearn_metrics = pytest.importorskip("sklearn.metrics", reason="scikit-learn (the dev extra) is the reference")

from prefcli.analysis.agreement import krippendorff_alpha as hand_alpha  # noqa: E402
from prefcli.label import stats  # noqa: E402
from prefcli.label.stats import Record  # noqa: E402


def rec(rater, item, choice, answer=None, cands=("x", "y"), gold=None, shown_at=0.0, t=1.0, prompt="p"):
    return Record(
        rater, item, prompt, list(cands), gold, answer if answer is not None else choice, choice, None, shown_at, t
    )


def constructed(seed=0, raters=5, items=30, k=3, labels=(0, 1, "tie", "skip")):
    """Each item answered by k of the raters (random), pair answers with ties and skips; candidates named so that
    candidate 0 sorts first (the pair label is then the chosen index)."""
    rng = random.Random(seed)
    out = []
    for i in range(items):
        truth = rng.choice((0, 1))
        for r in rng.sample(range(raters), k):
            c = truth if rng.random() < 0.7 else rng.choice(labels)
            out.append(rec(f"r{r}", f"item{i}", c, cands=(f"a{i}", f"b{i}")))
    return out


def matrix(records, key):
    raters = sorted({r.rater for r in records})
    items = sorted({r.item for r in records})
    data = np.full((len(raters), len(items)), np.nan)
    for r in records:
        v = key(r)
        if v is not None:
            data[raters.index(r.rater), items.index(r.item)] = v
    return data


def test_krippendorff_alpha_equals_the_package_and_a_hand_written_implementation():
    recs = constructed()
    got = stats.agreement(recs, "pair")
    decisive = lambda r: float(r.choice) if r.choice in (0, 1) else None  # noqa: E731
    want = krippendorff.alpha(reliability_data=matrix(recs, decisive), level_of_measurement="nominal")
    assert got["krippendorff_alpha"] == pytest.approx(want, abs=1e-12)
    units = {}
    for r in recs:
        if r.choice in (0, 1):
            units.setdefault(r.item, []).append(r.choice)
    assert got["krippendorff_alpha"] == pytest.approx(hand_alpha(list(units.values())), abs=1e-12)
    # ties as a third category
    code = {0: 0.0, 1: 1.0, "tie": 2.0}
    with_ties = stats.agreement(recs, "pair", ties=True)
    want = krippendorff.alpha(
        reliability_data=matrix(recs, lambda r: code.get(r.choice)), level_of_measurement="nominal"
    )
    assert with_ties["krippendorff_alpha"] == pytest.approx(want, abs=1e-12)
    assert with_ties["answers"] > got["answers"]


def test_rating_alpha_interval_and_nominal():
    rng = random.Random(3)
    recs = [
        rec(f"r{r}", f"i{i}", min(5, max(1, t + rng.choice((-1, 0, 0, 1)))), cands=(f"c{i}",))
        for i, t in enumerate(rng.choice((1, 2, 3, 4, 5)) for _ in range(25))
        for r in rng.sample(range(4), 3)
    ]
    got = stats.agreement(recs, "rate")
    for level, key in (("nominal", "krippendorff_alpha"), ("interval", "krippendorff_alpha_interval")):
        want = krippendorff.alpha(reliability_data=matrix(recs, lambda r: float(r.choice)), level_of_measurement=level)
        assert got[key] == pytest.approx(want, abs=1e-12)
    assert got["krippendorff_alpha_interval"] > got["krippendorff_alpha"]  # near misses count as near agreement


def test_cohen_kappa_per_pair_equals_scikit_learn():
    recs = constructed(seed=1, raters=4, items=40)
    got = {tuple(p["raters"]): p for p in stats.agreement(recs, "pair")["cohen_kappa"]}
    assert len(got) == 6
    by = {}
    for r in recs:
        if r.choice in (0, 1):
            by.setdefault(r.rater, {})[r.item] = r.choice
    for (a, b), p in got.items():
        shared = sorted(set(by[a]) & set(by[b]))
        assert p["shared_items"] == len(shared)
        want = sklearn_metrics.cohen_kappa_score([by[a][u] for u in shared], [by[b][u] for u in shared])
        assert p["kappa"] == pytest.approx(want, abs=1e-12)


def test_fleiss_kappa_worked_example():
    """The worked example of Wikipedia's "Fleiss' kappa" article (10 subjects, 14 raters, 5 categories; kappa
    0.210 there). By hand: the sum over items of sum_j n_ij (n_ij - 1) is 688, so P-bar = 688 / (10 * 14 * 13);
    the category totals are 20, 28, 39, 21, 32 of 140, so P_e = 4170 / 140^2."""
    table = [
        [0, 0, 0, 0, 14],
        [0, 2, 6, 4, 2],
        [0, 0, 3, 5, 6],
        [0, 3, 9, 2, 0],
        [2, 2, 8, 1, 1],
        [7, 7, 0, 0, 0],
        [3, 2, 6, 3, 0],
        [2, 5, 3, 2, 2],
        [6, 5, 2, 1, 0],
        [0, 2, 2, 3, 7],
    ]
    units = [[c for c, n in enumerate(row) for _ in range(n)] for row in table]
    p_bar, p_e = 688 / 1820, 4170 / 19600
    assert stats.fleiss_kappa(units) == pytest.approx((p_bar - p_e) / (1 - p_e), abs=1e-12)
    assert round(stats.fleiss_kappa(units), 3) == 0.210
    assert stats.fleiss_kappa([[1, 1], [1, 1]]) is None  # one label everywhere: chance agreement is 1
    # two raters on every item: Fleiss' kappa is Scott's pi, (p_o - p_e) / (1 - p_e) with pooled marginals
    two = [[0, 0], [0, 1], [1, 1], [1, 1], [0, 1]]
    p_o, p1 = 3 / 5, 6 / 10
    p_e = p1**2 + (1 - p1) ** 2
    assert stats.fleiss_kappa(two) == pytest.approx((p_o - p_e) / (1 - p_e), abs=1e-12)


def test_gold_accuracy_position_bias_and_flags_by_hand():
    recs = [
        # ann: 4 gold answers, 3 right; picks A in 4 of her 5 decisive (A or B) answers
        rec("ann", "g1", 0, "A", gold=0),
        rec("ann", "g2", 1, "A", gold=1),
        rec("ann", "g3", "tie", "tie", gold="tie"),
        rec("ann", "g4", 0, "B", gold=1),
        rec("ann", "i1", 0, "A"),
        rec("ann", "i2", 1, "A"),
        rec("ann", "i3", "skip", "skip"),
        # bob: one gold answer, wrong; a skip on gold is not counted
        rec("bob", "g1", 1, "B", gold=0),
        rec("bob", "g2", "skip", "skip", gold=1),
        rec("bob", "i1", 0, "B"),
    ]
    assert stats.gold_accuracy([r for r in recs if r.rater == "ann"]) == {"answers": 4, "accuracy": 0.75}
    assert stats.gold_accuracy([r for r in recs if r.rater == "bob"]) == {"answers": 1, "accuracy": 0.0}
    pb = stats.position_bias([r.answer for r in recs if r.rater == "ann"])
    assert pb["pairs"] == 5 and pb["chosen_shown_first"] == pytest.approx(4 / 5)
    z = (4 / 5 - 0.5) / math.sqrt(0.25 / 5)
    assert pb["z"] == pytest.approx(z) and pb["p_value"] == pytest.approx(math.erfc(z / math.sqrt(2)))

    class Flags:
        min_gold_accuracy, min_kappa, min_evidence = 0.8, 0.2, 4

    rows = {r["rater"]: r for r in stats.rater_table(recs, "pair", [], Flags)}
    assert rows["ann"]["gold_accuracy"] == 0.75 and rows["ann"]["flags"] == ["gold accuracy 75% < 80%"]
    assert rows["bob"]["flags"] == []  # one gold answer is not evidence enough
    assert (rows["ann"]["answers"], rows["ann"]["skips"], rows["ann"]["ties"]) == (3, 1, 0)
    assert stats.distribution(recs, "pair", 5, 2) == {"A": 4, "B": 3, "tie": 1, "skip": 2}


def test_time_per_item_and_labels_of_rankings():
    recs = [rec("a", f"i{i}", 0, shown_at=10.0, t=10.0 + s) for i, s in enumerate([1, 2, 3, 4, 100])]
    t = stats._time_summary(stats.seconds(recs))
    assert t["median_s"] == 3 and t["p90_s"] == 100 and t["mean_s"] == pytest.approx(22)
    # a ranking's label: the candidates' positions in text order, in ranked order (as data inspect labels rows)
    r = rec("a", "i", [2, 0, 1], cands=("beta", "alpha", "gamma"))
    assert stats.label_of(r, "rank") == (2, 1, 0)
