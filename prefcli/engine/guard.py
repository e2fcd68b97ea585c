"""The start-up guard: prefcli's own fast paths against the model's own forward, before they are trusted.

prefcli computes log-probs with its chunked kernels (logprobs.py), packs SFT examples into shared rows and
samples RL rollouts with its own decoder (rollout.py). Each re-implements a piece of the model's forward, and a
family quirk they miss (a logit scale, a mask that ignores position ids, a sliding window) would train a
different function than the model defines, silently. So, on one real batch:

- `check_logprobs` (every command, before the first step): the kernel's log-probs on the batch as training
  lays it out (packed rows, padding) against the model's own forward (`model(...).logits` -> log_softmax) on
  each of its first examples alone;
- `check_rollout` (RL, on the first completions sampled): the same for the trainer's log-probs of them, and the
  sampler's log-probs of the tokens it drew against the model's own forward with the same sampling warps
  (temperature, top-k, top-p, stop tokens blocked before min_new_tokens).

A difference beyond `TOLERANCES` (per compute dtype, docs/families.md) is exit 2 naming the family and what
differs; with `model.on_mismatch: fallback` the kernels give way to the model's own forward
(`PolicyLM.own_forward`) and the fast sampler to transformers generate, with a warning. Packing that lets
examples attend to each other is refused either way (data.packing: false). Cost: one forward of the rows that
hold the compared examples, and one of the model's own forward on those examples (GUARD_EXAMPLES) alone.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..errors import UsageError
from .families import FALLBACK_COST
from .logprobs import IGNORE
from .sampling import Rollout, SamplingConfig, warp_logits

GUARD_EXAMPLES = 4  # examples compared with the model's own forward (the same count on every process)


@dataclass(frozen=True)
class Tolerance:
    """Largest accepted difference in nats, over the compared tokens: on average, and at any one token (a
    sliding window or a mask bug may touch few tokens)."""

    mean_abs: float
    max_abs: float


# Measured on the bundled kjv-base model (Llama, 4 layers, 4,096 tokens), 16 real examples on a 2-core CPU
# (docs/families.md): the kernel's and the sampler's noise against the model's own forward is at most 3e-6
# (mean 7e-7) in fp32, 0.063 (mean 0.008) in bf16, 0.011 (mean 0.001) in fp16; a logit scale of 1/1.5 missed
# reads 2.6 (mean 0.77), a soft-cap of 30 missed 0.32 (mean 0.052).
TOLERANCES = {
    torch.float32: Tolerance(mean_abs=1e-4, max_abs=1e-2),
    torch.bfloat16: Tolerance(mean_abs=0.02, max_abs=1.0),
    torch.float16: Tolerance(mean_abs=0.01, max_abs=0.5),
}


@dataclass
class Difference:
    """|ours - the model's own| over the compared tokens."""

    max_abs: float
    mean_abs: float
    tokens: int

    def within(self, tol: Tolerance) -> bool:
        return self.mean_abs <= tol.mean_abs and self.max_abs <= tol.max_abs

    def text(self) -> str:
        return f"{self.max_abs:.3g} nats at most, {self.mean_abs:.3g} on average over {self.tokens} tokens"


def _tolerance(policy) -> tuple[Tolerance, str]:
    dt = policy.compute_dtype
    return TOLERANCES.get(dt, TOLERANCES[torch.bfloat16]), str(dt).removeprefix("torch.")


def _reduce(diffs: list[torch.Tensor], rt) -> Difference:
    """max, sum and count of |differences| across this process's examples and all processes."""
    d = torch.cat(diffs) if diffs else torch.zeros(0)
    dev = rt.device if rt is not None else d.device
    mx = torch.tensor([float(d.max()) if d.numel() else 0.0], dtype=torch.float64, device=dev)
    sums = torch.tensor([float(d.sum()), float(d.numel())], dtype=torch.float64, device=dev)
    if rt is not None and rt.distributed:
        rt.all_reduce(mx, op=torch.distributed.ReduceOp.MAX)
        rt.all_reduce(sums)
    n = int(sums[1])
    return Difference(float(mx[0]), float(sums[0]) / max(n, 1), n)


