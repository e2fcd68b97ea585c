"""Pure metric functions: numbers and strings in, numbers out. No model, no torch.

BLEU and ROUGE call the reference libraries (sacrebleu, rouge-score) and are never reimplemented.
Written by hand, because no maintained library offers exactly these on plain lists: perplexity
from accumulated sums and its sliding-window plan, KL estimators, win rate with a bootstrap
interval, distinct-n, length statistics and preference accuracy. Each docstring gives the formula
and its source (see also docs/algorithms.md, section eval).
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Sequence

from ..engine.pairs import pair_correct

# ------------------------------------------------------------------------------ perplexity


def perplexity(nll_sum: float, n_tokens: int) -> float:
    """PPL = exp(sum of target-token NLL / number of target tokens).

    Token-weighted: the sums are accumulated over the whole set first, never averaged per batch
    (a mean of batch means weighs a short batch like a long one). Hugging Face, "Perplexity of
    fixed-length models". Returns inf when there is no token."""
    if n_tokens <= 0:
        return math.inf
    return math.exp(nll_sum / n_tokens)


def window_spans(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """The sliding-window plan for one sequence of `n_tokens` tokens: a list of
    (context_start, target_start, end). The model reads tokens [context_start, end) and scores
    targets t in [target_start, end), each predicted from tokens [context_start, t).

    Method of Hugging Face's "Perplexity of fixed-length models": windows start every `stride`
    tokens and are at most `window` long; each window scores only the tokens no earlier window
    scored, and never its own first token (nothing in the window precedes it). With
    stride < window every token 1..n-1 is scored exactly once, with up to window - 1 tokens of
    context and at least window - stride once past the first window; with stride == window
    (no overlap) the first token of each later window goes unscored, as in their loop. (Their
    example counts `valid labels - 1` loss tokens per window, one too few for every overlapping
    window after the first; here the count is exact.)

        window_spans(10, 4, 2) == [(0, 1, 4), (2, 4, 6), (4, 6, 8), (6, 8, 10)]
        window_spans(10, 4, 4) == [(0, 1, 4), (4, 5, 8), (8, 9, 10)]     # tokens 4 and 8 unscored
    """
    if window < 2:
        raise ValueError("window must be at least 2 tokens")
    if not 0 < stride <= window:
        raise ValueError("stride must be in 1..window")
    spans: list[tuple[int, int, int]] = []
    scored_to = 1  # token 0 is never a target
    for begin in range(0, max(n_tokens, 1), stride):
        end = min(begin + window, n_tokens)
        start = max(scored_to, begin + 1)
        if end > start:
            spans.append((begin, start, end))
            scored_to = end
        if end >= n_tokens:
            break
    return spans


# ------------------------------------------------------------------------- BLEU and ROUGE


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> dict:
    """Corpus BLEU with sacrebleu's defaults (`BLEU()`: tokenize '13a', smooth 'exp', case
    sensitive, max order 4): BLEU = BP * exp(sum_n 1/4 log p_n), BP = min(1, exp(1 - r/c)),
    Papineni et al. 2002; Post 2018 ("A Call for Clarity in Reporting BLEU Scores").

    Returns the score (0-100), the n-gram precisions, the brevity penalty, the lengths and the
    signature that makes the number reproducible. One reference per hypothesis."""
    from sacrebleu.metrics import BLEU

    metric = BLEU()
    res = metric.corpus_score(list(hypotheses), [list(references)])
    return {
        "score": res.score,
        "precisions": list(res.precisions),
        "brevity_penalty": res.bp,
        "hyp_length": res.sys_len,
        "ref_length": res.ref_len,
        "signature": str(metric.get_signature()),
    }


def sentence_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> list[float]:
    """Per-example BLEU (sacrebleu `BLEU(effective_order=True).sentence_score`): for per-example
    rows only; a corpus score is not the mean of these."""
    from sacrebleu.metrics import BLEU

    metric = BLEU(effective_order=True)
    return [metric.sentence_score(h, [r]).score for h, r in zip(hypotheses, references)]


class _WhitespaceTokenizer:
    """For rouge-score: lowercase and split on whitespace, keeping every script (its default
    tokenizer keeps only [a-z0-9], so non-Latin text scores 0)."""

    def tokenize(self, text: str) -> list[str]:
        return text.lower().split()


ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def rouge(hypotheses: Sequence[str], references: Sequence[str], tokenizer: str = "default") -> dict:
    """ROUGE-1, ROUGE-2 (n-gram overlap) and ROUGE-L (longest common subsequence) F-measures from
    rouge-score (`RougeScorer(['rouge1','rouge2','rougeL'], use_stemmer=False)`; Lin 2004):
    P = overlap / hypothesis n-grams, R = overlap / reference n-grams, F = 2PR / (P + R).

    Returns {"per_example": [{rouge1, rouge2, rougeL}, ...], "mean": {...}}: the corpus numbers are
    the means of the per-example F-measures, as rouge-score's aggregators do without bootstrap."""
    from rouge_score import rouge_scorer

    tok = _WhitespaceTokenizer() if tokenizer == "whitespace" else None
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=False, tokenizer=tok)
    rows = []
    for h, r in zip(hypotheses, references):
        s = scorer.score(r, h)  # (target, prediction)
        rows.append({k: s[k].fmeasure for k in ROUGE_TYPES})
    mean = {k: (sum(r[k] for r in rows) / len(rows) if rows else 0.0) for k in ROUGE_TYPES}
    return {"per_example": rows, "mean": mean}


