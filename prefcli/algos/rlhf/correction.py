"""The gap between the sampler and the trainer: the sampler's log-probs of the tokens it drew against the
trainer's forward on the same tokens, measured every step and optionally corrected with truncated
importance weights (docs/algorithms.md, section rlhf).

Both should compute the same distribution; in practice they differ by numerics (bf16 kernels, a fused
decode step, CUDA graphs), so the "on-policy" samples are slightly off-policy (Yao et al. 2025, "Your
Efficient RL Framework Secretly Brings You Off-Policy RL Training"). With pi_s the sampler's and pi_old the
trainer's log-probs at rollout time,

    mismatch/abs_mean, abs_max   mean and max over tokens of |log pi_old(y_t) - log pi_s(y_t)|
    mismatch/kl                  k3 estimate of KL(pi_s || pi_old) per token: r - 1 - log r, r = pi_old / pi_s
                                 (unbiased under samples of pi_s; Schulman 2020)

and the truncated importance weights (`IS_CORRECTIONS`; the modes and their names are TRL's
`vllm_importance_sampling_mode`), multiplying each token's policy-gradient loss:

    token_truncate     w_t = clip(r_t, C_min, C_max)                         TIS, Yao et al. 2025
    token_mask         w_t = r_t, or 0 where r_t is outside [C_min, C_max]
    sequence_truncate  w_i = clip(prod_t r_t, C_min, C_max), on every token of completion i
    sequence_mask      w_i = prod_t r_t, or 0 outside [C_min, C_max]

(C_max = rlhf.is_cap, C_min = rlhf.is_floor; no floor when unset). The weights carry no gradient.
"""

from __future__ import annotations

import math

import torch


def _log_ratio(old_logp, sampler_logp, mask, level: str) -> torch.Tensor:
    d = (old_logp - sampler_logp) * mask
    return d.sum(-1, keepdim=True) if level == "sequence" else d


def _truncate(r: torch.Tensor, cap: float | None, floor: float | None) -> torch.Tensor:
    return r.clamp(min=floor, max=cap)


def _mask(r: torch.Tensor, cap: float | None, floor: float | None) -> torch.Tensor:
    lo = floor if floor is not None else -math.inf
    hi = cap if cap is not None else math.inf
    return r.masked_fill((r < lo) | (r > hi), 0.0)


# name -> (level, what happens outside [C_min, C_max])
IS_CORRECTIONS = {
    "token_truncate": ("token", _truncate),
    "token_mask": ("token", _mask),
    "sequence_truncate": ("sequence", _truncate),
    "sequence_mask": ("sequence", _mask),
}


def importance_weights(
    old_logp: torch.Tensor,
    sampler_logp: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    cap: float | None,
    floor: float | None = None,
) -> tuple[torch.Tensor, dict]:
    """Truncated (or masked) importance weights pi_old / pi_sampler, [B, N] for token modes and [B, 1] for
    sequence modes (see the module docstring), detached; metrics as (sum, count): the mean weight and the
    fraction of tokens whose weight was truncated or masked."""
    level, bound = IS_CORRECTIONS[mode]
    with torch.no_grad():
        raw = torch.exp(_log_ratio(old_logp.detach(), sampler_logp, mask, level))
        w = bound(raw, cap, floor)
        tokens = mask.sum()
        changed = (w != raw).float().expand_as(mask) * mask
        metrics = {
            "mismatch/is_weight": ((w.expand_as(mask) * mask).sum(), tokens),
            "mismatch/is_clipfrac": (changed.sum(), tokens),
        }
    return w, metrics


def mismatch_stats(old_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """How far the trainer's log-probs are from the sampler's on the same tokens: (sum, count) metrics
    mismatch/abs_mean and mismatch/kl (k3 of KL(pi_s || pi_old) per token), and the largest absolute
    difference (a 0-d tensor)."""
    with torch.no_grad():
        d = (old_logp.detach() - sampler_logp) * mask
        tokens = mask.sum()
        k3 = (torch.expm1(d) - d) * mask  # r - 1 - log r with log r = d
        stats = {"mismatch/abs_mean": (d.abs().sum(), tokens), "mismatch/kl": (k3.sum(), tokens)}
        return stats, d.abs().max() if d.numel() else torch.zeros((), device=d.device)
