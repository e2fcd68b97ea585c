"""One sampler protocol for everything that samples from a model: RL and GAN rollouts, online DPO, `prefcli eval`,
`prefcli generate`, `prefcli label --model` and the PHF control gap.

A `Sampler` samples completions for left-padded prompts (`sample`) and continues sequences it sampled, reusing
their KV cache (`continue_from`: the turns of a multi-turn episode, each appending the tokens that follow,
such as an environment's reply, then sampling again). Both return a `Rollout`: the tokens, the sampler's own
log-prob of each one, and whether each completion finished (its stop token) or was cut by max_new_tokens.

Two samplers stand behind it: `engine.rollout.FastDecoder`, a static-KV-cache decoder for the families of
`engine.families.DECODERS` (RL's default where it covers the architecture), and `HFSampler`, transformers'
`generate`, for every other architecture and for the callers that need transformers' own controls (logits
processors, stopping criteria, banned words: eval, generate, label, the control gap), which pass them through
unchanged. Drawing one token (temperature, top-k, top-p: `sample_with_logprob`) is here too: the fast decoder
draws with it and the start-up guard (engine/guard.py) replays the same warps.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Protocol

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
    # the sampler's hold on these sequences' KV cache, for `continue_from` (None: they cannot be continued)
    cache: Any = field(default=None, repr=False, compare=False)

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(-1)

    @property
    def finish_reasons(self) -> list[str]:
        """'stop' (a stop token ended it) or 'length' (max_new_tokens cut it), per completion."""
        return ["stop" if f else "length" for f in self.finished.tolist()]


class Sampler(Protocol):
    def sync(self) -> None:
        """Read the model's weights again (after an optimizer step)."""

    def nbytes(self) -> dict[str, int]:
        """Memory kept between calls: {'weights': ..., 'kv_cache': ...}."""

    def sample(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, cfg: SamplingConfig) -> Rollout:
        """Completions for left-padded prompts [B, P]."""

    def continue_from(self, previous: Rollout, new_ids: list[list[int]], cfg: SamplingConfig) -> Rollout:
        """Append `new_ids[i]` (possibly none) to sequence i of `previous` (its prompt and completion, as sampled
        by this sampler in its latest call) and sample a completion after it, reusing the sequences' KV cache.
        The Rollout's prompt is everything before the new completion: previous prompt, previous completion
        (its mask drops the padding after a stop token) and the appended tokens (left-padded)."""


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), P), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, P - len(p) :] = 1
    return ids.to(device), mask.to(device)


