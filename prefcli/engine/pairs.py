"""Preference rows to token batches.

Row shapes (column names after `data.<split>.columns` mapping):

- pairs: `chosen`, `rejected`, optional `prompt` (and `margin` for reward models). Plain rows hold
  strings; chat rows hold lists of `{role, content}` messages: `prompt` the conversation so far,
  `chosen`/`rejected` the assistant turn(s), or, with no `prompt` column, two whole conversations
  whose shared leading messages are the prompt.
- unpaired: `prompt`, `completion`, `label` (true = desirable), for KTO.
- scored texts for reward models: the exact string `prompt + completion` (chat rows rendered
  with the template), tokenized with the tokenizer's own special tokens and nothing added:
  `prefcli.reward_sources.ModelSource` scores a reward model's output that way at RL time, so training
  and use see the same tokens.

Policy sequences are prompt tokens (`add_special_tokens=True`) + completion tokens + EOS; only
completion tokens, EOS included, carry log-prob targets. Chosen and rejected go through the model
in one forward: `pair_batch` stacks them along the batch (chosen rows first), right-padded, with
position ids that skip padding.

Rows that cannot train are counted per reason (`BadRows`) and skipped; the task reports them and
refuses to start when none is left.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import DataError
from .data import cache_key, pad_batch
from .datacheck import describe_value, is_messages
from .logprobs import IGNORE
from .tokenizer import chat_ids, text_ids

PAIR_REQUIRED = ("chosen", "rejected")
CACHE_VERSION = "1"  # bump when the encoders below change their output for the same inputs
UNPAIRED_REQUIRED = ("prompt", "completion", "label")


# ------------------------------------------------------------------------------ bookkeeping


@dataclass
class BadRows:
    """Rows skipped, by reason."""

    missing: int = 0  # missing or empty chosen/rejected/completion
    identical: int = 0  # chosen identical to rejected
    long_prompt: int = 0  # the prompt alone fills max_length: no completion token would be left

    @property
    def total(self) -> int:
        return self.missing + self.identical + self.long_prompt

    def add(self, reason: str) -> None:
        setattr(self, reason, getattr(self, reason) + 1)

    def describe(self, max_length: int, what: str = "chosen/rejected") -> str:
        parts = []
        if self.missing:
            parts.append(f"{self.missing} with a missing or empty {what}")
        if self.identical:
            parts.append(f"{self.identical} with chosen identical to rejected")
        if self.long_prompt:
            parts.append(f"{self.long_prompt} with a prompt of max_length={max_length} tokens or more")
        return ", ".join(parts)

    def as_dict(self) -> dict:
        return {"missing": self.missing, "identical": self.identical, "long_prompt": self.long_prompt}


def is_empty(v: Any) -> bool:
    if v is None:
        return True
    if isinstance(v, str):
        return not v.strip()
    if isinstance(v, list):
        return len(v) == 0 or all(is_empty(m.get("content") if isinstance(m, dict) else m) for m in v)
    return False


def detect_pair_format(ds, column: str, requested: str) -> str:
    """'chat' when the rows hold message lists, 'plain' when they hold strings."""
    if requested != "auto":
        return requested
    for v in ds[column][:1000]:
        if v is None:
            continue
        return "chat" if isinstance(v, list) else "plain"
    return "plain"


def check_format(ds, columns, fmt: str, source: str, what: str) -> None:
    """Every row holds strings in all of `columns` (plain) or {role, content} message lists in all (chat).
    The first row that does not is named with what each of its columns holds."""
    cols = [c for c in columns if c in ds.column_names]
    values = {c: ds[c] for c in cols}
    for i in range(len(ds)):
        row = {c: values[c][i] for c in cols if values[c][i] is not None}
        if all(is_messages(v) if fmt == "chat" else isinstance(v, str) for v in row.values()):
            continue
        kinds = ", ".join(f"'{c}' is {describe_value(v)}" for c, v in row.items())
        raise DataError(
            f"{what}: {source}: row {i + 1}: {kinds}; read as {fmt} rows (data.format: {fmt}). Plain rows hold a "
            "string in every column, chat rows a list of {role, content} messages in every column: fix the row"
            + (" or set data.format" if fmt == "chat" else "")
        )


def map_cached(ds, tok, fn: Callable[[dict], dict], parts: tuple, desc: str):
    """Tokenize with `datasets`' cache keyed by the rows, the tokenizer and every field in `parts`."""
    key = cache_key(ds, tok, "pairs-v" + CACHE_VERSION, *parts)
    return ds.map(fn, remove_columns=ds.column_names, new_fingerprint=key, desc=desc)


