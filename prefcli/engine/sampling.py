"""What a sampler is asked and what it returns, for every sampler (the fast decoder in rollout.py, transformers
`generate` in algos/rlhf/sampling.py) and for the start-up guard, which replays the same warps: the sampling
settings, the sampled sequences, left-padding of prompts, and drawing one token (temperature, top-k, top-p)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    min_new_tokens: int = 0
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    stop_token_ids: list[int] = field(default_factory=list)  # EOS and friends
    pad_token_id: int = 0


@dataclass
class Rollout:
    """Sampled sequences: left-padded prompts followed by completions (right-padded)."""

    prompt_ids: torch.Tensor  # [B, P] left-padded
    prompt_mask: torch.Tensor  # [B, P]
    completion_ids: torch.Tensor  # [B, N] pad after the stop token
    completion_mask: torch.Tensor  # [B, N] 1 on generated tokens, the stop token included
    finished: torch.Tensor  # [B] bool: ended with a stop token (not cut by max_new_tokens)
    # [B, N] float32: the sampler's log-prob of each completion token under the distribution it sampled
    # from (temperature, top-k/top-p, blocked stop tokens applied; 0 after the end). None: not recorded.
    logprobs: torch.Tensor | None = None

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(-1)


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), P), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, P - len(p) :] = 1
    return ids.to(device), mask.to(device)


def sample_next(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """One token per row from [B, V] float32 logits: temperature, top-k, top-p, then Gumbel-max
    (the same distribution as softmax sampling, and graph-capturable)."""
    return sample_with_logprob(logits, cfg)[0]


def warp_logits(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """The logits [..., V] (float32) a sample is drawn from: divided by the temperature, then top-k and top-p
    applied (dropped tokens at -inf). Greedy (temperature 0): the raw logits."""
    if cfg.temperature <= 0:
        return logits
    logits = logits / cfg.temperature
    if cfg.top_k and cfg.top_k < logits.shape[-1]:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        cum = probs.cumsum(-1)
        drop_sorted = (cum - probs) > cfg.top_p  # keep the smallest prefix whose mass reaches top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_with_logprob(logits: torch.Tensor, cfg: SamplingConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """`sample_next`, and the log-prob [B] of the chosen token under the distribution it was drawn from
    (after temperature, top-k and top-p; greedy: under the softmax of the raw logits). The trainer
    compares it with its own log-prob of the same token (sampler/trainer mismatch)."""
    if cfg.temperature <= 0:
        tok = logits.argmax(-1)
        return tok, logits.log_softmax(-1).gather(-1, tok[:, None])[:, 0]
    logits = warp_logits(logits, cfg)
    u = torch.rand_like(logits).clamp_(min=1e-20, max=1.0 - 1e-7)
    tok = (logits - torch.log(-torch.log(u))).argmax(-1)
    return tok, logits.log_softmax(-1).gather(-1, tok[:, None])[:, 0]