def continued_prompt(previous: Rollout, new_ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt of a continuation: previous prompt, previous completion and the appended tokens (left-padded
    among themselves), with their masks (the padding inside is masked out, so positions count real tokens)."""
    block, block_mask = _block(new_ids, pad_id, previous.prompt_ids.device)
    ids = torch.cat([previous.prompt_ids, previous.completion_ids, block], 1)
    mask = torch.cat([previous.prompt_mask, previous.completion_mask.to(previous.prompt_mask.dtype), block_mask], 1)
    return ids, mask


def _block(new_ids: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The appended tokens, left-padded; [B, 0] when none is appended."""
    if any(new_ids):
        return left_pad([list(x) for x in new_ids], pad_id, device)
    empty = torch.zeros((len(new_ids), 0), dtype=torch.long, device=device)
    return empty, empty.clone()


# -------------------------------------------------------------------------- drawing one token


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


# -------------------------------------------------------------------------- the HF fallback


@dataclass
class _HFCache:
    """What HFSampler keeps to continue its latest call: transformers' cache and the sequences it covers."""

    owner: HFSampler
    call: int
    cache: Any  # transformers' DynamicCache: every position of `ids` but the last
    ids: torch.Tensor  # [B, L] what generate returned (its input, then the sampled tokens, pad after each end)
    mask: torch.Tensor  # [B, L] the real tokens of `ids` (the padding after a stop token was computed, not read)


class HFSampler:
    """transformers `generate` behind the sampler protocol: every architecture, and transformers' own controls.
    `gather`: a context that holds the whole weights for the duration (the Group's, under runtime.parallel
    fsdp; memory: the whole model's parameters in their forward dtype while sampling). `autocast`: the
    runtime's mixed-precision context."""

    def __init__(self, lm, autocast=None, gather=None):
        self.lm = lm
        self.autocast = autocast or contextlib.nullcontext
        self.gather = gather or (lambda modules=None, hold=False: contextlib.nullcontext())
        self.calls = 0

    def sync(self):
        pass

    def nbytes(self) -> dict[str, int]:
        return {"weights": 0, "kv_cache": 0}  # generate's cache lives only while it samples (and its continuation)

    @torch.no_grad()
    def sample(self, ids, mask, cfg: SamplingConfig, generation_config=None, **controls) -> Rollout:
        """`cfg` as generate's arguments; or, for callers that set up transformers themselves, their
        `generation_config` (cfg then only reads the result: max_new_tokens, stop and pad tokens). `controls`
        (logits_processor, stopping_criteria, bad_words_ids, tokenizer, ...) go to generate unchanged."""
        return self._generate(ids, mask, ids, mask, None, cfg, generation_config, controls)

    @torch.no_grad()
    def continue_from(self, previous: Rollout, new_ids: list[list[int]], cfg: SamplingConfig, **controls) -> Rollout:
        held = previous.cache
        if not isinstance(held, _HFCache) or held.owner is not self or held.call != self.calls:
            raise ValueError(
                "continue_from: these sequences' cache is gone (only this sampler's latest call can be continued)"
            )
        block, block_mask = _block(new_ids, cfg.pad_token_id, held.ids.device)
        ids = torch.cat([held.ids, block], 1)
        mask = torch.cat([held.mask, block_mask.to(held.mask.dtype)], 1)
        p_ids, p_mask = continued_prompt(previous, new_ids, cfg.pad_token_id)
        return self._generate(ids, mask, p_ids, p_mask, held.cache, cfg, None, controls)

    def _generate(self, ids, mask, prompt_ids, prompt_mask, cache, cfg: SamplingConfig, generation_config, controls):
        if generation_config is None:
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
        else:
            kw = dict(generation_config=generation_config)
        if cache is not None:
            kw["cache"] = cache
        # the recipe's settings and nothing else, unless the caller set transformers up itself
        own = _recipe_generation_config(self.lm) if generation_config is None else contextlib.nullcontext()
        # output_scores: the scores each token was drawn from, after the logits processors and warpers
        # (min_new_tokens, temperature, top-k, top-p): the sampler's own log-probs, for the mismatch check
        with self.gather(hold=True), self.autocast(), own:
            res = self.lm.generate(
                input_ids=ids, attention_mask=mask, output_scores=True, return_dict_in_generate=True, **kw, **controls
            )
        self.calls += 1
        out = res.sequences
        comp = out[:, ids.shape[1] :]
        B, N = comp.shape[0], cfg.max_new_tokens
        full = torch.full((B, N), cfg.pad_token_id, dtype=torch.long, device=ids.device)
        full[:, : comp.shape[1]] = comp
        stop = torch.isin(full, torch.tensor(cfg.stop_token_ids or [-1], device=ids.device))
        stop &= torch.arange(N, device=ids.device)[None] < comp.shape[1]  # not the padding added here (pad = EOS)
        has = stop.any(1)
        length = torch.where(
            has, stop.float().argmax(1).long() + 1, torch.full_like(has, comp.shape[1], dtype=torch.long)
        )
        cmask = torch.arange(N, device=ids.device)[None] < length[:, None]
        full = torch.where(cmask, full, torch.full_like(full, cfg.pad_token_id))
        logp = torch.zeros((B, N), dtype=torch.float32, device=ids.device)
        for t, scores in enumerate(res.scores[:N]):
            logp[:, t] = scores.float().log_softmax(-1).gather(-1, comp[:, t : t + 1])[:, 0]
        logp = torch.where(cmask, logp, torch.zeros_like(logp))
        seen = torch.cat([mask, cmask[:, : comp.shape[1]].to(mask.dtype)], 1)
        held = _HFCache(self, self.calls, getattr(res, "cache", None), out, seen)
        return Rollout(
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            completion_ids=full,
            completion_mask=cmask.long(),
            finished=has,
            logprobs=logp,
            cache=held if held.cache is not None else None,
        )


@contextlib.contextmanager
def _recipe_generation_config(lm):
    """Sampling as the recipe says and nothing else: transformers fills every setting `generate` is not given
    from the model's generation_config (a checkpoint's top_k 20, top_p 0.8, repetition_penalty 1.05), which would
    sample from another distribution than the trainer scores. A config with only the special tokens stands in
    while sampling; the model keeps its own (final/ saves it)."""
    from transformers import GenerationConfig

    from .models import unwrap_lm

    inner = unwrap_lm(lm)
    own = getattr(inner, "generation_config", None)
    if own is None:
        yield
        return
    keep = {
        k: getattr(own, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
    }
    inner.generation_config = GenerationConfig(**{k: v for k, v in keep.items() if v is not None})
    try:
        yield
    finally:
        inner.generation_config = own
