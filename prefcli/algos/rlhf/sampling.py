"""Sampling for RL: prompt rows to token ids, stop strings, and what a sampling round returns (the samplers
themselves are engine/sampling.py's)."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from ...engine.data import check_values
from ...engine.sampling import Rollout
from ...engine.tokenizer import text_ids
from ...errors import DataError


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


def concat_rollouts(rs: list[Rollout], pad_id: int = 0) -> Rollout:
    """Rollouts of the same kind, one after the other. Their widths may differ (episodes of another length, a
    sampler that stops at the longest completion): each [B, T] field is padded to the widest, the prompt's on the
    left, the rest on the right, token ids with `pad_id` and everything else (masks, log-probs, step rewards) with
    0, as the rollouts pad themselves."""
    if len(rs) == 1:
        return rs[0]
    out = {}
    for f in fields(rs[0]):
        xs = [getattr(r, f.name) for r in rs]
        if all(isinstance(x, torch.Tensor) and x.dim() == 2 for x in xs):
            width = max(x.shape[1] for x in xs)
            fill = pad_id if f.name.endswith("_ids") else 0
            left = f.name.startswith("prompt_")
            xs = [_pad_width(x, width, fill, left) for x in xs]
        out[f.name] = _cat(xs)
    return replace(rs[0], **out)


def _pad_width(x: torch.Tensor, width: int, fill, left: bool) -> torch.Tensor:
    if x.shape[1] == width:
        return x
    pad = torch.full((x.shape[0], width - x.shape[1]), fill, dtype=x.dtype, device=x.device)
    return torch.cat([pad, x] if left else [x, pad], 1)


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
    def concat(ds: list[Draw], pad_id: int = 0) -> Draw:
        if len(ds) == 1:
            return ds[0]
        return Draw(
            Samples(
                concat_rollouts([d.samples.rollout for d in ds], pad_id),
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
