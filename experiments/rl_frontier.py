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


def matched(runs: list[dict], base: dict, lab: str, x: float) -> dict[int, tuple[float | None, bool]]:
    """Gold reward of method `lab` at KL x in each seed of `base`: interpolate() on that seed's runs and its base."""
    out = {}
    for s in sorted(base):
        pts = [(0.0, base[s])] + [(r["kl"], r["gold_reward"]) for r in runs if label(r) == lab and r["seed"] == s]
        out[s] = interpolate(pts, x)
    return out


def seed_points(runs: list[dict], base: dict, lab: str, s: int) -> list[float]:
    """The KLs of method `lab`'s points in seed s, the base's 0 first, sorted."""
    return sorted([0.0] + [r["kl"] for r in runs if label(r) == lab and r["seed"] == s])


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

    print("| method | KL control | seeds | KL to base | gold reward | distinct-2 | training s / run |")
    print("|---|---|---|---|---|---|---|")
    for lab in labels:
        for (lb, v), rs in sorted(by.items(), key=lambda kv: kv[0][1]):
            if lb != lab:
                continue
            knob = "beta" if rs[0]["method"] == "online_dpo" else "kl_coef"
            print(
                f"| {lab} | {knob} {v:g} | {len(rs)} | {mean_sd([r['kl'] for r in rs])} | "
                f"{mean_sd([r['gold_reward'] for r in rs])} | {mean_sd([r['distinct2'] for r in rs])} | "
                f"{wall_range([train_s(r) for r in rs])} |"
            )

    seeds_all = sorted(base)
    print("\nGold reward at matched KL, per seed: linear between the two points of that seed that bracket it;")
    print("† = the lower point is the base model (KL 0): a chord, which understates a concave frontier;")
    print(
        "- = that seed's points do not reach it (never extrapolated). Mean ± sd (number of seeds) over the seeds whose"
    )
    print("value lies between two runs (not on a chord):\n")
    # the reward-model runs have one KL setting each: only chords, so they are compared in paired_rm instead
    methods = [lab for lab in labels if lab not in LABELS.values()]
    head = [f"KL {x:g}, seed {s}" for x in MATCHED_KL for s in seeds_all]
    print("| method | " + " | ".join(head) + " | " + " | ".join(f"KL {x:g}, mean" for x in MATCHED_KL) + " |")
    print("|---|" + "---|" * (len(head) + len(MATCHED_KL)))
    for lab in methods:
        cells, means = [], []
        for x in MATCHED_KL:
            per_seed = matched(runs, base, lab, x)
            cells += ["-" if y is None else f"{y:.3f}{' †' if chord else ''}" for y, chord in per_seed.values()]
            got = [y for y, chord in per_seed.values() if y is not None and not chord]
            means.append(f"{mean_sd(got)} ({len(got)})" if got else "-")
        print(f"| {lab} | " + " | ".join(cells) + " | " + " | ".join(means) + " |")
    print("\nThe KL of the two points each value above lies between (0 = the base), per seed: the wider, the more a")
    print("straight line between them understates a concave frontier:\n")
    print("| method | " + " | ".join(head) + " |")
    print("|---|" + "---|" * len(head))
    for lab in methods:
        cells = []
        for x in MATCHED_KL:
            for s in seeds_all:
                pts = seed_points(runs, base, lab, s)
                br = next(((a, b) for a, b in zip(pts, pts[1:]) if a <= x <= b and b > a), None)
                cells.append("-" if br is None else f"{br[0]:.1f}-{br[1]:.1f}")
        print(f"| {lab} | " + " | ".join(cells) + " |")
    paired_matched(runs, base, methods)
    paired_rm(runs)
    plot(runs, base, labels, figure)
    print(f"\nfigure: {figure}")


