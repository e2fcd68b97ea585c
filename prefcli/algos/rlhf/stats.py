"""The metrics of one rollout (docs/commands/rlhf.md, Logged metrics), summed across processes in one
all-reduce."""

from __future__ import annotations

import math
import time

import torch

from ...engine.dist import Runtime
from .correction import mismatch_stats
from .sampling import Draw


def max_op(rt):
    """The all-reduce op of a maximum (None: one process, nothing to reduce)."""
    return torch.distributed.ReduceOp.MAX if rt.distributed else None


def rollout_stats(
    d: Draw, batch, rt: Runtime, k: int, beta: float, kl_in_update: bool, t0: float
) -> tuple[dict[str, float], float]:
    """The metrics of a rollout `d` and the training batch made of it (learner.TrainingBatch), from sums across
    processes in one all-reduce, and its sequence count. `kl_in_update`: the KL is measured by the update
    (one pass, no rollout forward), not here."""
    r, kl, old_logp = d.samples.rollout, batch.kl, batch.old_logp
    raw_scores = d.raw
    groups = raw_scores.view(-1, k)
    zero_var = (groups.max(1).values - groups.min(1).values).abs() < 1e-8
    sums = {
        "score": raw_scores.sum(),
        "score_sq": (raw_scores**2).sum(),
        "kl": kl.sum(1).sum(),
        "tokens": r.completion_mask.sum().float(),
        "finished": r.finished.float().sum(),
        "zero_var_groups": zero_var.float().sum(),
        "groups": float(groups.shape[0]),
        "sequences": float(raw_scores.shape[0]),
        **{f"part/{name}": float(sum(v)) for name, v in d.parts.items()},
    }
    if d.overlong is not None:
        sums["overlong"] = d.overlong.sum()
    mm_max = None
    if old_logp is not None and r.logprobs is not None:  # sampler vs trainer, at rollout time
        mm, mm_max = mismatch_stats(old_logp, r.logprobs, r.completion_mask.float())
        for name, (num, den) in mm.items():
            sums[name], sums[name + "/n"] = num, den
    names = list(sums)
    flat = torch.stack([torch.as_tensor(sums[name], dtype=torch.float64, device=rt.device) for name in names])
    rt.all_reduce(flat)
    v = dict(zip(names, flat.tolist()))
    n = v["sequences"]
    mean = v["score"] / n
    m: dict[str, float] = {
        "reward/mean": mean,
        "reward/std": math.sqrt(max(v["score_sq"] / n - mean * mean, 0.0)),
        "kl/coef": beta,
        "length/mean": v["tokens"] / n,
        "length/finished": v["finished"] / n,
        "reward/zero_var_groups": v["zero_var_groups"] / v["groups"],
    }
    if not kl_in_update:
        m["kl/mean"] = v["kl"] / n
    for name in d.parts:
        m[f"reward/{name}"] = v[f"part/{name}"] / n
    if d.overlong is not None:
        m["reward/overlong_penalty"] = v["overlong"] / n
    if mm_max is not None:
        for name in ("mismatch/abs_mean", "mismatch/kl"):
            m[name] = v[name] / max(v[name + "/n"], 1.0)
        m["mismatch/abs_max"] = float(rt.all_reduce(mm_max.double().reshape(1), op=max_op(rt)).item())
    dt = time.perf_counter() - t0
    m["perf/rollout_s"] = dt
    m["perf/samples_per_s"] = n / dt
    m["perf/gen_tokens_per_s"] = v["tokens"] / max(d.samples.gen_s, 1e-9)
    return m, n