# -------------------------------------------------------------------------- win rate


def win_outcomes(model_scores: Sequence[float], base_scores: Sequence[float]) -> list[float]:
    """Per prompt: 1 if r(x, y_model) > r(x, y_base), 0.5 on a tie, else 0."""
    if len(model_scores) != len(base_scores):
        raise ValueError("win rate needs scores of both models on the same prompts")
    return [1.0 if a > b else (0.5 if a == b else 0.0) for a, b in zip(model_scores, base_scores)]


def bootstrap_ci(
    values: Sequence[float], n_samples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (Efron & Tibshirani 1993, ch. 13): resample the
    values with replacement `n_samples` times, take the (1-c)/2 and (1+c)/2 quantiles of the
    resampled means (linear interpolation between order statistics). Seeded: the same inputs give
    the same interval."""
    import numpy as np

    n = len(values)
    if n == 0:
        return (math.nan, math.nan)
    vals = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = np.empty(n_samples)
    per = max(1, 2_000_000 // n)  # resamples per chunk: bounded memory for large N
    for s in range(0, n_samples, per):
        k = min(per, n_samples - s)
        means[s : s + k] = vals[rng.integers(0, n, size=(k, n))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])  # linear interpolation
    return (float(lo), float(hi))


def win_rate(
    model_scores: Sequence[float],
    base_scores: Sequence[float],
    n_samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict:
    """Win rate of a model over a baseline on the same prompts, under one reward:
        W = (1/N) sum_i [1(r_model,i > r_base,i) + 0.5 * 1(r_model,i == r_base,i)]
    (docs/algorithms.md, section eval; the pairwise-judge convention of TRL's judges and AlpacaEval), with a
    seeded percentile-bootstrap confidence interval over prompts."""
    out = win_outcomes(model_scores, base_scores)
    n = len(out)
    lo, hi = bootstrap_ci(out, n_samples, confidence, seed)
    return {
        "win_rate": sum(out) / n if n else math.nan,
        "wins": sum(1 for o in out if o == 1.0),
        "ties": sum(1 for o in out if o == 0.5),
        "losses": sum(1 for o in out if o == 0.0),
        "n": n,
        "ci_low": lo,
        "ci_high": hi,
        "confidence": confidence,
        "bootstrap_samples": n_samples,
    }


def logistic_fit(x: Sequence[float], y: Sequence[float], ridge: float = 1e-6, iters: int = 100) -> tuple[float, float]:
    """Maximum-likelihood (b0, b1) of P(y = 1 | x) = σ(b0 + b1 x) by Newton-Raphson (iteratively
    reweighted least squares). y may be fractional (a tie is 0.5: the quasi-binomial likelihood
    y log p + (1 - y) log(1 - p)). A tiny ridge on the slope keeps the estimate finite when x
    separates the outcomes. Written by hand: two parameters need no library (no scikit-learn here)."""
    import numpy as np

    X = np.stack([np.ones(len(x)), np.asarray(x, dtype=np.float64)], 1)
    Y = np.asarray(y, dtype=np.float64)
    b = np.zeros(2)
    R = np.diag([0.0, ridge * len(Y)])
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(X @ b)))
        g = X.T @ (Y - p) - R @ b
        H = (X * (p * (1 - p))[:, None]).T @ X + R + 1e-12 * np.eye(2)
        step = np.linalg.solve(H, g)
        b = b + step
        if np.abs(step).max() < 1e-10:
            break
    return float(b[0]), float(b[1])


def length_controlled_win_rate(
    outcomes: Sequence[float],
    len_model: Sequence[float],
    len_base: Sequence[float],
    n_samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict:
    """The win rate a model would have if its completions were as long as the baseline's: the
    length-controlled win rate of AlpacaEval 2 (Dubois et al. 2024, "Length-Controlled AlpacaEval: A
    Simple Way to Debias Automatic Evaluators", arXiv 2404.04475), without their instruction term.
    A logistic regression of the per-prompt outcome (win 1, tie 0.5, loss 0) on
    d = tanh((len_model - len_base) / std(len_model - len_base)),
        P(win) = σ(b0 + b1 d),
    predicts the win rate at zero length difference: LC = σ(b0). b1 > 0 means longer completions win
    more often. The interval is a percentile bootstrap over prompts (the fit repeated on each resample,
    std fixed from the full set)."""
    import numpy as np

    n = len(outcomes)
    if n == 0 or len(len_model) != n or len(len_base) != n:
        raise ValueError("length-controlled win rate needs an outcome and both lengths for every prompt")
    diff = np.asarray(len_model, dtype=np.float64) - np.asarray(len_base, dtype=np.float64)
    sd = float(diff.std())
    d = np.tanh(diff / sd) if sd > 0 else np.zeros(n)
    y = np.asarray(outcomes, dtype=np.float64)
    b0, b1 = logistic_fit(d, y)
    rng = np.random.default_rng(seed)
    lcs = np.empty(n_samples)
    for k in range(n_samples):
        idx = rng.integers(0, n, size=n)
        lcs[k] = 1.0 / (1.0 + math.exp(-logistic_fit(d[idx], y[idx], iters=50)[0]))
    lo, hi = np.quantile(lcs, [(1 - confidence) / 2, (1 + confidence) / 2])
    return {
        "lc_win_rate": 1.0 / (1.0 + math.exp(-b0)),
        "ci_low": float(lo),
        "ci_high": float(hi),
        "intercept": b0,
        "length_coef": b1,
        "mean_length_diff": float(diff.mean()),
        "length_diff_std": sd,
        "n": n,
    }


# ----------------------------------------------------------------------- correlation


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson's r; nan when either side is constant or there are fewer than 2 values."""
    n = len(x)
    if n < 2 or n != len(y):
        return math.nan
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan


def ranks(v: Sequence[float]) -> list[float]:
    """Ranks 1..n, ties given their average rank."""
    order = sorted(range(len(v)), key=lambda i: v[i])
    out = [0.0] * len(v)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho: Pearson's r of the ranks (ties averaged)."""
    return pearson(ranks(x), ranks(y))


def length_correlation(scores: Sequence[float], lengths: Sequence[float], unit: str) -> dict:
    """How much a reward follows length on a set of texts: Pearson's r and Spearman's rho between
    score and length. A reward model that learned "longer is better" shows r near 1 here
    (Singhal et al. 2023, "A Long Way to Go: Investigating Length Correlations in RLHF")."""
    return {"pearson": pearson(scores, lengths), "spearman": spearman(scores, lengths), "unit": unit, "n": len(scores)}


# -------------------------------------------------------------------------------- KL


def kl_estimates(logp: Sequence[float], logp_ref: Sequence[float]) -> tuple[float, float]:
    """KL(pi || pi_ref) estimates for ONE sampled completion y ~ pi, from the per-token log-probs
    of its tokens under the policy (logp) and the reference (logp_ref), both at the sampling
    temperature:

        k1 = sum_t (log pi_t - log pi_ref,t)              (unbiased; can be negative per sample)
        k3 = sum_t [(r_t - 1) - log r_t],  r_t = pi_ref,t / pi_t   (unbiased, >= 0 term by term)

    Schulman, "Approximating KL divergence" (2020). k3 is applied per token and summed: E[r_t] = 1
    under pi at every position, so its expectation is the per-position KL, and by the chain rule
    the sum is the sequence KL. Averaging over completions gives the reported numbers."""
    k1 = 0.0
    k3 = 0.0
    for a, b in zip(logp, logp_ref):
        d = b - a  # log r
        k1 -= d
        k3 += math.expm1(d) - d
    return k1, k3


# ------------------------------------------------------------------------- diversity


def distinct_n(texts: Sequence[str], n: int) -> float:
    """distinct-n (Li et al. 2016, "A Diversity-Promoting Objective Function for Neural
    Conversation Models"): the number of unique n-grams divided by the total number of n-grams,
    over all generations together. Tokens are whitespace-separated words. 0 when there is no
    n-gram at all."""
    total = 0
    unique: set[tuple[str, ...]] = set()
    for t in texts:
        words = t.split()
        for i in range(len(words) - n + 1):
            unique.add(tuple(words[i : i + n]))
            total += 1
    return len(unique) / total if total else 0.0


def length_stats(lengths: Sequence[int | float]) -> dict:
    """Mean, median, min, max and population standard deviation of completion lengths."""
    if not lengths:
        return {"mean": math.nan, "median": math.nan, "min": math.nan, "max": math.nan, "std": math.nan}
    return {
        "mean": statistics.fmean(lengths),
        "median": float(statistics.median(lengths)),
        "min": min(lengths),
        "max": max(lengths),
        "std": statistics.pstdev(lengths),
    }


def word_count(text: str) -> int:
    return len(text.split())


# ------------------------------------------------------------- preference accuracy


def preference_accuracy(chosen: Sequence[float], rejected: Sequence[float]) -> dict:
    """How often a reward ranks the preferred completion first: accuracy = (1/N) sum pair_correct(r_w - r_l)
    (a tie counts 1/2), with the tie count and the mean margin r_w - r_l reported beside it
    (docs/algorithms.md, section reward)."""
    n = len(chosen)
    if n == 0 or n != len(rejected):
        raise ValueError("preference accuracy needs the same, non-zero number of chosen and rejected scores")
    margins = [a - b for a, b in zip(chosen, rejected)]
    return {
        "accuracy": sum(pair_correct(m) for m in margins) / n,
        "ties": sum(1 for m in margins if m == 0),
        "margin_mean": sum(margins) / n,
        "n": n,
    }


# ------------------------------------------------------------------- word matching


def word_pattern(word: str) -> re.Pattern:
    """A whole-word, case-insensitive pattern for a word or phrase (used by banned and required
    words): 'dark' matches 'Dark,' and 'DARK' but not 'darkness'."""
    return re.compile(r"(?<!\w)" + re.escape(word) + r"(?!\w)", re.IGNORECASE)


def contains_word(text: str, word: str) -> bool:
    return word_pattern(word).search(text) is not None
