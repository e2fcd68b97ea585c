"""Eval metrics against the reference libraries (sacrebleu, rouge-score, transformers) and numbers
worked by hand."""

import json
import math
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefcli.evaluate import metrics as M

from .conftest import DATA

# ------------------------------------------------------------------------------ perplexity


def test_window_spans_by_hand():
    # 10 tokens, window 4, stride 2: token 0 has no context; each later token is scored once
    assert M.window_spans(10, 4, 2) == [(0, 1, 4), (2, 4, 6), (4, 6, 8), (6, 8, 10)]
    # no overlap: tokens 4 and 8 open their windows, with nothing before them to predict them from
    assert M.window_spans(10, 4, 4) == [(0, 1, 4), (4, 5, 8), (8, 9, 10)]
    assert M.window_spans(3, 8, 4) == [(0, 1, 3)]  # shorter than the window: one pass
    assert M.window_spans(9, 4, 3) == [(0, 1, 4), (3, 4, 7), (6, 7, 9)]
    assert M.window_spans(1, 4, 2) == []
    with pytest.raises(ValueError):
        M.window_spans(10, 4, 5)


@pytest.mark.parametrize("n,window,stride", [(50, 8, 3), (17, 5, 5), (40, 16, 1), (7, 2, 1), (33, 6, 5)])
def test_window_spans_score_every_token_once_with_bounded_context(n, window, stride):
    seen = []
    for c0, t0, end in M.window_spans(n, window, stride):
        assert end - c0 <= window and c0 < t0 < end
        for t in range(t0, end):
            seen.append(t)
            assert 1 <= t - c0 <= window - 1  # context size
            if c0 > 0:
                assert t - c0 >= window - stride
    unscored = set(range(0, n, stride)) - {0} if stride == window else set()
    assert seen == [t for t in range(1, n) if t not in unscored]


def test_perplexity_is_token_weighted():
    # two "batches": 1 token at NLL 4, 3 tokens at NLL 0 each -> exp(4/4), not exp(mean(4, 0))
    assert M.perplexity(4.0 + 0.0, 1 + 3) == pytest.approx(math.e)
    assert M.perplexity(0.0, 0) == math.inf


def _texts(n=12):
    return [json.loads(x)["text"] for x in (DATA / "tiny" / "text_eval.jsonl").read_text().splitlines()[:n]]


@pytest.fixture(scope="module")
def model_and_policy(tiny_model_dir):
    from prefcli.engine.models import PolicyLM
    from prefcli.evaluate.loading import make_runtime

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    rt = make_runtime("cpu", "fp32", loss_chunk_tokens=64)  # several chunks per batch
    return tok, hf, PolicyLM(hf, rt), rt


def test_perplexity_matches_transformers_full_logits(model_and_policy):
    """Whole texts (window larger than any text): prefcli's chunked log-probs vs plain transformers."""
    from prefcli.evaluate.scoring import perplexity_nll

    tok, hf, policy, rt = model_and_policy
    ids = [tok(t)["input_ids"] + [tok.eos_token_id] for t in _texts()]
    res = perplexity_nll(
        policy, ids, ids, window=256, stride=128, batch_size=5, pad_id=tok.pad_token_id, device=rt.device
    )
    nll, n = 0.0, 0
    with torch.no_grad():
        for x in ids:
            logits = hf(input_ids=torch.tensor([x])).logits[0, :-1].double()
            nll += torch.nn.functional.cross_entropy(logits, torch.tensor(x[1:]), reduction="sum").item()
            n += len(x) - 1
    assert sum(r.tokens for r in res) == n
    ours = M.perplexity(sum(r.nll for r in res), sum(r.tokens for r in res))
    assert ours == pytest.approx(math.exp(nll / n), rel=1e-5)
    # per example, too
    x = ids[3]
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor([x])).logits[0, :-1].double()
    assert res[3].nll == pytest.approx(
        torch.nn.functional.cross_entropy(logits, torch.tensor(x[1:]), reduction="sum").item(), rel=1e-5
    )


def _hf_sliding_window_reference(hf, x, window, stride):
    """The loop of Hugging Face's "Perplexity of fixed-length models", with exact token counts
    (their example subtracts one label per window, which is one too many after the first)."""
    nll, n, prev_end = 0.0, 0, 0
    for begin in range(0, len(x), stride):
        end = min(begin + window, len(x))
        trg_len = end - prev_end
        inp = torch.tensor([x[begin:end]])
        labels = inp.clone()
        labels[:, :-trg_len] = -100
        with torch.no_grad():
            logits = hf(input_ids=inp).logits[0, :-1].double()
        tgt = labels[0, 1:]
        nll += torch.nn.functional.cross_entropy(logits, tgt, ignore_index=-100, reduction="sum").item()
        n += int((tgt != -100).sum())
        prev_end = end
        if end == len(x):
            break
    return nll, n


