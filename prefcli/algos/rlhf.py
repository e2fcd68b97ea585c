"""`prefcli rlhf`: reinforcement learning from a reward, R(s, a) = HumanScore(a).

One rollout: prompts -> k completions each (the fast sampler) -> scores from the reward sources
-> log-probs of the policy at sampling time and of the frozen reference -> advantages (per
algorithm, registry `ALGORITHMS`) -> `epochs_per_rollout` passes of `minibatches_per_epoch`
optimizer steps with the clipped policy-gradient loss. Tensors are completion-aligned: [B, N]
with N = max_new_tokens and a mask over generated tokens (the stop token included).

Equations (x prompt, y completion, s(x, y) the summed reward, beta the KL weight; sources in
docs/algorithms.md, section rlhf):
  KL estimators per token (Schulman 2020): k1 = log pi - log pi_ref, k2 = (k1)^2 / 2,
    k3 = exp(-k1) - (-k1) - 1 >= 0.
  PPO (Ouyang et al. 2022; Huang et al. 2023 "N implementation details"): token rewards
    r_t = -beta k1_t, plus s at the last token; GAE delta_t = r_t + gamma V_{t+1} - V_t,
    A_t = sum_l (gamma lambda)^l delta_{t+l}, returns R_t = A_t + V_t; whitened advantages.
  RLOO (Ahmadian et al. 2024): R_i = s_i - beta sum_t k1_t; A_i = R_i - mean_{j != i} R_j.
  GRPO (Shao et al. 2024): A_i = (s_i - mean_G) / (std_G + eps); the KL enters the loss as
    beta k3_t. Dr. GRPO (Liu et al. 2025): no std, token sums over a constant. DAPO (Yu et al.
    2025): token mean over the batch, clip-higher.
  REINFORCE++ (Hu et al. 2025): token rewards as PPO, returns G_t = sum_{t' >= t} gamma^(t'-t)
    r_t', advantages whitened over the global batch (no critic); the Baseline variant subtracts
    the group's mean score first.
  Policy loss (Schulman et al. 2017): rho = exp(log pi - log pi_old),
    L = max(-A rho, -A clip(rho, 1 - eps_low, 1 + eps_high)).
  Value loss: 1/2 max((V - R)^2, (clip(V, V_old +- eps_v) - R)^2).
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..engine.data import StepSchedule, load_rows, shard_for_rank, split_eval
from ..engine.loop import Group, Micro, Plan
from ..engine.models import (
    PolicyLM,
    apply_lora,
    build_causal_lm,
    disable_dropout,
    load_tokenizer,
    reference_mode,
    save_hf,
    trainable_parameters,
)
from ..engine.rollout import FastDecoder, Rollout, SamplingConfig, left_pad, supports_fast_decoder
from ..errors import DataError, UsageError
from ..rewards import build_rewards
from ..runner import RunContext

# ------------------------------------------------------------------------------ pure math


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp_min(1)


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


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over completion-aligned [B, N] tensors whose mask is a
    prefix (tokens 0..len-1). V after the last token is 0. Returns (advantages, returns)."""
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
    """G_t = sum_{t' >= t} gamma^(t'-t) r_t' over masked tokens."""
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


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """r_t = -beta * kl_t on every token, plus the sequence score on the last token."""
    r = -beta * kl * mask
    last = (mask.sum(1) - 1).clamp_min(0).long()
    r[torch.arange(r.shape[0], device=r.device), last] += scores
    return r


# ----------------------------------------------------------------------------- registry


@dataclass
class AdvantageInputs:
    scores: torch.Tensor  # [B] summed reward (after the missing-EOS penalty)
    kl: torch.Tensor  # [B, N] k1 per token (policy at rollout vs reference)
    mask: torch.Tensor  # [B, N]
    values: torch.Tensor | None  # [B, N] (ppo)
    k: int
    beta: float
    cfg: object  # RLHFSection
    all_reduce: Callable | None


def _ppo(x: AdvantageInputs):
    r = token_rewards(x.scores, x.kl, x.mask, x.beta)
    adv, ret = gae(r, x.values, x.mask, x.cfg.gamma, x.cfg.gae_lambda)
    if x.cfg.whiten_advantages:
        adv = masked_whiten(adv, x.mask, x.all_reduce)
    return adv, ret


