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


def _eval_row(env, model, seed, sample_seed, success, calls=0.0, errors=0.0):
    er = load(ROOT / "experiments" / "env_rl.py")
    return {"stage": "eval", "env": env, "model": model, "seed": seed, "sample_seed": sample_seed,
            "success_rate": success, "env_reward": success, "turns": 2.0, "tool_calls": calls,
            "tool_errors": errors, "tool_call_validity": er.validity(calls, errors),
            "date": "2026-01-01", "commit": "abc", "machine": "test", "wall_s": 10.0}  # fmt: skip


def test_env_rl_aggregates_training_seeds_of_sampling_means():
    er = load(ROOT / "experiments" / "env_rl.py")
    rows = [
        _eval_row("guess", "sft", 0, 0, 0.30),
        _eval_row("guess", "sft", 0, 1, 0.40),
        _eval_row("guess", "sft", 0, 2, 0.35),
        # grpo: training seed 0 -> mean(0.4, 0.6) = 0.5; seed 1 -> mean(0.7, 0.9) = 0.8; seed 2 -> 0.5
        _eval_row("guess", "grpo", 0, 0, 0.4), _eval_row("guess", "grpo", 0, 1, 0.6),
        _eval_row("guess", "grpo", 1, 0, 0.7), _eval_row("guess", "grpo", 1, 1, 0.9),
        _eval_row("guess", "grpo", 2, 0, 0.5), _eval_row("guess", "grpo", 2, 1, 0.5),
        _eval_row("guess", "rloo", 0, 0, 0.2),
        _eval_row("secret", "sft", 0, 0, 0.1, calls=0.5, errors=0.1),  # 0.8 valid
        _eval_row("secret", "sft", 0, 1, 0.1, calls=0.4, errors=0.0),  # 1.0 valid
        _eval_row("secret", "sft_secret", 0, 0, 0.5, calls=0.5, errors=0.0),  # the secret task's start
        _eval_row("secret", "grpo", 0, 0, 0.9, calls=1.0, errors=0.0),
        _eval_row("secret", "grpo", 1, 0, 0.5, calls=0.0, errors=0.0),  # no call: no validity
    ]  # fmt: skip
    g = er.aggregate(rows, "guess", "grpo", "success_rate")
    assert g["mean"] == pytest.approx(0.6) and g["sd"] == pytest.approx(0.17320508, abs=1e-6)  # sd of .5 .8 .5
    assert (g["over"], g["train_seeds"], g["sample_seeds"]) == ("training", 3, 2)
    s = er.aggregate(rows, "guess", "sft", "success_rate")  # one training seed: the sd over sampling seeds
    assert s["mean"] == pytest.approx(0.35) and s["sd"] == pytest.approx(0.05) and s["over"] == "sampling"
    v = er.aggregate(rows, "secret", "sft", "tool_call_validity")
    assert v["mean"] == pytest.approx(0.9)
    assert er.aggregate(rows, "secret", "grpo", "tool_call_validity")["train_seeds"] == 1  # seed 1 had no call
    assert er.aggregate(rows, "secret", "ppo", "success_rate") is None
    text = "\n".join(er.report_lines(rows))
    assert "| guess | grpo (after) | 3 × 2 | 0.600 ± 0.173 | +0.250 |" in text
    assert "| secret | format SFT | 1 × 2 | 0.100 ± 0.000 |  |" in text  # on secret, not what RL started from
    assert "| secret | secret SFT (before) | 1 × 1 | 0.500 ± 0.000 |  |" in text
    assert "| secret | grpo (after) | 2 × 1 | 0.700 ± 0.283 | +0.200 |" in text  # against the secret SFT
    assert "| rloo | 1 × 1 | 0.200 ± 0.000 | -0.150 |" in text
    assert "| format SFT | 0.45 ± 0.07 | 0.05 ± 0.07 | 0.900 ± 0.141 | 0.100 ± 0.000 |" in text


def test_env_rl_skips_rows_it_has_and_resumes_from_a_checkpoint(tmp_path):
    er = load(ROOT / "experiments" / "env_rl.py")
    assert er.resumed_step({"resumed_from": "/x/checkpoints/step-40"}) == 40
    assert er.resumed_step({"resumed_from": None}) == 0
    run = tmp_path / "guess-grpo-s0"
    (run / "checkpoints" / "step-10").mkdir(parents=True)
    assert er.resumable(run)
    (run / "summary.json").write_text('{"status": "completed"}')
    assert not er.resumable(run) and er.completed(run) == {"status": "completed"}
    r = _eval_row("guess", "sft", 0, 1, 0.3)
    assert er.row_key(r) == ("eval", "guess", "sft", 0, 1)
    assert er.validity(0.0, 0.0) is None and er.validity(4.0, 1.0) == 0.75


def test_env_rl_secret_runs_start_from_the_second_sft_stage(tmp_path):
    import argparse

    er = load(ROOT / "experiments" / "env_rl.py")
    a = argparse.Namespace(runs=tmp_path, sft_seed=0, checkpoint_every=10, sft_set=[], rl_set=[], eval_set=[],
                           envs=["guess", "secret"], algorithms=["grpo"], seeds=[0], sample_seeds=[0],
                           eval_episodes=8)  # fmt: skip
    (sft,) = er.jobs_for(a, "sft")
    fmt, second = sft.steps
    assert fmt.key == ("sft", None, "sft", 0, None) and fmt.needs is None
    assert second.key == ("sft", None, "sft_secret", 0, None)
    assert second.needs == tmp_path / "sft-s0" / "final" / "config.json"  # waits for the format SFT
    assert f"model.path={tmp_path / 'sft-s0' / 'final'}" in second.cmd
    assert str(er.SECRET_SFT_RECIPE) in second.cmd
    rl = {s.key[1]: s for s in (er.rl_step(a, env, "grpo", 0) for env in ("guess", "secret"))}
    assert f"model.path={tmp_path / 'sft-s0' / 'final'}" in rl["guess"].cmd
    assert f"model.path={tmp_path / 'sft-secret-s0' / 'final'}" in rl["secret"].cmd
    evals = er.jobs_for(a, "eval")[0].steps  # the SFTs' evaluations: the format SFT on both, the second on secret
    assert [s.key[1:3] for s in evals] == [("guess", "sft"), ("secret", "sft"), ("secret", "sft_secret")]
    a.envs = ["guess"]
    assert [s.key[2] for s in er.jobs_for(a, "sft")[0].steps] == ["sft"]
