"""Training curves from metrics.jsonl files (matplotlib, headless)."""

from __future__ import annotations

import json
import math
from pathlib import Path

# Panels in this order first; then anything else that is numeric, up to MAX_PANELS.
PREFERRED = ("loss/", "eval/", "reward/", "kl/", "policy/", "disc/", "lr")
SKIP = ("perf/", "step", "time_s")
MAX_PANELS = 12


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl; a line cut by a crash is skipped, bytes that are not UTF-8 are a ValueError
    naming the file and line (prefcli writes UTF-8: the file is damaged, or not a metrics file)."""
    rows = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"{path}:{n}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); prefcli writes "
                    "metrics.jsonl as UTF-8, so this file is damaged or is not a metrics file"
                ) from None
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut by a crash
    return rows


def choose_metrics(runs: dict[str, list[dict]], wanted: list[str] | None = None) -> list[str]:
    keys: list[str] = []
    for rows in runs.values():
        for r in rows:
            for k, v in r.items():
                if k not in keys and isinstance(v, (int, float)) and not isinstance(v, bool):
                    keys.append(k)
    if wanted:
        return [k for k in keys if any(k == w or k.startswith(w.rstrip("/") + "/") for w in wanted)]
    keys = [k for k in keys if not k.startswith(SKIP)]

    def rank(k: str) -> tuple[int, str]:
        for i, p in enumerate(PREFERRED):
            if k.startswith(p):
                return i, k
        return len(PREFERRED), k

    return sorted(keys, key=rank)[:MAX_PANELS]


def figure(runs: dict[str, list[dict]], keys: list[str], title: str | None = None):
    """The matplotlib figure: one panel per metric, one line per run. Each run keeps one colour in every panel
    (a panel where an earlier run has no points would otherwise restart the colour cycle and swap the runs'
    colours), and one legend for the whole figure names every run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colour = {label: palette[i % len(palette)] for i, label in enumerate(runs)}
    n = len(keys)
    cols = min(3, n)
    nrows = math.ceil(n / cols)
    ncol = min(len(runs), 4)
    legend_in = 0.3 * math.ceil(len(runs) / ncol) if len(runs) > 1 else 0.0  # header space, in inches
    title_in = 0.4 if title else 0.0
    height = 3.0 * nrows + legend_in + title_in
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, height), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for label, rows in runs.items():
            pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and "step" in r]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, label=label, color=colour[label], linewidth=1.2, marker="." if len(pts) < 30 else None)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    if title:
        fig.suptitle(title, y=1 - 0.08 / height, va="top")
    if len(runs) > 1:
        handles = [Line2D([], [], color=colour[label], linewidth=1.5) for label in runs]
        fig.legend(
            handles, list(runs), loc="upper center", bbox_to_anchor=(0.5, 1 - title_in / height), ncol=ncol,
            fontsize=8, frameon=False,
        )  # fmt: skip
    fig.tight_layout(rect=(0, 0, 1, 1 - (legend_in + title_in) / height))
    return fig


def plot_runs(
    runs: dict[str, list[dict]], out: Path, metrics: list[str] | None = None, title: str | None = None
) -> Path:
    import matplotlib.pyplot as plt

    keys = choose_metrics(runs, metrics)
    if not keys:
        raise ValueError("no numeric metrics to plot")
    fig = figure(runs, keys, title)
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_run_dirs(run_dirs: list[Path], out: Path, metrics: list[str] | None = None, title: str | None = None) -> dict:
    """`prefcli plot`: the curves of one or several run folders in one PNG, one line per run and
    panel per metric. Raises ValueError with a message naming the problem (no metrics.jsonl, an
    unknown metric). Returns what was drawn."""
    runs: dict[str, list[dict]] = {}
    for d in run_dirs:
        d = Path(d)
        f = d / "metrics.jsonl" if d.is_dir() else d
        if not f.is_file():
            raise ValueError(f"{d}: no metrics.jsonl (is it a prefcli run folder?)")
        rows = read_metrics(f)
        if not rows:
            raise ValueError(f"{f} is empty: the run logged no step yet")
        label = d.name if d.name != "metrics.jsonl" else d.parent.name
        base, k = label, 2
        while label in runs:  # same folder names in different places: runs/a/x, runs/b/x
            label = f"{base} ({k})"
            k += 1
        runs[label] = rows
    if metrics:
        every = sorted(
            {
                k
                for rows in runs.values()
                for r in rows
                for k, v in r.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"
            }
        )
        unknown = [w for w in metrics if not any(k == w or k.startswith(w.rstrip("/") + "/") for k in every)]
        if unknown:
            raise ValueError(
                f"no metric {', '.join(repr(u) for u in unknown)} in these runs (available: {', '.join(every)})"
            )
    keys = choose_metrics(runs, metrics)
    plot_runs(runs, out, metrics, title=title)
    return {"runs": list(runs), "metrics": keys, "output": str(out)}
