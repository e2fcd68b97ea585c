"""`prefcli eval`'s outputs: the run folder (recipe.yaml, examples.jsonl, summary.json) and the table on stderr."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..recipe import dump_recipe
from ..recipe.commands import EvalRecipe

ARTIFACTS = ("recipe.yaml", "summary.json", "examples.jsonl", "tensorboard")  # tensorboard: log.report_to


class Log:
    """Lines on stderr (none with --quiet, except warnings), and the final table."""

    def __init__(self, quiet: bool):
        from rich.console import Console

        self.quiet = quiet
        self.console = Console(stderr=True, highlight=False)
        self.warnings: list[str] = []

    def info(self, text: str) -> None:
        if not self.quiet:
            self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def warn(self, text: str) -> None:
        self.warnings.append(text)
        self.console.print(f"warning: {text}", markup=False, highlight=False, style="yellow", soft_wrap=True)


def write_outputs(run_dir: Path, r: EvalRecipe, rows: list[dict], summary: dict, overwrite: bool) -> None:
    if overwrite:
        from ..engine.runfolder import clear_artifacts

        clear_artifacts(run_dir, ARTIFACTS)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.yaml").write_text(dump_recipe(r))
    with open(run_dir / "examples.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(_clean(row), ensure_ascii=False) + "\n")
    (run_dir / "summary.json").write_text(json.dumps(_clean(summary), indent=2) + "\n")


def _clean(v):
    """JSON has no NaN/inf: they are written as strings."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


# ------------------------------------------------------------------------------ table

TABLE_ROWS = (
    ("perplexity", "ppl", "perplexity"),
    ("bleu", "score", "BLEU"),
    ("rouge", "rouge1", "ROUGE-1 F"),
    ("rouge", "rouge2", "ROUGE-2 F"),
    ("rouge", "rougeL", "ROUGE-L F"),
    ("reward", "mean", "reward (mean)"),
    ("win_rate", "win_rate", "win rate vs baseline"),
    ("win_rate", "length_controlled", "length-controlled win rate"),
    ("kl", "k1", "KL k1 (per completion)"),
    ("kl", "k3", "KL k3 (per completion)"),
    ("env", "success_rate", "env success rate"),
    ("env", "env_reward", "env reward (mean)"),
    ("env", "turns", "env turns (mean)"),
    ("env", "tool_error_rate", "env tool-error rate"),
)


def table_rows(summary: dict) -> tuple[list[str], list[list[str]]]:
    models = summary["models"]
    names = list(models)
    body: list[list[str]] = []

    def fmt(x) -> str:
        return f"{x:.4g}" if isinstance(x, float) else str(x)

    for metric, key, label in TABLE_ROWS:
        if not any(metric in models[n] for n in names):
            continue
        cells = []
        for n in names:
            v = models[n].get(metric, {}).get(key)
            if metric == "win_rate" and isinstance(v, dict):  # the length-controlled win rate
                cells.append(f"{v['lc_win_rate']:.3f} [{v['ci_low']:.3f}, {v['ci_high']:.3f}]")
            elif metric == "win_rate" and v is not None:
                w = models[n][metric]
                cells.append(f"{v:.3f} [{w['ci_low']:.3f}, {w['ci_high']:.3f}]")
            else:
                cells.append("-" if v is None else fmt(v))
        body.append([label] + cells)
    if any("length_correlation" in models[n].get("reward", {}) for n in names):
        body.append(
            ["corr(reward, tokens)"]
            + [
                fmt(models[n]["reward"]["length_correlation"]["pearson"]) if "reward" in models[n] else "-"
                for n in names
            ]
        )
    for n0 in names[:1]:
        for k in models[n0].get("distinct", {}):
            body.append([k] + [fmt(models[n].get("distinct", {}).get(k, "-")) for n in names])
    if any("length" in models[n] for n in names):
        body.append(
            ["tokens (mean)"]
            + [fmt(models[n]["length"]["tokens"]["mean"]) if "length" in models[n] else "-" for n in names]
        )
        body.append(
            ["words (mean)"]
            + [fmt(models[n]["length"]["words"]["mean"]) if "length" in models[n] else "-" for n in names]
        )
    header = ["metric"] + [f"{n} ({models[n]['role']})" if models[n]["role"] not in ("model", n) else n for n in names]
    return header, body


def print_table(log: Log, summary: dict) -> None:
    from rich.table import Table

    header, body = table_rows(summary)
    t = Table(title="prefcli eval")
    for h in header:
        t.add_column(h, overflow="fold")
    for row in body:
        t.add_row(*row)
    log.console.print(t)
    first = next((m for m in summary["models"].values() if "bleu" in m), None)
    if first is not None:
        log.info(f"BLEU signature: {first['bleu']['signature']}")
    pa = summary.get("preference_accuracy")
    if pa:
        for k, v in pa.items():
            log.info(
                f"preference accuracy ({k}): {v['accuracy']:.3f} on {v['n']} pairs ({v['ties']} ties, "
                f"mean margin {v['margin_mean']:.4g})"
            )
            if "chosen_longer" in v:
                log.info(
                    f"  chosen is longer in {v['chosen_longer']:.3f} of the pairs; corr(reward, words) over chosen "
                    f"and rejected: {v['length_correlation']['pearson']:.3f}"
                )
            if "per_user" in v:
                cells = ", ".join(f"{u} {a:.3f}" for u, a in v["per_user"].items())
                log.info(f"  per user: {cells}; worst: {v['worst_user']['user']} {v['worst_user']['accuracy']:.3f}")
    for name, m in summary["models"].items():
        for metric, key in (("reward", "mean"), ("win_rate", "win_rate")):
            v = m.get(metric)
            if isinstance(v, dict) and "per_user" in v:
                cells = ", ".join(f"{u} {a:.3f}" for u, a in v["per_user"].items())
                w = v["worst_user"]
                log.info(f"{name} {metric} per user: {cells}; worst: {w['user']} {w[key]:.3f}")
    log.info(f"examples: {summary['examples_file']}")