def examples(ids: torch.Tensor, mask, pos, targets: torch.Tensor, k: int) -> list[tuple[int, int, int]]:
    """(row, first, end) of the first k examples with a target: a row's real tokens (the attention mask), split
    where the position ids restart at 0 (packed rows). Repeated to exactly k, so that every process runs the
    same number of forwards (a sharded model gathers its weights in each)."""
    out: list[tuple[int, int, int]] = []
    B, T = ids.shape
    has_target = (targets != IGNORE).cpu()
    real = mask.bool().cpu() if mask is not None else torch.ones(B, T, dtype=torch.bool)
    starts = (pos == 0).cpu() & real if pos is not None else torch.zeros(B, T, dtype=torch.bool)
    for r in range(B):
        where = torch.nonzero(real[r]).flatten()
        if where.numel() == 0:
            continue
        s0, e0 = int(where[0]), int(where[-1]) + 1
        restarts = (torch.nonzero(starts[r, s0 + 1 : e0]).flatten() + s0 + 1).tolist()
        cuts = [s0, *restarts, e0]
        for a, b in zip(cuts, cuts[1:]):
            if bool(has_target[r, a:b].any()):
                out.append((r, a, b))
        if len(out) >= k:
            break
    if not out:
        return []
    return (out * k)[:k]


def _full_targets(targets: torch.Tensor, T: int, start: int) -> torch.Tensor:
    """Targets over every position (those given cover start .. start + width - 1)."""
    if targets.shape[1] == T:
        return targets
    full = torch.full((targets.shape[0], T), IGNORE, dtype=targets.dtype, device=targets.device)
    full[:, start : start + targets.shape[1]] = targets
    return full


def _spread(values: torch.Tensor, T: int, start: int) -> torch.Tensor:
    if values.shape[1] == T:
        return values
    full = torch.zeros((values.shape[0], T), dtype=values.dtype, device=values.device)
    full[:, start : start + values.shape[1]] = values
    return full


@contextmanager
def _eval_mode(module):
    """Eval mode for the comparison, every submodule's own mode restored after (a policy in train mode may hold a
    model in eval mode)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _own_logits(policy, ids: torch.Tensor) -> torch.Tensor:
    """The model's own forward on one example alone (positions 0..n-1, no padding): float32 [n, V]."""
    return policy(ids[None], None, mode="logits")[0]


OWN_LOGITS_BYTES = 2**30  # the float32 logits one batched forward of the reference may hold


