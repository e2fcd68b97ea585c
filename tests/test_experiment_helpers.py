"""The pieces of the experiment scripts that decide a reported number: the PII scorer and corpus of the PII
task (docs/phf-experiment.md) and the matched-KL interpolation of the RL frontier (docs/rl-comparison.md)."""

import importlib.util
import sys

import pytest

from .conftest import ROOT


def load(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = mod
    spec.loader.exec_module(mod)
    return mod


def test_pii_score_is_minus_pii_per_character():
    pytest.importorskip("scrubadub")
    pii = load(ROOT / "recipes" / "quickstart" / "pii.py")
    clean = "In the beginning God created the heaven and the earth."
    one = "Write unto Eric Mercer at uwoods@example.org."
    two = "Call Lisa Wells on +1-912-403-2835, or write to uwoods@example.org."
    assert pii.pii_score(["", "", ""], [clean, one, two]) == [0.0, -1 / len(one), -2 / len(two)]
    assert [k for k, _ in pii.pii_spans(two)] == ["phone", "email"]


def test_pii_corpus_inserts_known_pii_deterministically():
    pytest.importorskip("faker")
    pytest.importorskip("scrubadub")
    mk = load(ROOT / "scripts" / "make_pii_data.py")
    rows = [{"ref": f"Ge1:{i}", "text": "And God said, Let there be light: and there was light."} for i in range(400)]
    a, b = mk.make_split(rows, 0.25, 0), mk.make_split(rows, 0.25, 0)
    assert a == b  # seeded per verse
    with_pii = [r for r in a if r["pii_kind"]]
    assert 0.18 < len(with_pii) / len(a) < 0.32
    assert all(r["pii_text"] in r["text"] and r["text"] != rows[0]["text"] for r in with_pii)
    assert all(r["text"] == rows[0]["text"] for r in a if not r["pii_kind"])
    stats = mk.check_scorer(a)
    assert stats["recall"]["email"] == 1.0 and stats["recall"]["phone"] == 1.0 and stats["clean_flagged"] == 0


def test_matched_kl_interpolation():
    fr = load(ROOT / "experiments" / "rl_frontier.py")
    pts = [(0.0, 0.1), (4.0, 0.5), (20.0, 0.9)]
    # between 4 and 20 nats: 0.5 + 0.4 * (15 - 4) / 16
    assert fr.interpolate(pts, 15.0) == (pytest.approx(0.5 + 0.4 * 11 / 16), False)
    assert fr.interpolate(pts, 2.0) == (pytest.approx(0.3), True)  # from the base's chord
    assert fr.interpolate(pts, 25.0) == (None, False)  # never extrapolated
    assert fr.interpolate([(0.0, 0.1), (20.0, 0.9), (4.0, 0.5)], 5.0)[0] == pytest.approx(0.525)  # sorted by KL


def test_matched_kl_per_seed_reads_each_seed_on_its_own_runs():
    fr = load(ROOT / "experiments" / "rl_frontier.py")
    base = {0: 0.1, 1: 0.2}
    runs = [
        {"tag": "frontier", "method": "ppo", "seed": 0, "kl": 4.0, "gold_reward": 0.5},
        {"tag": "frontier", "method": "ppo", "seed": 0, "kl": 20.0, "gold_reward": 0.9},
        {"tag": "frontier", "method": "ppo", "seed": 1, "kl": 10.0, "gold_reward": 0.7},
        {"tag": "frontier", "method": "grpo", "seed": 1, "kl": 2.0, "gold_reward": 0.0},
    ]
    at5 = fr.matched(runs, base, "ppo", 5.0)
    assert at5[0] == (pytest.approx(0.525), False)
    assert at5[1] == (pytest.approx(0.2 + 0.5 * 5 / 10), True)  # seed 1: only the chord from its own base
    assert fr.matched(runs, base, "ppo", 15.0)[1] == (None, False)  # seed 1 stops at 10 nats
