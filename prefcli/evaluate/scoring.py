"""Scoring with a model: sliding-window perplexity and per-token log-probs of sampled completions.

Both go through `engine.models.PolicyLM`, the same chunked log-prob path training uses (no full
fp32 logits), and accumulate float64 sums. The formulas are in `metrics.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.logprobs import IGNORE
from ..engine.models import PolicyLM
from .metrics import window_spans

NO_TRUNCATION = 1 << 40  # tokenize_sft's max_length when windows take care of long examples


@dataclass
class ExampleNLL:
    nll: float  # sum of target-token negative log-likelihoods
    tokens: int  # number of target tokens
    windows: int  # forward windows the example needed


def _right_pad(rows: list[list[int]], targets: list[list[int]], pad_id: int, device) -> dict:
    T = max(len(r) for r in rows)
    B = len(rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    tgt = torch.full((B, T), IGNORE, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for i, (r, t) in enumerate(zip(rows, targets)):
        ids[i, : len(r)] = torch.tensor(r)
        tgt[i, : len(t)] = torch.tensor(t)
        mask[i, : len(r)] = 1
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    return {
        k: v.to(device)
        for k, v in {"input_ids": ids, "targets": tgt, "attention_mask": mask, "position_ids": pos}.items()
    }


@torch.no_grad()
def perplexity_nll(
    policy: PolicyLM,
    input_ids: list[list[int]],
    labels: list[list[int]],
    window: int,
    stride: int,
    batch_size: int,
    pad_id: int,
    device,
    check=None,
) -> list[ExampleNLL]:
    """Per-example summed NLL and target count. `labels[i][t]` is the token to score at position t
    (-100: not scored, e.g. a prompt token); token t is predicted from the tokens before it in its
    window (`metrics.window_spans`). Windows of all examples are batched together, longest first.
    `check(batch)` (the start-up guard, engine.guard.first_batch_check) sees the first batch."""
    jobs = []  # (example, row tokens, row targets)
    for i, (ids, lab) in enumerate(zip(input_ids, labels)):
        for c0, t0, end in window_spans(len(ids), window, stride):
            row = ids[c0:end]
            # target aligned with position j of the row: the token at row position j+1
            tgt = [IGNORE] * len(row)
            for t in range(t0, end):
                if lab[t] != IGNORE:
                    tgt[t - c0 - 1] = lab[t]
            jobs.append((i, row, tgt))
    out = [ExampleNLL(0.0, 0, 0) for _ in input_ids]
    jobs.sort(key=lambda j: -len(j[1]))
    policy.eval()
    for s in range(0, len(jobs), batch_size):
        part = jobs[s : s + batch_size]
        b = _right_pad([j[1] for j in part], [j[2] for j in part], pad_id, device)
        if check is not None:
            check(b)
        lp, _ = policy(b["input_ids"], b["targets"], b["attention_mask"], b["position_ids"], mode="logprobs")
        valid = b["targets"] != IGNORE
        sums = lp.double().sum(-1).tolist()
        counts = valid.sum(-1).tolist()
        for (i, _, _), lsum, n in zip(part, sums, counts):
            out[i].nll -= lsum
            out[i].tokens += int(n)
            out[i].windows += 1
    return out


@torch.no_grad()
def completion_logprobs(
    policy: PolicyLM,
    prompt_ids: list[list[int]],
    completion_ids: list[list[int]],
    temperature: float,
    batch_size: int,
    pad_id: int,
    device,
    check=None,
) -> list[list[float]]:
    """log pi(y_t | x, y_<t) of every completion token, with the logits divided by `temperature`
    (the sampling temperature, so that KL matches what was sampled; docs/algorithms.md, Pitfalls).
    Prompt tokens are context only. `check(batch, temperature)` (the start-up guard) sees the first batch."""
    out: list[list[float]] = [[] for _ in prompt_ids]
    order = sorted(range(len(prompt_ids)), key=lambda i: -(len(prompt_ids[i]) + len(completion_ids[i])))
    policy.eval()
    for s in range(0, len(order), batch_size):
        idx = [i for i in order[s : s + batch_size] if completion_ids[i]]
        if not idx:
            continue
        rows, tgts = [], []
        for i in idx:
            p, c = prompt_ids[i], completion_ids[i]
            rows.append(p + c)
            tgts.append([IGNORE] * (len(p) - 1) + list(c) + [IGNORE])
        b = _right_pad(rows, tgts, pad_id, device)
        if check is not None:
            check(b, temperature)
        lp, _ = policy(
            b["input_ids"],
            b["targets"],
            b["attention_mask"],
            b["position_ids"],
            mode="logprobs",
            temperature=temperature,
        )
        for k, i in enumerate(idx):
            p, c = prompt_ids[i], completion_ids[i]
            out[i] = lp[k, len(p) - 1 : len(p) - 1 + len(c)].double().tolist()
    return out