def _own_logits_of(policy, seqs: list[torch.Tensor], rt) -> list[torch.Tensor]:
    """The model's own forward on each sequence alone: float32 [n_i, V] each. Sequences are right-padded into
    batches of at most OWN_LOGITS_BYTES of logits and run without an attention mask: in a causal model token t
    never sees the padding after it, so each row is the sequence alone (tests/test_families.py holds this for
    every family against one forward per example). Sharded, one forward per sequence instead: every process must
    run the same number (each gathers the weights), whatever the lengths it holds."""
    if rt is not None and getattr(rt, "sharded", False):
        return [_own_logits(policy, x) for x in seqs]
    vocab = policy._head.weight.shape[0]
    out: list[torch.Tensor | None] = [None] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    while order:
        T = len(seqs[order[0]])
        take = max(1, min(len(order), OWN_LOGITS_BYTES // max(1, T * vocab * 4)))
        group, order = order[:take], order[take:]
        ids = torch.full((len(group), T), int(seqs[group[0]][0]), dtype=torch.long, device=seqs[group[0]].device)
        for j, i in enumerate(group):
            ids[j, : len(seqs[i])] = seqs[i]
        z = policy(ids, None, mode="logits")
        for j, i in enumerate(group):
            out[i] = z[j, : len(seqs[i])]
    return out


@torch.no_grad()
def compare_logprobs(policy, batch: dict, temperature: float = 1.0, start: int = 0, rt=None, k: int = GUARD_EXAMPLES):
    """(kernel vs the model's own forward on each example alone, the same on the packed rows themselves or None
    when the batch is not packed): Differences over the first k examples' targets. The kernel runs on the rows
    that hold those examples, as the batch lays them out (its padding, its packing)."""
    ids, mask, pos = batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids")
    T = ids.shape[1]
    full_t = _full_targets(batch["targets"], T, start)
    segs = examples(ids, mask, pos, full_t, k)
    rows = sorted({r for r, _, _ in segs}) or [0]
    packed = mask is None and pos is not None  # packed rows (the same on every process: a recipe setting)
    sub = {key: (v[rows] if v is not None else None) for key, v in (("ids", ids), ("mask", mask), ("pos", pos))}
    with _eval_mode(policy):
        lp, _ = policy(
            sub["ids"], batch["targets"][rows], sub["mask"], sub["pos"], temperature=temperature, start=start
        )
        full_lp = _spread(lp, T, start)
        own_rows = None
        if packed:  # the model's own forward on the packed rows themselves: does it mix examples?
            own_rows = policy(sub["ids"], None, None, sub["pos"], mode="logits")
        diffs, packed_diffs = [], []
        alone = _own_logits_of(policy, [ids[r, a:b] for r, a, b in segs], rt)
        for (r, a, b), z in zip(segs, alone):
            tgt = full_t[r, a:b]
            valid = tgt != IGNORE
            ref = (z / temperature).log_softmax(-1).gather(-1, tgt.clamp_min(0)[:, None])[:, 0]
            diffs.append((full_lp[rows.index(r), a:b] - ref)[valid].abs().float().cpu())
            if own_rows is not None:
                zr = own_rows[rows.index(r), a:b]
                mine = (zr / temperature).log_softmax(-1).gather(-1, tgt.clamp_min(0)[:, None])[:, 0]
                packed_diffs.append((mine - ref)[valid].abs().float().cpu())
    return _reduce(diffs, rt), (_reduce(packed_diffs, rt) if packed else None)


def check_logprobs(
    policy, batch: dict, on_mismatch: str, warn, temperature: float = 1.0, start: int = 0, rt=None, what: str = ""
) -> Difference:
    """The guard on one real batch (see the module docstring). Raises UsageError (exit 2), or with
    on_mismatch 'fallback' switches `policy` to the model's own forward and warns. Returns the difference."""
    kernel, packed = compare_logprobs(policy, batch, temperature, start, rt)
    tol, _ = _tolerance(policy)
    where = f" on {what}" if what else ""
    if packed is not None and not packed.within(tol):
        raise UsageError(
            f"{policy.family}: packed rows let examples attend to each other: the model's own forward on a packed "
            f"row differs from each example alone by {packed.text()}{where} (its attention mask ignores position "
            "ids); set data.packing: false"
        )
    _enforce_kernel(policy, kernel, on_mismatch, warn, where)
    return kernel


def _enforce_kernel(policy, kernel: Difference, on_mismatch: str, warn, where: str) -> None:
    tol, dt = _tolerance(policy)
    if kernel.within(tol):
        return
    msg = (
        f"{policy.family}: prefcli's log-prob kernel differs from the model's own forward (model(...).logits){where} "
        f"by {kernel.text()}; the tolerance in {dt} is {_tol_text(tol)} (docs/families.md)"
    )
    if on_mismatch != "fallback":
        raise UsageError(
            msg + ". Set model.on_mismatch: fallback to compute log-probs with the model's own forward (full "
            "logits: more memory)"
        )
    policy.own_forward = True
    warn(msg + "; model.on_mismatch is fallback: log-probs come from the model's own forward (full logits)")


def first_batch_check(policy, on_mismatch: str, warn, what: str):
    """`check(batch, temperature=1.0)`: the guard on the first batch it is given, a no-op afterwards (for code
    that scores batches in a loop: eval's perplexity and KL)."""
    done = False

    def check(batch: dict, temperature: float = 1.0) -> None:
        nonlocal done
        if not done:
            done = True
            check_logprobs(policy, batch, on_mismatch, warn, temperature, what=what)

    return check


def _tol_text(tol: Tolerance) -> str:
    return f"{tol.mean_abs:g} on average and {tol.max_abs:g} at most"


def rollout_batch(r: Rollout) -> tuple[dict, int]:
    """A rollout as the trainer lays it out: left-padded prompt + completion, targets over the completion (from
    position start = P - 1)."""
    ids = torch.cat([r.prompt_ids, r.completion_ids], 1)
    mask = torch.cat([r.prompt_mask, r.completion_mask], 1)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    targets = torch.where(r.completion_mask.bool(), r.completion_ids, torch.full_like(r.completion_ids, IGNORE))
    return {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "targets": targets}, r.prompt_ids.shape[
        1
    ] - 1


@torch.no_grad()
def compare_rollout(policy, r: Rollout, cfg: SamplingConfig, rt=None, k: int = GUARD_EXAMPLES):
    """(trainer vs the model's own forward, sampler vs the model's own forward with the same warps): Differences
    over the completion tokens of the rollout's first k sequences: one forward of those rows as the trainer lays
    them out, and the model's own forward on each alone (`_own_logits_of`)."""
    batch, start = rollout_batch(r)
    temp = cfg.temperature if cfg.temperature > 0 else 1.0
    P = r.prompt_ids.shape[1]
    stop = torch.tensor(cfg.stop_token_ids or [], dtype=torch.long, device=r.completion_ids.device)
    rows = list(range(min(k, r.completion_ids.shape[0])))
    rows = (rows * k)[:k]
    kernel_d, sampler_d = [], []
    with _eval_mode(policy):
        first = sorted(set(rows))
        lp, _ = policy(
            *(batch[key][first] for key in ("input_ids", "targets", "attention_mask", "position_ids")),
            temperature=temp,
            start=start,
        )
        spans = []
        for i in rows:
            real = torch.nonzero(batch["attention_mask"][i]).flatten()
            spans.append((int(real[0]), int(real[-1]) + 1))
        alone = _own_logits_of(policy, [batch["input_ids"][i, a:b] for i, (a, b) in zip(rows, spans)], rt)
        for i, (a, _), z in zip(rows, spans, alone):
            n = int(r.completion_mask[i].sum())
            z = z[P - 1 - a : P - 1 - a + n]  # position P - 1 + j predicts completion token j
            tokens = r.completion_ids[i, :n, None]
            ref = (z / temp).log_softmax(-1).gather(-1, tokens)[:, 0]
            kernel_d.append((lp[first.index(i), :n] - ref).abs().float().cpu())
            if r.logprobs is not None:
                if stop.numel() and cfg.min_new_tokens > 0:
                    z = z.clone()
                    z[: cfg.min_new_tokens, stop] = float("-inf")
                ref_s = warp_logits(z, cfg).log_softmax(-1).gather(-1, tokens)[:, 0]
                d = (r.logprobs[i, :n] - ref_s).abs()
                sampler_d.append(d[torch.isfinite(ref_s)].float().cpu())
    return _reduce(kernel_d, rt), _reduce(sampler_d, rt)


def check_rollout(
    policy, r: Rollout, cfg: SamplingConfig, on_mismatch: str, warn, rt=None, sampler: str = "fast"
) -> bool:
    """The guard on the first completions sampled: the trainer's log-probs and the sampler's against the model's
    own forward.
    Returns True when the sampler must be replaced by transformers generate (on_mismatch fallback, `sampler`
    'fast'); raises UsageError otherwise. `sampler` names it: 'fast' (FastDecoder) or 'hf' (transformers
    generate). A kernel difference switches the policy to its own forward (fallback) or raises, as
    check_logprobs does."""
    kernel, samp = compare_rollout(policy, r, cfg, rt)
    _enforce_kernel(policy, kernel, on_mismatch, warn, " on the first sampled completions")
    tol, dt = _tolerance(policy)
    if samp.within(tol):
        return False
    msg = (
        f"{policy.family}: the {sampler} sampler's log-probs of the tokens it drew differ from the model's own "
        f"forward by {samp.text()} on the first sampled completions; the tolerance in {dt} is {_tol_text(tol)} "
        "(docs/families.md)"
    )
    if sampler != "fast":
        raise UsageError(msg)
    if on_mismatch != "fallback":
        raise UsageError(
            msg + ". Set generation.sampler: hf (transformers generate, slower), or model.on_mismatch: fallback"
        )
    warn(
        msg
        + f"; model.on_mismatch is fallback: sampling with transformers generate from now on, slower: {FALLBACK_COST}"
    )
    return True
