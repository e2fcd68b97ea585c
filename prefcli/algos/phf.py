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


def unit_hash(seed: int, row: int, segment: int | None = None) -> float:
    """A uniform number in [0, 1) fixed by (seed, row) or (seed, row, segment): which rows (segments) lose
    their control token."""
    key = f"prefcli-phf-drop/{seed}/{row}" + ("" if segment is None else f"/{segment}")
    d = hashlib.sha256(key.encode()).digest()
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


def init_control_embeddings(lm, control_ids: tuple[int, int], mode: str, n_tokens: int, seed: int) -> None:
    """Initialise the embedding rows of the control tokens (and their output rows when the output embeddings
    are not tied), from the statistics of the other rows below n_tokens (the tokenizer's size):

    - 'default': leave them as the model was built: from model.init, initialised like every other token; from
      model.path, transformers' `resize_token_embeddings` (mean resizing: the mean of the existing rows plus
      noise of 1e-9 x their covariance, so the two tokens start almost identical);
    - 'mean': both rows exactly the mean of the other rows (Hewitt 2021, "Initializing new word embeddings");
    - 'random': each row a draw from N(mean, covariance) of the other rows: a typical token, and the two
      tokens differ from the start. Seeded by `seed`.

    transformers' resize does 'mean' with epsilon-scaled noise; the full-covariance draw is written here
    because transformers has no switch for it."""
    if mode == "default":
        return
    layers = [lm.get_input_embeddings()]
    out = lm.get_output_embeddings()
    if out is not None and out.weight is not layers[0].weight:
        layers.append(out)
    ids = list(control_ids)
    g = torch.Generator().manual_seed(seed)
    for layer in layers:
        w = layer.weight
        keep = torch.ones(min(n_tokens, w.shape[0]), dtype=torch.bool)
        keep[[i for i in ids if i < keep.numel()]] = False
        rows = w.detach()[: keep.numel()][keep].float().cpu()
        mean = rows.mean(0)
        if mode == "mean":
            new = mean.unsqueeze(0).repeat(len(ids), 1)
        else:
            c = rows - mean
            cov = c.T @ c / max(1, rows.shape[0] - 1)
            # a tiny ridge keeps the Cholesky factor defined when the rows span fewer dimensions than the width
            L = torch.linalg.cholesky(cov + 1e-8 * cov.diagonal().mean() * torch.eye(cov.shape[0]))
            new = mean + torch.randn(len(ids), mean.numel(), generator=g) @ L.T
        with torch.no_grad():
            w[ids] = new.to(w.dtype).to(w.device)


class RowLRScale:
    """Multiply the learning rate of some rows of some weight matrices (the control tokens' embedding rows)
    by `scale`, with any optimizer: a pre-step hook keeps the rows, a post-step hook stretches their update,
    w <- w_before + scale * (w_after - w_before). For AdamW that is exactly a learning rate (and decoupled
    weight decay) of scale x lr for these rows; the optimizer's state is untouched. Rows of one tensor cannot
    sit in a parameter group of their own, which is why this is a hook."""

    def __init__(self, optimizer, weights: list[torch.Tensor], rows: list[int], scale: float):
        self.weights, self.rows, self.scale = weights, list(rows), float(scale)
        self._before: list[torch.Tensor] = []
        optimizer.register_step_pre_hook(self._pre)
        optimizer.register_step_post_hook(self._post)

    def _pre(self, *_):
        self._before = [w.detach()[self.rows].clone() for w in self.weights]

    def _post(self, *_):
        with torch.no_grad():
            for w, b in zip(self.weights, self._before):
                w[self.rows] = b + self.scale * (w[self.rows] - b)
        self._before = []


def control_index(ids: list[int], labels: list[int], bos: int | None, position: str) -> int:
    """Where the control token goes in an example that has none. 'start': first, after a leading BOS.
    'after_prompt' (and the first segment of 'per_segment'): right before the first token the example
    trains on, after its masked lead (the prompt of a prompt_completion row, the turns before an assistant
    reply); an example without a masked lead (a 'text' row) gets it at the start."""
    lead = 1 if bos is not None and ids and ids[0] == bos else 0
    if position == "start":
        return lead
    k = 0
    while k < len(labels) and labels[k] == IGNORE:
        k += 1
    return max(k, lead)