def kept_rows(enc) -> tuple[list[int], BadRows]:
    """The indices of the encoded rows without a `bad` reason, and the count of the others by reason."""
    bad = BadRows()
    keep = []
    for i, reason in enumerate(enc["bad"]):
        if reason:
            bad.add(reason)
        else:
            keep.append(i)
    return keep, bad


# -------------------------------------------------------------------------------- encoding


def _split_conversations(chosen: list, rejected: list) -> tuple[list, list, list]:
    """Implicit prompt: the leading messages both conversations share."""
    k = 0
    while k < min(len(chosen), len(rejected)) - 1 and chosen[k] == rejected[k]:
        k += 1
    return chosen[:k], chosen[k:], rejected[k:]


def encode_completion(tok, fmt: str, prompt, completion) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids). Plain: the prompt with the tokenizer's special tokens, the
    completion without, then EOS. Chat: the prompt rendered with the generation prompt, the
    completion = what the full conversation adds after it (the template closes the turn)."""
    if fmt == "chat":
        p_msgs = list(prompt or [])
        c_msgs = completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
        p = chat_ids(tok, p_msgs, add_generation_prompt=True) if p_msgs else []
        full = chat_ids(tok, p_msgs + list(c_msgs))
        if full[: len(p)] != p:
            raise DataError(
                "the chat template renders the prompt differently inside the whole conversation, so "
                "the completion tokens cannot be told apart; use a template whose prompt is a prefix"
            )
        return p, full[len(p) :]
    p = text_ids(tok, prompt or "")
    c = tok(completion, add_special_tokens=False)["input_ids"]
    if not c or c[-1] != tok.eos_token_id:
        c = c + [tok.eos_token_id]
    return list(p), list(c)


def scored_text(tok, fmt: str, prompt, completion) -> tuple[str, str]:
    """(prompt string, completion string) as a reward model sees them: `prompt + completion` is
    the text it scores. Chat rows are rendered with the template."""
    if fmt == "chat":
        p_msgs = list(prompt or [])
        c_msgs = completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
        p = tok.apply_chat_template(p_msgs, tokenize=False, add_generation_prompt=True) if p_msgs else ""
        full = tok.apply_chat_template(p_msgs + list(c_msgs), tokenize=False)
        return p, full[len(p) :] if full.startswith(p) else full
    return prompt or "", completion


def encode_scored(tok, text: str, max_length: int) -> tuple[list[int], bool]:
    """Reward-model tokens of one text, truncated from the left like ModelSource."""
    ids = text_ids(tok, text)  # a chat-rendered text may carry its own BOS: counted once
    if len(ids) > max_length:
        return list(ids[-max_length:]), True
    return list(ids), False


# ----------------------------------------------------------------------------- policy pairs


@dataclass
class PairSet:
    """Tokenized preference pairs for a policy: prompt ids and the two completions' ids."""

    prompt: list[list[int]]
    chosen: list[list[int]]
    rejected: list[list[int]]
    n_rows: int
    bad: BadRows = field(default_factory=BadRows)
    n_truncated: int = 0
    rows: list[int] = field(default_factory=list)  # the source row of each pair (skipped rows leave gaps)
    users: list[int] | None = None  # per pair: its user's index among the users seen in training, -1 none

    def __len__(self) -> int:
        return len(self.prompt)

    def n_tokens(self) -> int:
        return sum(2 * len(p) + len(c) + len(r) for p, c, r in zip(self.prompt, self.chosen, self.rejected))


def _fit(p: list[int], c: list[int], max_length: int) -> tuple[list[int], bool]:
    room = max_length - len(p)
    return (c[:room], True) if len(c) > room else (c, False)


def tokenize_pairs(ds, tok, fmt: str, max_length: int, source: str, what: str = "data") -> PairSet:
    check_format(ds, ("prompt", "chosen", "rejected"), fmt, source, what)
    has_prompt = "prompt" in ds.column_names

    def encode(row):
        out = {"p": [], "c": [], "r": [], "bad": "", "trunc": False}
        prompt = row["prompt"] if has_prompt else None
        chosen, rejected = row["chosen"], row["rejected"]
        if is_empty(chosen) or is_empty(rejected):
            out["bad"] = "missing"
            return out
        if chosen == rejected:
            out["bad"] = "identical"
            return out
        if fmt == "chat" and not has_prompt:
            prompt, chosen, rejected = _split_conversations(chosen, rejected)
        p, c = encode_completion(tok, fmt, prompt, chosen)
        _, r = encode_completion(tok, fmt, prompt, rejected)
        if len(p) >= max_length:
            out["bad"] = "long_prompt"
            return out
        if not p and (len(c) < 2 or len(r) < 2):  # no prompt token: the first completion token has no context
            out["bad"] = "missing"
            return out
        c, tc = _fit(p, c, max_length)
        r, tr = _fit(p, r, max_length)
        out.update(p=p, c=c, r=r, trunc=tc or tr)
        return out

    enc = map_cached(ds, tok, encode, ("pairs", fmt, max_length, has_prompt), "tokenizing pairs")
    keep, bad = kept_rows(enc)
    P, C, R, T = enc["p"], enc["c"], enc["r"], enc["trunc"]
    return PairSet(
        prompt=[P[i] for i in keep],
        chosen=[C[i] for i in keep],
        rejected=[R[i] for i in keep],
        n_rows=len(ds),
        bad=bad,
        n_truncated=sum(1 for i in keep if T[i]),
        rows=keep,
    )


