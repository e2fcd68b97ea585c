"""The policy update of `prefcli rlhf`, on one screen: importance ratio, clipping, KL term, value loss and
the normaliser that turns token losses into one number (docs/algorithms.md, section rlhf).

    rho_t = exp(log pi(y_t) - log pi_old(y_t))                                importance ratio
    pg_t  = max(-A_t rho_t, -A_t clip(rho_t, 1 - eps_low, 1 + eps_high))    clipped surrogate (Schulman 2017)
          + beta k3_t            when the KL is a loss term (GRPO; Shao et al. 2024)
    vf_t  = 1/2 max((V_t - R_t)^2, (clip(V_t, V_old_t +- eps_v) - R_t)^2)    clipped value loss (PPO)
    loss  = normaliser(pg, mask) + c_v sum_t vf_t

Normalisers (`NORMALISERS`): token_mean (sum over tokens / tokens: PPO, DAPO), sequence_mean (each
completion's token mean, summed / completions: GRPO), constant (sum over tokens / (completions x
max_new_tokens): Dr. GRPO). Each returns the summed loss of a micro-batch and its units: the training
loop divides the sum of the whole step (all micro-batches, all ranks) by the units of the whole step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .advantages import kl_per_token


def ppo_clip_loss(logp, old_logp, adv, eps_low: float, eps_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token clipped surrogate max(-A rho, -A clip(rho, 1-eps_low, 1+eps_high)) and whether the
    clipped branch was taken."""
    ratio = torch.exp(logp - old_logp)
    a = -adv * ratio
    b = -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    return torch.maximum(a, b), (b > a)


def clipped_value_loss(values, old_values, returns, eps: float) -> torch.Tensor:
    clipped = old_values + (values - old_values).clamp(-eps, eps)
    return 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)


# How token losses become one number: name -> (summed loss of a micro-batch, its units)
NORMALISERS = {
    "token_mean": lambda per_tok, mask, n_max: ((per_tok * mask).sum(), mask.sum()),
    "sequence_mean": lambda per_tok, mask, n_max: (
        ((per_tok * mask).sum(1) / mask.sum(1).clamp_min(1)).sum(),
        (mask.sum(1) > 0).sum(),
    ),
    "constant": lambda per_tok, mask, n_max: ((per_tok * mask).sum(), torch.tensor(float(mask.shape[0] * n_max))),
}


@dataclass(frozen=True)
class LossParams:
    eps_low: float  # rlhf.clip_eps
    eps_high: float  # rlhf.clip_eps_high, else the algorithm's default, else clip_eps
    beta: float  # KL weight (used here only when the KL is a loss term)
    kl_in_loss: bool  # the algorithm puts beta * k3 into the loss (else the KL is in the reward)
    normaliser: str
    max_new_tokens: int  # the constant normaliser's length
    vf_coef: float
    value_clip_eps: float


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    p: LossParams,
    ref_logp: torch.Tensor | None = None,
    values: torch.Tensor | None = None,
    old_values: torch.Tensor | None = None,
    returns: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """The loss of one micro-batch of a rollout, summed over its units, and its metrics as (sum, count).
    Tensors are [B, N] over completion tokens; `logp` carries the gradient."""
    tokens = mask.sum()
    pg, clipped = ppo_clip_loss(logp, old_logp, adv, p.eps_low, p.eps_high)
    metrics = {
        "policy/clipfrac": ((clipped.float() * mask).sum(), tokens),
        "policy/approx_kl": ((kl_per_token(logp.detach(), old_logp, "k3") * mask).sum(), tokens),
    }
    per_tok = pg
    if ref_logp is not None and p.kl_in_loss and p.beta > 0:
        k3 = kl_per_token(logp, ref_logp, "k3")
        per_tok = per_tok + p.beta * k3
        metrics["kl/k3"] = ((k3.detach() * mask).sum(), tokens)
    loss_sum, _ = NORMALISERS[p.normaliser](per_tok, mask, p.max_new_tokens)
    if values is not None:
        v_sum = (clipped_value_loss(values, old_values, returns, p.value_clip_eps) * mask).sum()
        loss_sum = loss_sum + p.vf_coef * v_sum
        metrics["value/loss"] = (v_sum.detach(), tokens)
    return loss_sum, metrics