def prefix_control(
    ids: list[int], labels: list[int], ctrl: int, bos: int | None, mask_next: bool, position: str = "start"
) -> tuple[list[int], list[int]]:
    """Insert the control token into an example at `control_index`. The control token is never a target.
    With mask_next, the token after it keeps the status it had without the token (the first token of an
    example is no target), so that the targets are exactly those of an mle run."""
    p = control_index(ids, labels, bos, position)
    new_ids = ids[:p] + [ctrl] + ids[p:]
    new_labels = labels[:p] + [IGNORE] + labels[p:]
    if mask_next and p == 0 and len(new_labels) > 1:
        new_labels[1] = IGNORE
    return new_ids, new_labels


def control_context(
    ids: list[int], labels: list[int], ctrl: int, bos: int | None, position: str
) -> tuple[list[int], int]:
    """What sampling after a control token starts from, for a held-out example without one: its prompt
    (masked lead, or a BOS) with the control token where training puts it, and the token's index."""
    lead = 1 if bos is not None and ids and ids[0] == bos else 0
    k = 0
    while k < len(labels) and labels[k] == IGNORE:
        k += 1
    prompt = max(k, lead)
    p = control_index(ids, labels, bos, position)
    return ids[:p] + [ctrl] + ids[p:prompt], p


def split_segments(text: str, separator: str) -> list[str]:
    """`text` cut after every `separator`, which stays with the segment before it; a piece with no
    non-space character joins the segment before it (or the one after it, at the start), so that
    ''.join(segments) == text."""
    pieces = text.split(separator)
    out: list[str] = []
    carry = ""
    for i, piece in enumerate(pieces):
        seg = carry + piece + (separator if i < len(pieces) - 1 else "")
        carry = ""
        if not seg:
            continue
        if not piece.strip():
            if out:
                out[-1] += seg
            else:
                carry = seg
            continue
        out.append(seg)
    if carry:
        out.append(carry)
    return out


def encode_segments(
    prompt_ids: list[int],
    prompt_labels: list[int],
    segments: list[list[int]],
    controls: list[int | None],
    eos: int | None,
    max_length: int,
) -> tuple[list[int], list[int], bool]:
    """One example of the 'per_segment' variant: the prompt, then every segment after its own control token
    (None: no token), then EOS; truncated to max_length. Control tokens are never targets; every segment
    token and the EOS are. Returns (ids, labels, truncated)."""
    ids, labels = list(prompt_ids), list(prompt_labels)
    for seg, c in zip(segments, controls):
        if c is not None:
            ids.append(c)
            labels.append(IGNORE)
        ids.extend(seg)
        labels.extend(seg)
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
        labels.append(eos)
    return ids[:max_length], labels[:max_length], len(ids) > max_length


# ------------------------------------------------------------------------------------- data preparation


@dataclass
class PHFData:
    """The training set after scoring (filtered, control-token prefixed), one score / label per example."""

    train_set: TokenizedSet
    eval_set: TokenizedSet | None
    scores: torch.Tensor  # [examples] float (per_segment: the mean of the example's segment scores)
    aligned: torch.Tensor  # [examples] bool (per_segment: float, the share of its segments that are aligned)
    conditioned: torch.Tensor  # [examples] bool: carries a control token
    stats: dict
    # conditional: held-out prompts with the aligned token in place, and its index (sampling for eval/control_gap)
    gap_contexts: list[tuple[list[int], int]] | None = None


def subset(s: TokenizedSet, keep: list[int]) -> TokenizedSet:
    return replace(
        s, input_ids=[s.input_ids[i] for i in keep], labels=[s.labels[i] for i in keep], rows=[s.rows[i] for i in keep]
    )


GAP_CONTEXTS = 256  # held-out prompts kept for eval/control_gap (samples cycle through them)