@dataclass
class UnpairedSet:
    """Tokenized (prompt, completion, label) rows for KTO."""

    prompt: list[list[int]]
    completion: list[list[int]]
    label: list[bool]
    n_rows: int
    bad: BadRows = field(default_factory=BadRows)
    n_truncated: int = 0

    def __len__(self) -> int:
        return len(self.prompt)

    def n_tokens(self) -> int:
        return sum(len(p) + len(c) for p, c in zip(self.prompt, self.completion))


def parse_label(v) -> bool | None:
    """An unpaired row's label as training reads it (true = desirable): a boolean, 0/1, or the text
    true/false/1/0 in any case; None for anything else."""
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in ("true", "false", "1", "0"):
        return v.strip().lower() in ("true", "1")
    return None


def _label(v, i: int, source: str, what: str) -> bool:
    label = parse_label(v)
    if label is None:
        raise DataError(
            f"{what}: {source}: row {i + 1}: label {v!r} is not a boolean (true = desirable, false = undesirable)"
        )
    return label


def tokenize_unpaired(ds, tok, fmt: str, max_length: int, source: str, what: str = "data") -> UnpairedSet:
    check_format(ds, ("prompt", "completion"), fmt, source, what)
    labels = [_label(v, i, source, what) if v is not None else None for i, v in enumerate(ds["label"])]

    def encode(row):
        out = {"p": [], "c": [], "bad": "", "trunc": False}
        if is_empty(row["completion"]) or row["label"] is None:
            out["bad"] = "missing"
            return out
        p, c = encode_completion(tok, fmt, row["prompt"], row["completion"])
        if len(p) >= max_length:
            out["bad"] = "long_prompt"
            return out
        c, t = _fit(p, c, max_length)
        out.update(p=p, c=c, trunc=t)
        return out

    enc = map_cached(ds, tok, encode, ("unpaired", fmt, max_length), "tokenizing rows")
    keep, bad = kept_rows(enc)
    P, C, T = enc["p"], enc["c"], enc["trunc"]
    return UnpairedSet(
        prompt=[P[i] for i in keep],
        completion=[C[i] for i in keep],
        label=[labels[i] for i in keep],
        n_rows=len(ds),
        bad=bad,
        n_truncated=sum(1 for i in keep if T[i]),
    )


# ------------------------------------------------------------------------------- batching


def completion_batch(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> dict:
    """Right-padded prompt + completion rows; targets (already shifted) only on completion tokens."""
    seqs = [p + c for p, c in zip(prompts, completions)]
    labels = [[IGNORE] * len(p) + c for p, c in zip(prompts, completions)]
    return pad_batch(seqs, labels, pad_id)


def pair_batch(prompts: list[list[int]], chosen: list[list[int]], rejected: list[list[int]], pad_id: int) -> dict:
    """Chosen and rejected stacked along the batch for one forward: rows [c_1..c_B, r_1..r_B]."""
    return completion_batch(list(prompts) + list(prompts), list(chosen) + list(rejected), pad_id)


def sequence_logps(token_logps: torch.Tensor, targets: torch.Tensor, reduce: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence log-prob over the completion mask (targets != -100): the sum, or the mean per
    completion token. Returns (log-probs, completion token counts), float32."""
    mask = (targets != IGNORE).to(token_logps.dtype)
    n = mask.sum(-1)
    s = (token_logps * mask).sum(-1)
    if reduce == "mean":
        return s / n.clamp_min(1.0), n
    if reduce != "sum":
        raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}")
    return s, n


def text_batch(seqs: list[list[int]], pad_id: int) -> dict:
    """Right-padded token rows with an attention mask (reward models and encoders): the last real
    token of row i sits at attention_mask[i].sum() - 1."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def pair_correct(margin):
    """prefcli's one rule for pairwise accuracy (training and `prefcli eval`) and win rate: 1 when the
    preferred side scores higher (margin > 0), 0 when it scores lower, 1/2 for a tie. Ties are common
    before training (a policy equal to its reference gives every pair margin 0): with them at 1/2 an
    untrained model reads 0.5, chance, rather than 0. Works on floats and, elementwise, on tensors."""
    return (margin > 0) * 1.0 + (margin == 0) * 0.5
