"""Sampling for RL: prompt rows to token ids, the transformers-generate fallback sampler, stop strings, and
what a sampling call returns. (The fast KV-cache decoder is engine/rollout.py.)"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ...engine.data import check_values
from ...engine.rollout import Rollout, SamplingConfig
from ...errors import DataError


class HFSampler:
    """transformers `generate`, for architectures the fast decoder does not cover. `gather`: a context that
    holds the whole weights for the duration (the Group's, under runtime.parallel fsdp; memory: the whole
    model's parameters in their forward dtype while sampling)."""

    def __init__(self, lm, rt, gather=None):
        self.lm, self.rt = lm, rt
        self.gather = gather or (lambda modules=None, hold=False: contextlib.nullcontext())

    def sync(self):
        pass

    def nbytes(self) -> dict[str, int]:
        return {"weights": 0, "kv_cache": 0}  # generate's cache lives only while it samples

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
        with self.gather(hold=True), self.rt.autocast():
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


def prompt_rows(ds, tok, max_len: int, source: str = "prompt data") -> tuple[list[str], list[list[int]], int]:
    """(prompt texts, token ids, how many were cut to their last max_len tokens) of prompt rows. `source`
    ('data.train: <file>') starts every error message."""
    texts, ids, n_trunc = [], [], 0
    has_messages = "messages" in ds.column_names
    if not has_messages and "prompt" not in ds.column_names:
        raise DataError(
            f"{source}: prompt rows need a 'prompt' or 'messages' column (columns: {', '.join(ds.column_names)}); "
            "map yours with data.train.columns, e.g. {prompt: question}"
        )
    what, _, path = source.partition(": ")
    check_values(ds, ["messages" if has_messages else "prompt"], path or source, what if path else "data")
    for row in ds:
        if has_messages:
            msgs = row["messages"]
            if not tok.chat_template:
                raise DataError(f"{source}: chat 'messages' prompts need a chat template: set model.chat_template")
            text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            t = tok(text, add_special_tokens=False)["input_ids"]
        else:
            text = row["prompt"]
            t = tok(text, add_special_tokens=True)["input_ids"]
        if len(t) > max_len:
            t = t[-max_len:]
            n_trunc += 1
        texts.append(text)
        ids.append(t)
    return texts, ids, n_trunc


@dataclass
class Samples:
    """Completions sampled for a list of prompt rows (k per prompt, consecutive)."""

    rollout: Rollout
    rows: list[int]  # the prompt index of every completion
    prompts: list[str]
    completions: list[str]
    gen_s: float  # seconds spent in the sampler
