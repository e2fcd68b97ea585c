"""The policy update of `prefcli rlhf`, on one screen: importance ratio, clipping, KL term, value loss and
the normaliser that turns token losses into one number (docs/algorithms.md, section rlhf).

    rho_t = exp(log pi(y_t) - log pi_old(y_t))                                importance ratio
    pg_t  = surrogate (`POLICY_LOSSES`, rlhf.policy_loss):
      clip   max(-A_t rho_t, -A_t clip(rho_t, 1 - eps_low, 1 + eps_high))      Schulman et al. 2017; DAPO clip-higher
      gspo   max(-A_i s_i, -A_i clip(s_i, 1 - eps_low, 1 + eps_high)),          Zheng et al. 2025 (GSPO), section 4
             s_i = exp(mean_t log rho_t)   one length-normalised ratio per completion, clipped per completion
      cispo  -sg(clip(rho_t, 1 - eps_low, 1 + eps_high)) A_t log pi(y_t)        MiniMax 2025 (CISPO), section 3.1
          x w_t                  truncated importance weight pi_old / pi_sampler (`correction.py`, rlhf.is_correction)
          + beta k3_t            when the KL is a loss term (GRPO; Shao et al. 2024)
    vf_t  = 1/2 max((V_t - R_t)^2, (clip(V_t, V_old_t +- eps_v) - R_t)^2)    clipped value loss (PPO)
    loss  = normaliser(pg, mask) + c_v sum_t vf_t

Normalisers (`NORMALISERS`): token_mean (sum over tokens / tokens: PPO, DAPO), sequence_mean (each
completion's token mean, summed / completions: GRPO, GSPO), constant (sum over tokens / (completions x
max_new_tokens): Dr. GRPO). Each returns the summed loss of a micro-batch and its units: the training
loop divides the sum of the whole step (all micro-batches, all ranks) by the units of the whole step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .advantages import kl_per_token
from .correction import importance_weights


def ppo_clip_loss(logp, old_logp, adv, eps_low: float, eps_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token clipped surrogate max(-A rho, -A clip(rho, 1-eps_low, 1+eps_high)) and whether the
    clipped branch was taken."""
    ratio = torch.exp(logp - old_logp)
    a = -adv * ratio
    b = -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    return torch.maximum(a, b), (b > a)


def clip_surrogate(logp, old_logp, adv, mask, eps_low: float, eps_high: float) -> tuple[torch.Tensor, dict]:
    """PPO's token-level clipped surrogate (Schulman et al. 2017, Eq. 7) with DAPO's decoupled bounds
    (Yu et al. 2025, arXiv 2503.14476, section 3.1 "Clip-Higher": eps_high > eps_low). Metrics: the fraction
    of tokens on the clipped branch, and of those clipped at the low (A < 0) and high (A > 0) bound."""
    per_tok, clipped = ppo_clip_loss(logp, old_logp, adv, eps_low, eps_high)
    ratio = torch.exp(logp.detach() - old_logp)
    tokens = mask.sum()
    m = mask.float()
    return per_tok, {
        "policy/clipfrac": ((clipped.float() * mask).sum(), tokens),
        "policy/clipfrac_low": ((((ratio < 1.0 - eps_low) & (adv < 0)).float() * m).sum(), tokens),
        "policy/clipfrac_high": ((((ratio > 1.0 + eps_high) & (adv > 0)).float() * m).sum(), tokens),
    }


def gspo_surrogate(logp, old_logp, adv, mask, eps_low: float, eps_high: float) -> tuple[torch.Tensor, dict]:
    """GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization", arXiv 2507.18071, section 4): one
    importance ratio per completion, length-normalised, s_i = (pi(y_i) / pi_old(y_i))^(1/|y_i|) =
    exp(mean_t log rho_t), clipped per completion: l_i = max(-A_i s_i, -A_i clip(s_i, 1-eps_low, 1+eps_high)).
    A_i is the completion's (sequence-level) advantage. Returned broadcast over the completion's tokens,
    so the per-sequence normaliser gives (1/G) sum_i l_i. The paper's ranges are tiny (3e-4, 4e-4)
    because s_i is a geometric mean. Metric: the fraction of completions clipped."""
    n = mask.sum(1).clamp_min(1)
    log_s = ((logp - old_logp) * mask).sum(1) / n
    s = torch.exp(log_s)
    a_seq = adv[:, 0]
    a = -a_seq * s
    b = -a_seq * s.clamp(1.0 - eps_low, 1.0 + eps_high)
    per_seq = torch.maximum(a, b)
    has = (mask.sum(1) > 0).float()
    return per_seq[:, None].expand_as(logp), {"policy/clipfrac": (((b > a).float() * has).sum(), has.sum())}


