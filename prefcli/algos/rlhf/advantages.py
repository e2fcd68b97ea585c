"""Advantage estimators of `prefcli rlhf`: pure functions of a rollout's scores, KL and values, chosen
through the registry `ALGORITHMS` (docs/algorithms.md, section rlhf).

x prompt, y completion, s(x, y) the summed reward, beta the KL weight, k the completions per prompt.
Tensors are completion-aligned [B, N] with N = max_new_tokens and a mask over generated tokens (the
stop token included); rows of the same prompt are consecutive.

  KL estimators per token (Schulman 2020): k1 = log pi - log pi_ref, k2 = (k1)^2 / 2,
    k3 = exp(-k1) - (-k1) - 1 >= 0.
  PPO (Ouyang et al. 2022; Huang et al. 2023 "N implementation details"): token rewards
    r_t = -beta k1_t, plus s at the last token; GAE delta_t = r_t + gamma V_{t+1} - V_t,
    A_t = sum_l (gamma lambda)^l delta_{t+l}, returns R_t = A_t + V_t; whitened advantages.
  RLOO (Ahmadian et al. 2024): R_i = s_i - beta sum_t k1_t; A_i = R_i - mean_{j != i} R_j.
  GRPO (Shao et al. 2024): A_i = (s_i - mean_G) / (std_G + eps); the KL enters the loss as beta k3_t.
    Dr. GRPO (Liu et al. 2025, arXiv 2503.20783): no std, token sums over a constant.
    DAPO (Yu et al. 2025, arXiv 2503.14476): token mean over the batch, clip-higher (eps_high 0.28).
  REINFORCE++ (Hu et al. 2025): token rewards as PPO, returns G_t = sum_{t' >= t} gamma^(t'-t) r_t',
    advantages whitened over the global batch (no critic); the Baseline variant subtracts the group's
    mean score first.
  online_dpo: no advantages; the best and worst completion of each group become a preference pair for an
    objective of the contrastive registry (online.py).

Score shaping before any of them (`shaped_scores`): the missing-EOS penalty, and DAPO's overlong reward
shaping (Yu et al. 2025, section 3.4, "soft overlong punishment") with L_max = max_new_tokens and L_cache = rlhf.overlong_buffer:
    R_length(y) = 0                                  |y| <= L_max - L_cache
                = ((L_max - L_cache) - |y|) / L_cache   L_max - L_cache < |y| <= L_max
(times rlhf.overlong_penalty; |y| counts the completion's tokens, stop token included, and never exceeds
L_max here because sampling stops there).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

# ------------------------------------------------------------------------------ pure math


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, all_reduce: Callable | None = None, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """(x - mean) / std over masked entries; statistics summed across processes when all_reduce is given."""
    m = mask.to(x.dtype)
    stats = torch.stack([(x * m).sum(), (x * x * m).sum(), m.sum()]).double()
    if all_reduce is not None:
        all_reduce(stats)
    s, s2, n = stats.tolist()
    n = max(n, 1.0)
    mean = s / n
    var = max(s2 / n - mean * mean, 0.0) * (n / max(n - 1.0, 1.0))
    out = (x - mean) / math.sqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m


def kl_per_token(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Schulman's estimators of KL(pi || pi_ref) from samples of pi: k1 unbiased (can be < 0),
    k2 = k1^2 / 2, k3 = exp(-k1) + k1 - 1 (unbiased, >= 0)."""
    d = logp - ref_logp
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d * d
    return torch.expm1(-d) + d


def packing_index(mask: torch.Tensor) -> torch.Tensor:
    """[B, N] index that moves each row's masked positions to its front, in order (a stable sort). A multi-turn
    episode's policy tokens are separated by the environment's; packed, they are one contiguous sequence, the
    time axis of the return and GAE recursions (the environment's tokens are not the policy's steps). For a
    mask that is already a prefix the index is the identity."""
    return torch.sort((mask <= 0).to(torch.int8), dim=1, stable=True).indices