def paired_matched(runs: list[dict], base: dict, labels: list[str], ref: str = "ppo") -> None:
    """Each method minus `ref` at each matched KL, seed by seed (same seed: same base, same evaluation prompts and
    sampling), over the seeds where both values lie between two runs."""
    print(f"\nEach method minus {ref} at matched KL, paired by seed (seeds where both lie between two runs):\n")
    print("| method | " + " | ".join(f"KL {x:g}: minus {ref} | seeds {ref} ahead" for x in MATCHED_KL) + " |")
    print("|---|" + "---|---|" * len(MATCHED_KL))
    for lab in labels:
        if lab == ref:
            continue
        cells = []
        for x in MATCHED_KL:
            a, b = matched(runs, base, lab, x), matched(runs, base, ref, x)
            d = [
                a[s][0] - b[s][0]
                for s in a
                if a[s][0] is not None and b[s][0] is not None and not a[s][1] and not b[s][1]
            ]
            cells += [f"{mean_sd(d)} ({len(d)})" if d else "-", f"{sum(v < 0 for v in d)} of {len(d)}" if d else "-"]
        print(f"| {lab} | " + " | ".join(cells) + " |")


def train_s(r: dict) -> float:
    """A run's training wall seconds; the rows of the first tables (tags algos400, ensemble) hold only the wall
    time of training and evaluation together (the evaluation was 35 s of it)."""
    return r["train_wall_s"] if r.get("train_wall_s") is not None else r["wall_s"]


def wall_range(xs: list[float]) -> str:
    """Wall seconds of a setting's runs: the mean, and the range when they differ."""
    lo, hi = min(xs), max(xs)
    mean = f"{statistics.fmean(xs):.0f}"
    return mean if len(xs) == 1 or round(lo) == round(hi) else f"{mean} ({lo:.0f}-{hi:.0f})"


def paired_rm(runs: list[dict]) -> None:
    """PPO on each reward-model ensemble minus PPO on one reward model, and the bootstrap ensemble minus the one
    on the same data, seed by seed (same seed: same rollouts' prompts, same evaluation sampling)."""
    single, same, boot = LABELS.values()
    for lab, ref in ((same, single), (boot, single), (boot, same)):
        a = {r["seed"]: r for r in runs if label(r) == lab}
        b = {r["seed"]: r for r in runs if label(r) == ref}
        seeds = sorted(set(a) & set(b))
        if not seeds:
            continue
        keys = ("gold_reward", "kl", "distinct2", "length")
        print(f"\n{lab} minus {ref}, per seed:\n")
        print("| seed | gold reward | KL | distinct-2 | length |")
        print("|---|---|---|---|---|")
        diffs = {k: [a[s][k] - b[s][k] for s in seeds] for k in keys}
        for i, s in enumerate(seeds):
            print(f"| {s} | " + " | ".join(f"{diffs[k][i]:+.3f}" for k in keys) + " |")
        if len(seeds) > 1:
            print("| mean | " + " | ".join(mean_sd(diffs[k]) for k in keys) + " |")


XMAX = 45.0  # the scatter panels' KL axis: the runs beyond it (online DPO at beta 0.1) are drawn at its edge