def cispo_surrogate(logp, old_logp, adv, mask, eps_low: float, eps_high: float) -> tuple[torch.Tensor, dict]:
    """CISPO (MiniMax 2025, "MiniMax-M1", arXiv 2506.13585, section 3.1): REINFORCE with a clipped,
    stop-gradient importance weight on every token, l_t = -sg(clip(rho_t, 1-eps_low, 1+eps_high)) A_t
    log pi(y_t). Unlike the clip surrogate no token loses its gradient; the weight only bounds it. The
    paper sets no lower bound (eps_low = 1: the weight's floor is 0). Metric: the fraction of tokens whose
    weight was clipped."""
    ratio = torch.exp(logp.detach() - old_logp)
    w = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    return -w * adv * logp, {"policy/clipfrac": (((w != ratio).float() * mask).sum(), mask.sum())}


@dataclass(frozen=True)
class PolicyLoss:
    """A surrogate objective and its defaults: the clip range of its paper, and a normaliser when the
    surrogate fixes one (gspo's loss is per completion)."""

    surrogate: Callable[..., tuple[torch.Tensor, dict]]
    default_clip_low: float
    default_clip_high: float | None  # None: clip_low (symmetric)
    normaliser: str | None = None  # None: the advantage estimator's
    sequence_level: bool = False  # needs one advantage per completion


POLICY_LOSSES: dict[str, PolicyLoss] = {
    "clip": PolicyLoss(clip_surrogate, default_clip_low=0.2, default_clip_high=None),
    # the clip range of the GSPO paper's experiments: left 3e-4, right 4e-4
    "gspo": PolicyLoss(gspo_surrogate, 3e-4, 4e-4, normaliser="sequence_mean", sequence_level=True),
    # MiniMax-M1 sets no lower bound (eps_low = 1: floor 0); the upper cap 1 + 4 = 5 is TRL's recommended
    # epsilon_high for loss_type='cispo' (ScaleRL, arXiv 2510.13786)
    "cispo": PolicyLoss(cispo_surrogate, default_clip_low=1.0, default_clip_high=4.0),
}


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
    eps_low: float  # rlhf.clip_low, else the policy loss's default
    eps_high: float  # rlhf.clip_high, else the algorithm's or policy loss's default
    beta: float  # KL weight (used here only when the KL is a loss term)
    kl_in_loss: bool  # the algorithm puts beta * k3 into the loss (else the KL is in the reward)
    normaliser: str
    max_new_tokens: int  # the constant normaliser's length
    vf_coef: float
    value_clip_eps: float
    policy_loss: str = "clip"  # a key of POLICY_LOSSES
    is_correction: str = "none"  # a key of correction.IS_CORRECTIONS, or none
    is_cap: float | None = None
    is_floor: float | None = None


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
    sampler_logp: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """The loss of one micro-batch of a rollout, summed over its units, and its metrics as (sum, count).
    Tensors are [B, N] over completion tokens; `logp` carries the gradient. `sampler_logp`: the sampler's
    log-probs of the same tokens, for the truncated importance weights of `p.is_correction`."""
    tokens = mask.sum()
    per_tok, metrics = POLICY_LOSSES[p.policy_loss].surrogate(logp, old_logp, adv, mask, p.eps_low, p.eps_high)
    metrics["policy/approx_kl"] = ((kl_per_token(logp.detach(), old_logp, "k3") * mask).sum(), tokens)
    if p.is_correction != "none":
        w, is_metrics = importance_weights(old_logp, sampler_logp, mask, p.is_correction, p.is_cap, p.is_floor)
        per_tok = per_tok * w
        metrics.update(is_metrics)
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
