"""Sampling for RL: prompt rows to token ids, the transformers-generate fallback sampler, which sampler a run
uses (`choose_sampler`), stop strings, and what a sampling call returns. (The fast KV-cache decoder is
engine/rollout.py.)"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields, replace

import torch

from ...engine.data import check_values
from ...engine.families import FALLBACK_COST
from ...engine.rollout import FastDecoder, supports_fast_decoder
from ...engine.sampling import Rollout, SamplingConfig
from ...engine.tokenizer import text_ids
from ...errors import DataError, UsageError


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
        # output_scores: the scores each token was drawn from, after the logits processors and warpers
        # (min_new_tokens, temperature, top-k, top-p): the sampler's own log-probs, for the mismatch check
        with self.gather(hold=True), self.rt.autocast(), _recipe_generation_config(self.lm):
            res = self.lm.generate(
                input_ids=ids, attention_mask=mask, output_scores=True, return_dict_in_generate=True, **kw
            )
        out = res.sequences
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
        logp = torch.zeros((B, N), dtype=torch.float32, device=ids.device)
        for t, scores in enumerate(res.scores[:N]):
            logp[:, t] = scores.float().log_softmax(-1).gather(-1, comp[:, t : t + 1])[:, 0]
        logp = torch.where(cmask, logp, torch.zeros_like(logp))
        return Rollout(
            prompt_ids=ids,
            prompt_mask=mask,
            completion_ids=full,
            completion_mask=cmask.long(),
            finished=has,
            logprobs=logp,
        )


def choose_sampler(lm, g, rt, batch: int, max_len: int, gather, warn):
    """The sampler `generation.sampler` asks for: prefcli's FastDecoder where it runs the model's family ('auto',
    'fast'), else transformers generate ('hf', or 'auto' with a warning stating the measured cost; 'fast' is then
    bad input). `gather`: the Group's context holding the whole weights (runtime.parallel fsdp)."""
    ok, why = supports_fast_decoder(lm)
    if g.sampler == "fast" and not ok:
        raise UsageError(f"generation.sampler: fast does not support {why}; use 'auto' or 'hf'")
    if g.sampler == "hf" or not ok:
        if g.sampler == "auto":
            warn(
                f"the fast sampler does not support {why}; sampling with transformers generate, slower: {FALLBACK_COST}"
            )
        return HFSampler(lm, rt, gather=gather)
    cuda = rt.device.type == "cuda"
    return FastDecoder(
        lm,
        batch=batch,
        max_len=max_len,
        dtype=rt.compute_dtype,
        use_graph=g.cuda_graphs and cuda,
        compile=g.compile == "on" or (g.compile == "auto" and cuda),
        gather=gather,
    )


@contextlib.contextmanager
def _recipe_generation_config(lm):
    """Sampling as the recipe says and nothing else: transformers fills every setting `generate` is not given
    from the model's generation_config (a checkpoint's top_k 20, top_p 0.8, repetition_penalty 1.05), which would
    sample from another distribution than the trainer scores. A config with only the special tokens stands in
    while sampling; the model keeps its own (final/ saves it)."""
    from transformers import GenerationConfig

    from ...engine.models import unwrap_lm

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
    logp = r.logprobs * mask if r.logprobs is not None else None
    return Rollout(r.prompt_ids, r.prompt_mask, ids, mask, finished, logp)


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
            t = text_ids(tok, text)
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


def take_rows(r: Rollout, idx: torch.Tensor) -> Rollout:
    """The rollout's rows `idx`, in that order (of the same kind: an episode rollout keeps its extra fields)."""
    return replace(r, **{f.name: _rows(getattr(r, f.name), idx) for f in fields(r)})


def concat_rollouts(rs: list[Rollout]) -> Rollout:
    """Rollouts of the same widths (and kind), one after the other."""
    if len(rs) == 1:
        return rs[0]
    return replace(rs[0], **{f.name: _cat([getattr(r, f.name) for r in rs]) for f in fields(rs[0])})


def _rows(x, idx):
    return x[idx] if isinstance(x, torch.Tensor) else None


def _cat(xs):
    return torch.cat(xs) if all(isinstance(x, torch.Tensor) for x in xs) else None


def fill_groups(tied: torch.Tensor, n: int) -> torch.Tensor:
    """DAPO's dynamic sampling, the choice: of the groups drawn so far (in drawing order, `tied` [G] marks
    those whose scores all agree), the first n that are not tied; when fewer exist, the first tied ones fill
    the rest. Returns the chosen group indices [n], in drawing order."""
    order = torch.cat([torch.nonzero(~tied).flatten(), torch.nonzero(tied).flatten()])[:n]
    return order.sort().values


@dataclass
class Draw:
    """A scored sampling round (or the rollout assembled from several): the samples, each source's scores,
    the summed reward and the score the advantages see (penalties applied)."""

    samples: Samples
    total: list[float]
    parts: dict[str, list[float]]
    raw: torch.Tensor  # [B] summed reward
    scores: torch.Tensor  # [B] after the missing-EOS penalty and overlong shaping
    overlong: torch.Tensor | None  # [B] the overlong penalty (<= 0), when shaping is on

    def take(self, rows: list[int]) -> Draw:
        idx = torch.tensor(rows, dtype=torch.long, device=self.raw.device)
        s = self.samples
        return Draw(
            Samples(
                take_rows(s.rollout, idx),
                [s.rows[i] for i in rows],
                [s.prompts[i] for i in rows],
                [s.completions[i] for i in rows],
                s.gen_s,
            ),
            [self.total[i] for i in rows],
            {k: [v[i] for i in rows] for k, v in self.parts.items()},
            self.raw[idx],
            self.scores[idx],
            self.overlong[idx] if self.overlong is not None else None,
        )

    @staticmethod
    def concat(ds: list[Draw]) -> Draw:
        if len(ds) == 1:
            return ds[0]
        return Draw(
            Samples(
                concat_rollouts([d.samples.rollout for d in ds]),
                [i for d in ds for i in d.samples.rows],
                [p for d in ds for p in d.samples.prompts],
                [c for d in ds for c in d.samples.completions],
                sum(d.samples.gen_s for d in ds),
            ),
            [t for d in ds for t in d.total],
            {k: [v for d in ds for v in d.parts[k]] for k in ds[0].parts},
            torch.cat([d.raw for d in ds]),
            torch.cat([d.scores for d in ds]),
            torch.cat([d.overlong for d in ds]) if ds[0].overlong is not None else None,
        )
