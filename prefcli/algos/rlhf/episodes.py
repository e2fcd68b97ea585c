"""Played episodes (prefcli/envs) as a rollout the update reads like any other: left-padded prompts, then each
episode's turns and replies right-padded. The loss mask covers the policy's tokens only; the environment's
tokens are attended to (they are context) but have no target, so they carry no gradient. The sampler's
log-prob of each policy token rides along for the sampler/trainer mismatch check.

The episode's score: env.reward_weight x the environment's reward (the sum of its step rewards) plus the
recipe's `rewards:` on the final transcript, rendered as a reward model trained on chat rows sees it (the
prompt as the template writes it with the generation prompt, and the rest of the conversation after it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...envs.episode import Episode


@dataclass
class EpisodeBatch:
    prompt_ids: torch.Tensor  # [B, P] left-padded
    prompt_mask: torch.Tensor  # [B, P]
    completion_ids: torch.Tensor  # [B, N] every token after the prompt (policy and environment), right-padded
    completion_attention: torch.Tensor  # [B, N] 1 on every real token after the prompt
    completion_mask: torch.Tensor  # [B, N] 1 on the policy's tokens: the loss mask
    finished: torch.Tensor  # [B] bool: the environment ended the episode (not max_turns, the length cap or a failure)
    logprobs: torch.Tensor  # [B, N] the sampler's log-prob of each policy token (0 elsewhere)
    step_rewards: torch.Tensor  # [B, N] the environment's reward after each turn, at the turn's last token
    episode_lengths: torch.Tensor  # [B] all tokens of the episode, prompt included (DAPO's overlong shaping)

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(-1)


def episode_batch(eps: list[Episode], pad_id: int, env_weight: float, device) -> EpisodeBatch:
    B = len(eps)
    P = max(1, max(e.prompt_len for e in eps))
    N = max(1, max(len(e.ids) - e.prompt_len for e in eps))
    prompt_ids = torch.full((B, P), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((B, P), dtype=torch.long)
    comp = torch.full((B, N), pad_id, dtype=torch.long)
    attn = torch.zeros((B, N), dtype=torch.long)
    mask = torch.zeros((B, N), dtype=torch.long)
    logp = torch.zeros((B, N), dtype=torch.float32)
    steps = torch.zeros((B, N), dtype=torch.float32)
    for i, e in enumerate(eps):
        p = e.prompt_len
        if p:
            prompt_ids[i, P - p :] = torch.tensor(e.ids[:p])
            prompt_mask[i, P - p :] = 1
        rest = e.ids[p:]
        if rest:
            n = len(rest)
            comp[i, :n] = torch.tensor(rest)
            attn[i, :n] = 1
            mask[i, :n] = torch.tensor(e.policy_mask[p:])
            logp[i, :n] = torch.tensor(e.sampler_logp[p:], dtype=torch.float32)
        if not e.failure:
            for end, r in zip(e.turn_ends, e.turn_rewards):
                steps[i, end - p] += env_weight * r
    return EpisodeBatch(
        prompt_ids.to(device),
        prompt_mask.to(device),
        comp.to(device),
        attn.to(device),
        mask.to(device),
        torch.tensor([e.finished and not e.failure for e in eps], device=device),
        logp.to(device),
        steps.to(device),
        torch.tensor([len(e.ids) for e in eps], device=device),
    )


def transcripts(eps: list[Episode], renderer) -> tuple[list[str], list[str]]:
    """(prompt, completion) per episode as reward sources read them: the rendered prompt, and the rendered rest of
    the conversation (every message after the first observation, the environment's last word included)."""
    prompts, completions = [], []
    for e in eps:
        if not e.messages:
            prompts.append("")
            completions.append("")
            continue
        full = renderer.transcript(e.messages)
        prompts.append(e.prompt_text)
        completions.append(full[len(e.prompt_text) :] if full.startswith(e.prompt_text) else full)
    return prompts, completions


# the per-episode counts of a rollout (sums across processes, then divided by the episodes)
def episode_sums(eps: list[Episode]) -> dict[str, float]:
    calls = sum(e.tool_calls for e in eps)
    errors = sum(e.tool_errors for e in eps)
    return {
        "episodes": float(len(eps)),
        "success": float(sum(e.succeeded for e in eps)),
        "turns": float(sum(e.turns for e in eps)),
        "tool_calls": float(calls),
        "tool_errors": float(errors),
        "env_errors": float(sum(e.failure is not None for e in eps)),
        "env_timeouts": float(sum(e.failure_kind == "timeout" for e in eps)),
        "truncated": float(sum(e.truncated for e in eps)),
        "episode_tokens": float(sum(len(e.ids) for e in eps)),
        "env_reward": float(sum(e.env_reward for e in eps)),
    }


def episode_metrics(v: dict[str, float], prefix: str = "env") -> dict[str, float]:
    """Rates and means from the summed counts (`episode_sums`, all-reduced)."""
    n = max(v["episodes"], 1.0)
    return {
        f"{prefix}/success_rate": v["success"] / n,
        f"{prefix}/turns": v["turns"] / n,
        f"{prefix}/tool_calls": v["tool_calls"] / n,
        f"{prefix}/tool_errors": v["tool_errors"] / n,
        f"{prefix}/tool_call_validity": 1.0 - v["tool_errors"] / v["tool_calls"] if v["tool_calls"] else 1.0,
        f"{prefix}/errors": v["env_errors"] / n,
        f"{prefix}/timeouts": v["env_timeouts"] / n,
        f"{prefix}/truncated": v["truncated"] / n,
        f"{prefix}/episode_tokens": v["episode_tokens"] / n,
        f"{prefix}/reward": v["env_reward"] / n,
    }
