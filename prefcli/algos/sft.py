"""`prefcli sft`: supervised fine-tuning, pretraining from scratch, and pretraining with human preferences.

Objectives (registry `OBJECTIVES`, chosen by `sft.objective`). x_t is a target token, N the number of
target tokens in the whole accumulated global batch (the loop divides by it), R the score of the row
(segment) that x_t belongs to, t the threshold (aligned = R >= t):

- `mle`: next-token cross-entropy (Radford et al. 2018; Bengio et al. 2003)
      L = -(1/N) sum_t log p(x_t | x_<t)
- the five objectives of Korbak et al. 2023, "Pretraining Language Models with Human Preferences"
  (ICML; tomekkorbak/pretraining-with-human-feedback, apo/objectives.py), one row = one segment:
  - `filter`       MLE on aligned rows only (rows with R < t are dropped before training)
  - `conditional`  MLE on rows prefixed with <|aligned|> (R >= t) or <|misaligned|> (R < t); a
                   fraction of rows (1%) gets no token; generation starts after <|aligned|> and
                   both control tokens are blocked (bad_words_ids in the saved generation_config)
  - `unlikelihood` L = (1/N) sum_t [ 1{R>=t} (-log p(x_t)) + alpha 1{R<t} (-log(1 - p(x_t))) ]
                   (Welleck et al. 2020), alpha = 1
  - `rwr`          L = (1/N) sum_t exp(R/beta) (-log p(x_t)), beta = 10
                   (reward-weighted regression, Peters & Schaal 2007)
  - `awr`          L = (1/N) sum_t [ alpha min(exp((R - V_t)/beta), 1000) (-log p(x_t))
                                     + (1 - alpha) (V_t - R)^2 ],  alpha = 0.5, beta = 10
                   (advantage-weighted regression, Peng et al. 2019); V_t is a linear value head on
                   the hidden state that predicts x_t, trained by the MSE term; the weight uses it
                   detached.

Held-out perplexity: PPL = exp(sum of target-token NLL / number of target tokens), accumulated as
sums over the whole held-out set (not a mean of batch means). A conditional run conditions every
held-out row on <|aligned|> and scores the same target tokens as an mle run would.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import statistics
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch
from torch import nn

from ..engine.data import (
    CACHE_VERSION,
    FORMAT_COLUMNS,
    StepSchedule,
    TokenizedSet,
    check_values,
    detect_format,
    iterate_eval,
    load_rows,
    move,
    pack_rows,
    packed_batch,
    pad_batch,
    shard_for_rank,
    split_eval,
    split_micro,
    tokenize_sft,
    tokenizer_fingerprint,
    unpad_if_full,
)
from ..engine.debias import apply_debias
from ..engine.logprobs import IGNORE
from ..engine.loop import Group, Micro, Plan
from ..engine.models import (
    PolicyLM,
    apply_lora,
    build_causal_lm,
    load_tokenizer,
    save_hf,
    trainable_parameters,
    unwrap_lm,
)
from ..errors import DataError
from ..runner import RunContext

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


def mle_loss(model, batch) -> tuple[torch.Tensor, dict]:
    """Summed next-token cross-entropy over positions with a target (see module docstring)."""
    loss_sum = model(batch["input_ids"], batch["targets"], batch["attention_mask"], batch["position_ids"], mode="ce")
    return loss_sum, {}


def filter_loss(model, batch) -> tuple[torch.Tensor, dict]:
    """Korbak et al. 2023, filtering: MLE on the rows whose score is >= the threshold,

        L = -(1/N) sum_{t : R_t >= threshold} log p(x_t | x_<t)

    The rows below it never reach a batch (SFTTask drops them), so the loss is mle_loss."""
    loss_sum, _ = mle_loss(model, batch)
    return loss_sum, _example_metrics(batch)


def conditional_loss(model, batch) -> tuple[torch.Tensor, dict]:
    """Korbak et al. 2023, conditional training: MLE on rows prefixed with a control token chosen by the
    row's score (the prefix is part of the data, put there by SFTTask),

        L = -(1/N) sum_t log p(x_t | c, x_<t),   c = <|aligned|> if R >= threshold else <|misaligned|>

    so the model learns p(x | <|aligned|>) and p(x | <|misaligned|>); c itself is never a target."""
    loss_sum, _ = mle_loss(model, batch)
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


OBJECTIVES: dict[str, Objective] = {
    "mle": Objective(mle_loss),
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
        h = self.policy.hidden(input_ids, attention_mask, position_ids)
        lp, _ = self.policy.head_logprobs(h, targets)
        return lp, self.value_head(h.float()).squeeze(-1)


def count_targets(batch: dict) -> int:
    return int((batch["targets"] != -100).sum())


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
    a reward model's folder, a human-score file), so that editing one rescoring the data."""
    h = hashlib.sha256()
    for spec in specs:
        h.update(spec.model_dump_json().encode())
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
        elif kind == "model" and os.path.isdir(spec.path):
            for f in sorted(os.listdir(spec.path)):
                h.update(f"{f}={_file_digest(os.path.join(spec.path, f), content=False)}".encode())
        elif kind == "human_scores":
            h.update(_file_digest(spec.path, content=False).encode())
        elif kind == "sentiment":
            from importlib.metadata import PackageNotFoundError, version

            try:
                h.update(version("vaderSentiment").encode())
            except PackageNotFoundError:
                pass
    return h.hexdigest()[:16]


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

    from ..rewards import build_rewards

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


