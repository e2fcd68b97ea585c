"""What `prefcli reward` does with the user column: training contexts of the latent kind, per-user held-out
accuracy, and the new-user curve. The conditioning itself (the kinds, their states, fitting a new user) is in
prefcli/engine/personal.py; the loss is the Bradley-Terry loss of the objectives registry, applied to each
user's reward."""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from ..engine.pairs import pair_correct, text_batch


def user_index(users: Sequence[str | None], vocab: dict[str, int]) -> list[int]:
    """Each row's user as an index among the users seen in training; -1 for no user or a user never trained on."""
    return [vocab.get(u, -1) if u is not None else -1 for u in users]


def latent_context(
    s, items: list[int], user_rows: dict[int, list[int]], lo: int, hi: int, key: str, pad_id: int, latent_dim: int
) -> dict:
    """The latent kind's training contexts of one micro-batch: for every user with rows in `items`, between `lo`
    and `hi` of that user's other training pairs (never the batch's own rows while the user has others), drawn
    with a generator keyed by `key` (the step's position in the data, so a resumed run draws the same), and the
    reparameterisation noise of each group. Returns the batch fields PersonalReward.forward reads."""
    rng = random.Random(key)
    groups: dict[int, int] = {}
    for i in items:
        u = s.users[i]
        if u >= 0 and u not in groups:
            groups[u] = len(groups)
    own = set(items)
    ctx_c, ctx_r, ctx_g = [], [], []
    for u, g in groups.items():
        pool = [j for j in user_rows[u] if j not in own] or list(user_rows[u])
        k = min(len(pool), rng.randint(lo, hi))
        for j in rng.sample(pool, k):
            ctx_c.append(s.seqs[j][0])
            ctx_r.append(s.seqs[j][1])
            ctx_g.append(g)
    if not groups:  # no user in this micro-batch: every row is scored by the shared part
        return {"user": torch.full((2 * len(items),), -1)}
    row_group = [groups.get(s.users[i], -1) if s.users[i] >= 0 else -1 for i in items]
    b = text_batch(ctx_c + ctx_r, pad_id)
    g = torch.Generator().manual_seed(rng.getrandbits(63))
    return dict(
        row_group=torch.tensor(row_group + row_group),
        n_groups=len(groups),
        ctx_ids=b["input_ids"],
        ctx_mask=b["attention_mask"],
        ctx_group=torch.tensor(ctx_g),
        eps=torch.randn(len(groups), latent_dim, generator=g),
    )


def fixed_context(rows: list[int], n: int, seed: int, user: str) -> list[int]:
    """The context that summarises a seen user of the latent kind at evaluation and in final/: n of their training
    pairs, the same every time (seeded by the run's seed and the user id)."""
    rng = random.Random(f"{seed}|context|{user}")
    return sorted(rng.sample(rows, min(n, len(rows))))


def per_user_accuracy(margins: torch.Tensor, users: Sequence[int], names: Sequence[str]) -> dict[str, float]:
    """eval/accuracy/<user> over each user's rows (ties count 1/2) and eval/accuracy_worst_user, the lowest."""
    correct = pair_correct(margins.double())
    out: dict[str, float] = {}
    idx = torch.tensor(list(users), dtype=torch.long)
    for u, name in enumerate(names):
        sel = idx == u
        if bool(sel.any()):
            out[f"eval/accuracy/{name}"] = float(correct[sel].mean())
    if out:
        out["eval/accuracy_worst_user"] = min(out.values())
    return out


def new_user_curve(
    fit,
    margin_of,
    rows_by_user: dict[str, list[int]],
    ks: Sequence[int],
    draws: int,
    seed: int,
) -> dict[str, float]:
    """Held-out accuracy of users never trained on, given k of their own labels. Each user's rows are shuffled
    (seeded) and split into a pool of labels (the first max(ks) rows, at most half of them) and the rows scored
    (the rest); for each k, `draws` contexts of k pool rows are drawn, the user's state is fitted from them
    (`fit(rows) -> state`) and the scored rows are scored with it (`margin_of(state, rows) -> margins`).
    Returns eval/new_user/accuracy@k (the mean over users) and eval/new_user/accuracy@k/<user>."""
    out: dict[str, float] = {}
    per_k: dict[int, list[float]] = {k: [] for k in ks}
    for user, rows in sorted(rows_by_user.items()):
        if len(rows) < 2:
            continue
        rng = random.Random(f"{seed}|new-user|{user}")
        order = list(rows)
        rng.shuffle(order)
        n_pool = min(max(ks), len(order) // 2)
        pool, scored = order[:n_pool], order[n_pool:]
        for k in ks:
            accs = []
            for _ in range(draws if 0 < k < len(pool) else 1):  # k = 0 or the whole pool: one context only
                ctx = rng.sample(pool, min(k, len(pool)))
                m = margin_of(fit(ctx), scored)
                accs.append(float(pair_correct(m.double()).mean()))
            acc = sum(accs) / len(accs)
            out[f"eval/new_user/accuracy@{k}/{user}"] = acc
            per_k[k].append(acc)
    for k, v in per_k.items():
        if v:
            out[f"eval/new_user/accuracy@{k}"] = sum(v) / len(v)
    return out