def _rloo(x: AdvantageInputs):
    seq_return = x.scores - x.beta * (x.kl * x.mask).sum(1)
    return rloo_advantages(seq_return, x.k)[:, None] * x.mask, None


def _grpo(x: AdvantageInputs):
    a = group_normalised(x.scores, x.k, scale=x.cfg.grpo_loss != "dr_grpo")
    return a[:, None] * x.mask, None


def _reinforce_pp(x: AdvantageInputs):
    scores = x.scores
    if x.cfg.reinforce_baseline:
        scores = scores - scores.view(-1, x.k).mean(1, keepdim=True).expand(-1, x.k).reshape(-1)
    ret = discounted_returns(token_rewards(scores, x.kl, x.mask, x.beta), x.mask, x.cfg.gamma)
    return masked_whiten(ret, x.mask, x.all_reduce), None


@dataclass(frozen=True)
class RLAlgorithm:
    advantages: Callable[[AdvantageInputs], tuple[torch.Tensor, torch.Tensor | None]]
    kl_in_reward: bool  # else the KL is a loss term (beta * k3)
    needs_value: bool
    default_epochs: int


ALGORITHMS: dict[str, RLAlgorithm] = {
    "ppo": RLAlgorithm(_ppo, kl_in_reward=True, needs_value=True, default_epochs=4),
    "rloo": RLAlgorithm(_rloo, kl_in_reward=True, needs_value=False, default_epochs=1),
    "grpo": RLAlgorithm(_grpo, kl_in_reward=False, needs_value=False, default_epochs=1),
    "reinforce_pp": RLAlgorithm(_reinforce_pp, kl_in_reward=True, needs_value=False, default_epochs=1),
}

# How token losses become one number: name -> (units of a micro-batch, summed loss of a micro-batch)
AGGREGATIONS = {
    "token_mean": lambda per_tok, mask, n_max: ((per_tok * mask).sum(), mask.sum()),
    "sequence_mean": lambda per_tok, mask, n_max: (
        ((per_tok * mask).sum(1) / mask.sum(1).clamp_min(1)).sum(),
        (mask.sum(1) > 0).sum(),
    ),
    "constant": lambda per_tok, mask, n_max: ((per_tok * mask).sum(), torch.tensor(float(mask.shape[0] * n_max))),
}


def aggregation_for(cfg) -> str:
    if cfg.algorithm == "grpo":
        return {"grpo": "sequence_mean", "dr_grpo": "constant", "dapo": "token_mean"}[cfg.grpo_loss]
    return "token_mean"


# ---------------------------------------------------------------------------- modules


class ActorCritic(nn.Module):
    """The policy (and, for PPO, a linear value head on the same hidden states): one forward
    gives log-probs, entropies and values over the completion positions."""

    def __init__(self, policy: PolicyLM, value_head: nn.Linear | None):
        super().__init__()
        self.policy = policy
        self.value_head = value_head

    def forward(self, input_ids, attention_mask, position_ids, targets, start: int, temperature: float):
        h = self.policy.hidden(input_ids, attention_mask, position_ids)
        logp, ent = self.policy.head_logprobs(h, targets, "logprobs", temperature, start)
        values = None
        if self.value_head is not None:
            hv = h[:, start : start + targets.shape[1]]
            values = self.value_head(hv.to(self.value_head.weight.dtype)).squeeze(-1).float()
        return logp, ent, values


class HFSampler:
    """transformers `generate`, for architectures the fast decoder does not cover."""

    def __init__(self, lm, rt):
        self.lm, self.rt = lm, rt

    def sync(self):
        pass

    @torch.no_grad()
    def generate(self, ids, mask, cfg: SamplingConfig) -> Rollout:
        kw = dict(
            max_new_tokens=cfg.max_new_tokens,
            min_new_tokens=cfg.min_new_tokens,
            pad_token_id=cfg.pad_token_id,
            eos_token_id=cfg.stop_token_ids or None,
        )
        if cfg.temperature > 0:
            kw.update(do_sample=True, temperature=cfg.temperature, top_k=cfg.top_k or None, top_p=cfg.top_p)
        else:
            kw.update(do_sample=False)
        with self.rt.autocast():
            out = self.lm.generate(input_ids=ids, attention_mask=mask, **kw)
        comp = out[:, ids.shape[1] :]
        B, N = comp.shape[0], cfg.max_new_tokens
        full = torch.full((B, N), cfg.pad_token_id, dtype=torch.long, device=ids.device)
        full[:, : comp.shape[1]] = comp
        stop = torch.isin(full, torch.tensor(cfg.stop_token_ids or [-1], device=ids.device))
        has = stop.any(1)
        length = torch.where(
            has, stop.float().argmax(1).long() + 1, torch.full_like(has, comp.shape[1], dtype=torch.long)
        )
        cmask = torch.arange(N, device=ids.device)[None] < length[:, None]
        full = torch.where(cmask, full, torch.full_like(full, cfg.pad_token_id))
        return Rollout(
            prompt_ids=ids, prompt_mask=mask, completion_ids=full, completion_mask=cmask.long(), finished=has
        )


