"""The RL methods at equal KL: gold reward against KL to the base, from the rows of rl_comparison.py.

    python experiments/rl_comparison.py --frontier     # the tables (stdout) and docs/img/rl-frontier.png

Every run is one point (KL to the base, held-out gold reward) of its seed. A method's frontier in a seed is
the line through its points of that seed sorted by KL, starting at the base model (KL 0, the base's gold
reward of that seed: the limit of an infinite KL weight). Gold at a matched KL (5 and 15 nats) is read off
that line by linear interpolation, per seed, and only between two points that bracket it: never
extrapolated. A method whose points of a seed do not reach a matched KL has no value there for that seed,
and the table says for how many seeds it has one.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

MATCHED_KL = (5.0, 15.0)
# how a row's (tag, method) is named on the figure and in the tables
LABELS = {
    ("ensemble", "ppo_rm"): "ppo on 1 RM",
    ("ensemble", "ppo_ens"): "ppo on 3 RMs (same data)",
    ("ensemble_boot", "ppo_ens"): "ppo on 3 RMs (bootstrap)",
}
ORDER = ["ppo", "grpo", "dapo", "gspo", "online_dpo", *LABELS.values()]


def label(r: dict) -> str:
    return LABELS.get((r["tag"], r["method"]), r["method"])


def kl_value(r: dict) -> float:
    if r.get("kl_value") is not None:
        return r["kl_value"]
    return 0.1 if r["method"] == "online_dpo" else 0.05


def interpolate(points: list[tuple[float, float]], x: float) -> tuple[float | None, bool]:
    """(gold at KL x on the line through the points sorted by KL, whether the lower end is the base (KL 0));
    (None, False) when no two consecutive points bracket x."""
    pts = sorted(points)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1 and x1 > x0:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0), x0 == 0.0
    return None, False


def mean_sd(xs: list[float]) -> str:
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:.3f}"
    return f"{statistics.fmean(xs):.3f} ± {statistics.stdev(xs):.3f}"


def report(rows: list[dict], tags: list[str], figure: Path) -> None:
    rows = [r for r in rows if r.get("tag") in tags and r.get("steps") == 400]
    base = {r["seed"]: r["gold_reward"] for r in rows if r["method"] == "base" and r["tag"] == "algos400"}
    for r in rows:  # every evaluation must reproduce the base of the first table exactly (same seed, same code)
        if r["method"] == "base" and abs(r["gold_reward"] - base[r["seed"]]) > 1e-9:
            print(f"WARNING: base of tag {r['tag']} seed {r['seed']}: {r['gold_reward']} != {base[r['seed']]}")
    runs = [r for r in rows if r["method"] != "base"]
    by = defaultdict(list)  # (label, kl value) -> rows
    for r in runs:
        by[label(r), kl_value(r)].append(r)
    labels = sorted({k[0] for k in by}, key=lambda x: ORDER.index(x) if x in ORDER else len(ORDER))

    print("| method | KL control | seeds | KL to base | gold reward | distinct-2 |")
    print("|---|---|---|---|---|---|")
    for lab in labels:
        for (lb, v), rs in sorted(by.items(), key=lambda kv: kv[0][1]):
            if lb != lab:
                continue
            knob = "beta" if rs[0]["method"] == "online_dpo" else "kl_coef"
            print(
                f"| {lab} | {knob} {v:g} | {len(rs)} | {mean_sd([r['kl'] for r in rs])} | "
                f"{mean_sd([r['gold_reward'] for r in rs])} | {mean_sd([r['distinct2'] for r in rs])} |"
            )

    seeds_all = sorted(base)
    print("\nGold reward at matched KL, per seed: linear between the two points of that seed that bracket it;")
    print("† = the lower point is the base model (KL 0): a chord, which understates a concave frontier;")
    print(
        "- = that seed's points do not reach it (never extrapolated). Mean ± sd where every seed has one, not a chord:\n"
    )
    head = [f"KL {x:g}, seed {s}" for x in MATCHED_KL for s in seeds_all]
    print("| method | " + " | ".join(head) + " | " + " | ".join(f"KL {x:g}, mean" for x in MATCHED_KL) + " |")
    print("|---|" + "---|" * (len(head) + len(MATCHED_KL)))
    for lab in labels:
        cells, means = [], []
        for x in MATCHED_KL:
            vals = []
            for s in seeds_all:
                pts = [(0.0, base[s])] + [
                    (r["kl"], r["gold_reward"]) for r in runs if label(r) == lab and r["seed"] == s
                ]
                y, chord = interpolate(pts, x) if len(pts) > 1 else (None, False)
                cells.append("-" if y is None else f"{y:.3f}{' †' if chord else ''}")
                vals.append(None if chord else y)
            means.append(mean_sd(vals) if all(v is not None for v in vals) else "-")
        print(f"| {lab} | " + " | ".join(cells) + " | " + " | ".join(means) + " |")
    plot(runs, base, labels, figure)
    print(f"\nfigure: {figure}")


def plot(runs: list[dict], base: dict, labels: list[str], figure: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    colors = plt.get_cmap("tab10")
    b_gold = statistics.fmean(base.values())
    for i, lab in enumerate(labels):
        rs = [r for r in runs if label(r) == lab]
        c = colors(i)
        marker = "s" if lab.startswith("ppo on") else "o"
        settings = sorted(
            {kl_value(r) for r in rs}, key=lambda v: statistics.fmean(r["kl"] for r in rs if kl_value(r) == v)
        )
        for ax, key in zip(axes, ("gold_reward", "distinct2")):
            ax.scatter([r["kl"] for r in rs], [r[key] for r in rs], color=c, alpha=0.35, s=14, marker=marker)
            mx = [statistics.fmean(r["kl"] for r in rs if kl_value(r) == v) for v in settings]
            my = [statistics.fmean(r[key] for r in rs if kl_value(r) == v) for v in settings]
            ax.plot(mx, my, color=c, marker=marker, label=lab, lw=1.5)
            if (
                key == "gold_reward"
            ):  # the chord from the base (KL 0): what the interpolation assumes below the first point
                ax.plot([0.0, mx[0]], [b_gold, my[0]], color=c, lw=0.8, ls="--")
            for v, x, y in zip(settings, mx, my):
                ax.annotate(f"{v:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=c)
    axes[0].scatter([0], [b_gold], color="black", zorder=5, label="base model")
    for ax in axes:
        for x in MATCHED_KL:
            ax.axvline(x, color="grey", ls=":", lw=1)
        ax.set_xlabel("KL to the base model (nats per completion, held-out prompts)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out gold reward (VADER, 200 prompts)")
    axes[1].set_ylabel("distinct-2 of the 200 completions")
    axes[0].set_title(
        "gold reward against KL (small: one seed; large: mean per KL setting, labelled; dashed: chord from the base)",
        fontsize=9,
    )
    axes[1].set_title("what the reward costs in diversity", fontsize=9)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(
        "RL methods on the quickstart task, 400 steps, each method's KL control swept "
        "(kl_coef 0.05 / beta 0.1: seeds 0-2; the other settings: seed 0)",
        fontsize=10,
    )
    fig.tight_layout()
    figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(figure, dpi=110)
