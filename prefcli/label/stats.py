"""The figures of a labelling task, as pure functions of its answers: progress, agreement between raters,
gold accuracy, position bias, time per item, the label distribution and the raters to look at.

Agreement is measured on the real (not gold) items several raters answered, over the answers the export
holds (pairs: A or B; ties and skips are left out, as in the JSONL training reads), with the labels
`prefcli data inspect` gives the exported rows, so both report the same figures. A pair's label is which of
its two completions won, in the completions' text order; a ranking's is the order of its completions'
positions in text order; a rating's is the score.

- Cohen's kappa for every pair of raters (`prefcli.analysis.agreement.cohen_kappa`, tested against
  scikit-learn's `cohen_kappa_score`);
- Fleiss' kappa over every item with two or more answers (Fleiss 1971), in the form that allows a different
  number of raters per item: P_i = Σ_j n_ij (n_ij - 1) / (n_i (n_i - 1)), P̄ the mean of P_i,
  p_j = Σ_i n_ij / Σ_i n_i, P_e = Σ_j p_j², κ = (P̄ - P_e) / (1 - P_e): written here since the package
  that has it (statsmodels) is too large to depend on for ten lines; checked against Fleiss' worked example;
- Krippendorff's alpha from the `krippendorff` package (nominal; interval too for ratings).
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from ..analysis.agreement import pairwise_kappas, position_bias
from ..engine.debias import normalize_text


@dataclass
class Record:
    """One live answer, as the store holds it."""

    rater: str
    item: str  # the item's key
    prompt: str
    candidates: list[str]
    gold: Any  # the gold answer in candidate terms (gold items), else None
    answer: Any  # as shown: pair 'A' | 'B' | 'tie' | 'skip'; rate the score; rank shown positions best first
    choice: Any  # in candidate terms: pair 0 | 1 | 'tie' | 'skip'; rate the score; rank candidate indices
    shown: list[int] | None  # shown position -> candidate index (None: not known, e.g. imported)
    shown_at: float | None
    answered_at: float

    @property
    def is_gold(self) -> bool:
        return self.gold is not None


def label_of(r: Record, mode: str) -> Hashable | None:
    """The agreement label of an answer (None: left out, i.e. skips, and ties unless counted as a category)."""
    if r.choice == "skip":
        return None
    if mode == "rate":
        return r.choice
    if r.choice == "tie":
        return "tie"
    norm = [normalize_text(c) for c in r.candidates]
    if mode == "pair":
        chosen, rejected = norm[r.choice], norm[1 - r.choice]
        return int(chosen > rejected)
    canon = sorted(norm)
    return tuple(canon.index(norm[i]) for i in r.choice)


def labels_by_rater(records: Sequence[Record], mode: str, ties: bool = False) -> dict[str, dict[str, Hashable]]:
    out: dict[str, dict[str, Hashable]] = {}
    for r in records:
        lab = label_of(r, mode)
        if r.is_gold or lab is None or (lab == "tie" and not ties):
            continue
        out.setdefault(r.rater, {})[r.item] = lab
    return out


def units_of(labels: dict[str, dict[str, Hashable]]) -> dict[str, list[Hashable]]:
    units: dict[str, list[Hashable]] = {}
    for items in labels.values():
        for item, lab in items.items():
            units.setdefault(item, []).append(lab)
    return {u: v for u, v in units.items() if len(v) >= 2}


def fleiss_kappa(units: Sequence[Sequence[Hashable]]) -> float | None:
    """Fleiss' kappa of items each labelled by two or more raters (the module docstring has the formula).
    None when no item has two labels, or when chance agreement is 1 (one label everywhere)."""
    units = [u for u in units if len(u) >= 2]
    if not units:
        return None
    total: Counter = Counter()
    p_items = []
    for u in units:
        counts = Counter(u)
        n = len(u)
        total.update(counts)
        p_items.append(sum(c * (c - 1) for c in counts.values()) / (n * (n - 1)))
    n_all = sum(total.values())
    p_e = sum((c / n_all) ** 2 for c in total.values())
    if p_e >= 1.0:
        return None
    return (statistics.fmean(p_items) - p_e) / (1 - p_e)


def krippendorff_alpha(labels: dict[str, dict[str, Hashable]], level: str = "nominal") -> float | None:
    """Krippendorff's alpha from the `krippendorff` package: a raters x items matrix, nan where a rater did not
    answer. Nominal labels are coded as category numbers (any coding gives the same alpha). None when fewer
    than one item has two labels or there is no variation to measure."""
    import krippendorff
    import numpy as np

    items = sorted(units_of(labels))
    if not items:
        return None
    raters = sorted(labels)
    codes: dict[Hashable, float] = {}
    data = np.full((len(raters), len(items)), np.nan)
    for i, r in enumerate(raters):
        for j, u in enumerate(items):
            if u in labels[r]:
                v = labels[r][u]
                data[i, j] = float(v) if level == "interval" else codes.setdefault(v, float(len(codes)))
    try:
        a = float(krippendorff.alpha(reliability_data=data, level_of_measurement=level))
    except ValueError:  # one value in the whole domain: agreement is undefined
        return None
    return a if math.isfinite(a) else None


def agreement(records: Sequence[Record], mode: str, ties: bool = False) -> dict:
    """Agreement on the real items two or more raters answered (see the module docstring)."""
    labels = labels_by_rater(records, mode, ties)
    units = units_of(labels)
    out: dict[str, Any] = {
        "items": len(units),
        "answers": sum(len(v) for v in units.values()),
        "krippendorff_alpha": krippendorff_alpha(labels, "nominal"),
        "fleiss_kappa": fleiss_kappa(list(units.values())),
    }
    if mode == "rate":
        out["krippendorff_alpha_interval"] = krippendorff_alpha(labels, "interval")
    out["cohen_kappa"] = [_finite(p) for p in pairwise_kappas(labels)]
    return out


def _finite(d: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def gold_accuracy(records: Sequence[Record], mode: str = "pair") -> dict | None:
    """Answers to gold items (skips left out) that equal the gold answer; ratings also get the mean absolute
    error."""
    g = [r for r in records if r.is_gold and r.choice != "skip"]
    if not g:
        return None
    out = {"answers": len(g), "accuracy": sum(1 for r in g if r.choice == r.gold) / len(g)}
    if mode == "rate":
        out["mean_abs_error"] = statistics.fmean(abs(r.choice - r.gold) for r in g)
    return out


def seconds(records: Sequence[Record]) -> list[float]:
    return [r.answered_at - r.shown_at for r in records if r.shown_at is not None]


def _time_summary(ts: list[float]) -> dict | None:
    if not ts:
        return None
    ts = sorted(ts)
    return {
        "median_s": statistics.median(ts),
        "p90_s": ts[min(len(ts) - 1, math.ceil(0.9 * len(ts)) - 1)],
        "mean_s": statistics.fmean(ts),
    }


def distribution(records: Sequence[Record], mode: str, scale: int, k: int) -> dict[str, int]:
    """How often each answer was given, as raters saw it (rankings: the position ranked first)."""
    keys = {"pair": ["A", "B", "tie"], "rate": [str(s) for s in range(1, scale + 1)], "rank": []}[mode]
    if mode == "rank":
        keys = [str(p) for p in range(1, k + 1)]
    c = Counter("skip" if r.answer == "skip" else str(r.answer[0] if mode == "rank" else r.answer) for r in records)
    return {key: c.get(key, 0) for key in [*keys, "skip"]}


def rater_table(records: Sequence[Record], mode: str, kappas: list[dict], flags) -> list[dict]:
    by: dict[str, list[Record]] = {}
    for r in records:
        by.setdefault(r.rater, []).append(r)
    rows = []
    for name in sorted(by):
        rs = by[name]
        real = [r for r in rs if not r.is_gold]
        row: dict[str, Any] = {
            "rater": name,
            "answers": len(real),
            "skips": sum(1 for r in real if r.answer == "skip"),
        }
        if mode == "pair":
            row["ties"] = sum(1 for r in real if r.answer == "tie")
            pb = position_bias([r.answer for r in rs])
            row["chosen_shown_first"] = pb["chosen_shown_first"] if pb else None
            row["position_p_value"] = pb["p_value"] if pb else None
        gold = gold_accuracy(rs, mode)
        row["gold_answers"] = gold["answers"] if gold else 0
        row["gold_accuracy"] = gold["accuracy"] if gold else None
        mine = [p for p in kappas if name in p["raters"] and p["kappa"] is not None]
        row["shared_items"] = sum(p["shared_items"] for p in mine)
        row["kappa_mean"] = statistics.fmean(p["kappa"] for p in mine) if mine else None
        t = _time_summary(seconds(rs))
        row["median_time_s"] = t["median_s"] if t else None
        row["flags"] = rater_flags(row, flags)
        rows.append(row)
    return rows


def rater_flags(row: dict, flags) -> list[str]:
    out = []
    if row["gold_answers"] >= flags.min_evidence and row["gold_accuracy"] < flags.min_gold_accuracy:
        out.append(f"gold accuracy {row['gold_accuracy']:.0%} < {flags.min_gold_accuracy:.0%}")
    if (
        row["shared_items"] >= flags.min_evidence
        and row["kappa_mean"] is not None
        and row["kappa_mean"] < flags.min_kappa
    ):
        out.append(f"agreement (mean kappa {row['kappa_mean']:.2f}) < {flags.min_kappa:.2f}")
    p = row.get("position_p_value")
    if p is not None and p < 0.01 and row["answers"] >= flags.min_evidence:
        out.append(f"position bias: picks A in {row['chosen_shown_first']:.0%} of pairs (p = {p:.1g})")
    return out


def summarize(records: Sequence[Record], task, progress: dict) -> dict:
    """Every figure of the dashboard, `/api/stats` and `prefcli label stats`."""
    mode = task.mode
    k = max((len(r.candidates) for r in records), default=2)
    agree = agreement(records, mode)
    out: dict[str, Any] = {
        "mode": mode,
        "overlap": task.overlap,
        **progress,
        "answers": sum(1 for r in records if not r.is_gold),
        "gold_answers": sum(1 for r in records if r.is_gold),
        "raters": len({r.rater for r in records}),
        "agreement": agree,
    }
    if mode == "pair":
        out["agreement_with_ties"] = agreement(records, mode, ties=True)
    out["gold"] = gold_accuracy(records, mode)
    out["position_bias"] = position_bias([r.answer for r in records]) if mode == "pair" else None
    out["time_per_item"] = _time_summary(seconds(records))
    out["distribution"] = distribution(records, mode, task.scale, k)
    out["per_rater"] = rater_table(records, mode, agree["cohen_kappa"], task.flags)
    out["flagged"] = [{"rater": r["rater"], "flags": r["flags"]} for r in out["per_rater"] if r["flags"]]
    return out