def pack(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return x.gather(1, index)


def unpack(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(x).scatter_(1, index, x)


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over completion-aligned [B, N] tensors. V after the last masked token is
    0. A mask with holes (the environment's tokens between a multi-turn episode's turns) is packed first: the
    recursion runs over the policy's tokens only, across turns. Returns (advantages, returns)."""
    idx = packing_index(mask)
    adv, ret = _gae_prefix(pack(rewards, idx), pack(values, idx), pack(mask, idx), gamma, lam)
    return unpack(adv, idx), unpack(ret, idx)


def _gae_prefix(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE over tensors whose mask is a prefix (tokens 0..len-1)."""
    B, N = rewards.shape
    adv = torch.zeros_like(rewards)
    last = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    m = mask.to(rewards.dtype)
    for t in range(N - 1, -1, -1):
        next_m = m[:, t + 1] if t + 1 < N else torch.zeros_like(last)
        next_v = values[:, t + 1] * next_m if t + 1 < N else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = (delta + gamma * lam * next_m * last) * m[:, t]
        adv[:, t] = last
    return adv, (adv + values) * m


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = sum_{t' >= t} gamma^(t'-t) r_t' over masked tokens (packed first, as in `gae`: t counts the policy's
    tokens, across the turns of an episode)."""
    idx = packing_index(mask)
    return unpack(_returns_prefix(pack(rewards, idx), pack(mask, idx), gamma), idx)


def _returns_prefix(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    out = torch.zeros_like(rewards)
    run = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    m = mask.to(rewards.dtype)
    for t in range(rewards.shape[1] - 1, -1, -1):
        run = (rewards[:, t] + gamma * run) * m[:, t]
        out[:, t] = run
    return out


def rloo_advantages(returns: torch.Tensor, k: int) -> torch.Tensor:
    """A_i = R_i - mean of the other k-1 returns of the same prompt (rows grouped consecutively)."""
    g = returns.view(-1, k)
    return (g - (g.sum(1, keepdim=True) - g) / (k - 1)).reshape(-1)


def group_normalised(scores: torch.Tensor, k: int, scale: bool, eps: float = 1e-4) -> torch.Tensor:
    """GRPO: (s_i - mean_G) / (std_G + eps); Dr. GRPO: s_i - mean_G. std is the unbiased one, as in
    TRL. A group whose scores are all equal gets advantage 0 (no division by zero)."""
    g = scores.view(-1, k)
    a = g - g.mean(1, keepdim=True)
    if scale:
        a = a / (g.std(1, keepdim=True) + eps)
    return a.reshape(-1)


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int, factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, arXiv 2503.14476, section 3.4): 0 up to
    max_len - buffer tokens, then falling linearly to -factor at max_len (and -factor beyond it)."""
    start = max_len - buffer
    return -factor * ((lengths.to(torch.float32) - start).clamp_min(0.0) / buffer).clamp_max(1.0)


def tied_groups(scores: torch.Tensor, k: int, tol: float = 1e-8) -> torch.Tensor:
    """[B / k] bool: the groups (k consecutive completions of one prompt) whose scores all agree, which
    group-relative estimators give no signal (advantage 0; DAPO's dynamic sampling drops them)."""
    g = scores.view(-1, k)
    return (g.max(1).values - g.min(1).values).abs() < tol


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """[B] position of each row's last masked token (0 for a row with none)."""
    pos = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask > 0, pos, torch.zeros_like(pos)).max(1).values


def token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float, step_rewards: torch.Tensor | None = None
) -> torch.Tensor:
    """r_t = -beta * kl_t on every token, plus the sequence score on the last token. With `step_rewards` (a
    multi-turn episode: the environment's reward after each turn, at that turn's last token, already part of
    the score), those rewards where they were earned and the rest of the score on the last token."""
    r = -beta * kl * mask
    rows = torch.arange(r.shape[0], device=r.device)
    if step_rewards is not None:
        r = r + step_rewards * mask
        scores = scores - (step_rewards * mask).sum(1)
    r[rows, last_index(mask)] += scores
    return r


# ----------------------------------------------------------------------------- estimators


@dataclass
class AdvantageInputs:
    scores: torch.Tensor  # [B] summed reward (after the missing-EOS penalty)
    kl: torch.Tensor  # [B, N] k1 per token (policy at rollout vs reference); 0 when the KL is a loss term
    mask: torch.Tensor  # [B, N]
    values: torch.Tensor | None  # [B, N] (ppo)
    k: int
    beta: float
    cfg: object  # RLHFSection: gamma, gae_lambda, whiten_advantages, reinforce_baseline
    all_reduce: Callable | None
    # [B, N] multi-turn episodes: the environment's reward after each turn at that turn's last token (included in
    # scores); the token-level estimators (ppo, reinforce_pp) credit it where it was earned. None: single turn.
    step_rewards: torch.Tensor | None = None


Advantages = tuple[torch.Tensor, torch.Tensor | None]  # ([B, N] advantages, [B, N] returns for a critic or None)


def ppo_advantages(x: AdvantageInputs) -> Advantages:
    r = token_rewards(x.scores, x.kl, x.mask, x.beta, x.step_rewards)
    adv, ret = gae(r, x.values, x.mask, x.cfg.gamma, x.cfg.gae_lambda)
    if x.cfg.whiten_advantages:
        adv = masked_whiten(adv, x.mask, x.all_reduce)
    return adv, ret


def rloo(x: AdvantageInputs) -> Advantages:
    seq_return = x.scores - x.beta * (x.kl * x.mask).sum(1)
    return rloo_advantages(seq_return, x.k)[:, None] * x.mask, None


def grpo_advantages(x: AdvantageInputs) -> Advantages:
    return group_normalised(x.scores, x.k, scale=True)[:, None] * x.mask, None


def dr_grpo_advantages(x: AdvantageInputs) -> Advantages:
    return group_normalised(x.scores, x.k, scale=False)[:, None] * x.mask, None


def reinforce_pp(x: AdvantageInputs) -> Advantages:
    scores = x.scores
    if x.cfg.reinforce_baseline:
        scores = scores - scores.view(-1, x.k).mean(1, keepdim=True).expand(-1, x.k).reshape(-1)
    ret = discounted_returns(token_rewards(scores, x.kl, x.mask, x.beta, x.step_rewards), x.mask, x.cfg.gamma)
    return (masked_whiten(ret, x.mask, x.all_reduce) if x.cfg.whiten_advantages else ret * x.mask), None


def no_advantages(x: AdvantageInputs) -> Advantages:
    """online_dpo: the update reads pairs, not advantages (online.py)."""
    return torch.zeros_like(x.mask), None


# ------------------------------------------------------------------------------ registry


@dataclass(frozen=True)
class RLAlgorithm:
    """An RL algorithm: how advantages are estimated, where the KL goes, and its defaults."""

    advantages: Callable[[AdvantageInputs], Advantages]
    kl_in_reward: bool  # else the KL is a loss term (beta * k3)
    needs_value: bool
    default_epochs: int
    normaliser: str = "token_mean"  # a key of prefcli.algos.rlhf.loss.NORMALISERS
    default_clip_high: float | None = None  # the upper clip epsilon when rlhf.clip_high is unset (clip loss)
    sequence_advantages: bool = True  # one advantage per completion (gspo needs it)
    update: str = "policy_gradient"  # or "preference": pairs for a contrastive objective (online_dpo)


ALGORITHMS: dict[str, RLAlgorithm] = {
    "ppo": RLAlgorithm(ppo_advantages, kl_in_reward=True, needs_value=True, default_epochs=4,
                       sequence_advantages=False),
    "rloo": RLAlgorithm(rloo, kl_in_reward=True, needs_value=False, default_epochs=1),
    "grpo": RLAlgorithm(grpo_advantages, kl_in_reward=False, needs_value=False, default_epochs=1,
                        normaliser="sequence_mean"),
    "dr_grpo": RLAlgorithm(dr_grpo_advantages, kl_in_reward=False, needs_value=False, default_epochs=1,
                           normaliser="constant"),
    "dapo": RLAlgorithm(grpo_advantages, kl_in_reward=False, needs_value=False, default_epochs=1,
                        normaliser="token_mean", default_clip_high=0.28),
    "reinforce_pp": RLAlgorithm(reinforce_pp, kl_in_reward=True, needs_value=False, default_epochs=1,
                                sequence_advantages=False),
    "online_dpo": RLAlgorithm(no_advantages, kl_in_reward=False, needs_value=False, default_epochs=1,
                              update="preference"),
}  # fmt: skip


def algorithm_key(cfg) -> str:
    """The registry entry of a recipe's rlhf section: `algorithm`, with grpo's `grpo_loss` variant
    (dr_grpo, dapo) naming its own entry."""
    if cfg.algorithm == "grpo" and cfg.grpo_loss != "grpo":
        return cfg.grpo_loss
    return cfg.algorithm