def plot(runs: list[dict], base: dict, labels: list[str], figure: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(18, 5.6), gridspec_kw={"width_ratios": [1.15, 1.0, 0.85]})
    colors = plt.get_cmap("tab10")
    b_gold = statistics.fmean(base.values())
    beyond = []
    for i, lab in enumerate(labels):
        rs = [r for r in runs if label(r) == lab]
        c = colors(i)
        marker = "s" if lab.startswith("ppo on") else "o"
        for ax, key in zip(axes, ("gold_reward", "distinct2")):
            b_key = {s: base[s] for s in base} if key == "gold_reward" else {}
            for s in sorted({r["seed"] for r in rs}):  # each seed's line: what the interpolation reads
                pts = sorted((r["kl"], r[key]) for r in rs if r["seed"] == s)  # the axis clips beyond XMAX
                if s in b_key:
                    pts = [(0.0, b_key[s])] + pts
                ax.plot(*zip(*pts), color=c, lw=0.9, alpha=0.55, label=lab if s == min(r["seed"] for r in rs) else None)
            near = [r for r in rs if r["kl"] <= XMAX]
            ax.scatter([r["kl"] for r in near], [r[key] for r in near], color=c, s=16, marker=marker)
            far = [r for r in rs if r["kl"] > XMAX]
            ax.scatter([XMAX] * len(far), [r[key] for r in far], color=c, s=34, marker=">")
            if key == "gold_reward":
                beyond += [f"{lab} {r['kl']:.0f}" for r in far]
            for v in sorted({kl_value(r) for r in rs}):  # the setting's label at the mean of its runs
                mine = [r for r in near if kl_value(r) == v]
                if mine:
                    x, y = statistics.fmean(r["kl"] for r in mine), statistics.fmean(r[key] for r in mine)
                    ax.annotate(f"{v:g}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7, color=c)
    axes[0].scatter([0], [b_gold], color="black", zorder=5, label="base model")
    for ax in axes[:2]:
        for x in MATCHED_KL:
            ax.axvline(x, color="grey", ls=":", lw=1)
        ax.set_xlim(-1, XMAX + 1.5)
        ax.set_xlabel("KL to the base model (nats per completion, held-out prompts)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out gold reward (VADER, 200 prompts)")
    axes[1].set_ylabel("distinct-2 of the 200 completions")
    note = f"\n> at the edge: beyond {XMAX:g} nats ({', '.join(beyond)})" if beyond else ""
    axes[0].set_title(
        "gold reward against KL: one line per seed from the base through its runs;\n"
        f"numbers: the KL control of the runs beside them{note}",
        fontsize=8,
    )
    axes[1].set_title("what the reward costs in diversity", fontsize=9)
    leg = axes[0].legend(fontsize=8, loc="lower right")
    for line in leg.get_lines():
        line.set_alpha(1.0)
        line.set_linewidth(2.5)
    matched_bars(axes[2], runs, base, [lab for lab in labels if lab not in LABELS.values()], colors)
    n_seeds = defaultdict(set)  # how many seeds each setting has, for the title
    for r in runs:
        n_seeds[label(r), kl_value(r)].add(r["seed"])
    counts = sorted({len(v) for v in n_seeds.values()})
    fig.suptitle(
        "RL methods on the quickstart task, 400 steps, each method's KL control swept "
        f"({' or '.join(map(str, counts))} seeds per setting)",
        fontsize=10,
    )
    fig.tight_layout()
    figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(figure, dpi=110)


def matched_bars(ax, runs: list[dict], base: dict, labels: list[str], colors) -> None:
    """Gold reward at each matched KL: one bar per method, the mean over the seeds whose value lies between two
    runs, the seeds' values as dots, and how many seeds that is."""
    width = 0.8 / len(labels)
    for i, lab in enumerate(labels):
        for j, x in enumerate(MATCHED_KL):
            ys = [y for y, chord in matched(runs, base, lab, x).values() if y is not None and not chord]
            pos = j + (i - (len(labels) - 1) / 2) * width
            if not ys:
                ax.text(pos, 0.02, "n/a", rotation=90, ha="center", va="bottom", fontsize=6, color=colors(i))
                continue
            ax.bar(pos, statistics.fmean(ys), width * 0.9, color=colors(i), alpha=0.75)
            ax.scatter([pos] * len(ys), ys, color="black", s=6, zorder=3)
            ax.text(pos, max(ys) + 0.015, f"{len(ys)}", ha="center", fontsize=6)
    ax.set_xticks(range(len(MATCHED_KL)), [f"KL {x:g} nats" for x in MATCHED_KL])
    ax.set_ylim(0, 1)
    ax.set_ylabel("gold reward at that KL (interpolated per seed)")
    ax.set_title(
        "at matched KL: bar = mean over seeds, dots = seeds, number = seeds\n"
        "(only seeds with a run on each side; n/a: none)",
        fontsize=8,
    )
    ax.grid(alpha=0.3, axis="y")