def _unit_hash(seed: int, row: int) -> float:
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


def _subset(s: TokenizedSet, keep: list[int]) -> TokenizedSet:
    return replace(
        s, input_ids=[s.input_ids[i] for i in keep], labels=[s.labels[i] for i in keep], rows=[s.rows[i] for i in keep]
    )


class SFTTask:
    def __init__(self, ctx: RunContext):
        r = ctx.recipe
        self.ctx = ctx
        self.rt = rt = ctx.rt
        self.cfg = r
        d = r.data
        s = r.sft
        self.objective = obj = OBJECTIVES[s.objective]
        self.tok = tok = load_tokenizer(r.model)
        self.control_ids: tuple[int, int] | None = None
        if obj.control_tokens:  # before the model is built, so that its embeddings are resized to the tokenizer
            self.control_ids = add_control_tokens(tok, s.aligned_token, s.misaligned_token)
        train_rows = load_rows(d.train, what="data.train")
        self.format = fmt = detect_format(train_rows.column_names, d.format)
        missing = [c for c in FORMAT_COLUMNS[fmt] if c not in train_rows.column_names]
        if missing:
            raise DataError(
                f"data.train: {d.train.path}: format '{fmt}' needs column(s) {', '.join(missing)} "
                f"(columns: {', '.join(train_rows.column_names)})"
            )
        eval_rows = None
        if d.eval is not None:
            eval_rows = load_rows(d.eval, required=FORMAT_COLUMNS[fmt], what="data.eval")
        elif d.eval_fraction > 0:
            train_rows, eval_rows = split_eval(train_rows, d.eval_fraction, r.train.seed)
        train_rows, eval_rows, self.debias = apply_debias(train_rows, eval_rows, d.debias, warn=ctx.warn)
        row_scores = None
        if obj.scored:
            check_values(train_rows, FORMAT_COLUMNS[fmt], d.train.path)
            if not rt.is_main:
                rt.barrier()  # rank 0 scores first and fills the cache; the others read it
            row_scores = score_rows(train_rows, fmt, s, tok, rt.device, d.train.path)
            if rt.is_main:
                rt.barrier()
        # a control token takes one position: tokenize to max_length - 1 so that the prefixed example fits
        reserve = 1 if obj.control_tokens else 0
        enc = dict(
            fmt=fmt, max_length=d.max_length - reserve, mask_prompt=d.mask_prompt and fmt != "text", add_eos=d.add_eos
        )
        self.train_set = tokenize_sft(train_rows, tok, source=d.train.path, **enc)
        self.eval_set = (
            tokenize_sft(eval_rows, tok, source=(d.eval.path if d.eval else d.train.path), **enc)
            if eval_rows is not None
            else None
        )
        if len(self.train_set) == 0:
            raise DataError(
                f"data.train: {d.train.path}: no example has a token to train on after masking and "
                f"truncation to max_length={d.max_length} (prompts longer than max_length?)"
            )
        for name, st in (("data.train", self.train_set), ("data.eval", self.eval_set)):
            if st is not None and st.n_truncated:
                room = " less one for the control token" if reserve else ""
                ctx.warn(
                    f"{name}: {st.n_truncated} of {st.n_rows} examples were longer than max_length={d.max_length} "
                    f"tokens{room} and were truncated"
                )
            if st is not None and st.n_dropped:
                ctx.warn(f"{name}: {st.n_dropped} of {st.n_rows} examples had no trainable token left and were dropped")
        self.phf_stats: dict | None = None
        self._prepare_phf(row_scores)

        lm = build_causal_lm(r.model, tok, rt, seed=r.train.seed, smoke=ctx.smoke)
        if r.train.gradient_checkpointing:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            lm.config.use_cache = False
        if r.model.lora is not None:
            lm = apply_lora(lm, r.model.lora)
        self.lm = lm
        self.policy = PolicyLM(lm, rt)
        trained: nn.Module = self.policy
        if obj.value_head:
            hidden = unwrap_lm(lm).get_output_embeddings().weight.shape[1]
            trained = ValuePolicy(self.policy, hidden).to(rt.device)
        knobs = {arg: getattr(s, field) for arg, field in (obj.knobs or {}).items()}
        self.loss_fn = partial(obj.loss, **knobs) if knobs else obj.loss

        t = r.train
        self.global_batch = t.batch_size * t.grad_accum_steps * rt.world_size
        if d.packing:
            order = StepSchedule(len(self.train_set), 1, t.seed, d.shuffle).order(0)
            self.rows = pack_rows(order, self.train_set, d.max_length)
        else:
            self.rows = None
        n_units = len(self.rows) if self.rows is not None else len(self.train_set)
        if n_units < rt.world_size:
            raise DataError(f"data.train: {len(self.train_set)} examples cannot feed {rt.world_size} processes")
        self.schedule = StepSchedule(n_units, self.global_batch, t.seed, d.shuffle)
        spe = self.schedule.steps_per_epoch()
        self._total = t.max_steps if t.max_steps is not None else max(1, math.ceil((t.epochs or 1.0) * spe))
        self.groups = {"policy": Group("policy", trained, rt, t, self._total)}
        self.epoch = 0
        self.index = 0

    # ---------------------------------------------------------------- preference data

    def _prepare_phf(self, row_scores: list[float] | None) -> None:
        """Scores per example, the threshold and labels, filtering, control tokens; stats for the summary."""
        obj, s, d = self.objective, self.cfg.sft, self.cfg.data
        if not obj.scored:
            return
        n_ex = len(self.train_set)
        scores = [row_scores[i] for i in self.train_set.rows]
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
                self.ctx.warn(
                    f"sft: all {len(row_scores)} scored rows are {'aligned' if n_al else 'misaligned'} "
                    f"at threshold {t:g} ({rule}); the objective cannot tell good rows from bad ones"
                )
        if obj.keep_aligned_only:
            keep = [i for i in range(n_ex) if aligned[i]]
            if not keep:
                raise DataError(
                    f"data.train: {d.train.path}: sft.objective filter keeps no row: every score is below "
                    f"the threshold {stats['threshold']:g}"
                )
            self.train_set = _subset(self.train_set, keep)
            scores = [scores[i] for i in keep]
            aligned = [True] * len(keep)
            stats.update({"examples_kept": len(keep), "examples_filtered": n_ex - len(keep)})
        conditioned = [False] * len(scores)
        if obj.control_tokens:
            a_id, m_id = self.control_ids
            bos = self.tok.bos_token_id
            ts = self.train_set
            seed = self.cfg.train.seed
            for i in range(len(ts)):
                if _unit_hash(seed, ts.rows[i]) < s.drop_control_fraction:
                    continue
                conditioned[i] = True
                ts.input_ids[i], ts.labels[i] = prefix_control(
                    ts.input_ids[i], ts.labels[i], a_id if aligned[i] else m_id, bos, mask_next=False
                )
            if self.eval_set is not None:
                es = self.eval_set
                for i in range(len(es)):
                    es.input_ids[i], es.labels[i] = prefix_control(
                        es.input_ids[i], es.labels[i], a_id, bos, mask_next=True
                    )
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
        self.ex_scores = torch.tensor(scores, dtype=torch.float32)
        self.ex_aligned = torch.tensor(aligned, dtype=torch.bool)
        self.ex_conditioned = torch.tensor(conditioned, dtype=torch.bool)
        self.phf_stats = stats

    # ---------------------------------------------------------------- Task protocol

    def total_steps(self) -> int:
        return self._total

    def describe(self) -> dict:
        s = self.train_set
        data = {
            "format": self.format,
            "train_rows": s.n_rows,
            "train_examples": len(s),
            "train_tokens": s.n_tokens(),
            "truncated": s.n_truncated,
            "dropped": s.n_dropped,
            "packed_rows": len(self.rows) if self.rows is not None else None,
            "eval_examples": len(self.eval_set) if self.eval_set is not None else 0,
            "debias": self.debias,
        }
        if self.phf_stats is not None:
            data["phf"] = self.phf_stats
        return {
            "data": data,
            "model": {
                "parameters": sum(p.numel() for p in self.groups["policy"].raw.parameters()),
                "trainable_parameters": trainable_parameters(self.groups["policy"].raw),
            },
        }

    def _collate(self, items: list[int]) -> tuple[dict, int, int]:
        """A device batch and, counted on the host (no GPU sync), its target and token counts."""
        pad = self.tok.pad_token_id
        if self.rows is not None:
            members = [self.rows[i] for i in items]
            batch = packed_batch(members, self.train_set, pad, self.cfg.data.max_length)
            tokens = sum(len(self.train_set.input_ids[i]) for m in members for i in m)
        else:
            members = [[i] for i in items]
            batch = pad_batch(
                [self.train_set.input_ids[i] for i in items], [self.train_set.labels[i] for i in items], pad
            )
            tokens = int(batch["attention_mask"].sum())
        if self.objective.scored:  # before unpadding: examples are found where position ids restart
            batch.update(self._example_fields(batch, members))
        if self.rows is None:
            batch = unpad_if_full(batch)
        return move(batch, self.rt.device), count_targets(batch), tokens

    def _example_fields(self, batch: dict, members: list[list[int]]) -> dict:
        """Per-example scores and labels of a batch, and the example of every target position
        (example_index, -1 where there is none). Examples start where position_ids restart at 0, both
        in padded rows (one example each) and in packed rows (several)."""
        pos = batch["position_ids"]
        seg = (pos == 0).long().cumsum(-1) - 1
        flat = [i for m in members for i in m]
        offsets = torch.tensor([0] + [len(m) for m in members[:-1]]).cumsum(0).unsqueeze(1)
        counts = torch.tensor([len(m) for m in members]).unsqueeze(1)
        idx = torch.where((seg < counts) & (batch["targets"] != IGNORE), offsets + seg, torch.full_like(seg, -1))
        sel = torch.tensor(flat, dtype=torch.long)
        return {
            "example_index": idx,
            "scores": self.ex_scores[sel],
            "aligned": self.ex_aligned[sel],
            "conditioned": self.ex_conditioned[sel],
        }

    def _lengths(self, items: list[int]) -> list[int] | None:
        if self.rows is not None:
            return None
        return [len(self.train_set.input_ids[i]) for i in items]

    def plan_for(self, items: list[int]) -> Plan:
        rt = self.rt
        mine = shard_for_rank(items, rt.rank, rt.world_size)
        n_micro = max(1, min(self.cfg.train.grad_accum_steps, len(items) // rt.world_size))
        micro = []
        for part in split_micro(mine, n_micro, self._lengths(mine)):
            b, n, tokens = self._collate(part)
            micro.append(Micro(batch=b, n=n, tokens=tokens))
        return Plan(group="policy", micro=micro, loss_fn=self.loss_fn, name="sft")

    def plans(self, start_step: int) -> Iterator[Plan]:
        while True:
            steps = [s for s in self.schedule.steps(self.epoch) if len(s) >= self.rt.world_size]
            while self.index < len(steps):
                items = steps[self.index]
                self.index += 1
                yield self.plan_for(items)
            self.epoch += 1
            self.index = 0

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "index": self.index,
            "n_units": self.schedule.n_examples,
            "global_batch": self.global_batch,
        }

    def load_state_dict(self, state: dict, extra: dict) -> None:
        if state.get("n_units") != self.schedule.n_examples or state.get("global_batch") != self.global_batch:
            self.ctx.warn(
                "the data or batch size changed since the checkpoint; the data order will not match the "
                "interrupted run exactly"
            )
        self.epoch, self.index = int(state["epoch"]), int(state["index"])

    def extra_tensors(self) -> dict:
        return {}

    def has_eval(self) -> bool:
        return self.eval_set is not None and len(self.eval_set) > 0

    def evaluate(self) -> dict:
        rt, s = self.rt, self.eval_set
        tot = torch.zeros(2, dtype=torch.float64, device=rt.device)
        bs = self.cfg.train.batch_size
        for items in iterate_eval(len(s), bs, rt.rank, rt.world_size, self.cfg.train.eval_max_batches):
            if not items:
                continue
            cpu = unpad_if_full(
                pad_batch([s.input_ids[i] for i in items], [s.labels[i] for i in items], self.tok.pad_token_id)
            )
            b = move(cpu, rt.device)
            loss_sum = self.policy(b["input_ids"], b["targets"], b["attention_mask"], b["position_ids"], mode="ce")
            tot[0] += loss_sum.double()
            tot[1] += float(count_targets(cpu))
        rt.all_reduce(tot)
        nll, n = tot.tolist()
        if n == 0:
            return {}
        return {"eval/loss": nll / n, "eval/ppl": math.exp(min(nll / n, 700.0)), "eval/tokens": n}

    def save_final(self, out_dir: Path) -> None:
        if self.control_ids is not None:  # sampling never emits a control token (Korbak et al.: bad_words_ids)
            from transformers import GenerationConfig

            inner = unwrap_lm(self.lm)
            if inner.generation_config is None:
                inner.generation_config = GenerationConfig.from_model_config(inner.config)
            inner.generation_config.bad_words_ids = [[i] for i in self.control_ids]
        save_hf(self.lm, self.tok, out_dir)


def build(ctx: RunContext) -> SFTTask:
    return SFTTask(ctx)