def test_sliding_window_perplexity_matches_the_hf_loop(model_and_policy):
    from prefcli.evaluate.scoring import perplexity_nll

    tok, hf, policy, rt = model_and_policy
    x = tok(" ".join(_texts(2)))["input_ids"]
    assert len(x) > 40
    for window, stride in ((16, 5), (16, 16), (9, 2)):
        res = perplexity_nll(policy, [x], [x], window, stride, batch_size=3, pad_id=tok.pad_token_id, device=rt.device)
        nll, n = _hf_sliding_window_reference(hf, x, window, stride)
        assert res[0].tokens == n == len(x) - 1 - (len(range(window, len(x), window)) if window == stride else 0)
        assert res[0].nll == pytest.approx(nll, rel=1e-5)
    whole = perplexity_nll(policy, [x], [x], 256, 128, 1, tok.pad_token_id, rt.device)[0]
    windowed = perplexity_nll(policy, [x], [x], 16, 5, 1, tok.pad_token_id, rt.device)[0]
    assert windowed.nll != pytest.approx(whole.nll, rel=1e-4)  # less context: a different number


def test_masked_prompt_tokens_are_not_scored(model_and_policy):
    from prefcli.evaluate.scoring import perplexity_nll

    tok, hf, policy, rt = model_and_policy
    p, c = tok("And the LORD")["input_ids"], tok(" spake unto Moses", add_special_tokens=False)["input_ids"]
    x = p + c
    lab = [-100] * len(p) + c
    r = perplexity_nll(policy, [x], [lab], 8, 3, 2, tok.pad_token_id, rt.device)[0]
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor([x])).logits[0, :-1].double()
    want = torch.nn.functional.cross_entropy(logits[len(p) - 1 :], torch.tensor(c), reduction="sum").item()
    assert r.tokens == len(c) and r.nll == pytest.approx(want, rel=1e-5)  # x is shorter than the window


def test_completion_logprobs_at_a_temperature(model_and_policy):
    from prefcli.evaluate.scoring import completion_logprobs

    tok, hf, policy, rt = model_and_policy
    prompts = [tok("And the")["input_ids"], tok("In the beginning God")["input_ids"]]
    comps = [
        tok(" LORD said", add_special_tokens=False)["input_ids"] + [tok.eos_token_id],
        tok(" created", add_special_tokens=False)["input_ids"],
    ]
    got = completion_logprobs(
        policy, prompts, comps, temperature=0.7, batch_size=2, pad_id=tok.pad_token_id, device=rt.device
    )
    for p, c, g in zip(prompts, comps, got):
        with torch.no_grad():
            logits = hf(input_ids=torch.tensor([p + c])).logits[0].double() / 0.7
        lp = torch.log_softmax(logits, -1)
        want = [lp[len(p) - 1 + j, t].item() for j, t in enumerate(c)]
        assert g == pytest.approx(want, rel=1e-5)


# ---------------------------------------------------------------------------- BLEU, ROUGE


def test_bleu_is_sacrebleu_with_its_signature():
    import sacrebleu

    hyps = ["And God said, Let there be light: and there was light.", "In the beginning God created the earth."]
    refs = ["And God said, Let there be light: and there was light.", "In the beginning God created the heaven."]
    got = M.bleu(hyps, refs)
    want = sacrebleu.corpus_bleu(hyps, [refs])
    assert got["score"] == pytest.approx(want.score) and got["brevity_penalty"] == pytest.approx(want.bp)
    assert got["signature"] == f"nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:{sacrebleu.__version__}"


def test_bleu_by_hand():
    # p1..p4 = 4/5, 3/4, 2/3, 1/2, equal lengths (BP = 1): BLEU = (0.8 * 0.75 * 2/3 * 0.5) ** (1/4) = 0.2 ** 0.25
    got = M.bleu(["a b c d e"], ["a b c d f"])
    assert got["score"] == pytest.approx(100 * 0.2**0.25, rel=1e-9)
    assert got["precisions"] == pytest.approx([80.0, 75.0, 200 / 3, 50.0])
    # shorter hypothesis: BP = exp(1 - r/c) = exp(1 - 6/5)
    short = M.bleu(["a b c d e"], ["a b c d e f"])
    assert short["brevity_penalty"] == pytest.approx(math.exp(1 - 6 / 5))
    assert M.sentence_bleu(["a b c d e"], ["a b c d f"]) == [pytest.approx(100 * 0.2**0.25)]