def apply_stop_strings(r: Rollout, tok, stop_strings: list[str], pad_id: int) -> Rollout:
    """End each completion at the first stop string: keep the shortest token prefix whose text
    contains it, mask the rest, and count the completion as finished."""
    if not stop_strings:
        return r
    ids, mask = r.completion_ids.clone(), r.completion_mask.clone()
    finished = r.finished.clone()
    for i in range(ids.shape[0]):
        n = int(mask[i].sum())
        toks = ids[i, :n].tolist()
        text = tok.decode(toks, skip_special_tokens=True)
        if not any(s in text for s in stop_strings):
            continue
        for k in range(1, n + 1):
            if any(s in tok.decode(toks[:k], skip_special_tokens=True) for s in stop_strings):
                ids[i, k:] = pad_id
                mask[i, k:] = 0
                finished[i] = True
                break
    return Rollout(r.prompt_ids, r.prompt_mask, ids, mask, finished)


# ------------------------------------------------------------------------------- task


def _prompt_rows(ds, tok, max_len: int):
    texts, ids, n_trunc = [], [], 0
    has_messages = "messages" in ds.column_names
    if not has_messages and "prompt" not in ds.column_names:
        raise DataError(
            f"prompt data needs a 'prompt' or 'messages' column (columns: {', '.join(ds.column_names)}); "
            "map yours with data.train.columns, e.g. {prompt: question}"
        )
    for i, row in enumerate(ds):
        if has_messages:
            msgs = row["messages"]
            if not msgs:
                raise DataError(f"prompt row {i + 1} has no messages")
            if not tok.chat_template:
                raise DataError("chat 'messages' prompts need a chat template: set model.chat_template")
            text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            t = tok(text, add_special_tokens=False)["input_ids"]
        else:
            text = row["prompt"]
            if text is None or text == "":
                raise DataError(f"prompt row {i + 1} has an empty prompt")
            t = tok(text, add_special_tokens=True)["input_ids"]
        if len(t) > max_len:
            t = t[-max_len:]
            n_trunc += 1
        texts.append(text)
        ids.append(t)
    return texts, ids, n_trunc


