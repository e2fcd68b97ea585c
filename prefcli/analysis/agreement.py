"""Agreement between raters: Cohen's kappa (two raters) and Krippendorff's alpha (any number of
raters, missing ratings allowed). Pure functions on plain lists, no torch.

Written by hand, as the formulas are short and exact (no maintained dependency-free library offers
both on plain lists); tests/test_inspect.py checks them against hand-worked numbers and the worked
example of Krippendorff (2011).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Hashable, Sequence


def cohen_kappa(a: Sequence[Hashable], b: Sequence[Hashable]) -> float:
    """Cohen's kappa of two raters' labels on the same items (Cohen 1960):

        κ = (p_o - p_e) / (1 - p_e),  p_o = share of items with equal labels,
        p_e = Σ_c p_a(c) p_b(c)       (chance agreement from each rater's own label frequencies).

    nan when there is no item, or when chance agreement is 1 (both raters always give one label)."""
    n = len(a)
    if n == 0 or n != len(b):
        return math.nan
    p_o = sum(1 for x, y in zip(a, b) if x == y) / n
    ca, cb = Counter(a), Counter(b)
    p_e = sum(ca[c] * cb[c] for c in ca) / (n * n)
    if p_e >= 1.0:
        return math.nan
    return (p_o - p_e) / (1 - p_e)


def _nominal(c, k) -> float:
    return 0.0 if c == k else 1.0


def _interval(c, k) -> float:
    return (float(c) - float(k)) ** 2


METRICS: dict[str, Callable] = {"nominal": _nominal, "interval": _interval}


def krippendorff_alpha(units: Sequence[Sequence[Hashable]], metric: str = "nominal") -> float:
    """Krippendorff's alpha (Krippendorff 2011, "Computing Krippendorff's Alpha-Reliability"):

        α = 1 - D_o / D_e = 1 - (n - 1) Σ_{c,k} o_ck δ²(c, k) / Σ_{c,k} n_c n_k δ²(c, k)

    `units`: for each item, the values the raters gave it (missing ratings left out). Only items
    with at least two values are pairable. o_ck is the coincidence matrix: every ordered pair of
    values (c, k) from two different raters of an item u adds 1/(m_u - 1), m_u the item's values;
    n_c = Σ_k o_ck, n = Σ_c n_c. δ² is 0/1 for 'nominal' (different labels disagree equally) and
    (c - k)² for 'interval'. nan when no item is pairable or there is no variation at all."""
    delta = METRICS[metric]
    o: dict[tuple, float] = {}
    for vals in units:
        vals = [v for v in vals if v is not None]
        m = len(vals)
        if m < 2:
            continue
        for i in range(m):
            for j in range(m):
                if i != j:
                    key = (vals[i], vals[j])
                    o[key] = o.get(key, 0.0) + 1.0 / (m - 1)
    if not o:
        return math.nan
    n_c: dict = {}
    for (c, _k), v in o.items():
        n_c[c] = n_c.get(c, 0.0) + v
    n = sum(n_c.values())
    d_o = sum(v * delta(c, k) for (c, k), v in o.items())
    d_e = sum(n_c[c] * n_c[k] * delta(c, k) for c in n_c for k in n_c)
    if d_e == 0:
        return math.nan
    return 1.0 - (n - 1) * d_o / d_e


def pairwise_kappas(labels: dict[str, dict[Hashable, Hashable]], min_shared: int = 1) -> list[dict]:
    """Cohen's kappa for every pair of raters on the items both labelled. `labels`: rater -> {item:
    label}. Pairs sharing fewer than `min_shared` items are left out."""
    raters = sorted(labels)
    out = []
    for i, r1 in enumerate(raters):
        for r2 in raters[i + 1 :]:
            shared = sorted(set(labels[r1]) & set(labels[r2]), key=str)
            if len(shared) < min_shared:
                continue
            a = [labels[r1][u] for u in shared]
            b = [labels[r2][u] for u in shared]
            out.append(
                {
                    "raters": [r1, r2],
                    "shared_items": len(shared),
                    "agreement": sum(1 for x, y in zip(a, b) if x == y) / len(shared),
                    "kappa": cohen_kappa(a, b),
                }
            )
    return out


def position_bias(shown_first: Sequence[str | None]) -> dict | None:
    """Share of decisive pairs whose chosen (or picked) answer was the one shown first ("A" of "A"/"B"; anything
    else is left out), with a two-sided binomial z-test against 1/2 (normal approximation). None: no pair."""
    pos = [p for p in shown_first if p in ("A", "B")]
    if not pos:
        return None
    n = len(pos)
    a = sum(1 for p in pos if p == "A") / n
    z = (a - 0.5) / math.sqrt(0.25 / n)
    return {"pairs": n, "chosen_shown_first": a, "z": z, "p_value": math.erfc(abs(z) / math.sqrt(2))}