def test_rouge_is_rouge_score_and_by_hand():
    from rouge_score import rouge_scorer

    got = M.rouge(["the cat sat"], ["the cat was here"])
    s = got["per_example"][0]
    # ROUGE-1: overlap {the, cat} = 2, P = 2/3, R = 2/4, F = 4/7; ROUGE-2: overlap {the cat}, P = 1/2, R = 1/3, F = 2/5
    assert s["rouge1"] == pytest.approx(4 / 7) and s["rouge2"] == pytest.approx(2 / 5)
    assert s["rougeL"] == pytest.approx(4 / 7)  # LCS "the cat"
    hyps = ["And God said, Let there be light", "the earth was without form, and void"]
    refs = ["And God said, Let there be light: and there was light", "And the earth was without form"]
    ref_scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    want = [ref_scorer.score(r, h) for h, r in zip(hyps, refs)]
    got = M.rouge(hyps, refs)
    for k in ("rouge1", "rouge2", "rougeL"):
        assert got["mean"][k] == pytest.approx(sum(w[k].fmeasure for w in want) / 2)


def test_rouge_whitespace_tokenizer_scores_non_latin_text():
    assert M.rouge(["свет миру"], ["свет миру"])["mean"]["rouge1"] == 0.0  # rouge-score keeps only [a-z0-9]
    assert M.rouge(["свет миру"], ["свет миру"], tokenizer="whitespace")["mean"]["rouge1"] == 1.0


# ------------------------------------------------------------------- win rate, KL, etc.


def test_win_rate_by_hand_and_bootstrap():
    model, base = [1, 2, 3, 3], [0, 2, 4, 1]
    assert M.win_outcomes(model, base) == [1.0, 0.5, 0.0, 1.0]
    w = M.win_rate(model, base, n_samples=2000, seed=3)
    assert w["win_rate"] == 0.625 and (w["wins"], w["ties"], w["losses"], w["n"]) == (2, 1, 1, 4)
    assert 0.0 <= w["ci_low"] <= 0.625 <= w["ci_high"] <= 1.0
    assert M.win_rate(model, base, n_samples=2000, seed=3) == w  # seeded
    assert M.win_rate([1, 1], [0, 0])["ci_low"] == 1.0  # no variance, no interval
    with pytest.raises(ValueError):
        M.win_outcomes([1], [1, 2])


def test_bootstrap_interval_against_a_plain_resampling_loop():
    rng = random.Random(0)
    vals = [rng.random() < 0.6 for _ in range(200)]
    lo, hi = M.bootstrap_ci([float(v) for v in vals], n_samples=4000, confidence=0.9, seed=1)
    # a plain-Python percentile bootstrap with another generator: the intervals agree to Monte Carlo error
    means = sorted(sum(vals[rng.randrange(200)] for _ in range(200)) / 200 for _ in range(4000))
    assert lo == pytest.approx(means[int(0.05 * 3999)], abs=0.015)
    assert hi == pytest.approx(means[int(0.95 * 3999)], abs=0.015)
    # and the normal approximation of a proportion: p +- 1.645 sqrt(p(1-p)/n)
    p = sum(vals) / 200
    half = 1.645 * math.sqrt(p * (1 - p) / 200)
    assert (lo, hi) == pytest.approx((p - half, p + half), abs=0.015)


def test_length_controlled_win_rate_by_hand():
    # half the prompts the model is longer by the same amount (feature +c), half shorter (-c): the two-parameter
    # logistic fit is saturated, so p(+c) = win share when longer = 0.8, p(-c) = 0.4, and
    # b0 = (logit 0.8 + logit 0.4) / 2: the LC win rate is sigmoid(b0) = 0.62020, the raw win rate 0.6
    outcomes = [1.0] * 8 + [0.0] * 2 + [1.0] * 4 + [0.0] * 6
    lm = [30] * 10 + [10] * 10
    lb = [20] * 20
    r = M.length_controlled_win_rate(outcomes, lm, lb, n_samples=50, seed=0)
    b0 = (math.log(0.8 / 0.2) + math.log(0.4 / 0.6)) / 2
    assert r["intercept"] == pytest.approx(b0, abs=1e-4)
    assert r["lc_win_rate"] == pytest.approx(1 / (1 + math.exp(-b0)), abs=1e-4)
    assert r["lc_win_rate"] == pytest.approx(0.62020, abs=1e-4)
    assert r["length_coef"] > 0 and r["ci_low"] <= r["lc_win_rate"] <= r["ci_high"]
    # equal lengths: no length term to remove, the LC win rate is the raw win rate (ties count 1/2)
    r = M.length_controlled_win_rate([1.0, 0.5, 0.0, 1.0], [5] * 4, [5] * 4, n_samples=20)
    assert r["lc_win_rate"] == pytest.approx(0.625, abs=1e-6) and r["length_coef"] == 0.0
    # the fit solves the likelihood equations: sum (y - p) = 0 and sum (y - p) x = 0 (up to the tiny ridge)
    rng = random.Random(0)
    x = [rng.uniform(-1, 1) for _ in range(200)]
    y = [1.0 if rng.random() < 1 / (1 + math.exp(-(0.3 + 1.5 * v))) else 0.0 for v in x]
    b0, b1 = M.logistic_fit(x, y)
    p = [1 / (1 + math.exp(-(b0 + b1 * v))) for v in x]
    assert sum(a - q for a, q in zip(y, p)) == pytest.approx(0, abs=1e-6)
    assert sum((a - q) * v for a, q, v in zip(y, p, x)) == pytest.approx(0, abs=1e-3)
    # length separates wins from losses completely: still finite
    r = M.length_controlled_win_rate([1.0] * 5 + [0.0] * 5, [9] * 5 + [1] * 5, [5] * 10, n_samples=20)
    assert 0 < r["lc_win_rate"] < 1 and math.isfinite(r["length_coef"])


