"""The five PHF objectives: their loss terms (pure tensor math), the losses on a batch and their entries of
the SFT objective registry (`SFTObjective`; Korbak et al. 2023; equations in the package docstring)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ...engine.logprobs import IGNORE
from ...engine.models import PolicyLM

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
class SFTObjective:
    """An SFT objective: its loss, the recipe knobs it takes, and what it needs from the data."""

    loss: Callable
    knobs: dict[str, str] | None = None  # loss keyword -> SFTSection field
    scored: bool = False  # every training row gets a score
    keep_aligned_only: bool = False  # rows scoring below the threshold are dropped (filter)
    thresholded: bool = False  # rows are labelled aligned / misaligned by the threshold
    control_tokens: bool = False  # rows are prefixed with a control token (conditional)
    value_head: bool = False  # the policy carries a value head (awr)


PHF_OBJECTIVES: dict[str, SFTObjective] = {
    "filter": SFTObjective(filter_loss, scored=True, thresholded=True, keep_aligned_only=True),
    "conditional": SFTObjective(conditional_loss, scored=True, thresholded=True, control_tokens=True),
    "unlikelihood": SFTObjective(unlikelihood_loss, {"alpha": "unlikelihood_alpha"}, scored=True, thresholded=True),
    "rwr": SFTObjective(rwr_loss, {"beta": "beta"}, scored=True),
    "awr": SFTObjective(
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