class RLHFTask:
    def __init__(self, ctx: RunContext):
        r = ctx.recipe
        self.ctx, self.rt, self.cfg = ctx, ctx.rt, r
        rt, c, g = self.rt, r.rlhf, r.generation
        self.algo = ALGORITHMS[c.algorithm]
        self.tok = tok = load_tokenizer(r.model)
        rows = load_rows(r.data.train, what="data.train")
        eval_rows = load_rows(r.data.eval, what="data.eval") if r.data.eval is not None else None
        if eval_rows is None and r.data.eval_fraction > 0:
            rows, eval_rows = split_eval(rows, r.data.eval_fraction, r.train.seed)
        self.train_rows, self.eval_rows = rows, eval_rows
        self.prompt_text, self.prompt_ids, trunc = _prompt_rows(rows, tok, r.data.max_prompt_length)
        self.eval_text, self.eval_ids, _ = (
            _prompt_rows(eval_rows, tok, r.data.max_prompt_length) if eval_rows else ([], [], 0)
        )
        if trunc:
            ctx.warn(
                f"data.train: {trunc} of {len(self.prompt_ids)} prompts were longer than max_prompt_length="
                f"{r.data.max_prompt_length} tokens and lost their beginning"
            )
        self.n_truncated = trunc
        self.rewards = self._make_rewards(r)

        lm = build_causal_lm(r.model, tok, rt, seed=r.train.seed, smoke=ctx.smoke)
        disable_dropout(lm)  # old and new log-probs must come from the same function
        if r.train.gradient_checkpointing:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.ref_policy = None
        need_ref = c.kl_coef > 0 or c.kl_target is not None
        if r.model.lora is not None:
            lm = apply_lora(lm, r.model.lora)
        elif need_ref:  # a frozen copy in the compute dtype; never trained, never in the optimizer
            ref_lm = copy.deepcopy(lm).to(rt.compute_dtype if rt.device.type == "cuda" else rt.param_dtype).eval()
            for p in ref_lm.parameters():
                p.requires_grad_(False)
            self.ref_policy = PolicyLM(ref_lm, rt)
        self.need_ref = need_ref
        self.lm = lm
        self.policy = PolicyLM(lm, rt)
        value_head = None
        if self.algo.needs_value:
            d = lm.config.hidden_size
            value_head = nn.Linear(d, 1).to(rt.device, rt.param_dtype)
            nn.init.zeros_(value_head.weight)  # std 0 (Huang et al. 2023)
            nn.init.zeros_(value_head.bias)
        self.model = ActorCritic(self.policy, value_head)

        self.k = c.num_generations
        self.B = c.prompts_per_rollout * self.k
        self.epochs = c.epochs_per_rollout or self.algo.default_epochs
        if self.B % c.minibatches_per_epoch:
            raise UsageError(
                f"rlhf.minibatches_per_epoch ({c.minibatches_per_epoch}) must divide the rollout's "
                f"{self.B} sequences (prompts_per_rollout x num_generations)"
            )
        self.mb_size = self.B // c.minibatches_per_epoch
        # One pass over a rollout whose advantages need no rollout-time log-probs (grpo): the old
        # policy is the current one, so the training forward's own (detached) log-probs serve as
        # pi_old and one no-grad forward per rollout is saved (as TRL does for num_iterations=1).
        self.old_is_current = (
            not self.algo.kl_in_reward and not self.algo.needs_value and self.epochs * c.minibatches_per_epoch == 1
        )
        self.aggregation = aggregation_for(c)
        self.eps_high = (
            c.clip_eps_high
            if c.clip_eps_high is not None
            else (0.28 if c.algorithm == "grpo" and c.grpo_loss == "dapo" else c.clip_eps)
        )
        self.beta = c.kl_coef
        self.max_prompt = max(len(p) for p in self.prompt_ids + self.eval_ids)
        self.sampler = self._make_sampler(lm, g)
        self.scfg = SamplingConfig(
            max_new_tokens=g.max_new_tokens,
            min_new_tokens=g.min_new_tokens,
            temperature=g.temperature,
            top_k=g.top_k,
            top_p=g.top_p,
            stop_token_ids=[tok.eos_token_id],
            pad_token_id=tok.pad_token_id,
        )
        if len(self.prompt_ids) < c.prompts_per_rollout * rt.world_size:
            raise DataError(
                f"data.train has {len(self.prompt_ids)} prompts; a rollout needs "
                f"{c.prompts_per_rollout * rt.world_size} (rlhf.prompts_per_rollout x processes)"
            )
        self.schedule = StepSchedule(
            len(self.prompt_ids), c.prompts_per_rollout * rt.world_size, r.train.seed, r.data.shuffle
        )
        steps_per_rollout = self.epochs * c.minibatches_per_epoch
        t = r.train
        if t.max_steps is not None:
            self._total = t.max_steps
        else:
            self._total = max(1, math.ceil((t.epochs or 1.0) * self.schedule.steps_per_epoch() * steps_per_rollout))
        params = [{"params": [p for p in self.policy.parameters() if p.requires_grad], "weight_decay": t.weight_decay}]
        if value_head is not None:
            params.append(
                {
                    "params": list(value_head.parameters()),
                    "weight_decay": 0.0,
                    "lr_scale": (c.value_lr / t.lr) if c.value_lr else 1.0,
                }
            )
        self.groups = {"policy": Group("policy", self.model, rt, t, self._total, param_groups=params)}
        # position: prompt epoch/index, rollouts done, and where we are inside the current rollout
        self.epoch, self.index, self.rollouts = 0, 0, 0
        self.buffer: dict[str, torch.Tensor] | None = None
        self.queue: list[list[int]] = []  # remaining minibatches of the current rollout (row indices)
        self.rollout_metrics: dict[str, float] = {}
        self.examples_file = ctx.run_dir / "samples.jsonl"

    def _make_rewards(self, r):
        return build_rewards(r.rewards, tokenizer=self.tok, device=self.rt.device)

    def _on_samples(self, rows: list[int], completions: list[str]) -> None:
        """Called with every rollout's prompt indices and completions (the GAN's sample buffer)."""

    def _make_sampler(self, lm, g):
        ok, why = supports_fast_decoder(lm)
        if g.sampler == "fast" and not ok:
            raise UsageError(f"generation.sampler: fast does not support {why}; use 'auto' or 'hf'")
        if g.sampler == "hf" or not ok:
            if g.sampler == "auto":
                self.ctx.warn(f"the fast sampler does not support {why}; sampling with transformers generate (slower)")
            return HFSampler(lm, self.rt)
        cuda = self.rt.device.type == "cuda"
        return FastDecoder(
            lm,
            batch=self.B,
            max_len=self.max_prompt + g.max_new_tokens,
            dtype=self.rt.compute_dtype,
            use_graph=g.cuda_graphs and cuda,
            compile=g.compile == "on" or (g.compile == "auto" and cuda),
        )

    # ------------------------------------------------------------------ rollouts
    def total_steps(self) -> int:
        return self._total

    def _next_prompts(self) -> list[int]:
        steps = self.schedule.steps(self.epoch)
        while self.index >= len(steps):
            self.epoch, self.index = self.epoch + 1, 0
            steps = self.schedule.steps(self.epoch)
        items = steps[self.index]
        self.index += 1
        mine = shard_for_rank(items, self.rt.rank, self.rt.world_size)
        while len(mine) < self.cfg.rlhf.prompts_per_rollout:  # a short last step: repeat prompts to fill the batch
            mine.append(mine[len(mine) % max(1, len(mine))] if mine else items[0])
        return mine

    def _sequences(self, r: Rollout) -> dict[str, torch.Tensor]:
        """Full sequences for the training forward: left-padded prompt + completion."""
        ids = torch.cat([r.prompt_ids, r.completion_ids], 1)
        mask = torch.cat([r.prompt_mask, r.completion_mask], 1)
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        P = r.prompt_ids.shape[1]
        targets = torch.where(r.completion_mask.bool(), r.completion_ids, torch.full_like(r.completion_ids, -100))
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": pos,
            "targets": targets,
            "start": torch.tensor(P - 1),
        }

    @torch.no_grad()
    def _score_logprobs(self, seq: dict, reference: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-probs [B, N] at the sampling temperature (and values, for the policy), micro-batched."""
        out_lp, out_v = [], []
        bs = self.cfg.train.batch_size
        start = int(seq["start"])
        temp = self.cfg.generation.temperature
        for s in range(0, seq["input_ids"].shape[0], bs):
            sl = {k: (v[s : s + bs] if v.dim() else v) for k, v in seq.items()}
            args = (sl["input_ids"], sl["attention_mask"], sl["position_ids"])
            if reference:
                if self.ref_policy is not None:
                    lp, _ = self.ref_policy(
                        sl["input_ids"],
                        sl["targets"],
                        sl["attention_mask"],
                        sl["position_ids"],
                        temperature=temp,
                        start=start,
                    )
                else:
                    with reference_mode(self.lm):
                        lp, _ = self.policy(
                            sl["input_ids"],
                            sl["targets"],
                            sl["attention_mask"],
                            sl["position_ids"],
                            temperature=temp,
                            start=start,
                        )
                out_lp.append(lp)
            else:
                lp, _, v = self.model(*args, sl["targets"], start, temp)
                out_lp.append(lp)
                if v is not None:
                    out_v.append(v)
        return torch.cat(out_lp), (torch.cat(out_v) if out_v else None)

    def _sample(self, prompt_idx: list[int], texts: list[str], ids: list[list[int]], k: int):
        rt = self.rt
        rows = [i for i in prompt_idx for _ in range(k)]
        p_ids, p_mask = left_pad([ids[i] for i in rows], self.tok.pad_token_id, rt.device)
        P = p_ids.shape[1]
        if P < self.max_prompt:  # a fixed prompt width keeps the decoder's buffers (and CUDA graph) reusable
            pad = self.max_prompt - P
            p_ids = torch.cat([torch.full((len(rows), pad), self.tok.pad_token_id, device=rt.device), p_ids], 1)
            p_mask = torch.cat([torch.zeros((len(rows), pad), dtype=p_mask.dtype, device=rt.device), p_mask], 1)
        self.model.eval()
        rt.synchronize()
        t0 = time.perf_counter()
        r = self.sampler.generate(p_ids, p_mask, self.scfg)
        if not getattr(self, "_warned_sampler", False):
            for what, err in (
                ("compiling", getattr(self.sampler, "compile_error", None)),
                ("capturing a CUDA graph of", getattr(self.sampler, "graph_error", None)),
            ):
                if err:
                    self.ctx.warn(f"{what} the sampler's decode step failed ({err}); decoding without it")
            self._warned_sampler = True
        rt.synchronize()
        gen_s = time.perf_counter() - t0
        r = apply_stop_strings(r, self.tok, self.cfg.generation.stop_strings, self.tok.pad_token_id)
        comp_text = [
            self.tok.decode(c[m.bool()].tolist(), skip_special_tokens=True)
            for c, m in zip(r.completion_ids, r.completion_mask)
        ]
        prompts = [texts[i] for i in rows]
        self._last_rows = rows
        return r, prompts, comp_text, gen_s

    def _rollout(self) -> None:
        rt, c = self.rt, self.cfg.rlhf
        t0 = time.perf_counter()
        self.sampler.sync()
        idx = self._next_prompts()
        r, prompts, completions, gen_s = self._sample(idx, self.prompt_text, self.prompt_ids, self.k)
        self._on_samples(self._last_rows, completions)
        total, parts = self.rewards.score(prompts, completions)
        scores = torch.tensor(total, dtype=torch.float32, device=rt.device)
        raw_scores = scores.clone()
        if c.missing_eos_penalty is not None:
            scores = scores - c.missing_eos_penalty * (~r.finished).float()
        seq = self._sequences(r)
        mask = r.completion_mask.float()
        if c.mask_truncated_completions:
            mask = mask * r.finished.float()[:, None]
        ref_logp = self._score_logprobs(seq, reference=True)[0] if self.need_ref else None
        if self.old_is_current:
            old_logp, old_values = None, None
            kl = torch.zeros_like(mask)  # measured in the update instead (kl/mean is logged there)
        else:
            old_logp, old_values = self._score_logprobs(seq, reference=False)
            if ref_logp is None:
                ref_logp = old_logp
            kl = kl_per_token(old_logp, ref_logp, "k1") * r.completion_mask
        self.model.train()
        x = AdvantageInputs(
            scores=scores,
            kl=kl if self.algo.kl_in_reward else torch.zeros_like(kl),
            mask=r.completion_mask.float(),
            values=old_values,
            k=self.k,
            beta=self.beta,
            cfg=c,
            all_reduce=rt.all_reduce if rt.distributed else None,
        )
        adv, returns = self.algo.advantages(x)
        self.buffer = {**{k: v for k, v in seq.items()}, "adv": adv, "mask": mask}
        if old_logp is not None:
            self.buffer["old_logp"] = old_logp
        if ref_logp is not None:
            self.buffer["ref_logp"] = ref_logp
        if old_values is not None:
            self.buffer.update(old_values=old_values, returns=returns)
        self.queue = []
        B = self.B
        for e in range(self.epochs):
            gen = torch.Generator().manual_seed(self.cfg.train.seed * 1_000_003 + self.rollouts * 101 + e)
            perm = torch.randperm(B, generator=gen).tolist()
            self.queue += [perm[s : s + self.mb_size] for s in range(0, B, self.mb_size)]
        # ---- statistics of this rollout, summed across processes
        seq_kl = kl.sum(1)
        groups = raw_scores.view(-1, self.k)
        zero_var = (groups.max(1).values - groups.min(1).values).abs() < 1e-8
        n = float(B)
        sums = [
            raw_scores.sum(),
            (raw_scores**2).sum(),
            seq_kl.sum(),
            r.completion_mask.sum().float(),
            r.finished.float().sum(),
            zero_var.float().sum(),
            torch.tensor(float(groups.shape[0])),
            torch.tensor(n),
        ] + [torch.tensor(float(sum(v))) for v in parts.values()]
        stats = torch.stack([torch.as_tensor(s, dtype=torch.float64, device=rt.device) for s in sums])
        rt.all_reduce(stats)
        v = stats.tolist()
        N = v[7]
        mean = v[0] / N
        m: dict[str, float] = {
            "reward/mean": mean,
            "reward/std": math.sqrt(max(v[1] / N - mean * mean, 0.0)),
            "kl/coef": self.beta,
            "length/mean": v[3] / N,
            "length/finished": v[4] / N,
            "reward/zero_var_groups": v[5] / v[6],
        }
        if not self.old_is_current:
            m["kl/mean"] = v[2] / N
        for i, name in enumerate(parts):
            m[f"reward/{name}"] = v[8 + i] / N
        dt = time.perf_counter() - t0
        m["perf/rollout_s"] = dt
        m["perf/samples_per_s"] = N / dt
        m["perf/gen_tokens_per_s"] = v[3] / max(gen_s, 1e-9)
        self.rollout_metrics = m
        if c.kl_target is not None:  # adaptive KL controller (Ziegler et al. 2019)
            err = max(-0.2, min(0.2, m["kl/mean"] / c.kl_target - 1.0))
            self.beta *= 1.0 + err * N / c.kl_horizon
        if c.num_examples and self.rollouts % c.log_examples_every_steps == 0 and rt.is_main:
            self._show_examples(prompts, completions, total)
        self.rollouts += 1

    def _show_examples(self, prompts, completions, total):
        n = min(self.cfg.rlhf.num_examples, len(prompts))
        pick = list(range(0, len(prompts), max(1, len(prompts) // max(n, 1))))[:n]
        rows = [[prompts[i][-60:], completions[i][:100], f"{total[i]:.3f}"] for i in pick]
        if self.ctx.progress is not None:
            self.ctx.progress.table(f"rollout {self.rollouts}: examples", ["prompt", "completion", "reward"], rows)
        with open(self.examples_file, "a", encoding="utf-8") as f:
            for i in pick:
                f.write(
                    json.dumps(
                        {
                            "rollout": self.rollouts,
                            "prompt": prompts[i],
                            "completion": completions[i],
                            "reward": total[i],
                        }
                    )
                    + "\n"
                )

    # ------------------------------------------------------------------ the loss
    def _loss(self, module, mb) -> tuple[torch.Tensor, dict]:
        c = self.cfg.rlhf
        logp, ent, values = module(
            mb["input_ids"],
            mb["attention_mask"],
            mb["position_ids"],
            mb["targets"],
            int(mb["start"]),
            self.cfg.generation.temperature,
        )
        mask = mb["mask"]
        old_logp = mb["old_logp"] if "old_logp" in mb else logp.detach()
        pg, clipped = ppo_clip_loss(logp, old_logp, mb["adv"], c.clip_eps, self.eps_high)
        per_tok = pg
        tokens = mask.sum()
        metrics = {
            "policy/clipfrac": ((clipped.float() * mask).sum(), tokens),
            "policy/entropy": ((ent * mask).sum(), tokens),
            "policy/approx_kl": ((kl_per_token(logp.detach(), old_logp, "k3") * mask).sum(), tokens),
        }
        if "ref_logp" in mb:
            if self.old_is_current:  # the rollout skipped its policy forward: measure the KL here
                k1 = (kl_per_token(logp.detach(), mb["ref_logp"], "k1") * mask).sum()
                metrics["kl/mean"] = (k1, (mask.sum(1) > 0).sum())
            if not self.algo.kl_in_reward and self.beta > 0:
                k3 = kl_per_token(logp, mb["ref_logp"], "k3")
                per_tok = per_tok + self.beta * k3
                metrics["kl/k3"] = ((k3.detach() * mask).sum(), tokens)
        loss_sum, _ = AGGREGATIONS[self.aggregation](per_tok, mask, self.cfg.generation.max_new_tokens)
        if values is not None:
            vl = clipped_value_loss(values, mb["old_values"], mb["returns"], c.value_clip_eps)
            v_sum = (vl * mask).sum()
            loss_sum = loss_sum + c.vf_coef * v_sum
            metrics["value/loss"] = (v_sum.detach(), tokens)
        return loss_sum, metrics

    def plans(self, start_step: int) -> Iterator[Plan]:
        while True:
            yield self._policy_plan()

    def _policy_plan(self) -> Plan:
        """The next policy update: a minibatch of the current rollout (a new rollout when it is used up)."""
        if not self.queue:
            self._rollout()
        rows = self.queue.pop(0)
        idx = torch.tensor(rows, device=self.rt.device)
        micro = []
        bs = self.cfg.train.batch_size
        for s in range(0, len(rows), bs):
            sub = idx[s : s + bs]
            mb = {k: (v[sub] if v.dim() else v) for k, v in self.buffer.items()}
            _, units = AGGREGATIONS[self.aggregation](mb["mask"], mb["mask"], self.cfg.generation.max_new_tokens)
            micro.append(Micro(batch=mb, n=float(units), tokens=int(mb["attention_mask"].sum())))
        return Plan(
            group="policy",
            micro=micro,
            loss_fn=self._loss,
            name=self.cfg.rlhf.algorithm,
            metrics=dict(self.rollout_metrics),
        )

    # ------------------------------------------------------------------ protocol
    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "index": self.index,
            "rollouts": self.rollouts,
            "beta": self.beta,
            "queue": self.queue,
            "rollout_metrics": self.rollout_metrics,
        }

    def load_state_dict(self, state: dict, extra: dict) -> None:
        self.epoch, self.index, self.rollouts = state["epoch"], state["index"], state["rollouts"]
        self.beta, self.queue = state["beta"], [list(q) for q in state["queue"]]
        self.rollout_metrics = state.get("rollout_metrics", {})
        self.buffer = {
            k[len("buffer.") :]: v.to(self.rt.device) for k, v in extra.items() if k.startswith("buffer.")
        } or None
        if self.queue and self.buffer is None:
            self.queue = []

    def extra_tensors(self) -> dict:
        if not self.buffer or not self.queue:
            return {}
        return {f"buffer.{k}": v for k, v in self.buffer.items()}

    def has_eval(self) -> bool:
        return bool(self.eval_ids)

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean reward, KL to the reference and length of one sampled completion per held-out prompt."""
        rt = self.rt
        self.sampler.sync()
        idx = shard_for_rank(list(range(len(self.eval_ids))), rt.rank, rt.world_size)
        if self.cfg.train.eval_max_batches:
            idx = idx[: self.cfg.train.eval_max_batches * self.B]
        sums = torch.zeros(4, dtype=torch.float64, device=rt.device)
        for s in range(0, len(idx), self.B):
            chunk = idx[s : s + self.B]
            real = len(chunk)
            chunk = chunk + [chunk[0]] * (self.B - real)
            r, prompts, completions, _ = self._sample(chunk, self.eval_text, self.eval_ids, 1)
            total, _ = self.rewards.score(prompts[:real], completions[:real])
            seq = self._sequences(r)
            lp, _ = self._score_logprobs(seq, reference=False)
            ref = self._score_logprobs(seq, reference=True)[0] if self.need_ref else lp
            kl = (kl_per_token(lp, ref, "k1") * r.completion_mask).sum(1)[:real]
            sums += torch.tensor(
                [sum(total), float(kl.sum()), float(r.completion_mask[:real].sum()), real],
                dtype=torch.float64,
                device=rt.device,
            )
        rt.all_reduce(sums)
        tot, kl, length, n = sums.tolist()
        if n == 0:
            return {}
        return {"eval/reward": tot / n, "eval/kl": kl / n, "eval/length": length / n}

    def describe(self) -> dict:
        return {
            "data": {
                "prompts": len(self.prompt_ids),
                "eval_prompts": len(self.eval_ids),
                "truncated_prompts": self.n_truncated,
            },
            "model": {
                "parameters": sum(p.numel() for p in self.lm.parameters()),
                "trainable_parameters": trainable_parameters(self.model),
            },
            "rlhf": {
                "algorithm": self.cfg.rlhf.algorithm,
                "rollouts": self.rollouts,
                "sequences_per_rollout": self.B * self.rt.world_size,
                "sampler": type(self.sampler).__name__,
                "final_kl_coef": self.beta,
            },
        }

    def save_final(self, out_dir: Path) -> None:
        save_hf(self.lm, self.tok, out_dir)
        if self.model.value_head is not None:
            from safetensors.torch import save_file

            save_file(
                {k: v.detach().cpu().contiguous() for k, v in self.model.value_head.state_dict().items()},
                str(Path(out_dir) / "value_head.safetensors"),
            )


def build(ctx: RunContext) -> RLHFTask:
    return RLHFTask(ctx)