def test_correlations_by_hand():
    assert M.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert M.pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(M.pearson([1, 1, 1], [1, 2, 3]))
    assert M.ranks([10, 20, 20, 5]) == [2.0, 3.5, 3.5, 1.0]
    # monotone but not linear: Spearman 1, Pearson below 1
    assert M.spearman([1, 2, 3, 4], [1, 4, 9, 100]) == pytest.approx(1.0)
    assert M.pearson([1, 2, 3, 4], [1, 4, 9, 100]) < 0.9
    c = M.length_correlation([0.1, 0.5, 0.9], [3, 7, 11], "tokens")
    assert c == {"pearson": pytest.approx(1.0), "spearman": pytest.approx(1.0), "unit": "tokens", "n": 3}


def test_kl_estimates_by_hand():
    k1, k3 = M.kl_estimates([-1.0, -2.0], [-1.5, -1.0])
    assert k1 == pytest.approx(0.5 - 1.0)
    assert k3 == pytest.approx((math.exp(-0.5) - 1 + 0.5) + (math.exp(1.0) - 1 - 1.0))
    assert M.kl_estimates([-0.3, -2.0], [-0.3, -2.0]) == (0.0, 0.0)


def test_kl_estimators_are_unbiased_for_a_two_step_sequence():
    """Sequences of 2 tokens from p, first token independent of the second: the exact sequence KL is
    2 KL(p||q); the sample means of k1 and k3 approach it, and k3 is never negative."""
    p, q = [0.6, 0.3, 0.1], [0.3, 0.3, 0.4]
    exact = 2 * sum(a * math.log(a / b) for a, b in zip(p, q))
    rng = random.Random(0)
    k1s, k3s = [], []
    for _ in range(40000):
        ys = rng.choices(range(3), weights=p, k=2)
        k1, k3 = M.kl_estimates([math.log(p[y]) for y in ys], [math.log(q[y]) for y in ys])
        k1s.append(k1)
        k3s.append(k3)
        assert k3 >= 0
    assert sum(k1s) / len(k1s) == pytest.approx(exact, rel=0.03)
    assert sum(k3s) / len(k3s) == pytest.approx(exact, rel=0.03)


def test_distinct_n_by_hand():
    texts = ["a b a b", "a c"]
    assert M.distinct_n(texts, 1) == pytest.approx(3 / 6)  # a b a b a c: 3 unique of 6
    assert M.distinct_n(texts, 2) == pytest.approx(3 / 4)  # (a b) (b a) (a b) | (a c): n-grams never cross texts
    assert M.distinct_n(texts, 3) == pytest.approx(2 / 2)
    assert M.distinct_n(["a"], 2) == 0.0


def test_length_stats_and_preference_accuracy():
    s = M.length_stats([1, 2, 3, 10])
    assert s == {"mean": 4.0, "median": 2.5, "min": 1, "max": 10, "std": pytest.approx(math.sqrt(12.5))}
    acc = M.preference_accuracy([1.0, 0.5, 2.0, 0.0], [0.0, 0.5, 3.0, -1.0])
    # margins 1, 0, -1, 1: a tie counts 1/2 (pair_correct, the rule training uses too)
    assert acc == {"accuracy": 0.625, "ties": 1, "margin_mean": pytest.approx((1 + 0 - 1 + 1) / 4), "n": 4}


def test_word_matching_is_whole_word_and_case_insensitive():
    assert M.contains_word("Let there be Light.", "light")
    assert not M.contains_word("lightning", "light")
    assert M.contains_word("the LORD God", "lord god")
