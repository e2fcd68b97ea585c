"""Pretraining with human preferences (Korbak et al. 2023, "Pretraining Language Models with Human
Preferences", ICML; tomekkorbak/pretraining-with-human-feedback, apo/objectives.py): the five objectives
`prefcli sft` offers beside plain MLE, and what they need from the data (a score per row, a threshold,
control tokens). One row = one segment. x_t is a target token, N the number of target tokens in the whole
accumulated global batch (the loop divides by it), R the score of the row (segment) that x_t belongs to,
t the threshold (aligned = R >= t):

- `filter`       MLE on aligned rows only (rows with R < t are dropped before training)
- `conditional`  MLE on rows prefixed with <|aligned|> (R >= t) or <|misaligned|> (R < t); a fraction of
                 rows (1%) gets no token; generation starts after <|aligned|> and both control tokens are
                 blocked (bad_words_ids in the saved generation_config)
- `unlikelihood` L = (1/N) sum_t [ 1{R>=t} (-log p(x_t)) + alpha 1{R<t} (-log(1 - p(x_t))) ]
                 (Welleck et al. 2020), alpha = 1
- `rwr`          L = (1/N) sum_t exp(R/beta) (-log p(x_t)), beta = 10
                 (reward-weighted regression, Peters & Schaal 2007)
- `awr`          L = (1/N) sum_t [ alpha min(exp((R - V_t)/beta), 1000) (-log p(x_t))
                                   + (1 - alpha) (V_t - R)^2 ],  alpha = 0.5, beta = 10
                 (advantage-weighted regression, Peng et al. 2019); V_t is a linear value head on the
                 hidden state that predicts x_t, trained by the MSE term; the weight uses it detached.

Each objective is a function (model, batch) -> (loss summed over target tokens, metrics); the registry of
all SFT objectives (with `mle`) is `prefcli.algos.sft.OBJECTIVES`. docs/algorithms.md, section sft.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from ..engine.data import CACHE_VERSION, TokenizedSet, tokenizer_fingerprint
from ..engine.logprobs import IGNORE
from ..engine.models import PolicyLM
from ..errors import DataError

# ------------------------------------------------------------------------------ loss terms (pure tensor math)


def unlikelihood_terms(logp: torch.Tensor, mask: torch.Tensor, aligned: torch.Tensor, alpha: float):
    """Korbak et al. 2023, unlikelihood objective (after Welleck et al. 2020), summed over targets:

        sum_t [ 1{aligned_t} (-log p_t) + alpha 1{not aligned_t} (-log(1 - p_t)) ]

    logp: log p(x_t) per position; mask: positions with a target; aligned: per position, whether the
    row of x_t is aligned. 1 - p is computed as -expm1(log p) and clamped at 1e-20 (as the paper's code
    does). Returns (loss sum, likelihood sum, unlikelihood sum)."""
    m = mask.to(logp.dtype)
    al = aligned.to(logp.dtype) * m
    mis = (1.0 - aligned.to(logp.dtype)) * m
    one_minus_p = (-torch.expm1(logp)).clamp_min(1e-20)
    likelihood = -(logp * al).sum()
    unlikelihood = -(torch.log(one_minus_p) * mis).sum()
    return likelihood + alpha * unlikelihood, likelihood, unlikelihood


def rwr_terms(logp: torch.Tensor, mask: torch.Tensor, reward: torch.Tensor, beta: float):
    """Korbak et al. 2023, reward-weighted regression (Peters & Schaal 2007), summed over targets:

        sum_t exp(R_t / beta) (-log p_t)

    reward: per position, the score of the row of x_t. Returns (loss sum, weights per position)."""
    m = mask.to(logp.dtype)
    w = torch.exp(reward.to(logp.dtype) / beta) * m
    return -(w * logp).sum(), w


def awr_terms(
    logp: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    reward: torch.Tensor,
    beta: float,
    alpha: float,
    max_weight: float,
):
    """Korbak et al. 2023, advantage-weighted regression (Peng et al. 2019), summed over targets:

        sum_t [ alpha w_t (-log p_t) + (1 - alpha) (V_t - R_t)^2 ],  w_t = min(exp((R_t - V_t)/beta), max_weight)

    with V detached inside w_t (the value head learns from the MSE term only). Returns (loss sum,
    weighted-NLL sum, value-MSE sum, weights, advantages)."""
    m = mask.to(logp.dtype)
    r = reward.to(logp.dtype)
    v = values.to(logp.dtype)
    adv = (r - v.detach()) * m
    w = torch.exp(adv / beta).clamp(max=max_weight) * m
    weighted_nll = -(w * logp).sum()
    mse = ((v - r) ** 2 * m).sum()
    return alpha * weighted_nll + (1.0 - alpha) * mse, weighted_nll, mse, w, adv


# ------------------------------------------------------------------------- objectives (model, batch) -> loss


def _cross_entropy(model, batch) -> torch.Tensor:
    return model(batch["input_ids"], batch["targets"], batch["attention_mask"], batch["position_ids"], mode="ce")


def _per_token(batch: dict, name: str) -> torch.Tensor:
    """A per-example value (batch[name], one per example of the micro-batch) at every position, via
    batch['example_index'] (the example each target token belongs to); 0 where there is none."""
    idx = batch["example_index"]
    vals = batch[name].to(idx.device)
    out = vals[idx.clamp_min(0)]
    return torch.where(idx >= 0, out, torch.zeros_like(out))


def _example_metrics(batch: dict) -> dict:
    n = float(batch["scores"].numel())
    return {"phf/score_mean": (batch["scores"].sum(), n)} if n else {}


def _logprobs(model, batch):
    lp, _ = model(batch["input_ids"], batch["targets"], batch["attention_mask"], batch["position_ids"], mode="logprobs")
    return lp, batch["targets"] != IGNORE


def filter_loss(model, batch) -> tuple[torch.Tensor, dict]:
    """Korbak et al. 2023, filtering: MLE on the rows whose score is >= the threshold,

        L = -(1/N) sum_{t : R_t >= threshold} log p(x_t | x_<t)

    The rows below it never reach a batch (`prepare` drops them), so the loss is plain MLE."""
    loss_sum = _cross_entropy(model, batch)
    return loss_sum, _example_metrics(batch)


def conditional_loss(model, batch) -> tuple[torch.Tensor, dict]:
    """Korbak et al. 2023, conditional training: MLE on rows prefixed with a control token chosen by the
    row's score (the prefix is part of the data, put there by `prepare`),

        L = -(1/N) sum_t log p(x_t | c, x_<t),   c = <|aligned|> if R >= threshold else <|misaligned|>

    so the model learns p(x | <|aligned|>) and p(x | <|misaligned|>); c itself is never a target."""
    loss_sum = _cross_entropy(model, batch)
    n = float(batch["scores"].numel())
    cond = batch["conditioned"].float()
    mets = _example_metrics(batch)
    mets["phf/aligned_fraction"] = ((batch["aligned"].float() * cond).sum(), n)
    mets["phf/unconditioned_fraction"] = ((1.0 - cond).sum(), n)
    return loss_sum, mets


def unlikelihood_loss(model, batch, alpha: float = 1.0) -> tuple[torch.Tensor, dict]:
    """Korbak et al. 2023, unlikelihood (`unlikelihood_terms`):

    L = (1/N) sum_t [ 1{R_t >= threshold} (-log p(x_t)) + alpha 1{R_t < threshold} (-log(1 - p(x_t))) ]"""
    lp, mask = _logprobs(model, batch)
    aligned = _per_token(batch, "aligned").bool()
    loss_sum, lik, unl = unlikelihood_terms(lp, mask, aligned, alpha)
    n = float(mask.sum())
    mets = _example_metrics(batch)
    mets.update(
        {
            "phf/likelihood_loss": (lik.detach(), n),
            "phf/unlikelihood_loss": (unl.detach(), n),
            "phf/aligned_token_fraction": ((aligned & mask).sum(), n),
        }
    )
    return loss_sum, mets


def rwr_loss(model, batch, beta: float = 10.0) -> tuple[torch.Tensor, dict]:
    """Korbak et al. 2023, reward-weighted regression (`rwr_terms`):

    L = -(1/N) sum_t exp(R_t / beta) log p(x_t | x_<t)"""
    lp, mask = _logprobs(model, batch)
    loss_sum, w = rwr_terms(lp, mask, _per_token(batch, "scores"), beta)
    n = float(mask.sum())
    mets = _example_metrics(batch)
    mets.update({"phf/weight_mean": (w.sum(), n), "phf/nll": (-(lp * mask).sum().detach(), n)})
    return loss_sum, mets


def awr_loss(
    model, batch, beta: float = 10.0, alpha: float = 0.5, max_weight: float = 1000.0
) -> tuple[torch.Tensor, dict]:
    """Korbak et al. 2023, advantage-weighted regression (`awr_terms`); `model` is a ValuePolicy:

    L = (1/N) sum_t [ alpha min(exp((R_t - V_t)/beta), max_weight) (-log p(x_t)) + (1 - alpha) (V_t - R_t)^2 ]"""
    lp, values = model(batch["input_ids"], batch["targets"], batch["attention_mask"], batch["position_ids"])
    mask = batch["targets"] != IGNORE
    loss_sum, wnll, mse, w, adv = awr_terms(lp, values, mask, _per_token(batch, "scores"), beta, alpha, max_weight)
    n = float(mask.sum())
    m = mask.to(values.dtype)
    mets = _example_metrics(batch)
    mets.update(
        {
            "phf/weight_mean": (w.sum(), n),
            "phf/clipped_fraction": (((w >= max_weight) & mask).sum(), n),
            "phf/value_loss": (mse.detach(), n),
            "phf/value_mean": ((values.detach() * m).sum(), n),
            "phf/advantage_mean": (adv.sum(), n),
            "phf/nll": (-(lp * mask).sum().detach(), n),
        }
    )
    return loss_sum, mets


@dataclass(frozen=True)
class Objective:
    """An SFT objective: its loss, the recipe knobs it takes, and what it needs from the data."""

    loss: Callable
    knobs: dict[str, str] | None = None  # loss keyword -> SFTSection field
    scored: bool = False  # every training row gets a score
    keep_aligned_only: bool = False  # rows scoring below the threshold are dropped (filter)
    thresholded: bool = False  # rows are labelled aligned / misaligned by the threshold
    control_tokens: bool = False  # rows are prefixed with a control token (conditional)
    value_head: bool = False  # the policy carries a value head (awr)


PHF_OBJECTIVES: dict[str, Objective] = {
    "filter": Objective(filter_loss, scored=True, thresholded=True, keep_aligned_only=True),
    "conditional": Objective(conditional_loss, scored=True, thresholded=True, control_tokens=True),
    "unlikelihood": Objective(unlikelihood_loss, {"alpha": "unlikelihood_alpha"}, scored=True, thresholded=True),
    "rwr": Objective(rwr_loss, {"beta": "beta"}, scored=True),
    "awr": Objective(
        awr_loss, {"beta": "beta", "alpha": "awr_alpha", "max_weight": "awr_max_weight"}, scored=True, value_head=True
    ),
}


class ValuePolicy(nn.Module):
    """PolicyLM plus a linear value head on its last hidden states (AWR's V). Korbak et al. put a value head
    on the LM; this one is nn.Linear(hidden, 1), zero-initialised (V = 0 at the start, so the first weights
    are exp(R/beta), as in RWR), read in fp32. One module so that one optimizer (and DDP) covers both.

    forward -> (log p(target) per position, V per position)."""

    def __init__(self, policy: PolicyLM, hidden_size: int):
        super().__init__()
        self.policy = policy
        self.value_head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids, targets, attention_mask=None, position_ids=None):
        lp, _, h = self.policy(input_ids, targets, attention_mask, position_ids, return_hidden=True)
        return lp, self.value_head(h.float()).squeeze(-1)


# ------------------------------------------------------------------------------------- scoring rows

SCORE_COLUMN = "__prefcli_score__"
SCORE_VERSION = "1"  # bump when the scoring of the same rows by the same scorer changes


def row_texts(batch: dict, fmt: str) -> tuple[list[str], list[str]]:
    """(prompts, completions) that the scorer sees for a batch of rows: a 'text' row is a completion with an
    empty prompt; a 'messages' row is its last assistant turn, after the earlier turns joined by newlines."""
    if fmt == "text":
        return [""] * len(batch["text"]), list(batch["text"])
    if fmt == "prompt_completion":
        return list(batch["prompt"]), list(batch["completion"])
    prompts, completions = [], []
    for msgs in batch["messages"]:
        last = max((i for i, m in enumerate(msgs) if m.get("role") == "assistant"), default=None)
        if last is None:
            prompts.append("")
            completions.append("\n".join(str(m.get("content", "")) for m in msgs))
        else:
            prompts.append("\n".join(str(m.get("content", "")) for m in msgs[:last]))
            completions.append(str(msgs[last].get("content", "")))
    return prompts, completions


def _file_digest(path: str, content: bool) -> str:
    try:
        if content:
            return hashlib.sha256(Path(path).read_bytes()).hexdigest()
        st = os.stat(path)
        return f"{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        return "missing"


def scorer_fingerprint(specs) -> str:
    """What the cached scores depend on: the reward specs, and the files behind them (a function's source,
    a reward model's or a judge's folder, a human-score file, an ensemble's members), so that editing one
    rescores the data."""
    h = hashlib.sha256()
    for spec in specs:
        h.update(spec.model_dump_json().encode())
        _hash_sources(h, spec)
    return h.hexdigest()[:16]


def _hash_sources(h, spec) -> None:
    kind = spec.kind
    if kind == "function":
        mod = spec.function.rpartition(":")[0]
        path = mod
        if not mod.endswith(".py"):
            try:
                found = importlib.util.find_spec(mod)
                path = found.origin if found is not None and found.origin else ""
            except (ImportError, ValueError):
                path = ""
        h.update(_file_digest(path, content=True).encode() if path else b"")
    elif kind in ("model", "judge") and os.path.isdir(spec.path):
        for f in sorted(os.listdir(spec.path)):
            h.update(f"{f}={_file_digest(os.path.join(spec.path, f), content=False)}".encode())
    elif kind == "ensemble":
        for member in spec.members:
            _hash_sources(h, member)
    elif kind == "human_scores":
        h.update(_file_digest(spec.path, content=False).encode())
    elif kind == "sentiment":
        from importlib.metadata import PackageNotFoundError, version

        try:
            h.update(version("vaderSentiment").encode())
        except PackageNotFoundError:
            pass


def score_rows(ds, fmt: str, cfg, tok, device, source: str) -> list[float]:
    """One score per row of `ds`: from cfg.score_column, or from the reward sources cfg.rewards. Reward
    scores are computed by a `datasets` map whose fingerprint covers the rows, the format and the scorer,
    so a second run on the same data reads them from the datasets cache without calling the scorer."""
    if cfg.score_column is not None:
        col = cfg.score_column
        if col not in ds.column_names:
            raise DataError(
                f"data.train: {source}: sft.score_column '{col}' is not a column of the data "
                f"(columns: {', '.join(ds.column_names)})"
            )
        out = []
        for i, v in enumerate(ds[col]):
            try:
                f = float(v)
            except (TypeError, ValueError):
                f = float("nan")
            if not math.isfinite(f):
                raise DataError(
                    f"data.train: {source}: row {i + 1}: score column '{col}' holds {v!r}, not a finite number"
                )
            out.append(f)
        return out

    from ..reward_sources import build_rewards

    specs = cfg.rewards
    uses_tokens = any(getattr(s, "unit", None) == "tokens" for s in specs)
    h = hashlib.sha256(f"{CACHE_VERSION}/{SCORE_VERSION}".encode())
    h.update(str(ds._fingerprint).encode())
    h.update(json.dumps([fmt, scorer_fingerprint(specs), tokenizer_fingerprint(tok) if uses_tokens else None]).encode())
    holder: dict = {}

    def score(batch):
        if "rs" not in holder:  # built on the first uncached batch only: a cache hit loads no reward model
            holder["rs"] = build_rewards(specs, tokenizer=tok, device=device)
        prompts, completions = row_texts(batch, fmt)
        total, _ = holder["rs"].score(prompts, completions)
        return {SCORE_COLUMN: [float(x) for x in total]}

    scored = ds.map(
        score, batched=True, batch_size=cfg.score_batch_size, new_fingerprint=h.hexdigest()[:32], desc="scoring"
    )
    return list(scored[SCORE_COLUMN])


def pick_threshold(scores: list[float], cfg) -> tuple[float, str]:
    """The threshold (aligned = score >= it) and how it was chosen."""
    if cfg.threshold is not None:
        return float(cfg.threshold), "fixed"
    q = cfg.threshold_quantile
    t = torch.quantile(torch.tensor(scores, dtype=torch.float64), q).item()
    return float(t), f"quantile {q}"


def unit_hash(seed: int, row: int) -> float:
    """A uniform number in [0, 1) fixed by (seed, row): which rows lose their control token."""
    d = hashlib.sha256(f"prefcli-phf-drop/{seed}/{row}".encode()).digest()
    return int.from_bytes(d[:8], "big") / 2.0**64


def add_control_tokens(tok, aligned: str, misaligned: str) -> tuple[int, int]:
    """Register the two control tokens as special tokens (kept whole by the tokenizer, skipped by
    decode(skip_special_tokens=True)); the model's embeddings are resized to len(tok) when it is built."""
    new = [t for t in (aligned, misaligned) if t not in tok.get_vocab()]
    if new:
        extra = [t for t in (getattr(tok, "extra_special_tokens", None) or []) if isinstance(t, str)]
        tok.add_special_tokens({"extra_special_tokens": extra + new})
    ids = tok.convert_tokens_to_ids([aligned, misaligned])
    for t, i in zip((aligned, misaligned), ids):
        if i is None or i == tok.unk_token_id or tok.convert_ids_to_tokens(i) != t:
            raise DataError(f"could not add the control token {t!r} to the tokenizer")
    return int(ids[0]), int(ids[1])


def prefix_control(
    ids: list[int], labels: list[int], ctrl: int, bos: int | None, mask_next: bool
) -> tuple[list[int], list[int]]:
    """Insert the control token at the start of an example (after a leading BOS). The control token is
    never a target. With mask_next, the token after it keeps the status it had without the prefix (the
    first token of an example is no target), so that the targets are exactly those of an mle run."""
    p = 1 if bos is not None and ids and ids[0] == bos else 0
    new_ids = ids[:p] + [ctrl] + ids[p:]
    new_labels = labels[:p] + [IGNORE] + labels[p:]
    if mask_next and p == 0 and len(new_labels) > 1:
        new_labels[1] = IGNORE
    return new_ids, new_labels


# ------------------------------------------------------------------------------------- data preparation


@dataclass
class PHFData:
    """The training set after scoring (filtered, control-token prefixed), one score / label per example."""

    train_set: TokenizedSet
    eval_set: TokenizedSet | None
    scores: torch.Tensor  # [examples] float
    aligned: torch.Tensor  # [examples] bool
    conditioned: torch.Tensor  # [examples] bool: carries a control token
    stats: dict


def subset(s: TokenizedSet, keep: list[int]) -> TokenizedSet:
    return replace(
        s, input_ids=[s.input_ids[i] for i in keep], labels=[s.labels[i] for i in keep], rows=[s.rows[i] for i in keep]
    )


def prepare(
    obj: Objective,
    s,
    train_set: TokenizedSet,
    eval_set: TokenizedSet | None,
    row_scores: list[float],
    control_ids: tuple[int, int] | None,
    bos: int | None,
    seed: int,
    source: str,
    warn: Callable[[str], None],
) -> PHFData:
    """Scores per example, the threshold and aligned/misaligned labels, filtering (filter), control-token
    prefixes (conditional; the held-out rows are all conditioned on the aligned token); stats for the
    summary. `s` is the recipe's sft section; `row_scores` has one score per data row."""
    n_ex = len(train_set)
    scores = [row_scores[i] for i in train_set.rows]
    stats: dict = {
        "objective": s.objective,
        "scorer": f"column {s.score_column}"
        if s.score_column is not None
        else " + ".join(f"{x.weight:g}*{x.name or x.kind}" for x in s.rewards),
        "rows_scored": len(row_scores),
        "score_mean": statistics.fmean(row_scores),
        "score_std": statistics.pstdev(row_scores),
        "score_min": min(row_scores),
        "score_max": max(row_scores),
    }
    aligned = [True] * n_ex
    if obj.thresholded:
        t, rule = pick_threshold(row_scores, s)
        aligned = [x >= t for x in scores]
        n_al = sum(x >= t for x in row_scores)
        stats.update(
            {
                "threshold": t,
                "threshold_rule": rule,
                "rows_aligned": n_al,
                "rows_misaligned": len(row_scores) - n_al,
            }
        )
        if n_al in (0, len(row_scores)):
            warn(
                f"sft: all {len(row_scores)} scored rows are {'aligned' if n_al else 'misaligned'} "
                f"at threshold {t:g} ({rule}); the objective cannot tell good rows from bad ones"
            )
    if obj.keep_aligned_only:
        keep = [i for i in range(n_ex) if aligned[i]]
        if not keep:
            raise DataError(
                f"data.train: {source}: sft.objective filter keeps no row: every score is below "
                f"the threshold {stats['threshold']:g}"
            )
        train_set = subset(train_set, keep)
        scores = [scores[i] for i in keep]
        aligned = [True] * len(keep)
        stats.update({"examples_kept": len(keep), "examples_filtered": n_ex - len(keep)})
    conditioned = [False] * len(scores)
    if obj.control_tokens:
        a_id, m_id = control_ids
        ts = train_set
        for i in range(len(ts)):
            if unit_hash(seed, ts.rows[i]) < s.drop_control_fraction:
                continue
            conditioned[i] = True
            ts.input_ids[i], ts.labels[i] = prefix_control(
                ts.input_ids[i], ts.labels[i], a_id if aligned[i] else m_id, bos, mask_next=False
            )
        if eval_set is not None:
            es = eval_set
            for i in range(len(es)):
                es.input_ids[i], es.labels[i] = prefix_control(es.input_ids[i], es.labels[i], a_id, bos, mask_next=True)
        n = max(1, len(scores))
        stats.update(
            {
                "aligned_token": s.aligned_token,
                "misaligned_token": s.misaligned_token,
                "control_token_ids": [a_id, m_id],
                "examples_aligned": sum(c and a for c, a in zip(conditioned, aligned)),
                "examples_misaligned": sum(c and not a for c, a in zip(conditioned, aligned)),
                "examples_unconditioned": len(scores) - sum(conditioned),
            }
        )
        stats["aligned_fraction"] = stats["examples_aligned"] / n
    return PHFData(
        train_set=train_set,
        eval_set=eval_set,
        scores=torch.tensor(scores, dtype=torch.float32),
        aligned=torch.tensor(aligned, dtype=torch.bool),
        conditioned=torch.tensor(conditioned, dtype=torch.bool),
        stats=stats,
    )