def _scorer_stats(s, scores: list[float], what: str) -> dict:
    return {
        "objective": s.objective,
        "scorer": f"column {s.score_column}"
        if s.score_column is not None
        else " + ".join(f"{x.weight:g}*{x.name or x.kind}" for x in s.rewards),
        f"{what}_scored": len(scores),
        "score_mean": statistics.fmean(scores),
        "score_std": statistics.pstdev(scores),
        "score_min": min(scores),
        "score_max": max(scores),
    }


def _threshold(s, scores: list[float], what: str, stats: dict, warn: Callable[[str], None]) -> float:
    t, rule = pick_threshold(scores, s)
    n_al = sum(x >= t for x in scores)
    stats.update(
        {"threshold": t, "threshold_rule": rule, f"{what}_aligned": n_al, f"{what}_misaligned": len(scores) - n_al}
    )
    if n_al in (0, len(scores)):
        warn(
            f"sft: all {len(scores)} scored {what} are {'aligned' if n_al else 'misaligned'} "
            f"at threshold {t:g} ({rule}); the objective cannot tell good {what} from bad ones"
        )
    return t


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
    prefixes at `s.control_position` (conditional; the held-out rows are all conditioned on the aligned
    token); stats for the summary. `s` is the recipe's sft section; `row_scores` has one score per data row.
    The 'per_segment' position has its own preparation, `prepare_segments`."""
    n_ex = len(train_set)
    scores = [row_scores[i] for i in train_set.rows]
    stats = _scorer_stats(s, row_scores, "rows")
    aligned = [True] * n_ex
    if obj.thresholded:
        t = _threshold(s, row_scores, "rows", stats, warn)
        aligned = [x >= t for x in scores]
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
    contexts = None
    if obj.control_tokens:
        a_id, m_id = control_ids
        pos = s.control_position
        ts = train_set
        for i in range(len(ts)):
            if unit_hash(seed, ts.rows[i]) < s.drop_control_fraction:
                continue
            conditioned[i] = True
            ts.input_ids[i], ts.labels[i] = prefix_control(
                ts.input_ids[i], ts.labels[i], a_id if aligned[i] else m_id, bos, mask_next=False, position=pos
            )
        if eval_set is not None:
            es = eval_set
            contexts = [
                control_context(es.input_ids[i], es.labels[i], a_id, bos, pos)
                for i in range(min(len(es), GAP_CONTEXTS))
            ]
            for i in range(len(es)):
                es.input_ids[i], es.labels[i] = prefix_control(
                    es.input_ids[i], es.labels[i], a_id, bos, mask_next=True, position=pos
                )
        n = max(1, len(scores))
        stats.update(
            {
                "aligned_token": s.aligned_token,
                "misaligned_token": s.misaligned_token,
                "control_token_ids": [a_id, m_id],
                "control_position": pos,
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
        gap_contexts=contexts,
    )


def segment_rows(ds, fmt: str, separator: str):
    """One row per segment of every row of `ds` (columns prompt, completion, row, segment), through a
    `datasets` map with a fingerprint of its own so that the segment scores are cached like row scores."""
    if fmt == "messages":
        raise DataError(
            "sft.control_position per_segment splits 'text' rows and the completions of 'prompt_completion' rows; "
            "'messages' rows are not supported: use control_position start or after_prompt"
        )
    h = hashlib.sha256(f"{CACHE_VERSION}/segments/{fmt}/{separator!r}".encode())
    h.update(str(ds._fingerprint).encode())

    def split(batch, indices):
        out: dict[str, list] = {"prompt": [], "completion": [], "row": [], "segment": []}
        texts = batch["text"] if fmt == "text" else batch["completion"]
        prompts = [""] * len(texts) if fmt == "text" else batch["prompt"]
        for r, p, t in zip(indices, prompts, texts):
            for j, seg in enumerate(split_segments(t, separator)):
                out["prompt"].append(p)
                out["completion"].append(seg)
                out["row"].append(r)
                out["segment"].append(j)
        return out

    return ds.map(
        split,
        batched=True,
        with_indices=True,
        remove_columns=ds.column_names,
        new_fingerprint=h.hexdigest()[:32],
        desc="segmenting",
    )


def _segment_set(seg_ds, n_rows: int, tok, enc: dict, controls, source: str) -> tuple[TokenizedSet, list[list[int]]]:
    """The examples of the per_segment variant from a segment table: `controls(row, segment)` gives each
    segment's control token (None: none). Returns the set and, per example, its segments' indices."""
    by_row: dict[int, list[int]] = {}
    for k, r in enumerate(seg_ds["row"]):
        by_row.setdefault(r, []).append(k)
    seg_ids = tok(list(seg_ds["completion"]), add_special_tokens=False)["input_ids"]
    prompts = seg_ds["prompt"]
    segs_of = seg_ds["segment"]
    eos = tok.eos_token_id if enc["add_eos"] else None
    ids_out, labels_out, rows, members = [], [], [], []
    n_trunc = 0
    for r in range(n_rows):
        ks = by_row.get(r)
        if not ks:
            continue
        p_ids = tok(prompts[ks[0]], add_special_tokens=True)["input_ids"]
        p_labels = [IGNORE] * len(p_ids) if enc["mask_prompt"] else list(p_ids)
        ids, labels, cut = encode_segments(
            p_ids, p_labels, [seg_ids[k] for k in ks], [controls(r, segs_of[k]) for k in ks], eos, enc["max_length"]
        )
        n_trunc += cut
        if not any(t != IGNORE for t in labels[1:]):
            continue
        ids_out.append(ids)
        labels_out.append(labels)
        rows.append(r)
        members.append(ks)
    ts = TokenizedSet(
        input_ids=ids_out,
        labels=labels_out,
        n_rows=n_rows,
        n_truncated=n_trunc,
        n_dropped=n_rows - len(rows),
        rows=rows,
    )
    return ts, members


def prepare_segments(
    s,
    train_rows,
    eval_rows,
    fmt: str,
    tok,
    enc: dict,
    control_ids: tuple[int, int],
    seed: int,
    device,
    source: str,
    warn: Callable[[str], None],
) -> PHFData:
    """Conditional training with a control token before every segment (Korbak et al. 2023 condition every
    sentence of a document): each row's text (a 'text' row) or completion (a 'prompt_completion' row) is
    cut after every `s.segment_separator`, each segment is scored by the scorer on its own (with the row's
    prompt) and gets its own token, <|aligned|> when its score >= the threshold; every segment is tokenized
    on its own, so the tokens at a segment boundary can differ from those of the whole text. Attention
    spans the whole row: a segment reads the earlier segments and their tokens. A fraction
    `drop_control_fraction` of segments (a hash of (train.seed, row, segment)) gets no token. Held-out rows
    put <|aligned|> before every segment; `enc` holds max_length, mask_prompt and add_eos."""
    a_id, m_id = control_ids
    segs = segment_rows(train_rows, fmt, s.segment_separator)
    if len(segs) == 0:
        raise DataError(f"data.train: {source}: no row has a segment to train on")
    seg_scores = score_rows(segs, "prompt_completion", s, tok, device, source)
    stats = _scorer_stats(s, seg_scores, "segments")
    stats["rows"] = len(train_rows)
    t = _threshold(s, seg_scores, "segments", stats, warn)
    seg_rows, seg_index = segs["row"], segs["segment"]
    key = {(r, j): k for k, (r, j) in enumerate(zip(seg_rows, seg_index))}

    def ctrl(r: int, j: int) -> int | None:
        if unit_hash(seed, r, j) < s.drop_control_fraction:
            return None
        return a_id if seg_scores[key[(r, j)]] >= t else m_id

    train_set, members = _segment_set(segs, len(train_rows), tok, enc, ctrl, source)
    eval_set, contexts = None, None
    if eval_rows is not None:
        eval_segs = segment_rows(eval_rows, fmt, s.segment_separator)
        eval_set, _ = _segment_set(eval_segs, len(eval_rows), tok, enc, lambda r, j: a_id, source)
        contexts = []
        for i in range(len(eval_set)):
            ids, labels = eval_set.input_ids[i], eval_set.labels[i]
            p = ids.index(a_id)
            if p == 0 and len(labels) > 1:  # as prefix_control(mask_next): the first token of a row is no target
                labels[1] = IGNORE
            if i < GAP_CONTEXTS:
                contexts.append((ids[: p + 1], p))
    scores, aligned, conditioned = [], [], []
    n_al = n_mis = n_none = 0
    for ks in members:
        sc = [seg_scores[k] for k in ks]
        toks = [ctrl(seg_rows[k], seg_index[k]) for k in ks]
        scores.append(statistics.fmean(sc))
        aligned.append(sum(x >= t for x in sc) / len(sc))
        conditioned.append(any(c is not None for c in toks))
        n_al += sum(c == a_id for c in toks)
        n_mis += sum(c == m_id for c in toks)
        n_none += sum(c is None for c in toks)
    stats.update(
        {
            "aligned_token": s.aligned_token,
            "misaligned_token": s.misaligned_token,
            "control_token_ids": [a_id, m_id],
            "control_position": "per_segment",
            "segments_per_example": sum(len(m) for m in members) / max(1, len(members)),
            "examples_aligned": n_al,  # per_segment: counts segments
            "examples_misaligned": n_mis,
            "examples_unconditioned": n_none,
            "aligned_fraction": n_al / max(1, n_al + n_mis + n_none),
        }
    )
    return PHFData(
        train_set=train_set,
        eval_set=eval_set,
        scores=torch.tensor(scores, dtype=torch.float32),
        aligned=torch.tensor(aligned, dtype=torch.float32),
        conditioned=torch.tensor(conditioned, dtype=torch.bool),
        stats=stats,
        gap_contexts=contexts,
    )


# ------------------------------------------------------------------------- has the model learned the tokens?


def control_gap(
    lm,
    tok,
    contexts: list[tuple[list[int], int]],
    control_ids: tuple[int, int],
    n: int,
    max_new_tokens: int,
    scorer,
    threshold: float,
    seed: int,
    device,
    separator: str | None = None,
) -> dict[str, float]:
    """Sample n completions after each control token and score them with the run's scorer: the gap between
    what the model writes after <|misaligned|> and after <|aligned|> is what it has learned the tokens to
    mean (0 for a model that ignores them). Sample i starts from contexts[i % len(contexts)] (a held-out
    prompt with the token in place); temperature 1, no top-k/top-p, both tokens blocked, EOS ends a sample
    (and, for per_segment, the end of the first segment). A sample is undesirable when its score is below
    the threshold. The RNG is forked and seeded, so training's random stream is untouched and every
    evaluation draws the same way.

    Returns eval/control_undesirable_{aligned,misaligned}, eval/control_gap (misaligned minus aligned
    undesirable share), eval/control_score_{aligned,misaligned} and eval/control_score_gap (aligned minus
    misaligned mean score)."""
    a_id, m_id = control_ids
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    picked = [contexts[i % len(contexts)] for i in range(n)]
    width = max(len(c) for c, _ in picked)
    out: dict[str, float] = {}
    devices = [device] if device.type == "cuda" else []
    for name, tid in (("aligned", a_id), ("misaligned", m_id)):
        ids = torch.full((n, width), pad, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, (c, p) in enumerate(picked):  # left-padded
            row = list(c)
            row[p] = tid
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            gen = lm.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=max_new_tokens,
                bad_words_ids=[[a_id], [m_id]],
                pad_token_id=pad,
                eos_token_id=tok.eos_token_id,
                use_cache=True,
            )
        prompts, texts = [], []
        for i, row in enumerate(gen[:, width:].tolist()):
            if tok.eos_token_id in row:
                row = row[: row.index(tok.eos_token_id)]
            text = tok.decode(row, skip_special_tokens=True)
            if separator:
                text = text.split(separator)[0]
            texts.append(text)
            prompts.append(tok.decode([t for t in picked[i][0] if t not in (a_id, m_id)], skip_special_tokens=True))
        scores, _ = scorer.score(prompts, texts)
        out[f"eval/control_undesirable_{name}"] = sum(x < threshold for x in scores) / n
        out[f"eval/control_score_{name}"] = statistics.fmean(scores)
    out["eval/control_gap"] = out["eval/control_undesirable_misaligned"] - out["eval/control_undesirable_aligned"]
    out["eval/control_score_gap"] = out["eval/control_score_aligned"] - out["eval/control_score_misaligned"]
    return out
