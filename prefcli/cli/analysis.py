"""The analysis commands: `prefcli data inspect` (preference data) and `prefcli explain` (a trained model)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from .. import SEED_MAX
from ..errors import EXIT_INTERRUPTED, EXIT_USAGE, PrefcliError, UsageError
from .base import QuietOpt, app, examples, fail

# ------------------------------------------------------------------------------- data inspect

data_app = typer.Typer(
    help="Look at preference data before training on it: `prefcli data inspect DATA_OR_RECIPE`.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(data_app, name="data")


def _key_values(items: list[str] | None, option: str) -> dict[str, str]:
    out = {}
    for it in items or []:
        k, sep, v = it.partition("=")
        if not sep or not k.strip() or not v.strip():
            raise UsageError(f"{option} expects NAME=COLUMN, got {it!r}")
        out[k.strip()] = v.strip()
    return out


@data_app.command(
    "inspect",
    epilog=examples(
        "prefcli data inspect data/quickstart/preferences.jsonl --eval data/quickstart/preferences_eval.jsonl",
        "prefcli data inspect recipes/quickstart/reward.yaml --plots inspect/    # the data as the recipe reads it",
    ),
)
def data_inspect(
    source: Annotated[
        str,
        typer.Argument(
            help="A data file (JSONL, JSON, CSV, Parquet), a saved dataset folder or hub dataset, or a recipe "
            "(its data read as training reads it).",
            show_default=False,
        ),
    ],
    eval_: Annotated[
        str | None, typer.Option("--eval", help="Held-out rows (a data file) for leakage and held-out baselines.")
    ] = None,
    kind: Annotated[
        str,
        typer.Option(help="Row kind: auto (from the columns), pairs, unpaired, scores, rankings, sft or prompts."),
    ] = "auto",
    columns: Annotated[
        list[str] | None,
        typer.Option("--columns", "-c", metavar="NAME=COLUMN", help="Column mapping, e.g. chosen=good (repeatable)."),
    ] = None,
    tokenizer: Annotated[
        str | None,
        typer.Option(help="Tokenizer for token lengths (default: the bundled kjv-base tokenizer; a recipe: its own)."),
    ] = None,
    max_length: Annotated[
        int | None, typer.Option(help="Count the rows a training max_length would truncate (a recipe: its own).")
    ] = None,
    reward: Annotated[
        str | None,
        typer.Option(
            help="A reward source to compare the labels with: a reward-model folder, or a recipe reward entry "
            "in YAML, e.g. '{kind: sentiment}'."
        ),
    ] = None,
    plots: Annotated[
        Path | None, typer.Option(help="Write PNG histograms (lengths, length differences, raters) here.")
    ] = None,
    max_rows: Annotated[int | None, typer.Option(help="Read only the first N rows of each file.")] = None,
    folds: Annotated[int, typer.Option(help="Cross-validation folds when there are no held-out rows.")] = 5,
    top_words: Annotated[int, typer.Option(help="Words listed per side.")] = 10,
    seed: Annotated[
        int, typer.Option(min=0, max=SEED_MAX, help="Seed of the cross-validation folds and the debias subsample.")
    ] = 0,
    quiet: QuietOpt = False,
) -> None:
    """Counts, duplicates, truncation, length bias, shallow baselines, leakage and rater agreement of a
    preference data set. A report on stderr, the figures as one JSON line on stdout."""
    if max_rows is not None and max_rows <= 0:
        fail("data inspect", ValueError("--max-rows must be positive"), EXIT_USAGE, "invalid")
    if max_length is not None and max_length <= 1:
        fail("data inspect", ValueError("--max-length must be at least 2"), EXIT_USAGE, "invalid")
    try:
        from ..analysis.inspect import InspectOptions, print_report, run_inspect

        opts = InspectOptions(
            source=source,
            eval=eval_,
            kind=kind,
            columns=_key_values(columns, "--columns"),
            tokenizer=tokenizer,
            max_length=max_length,
            reward=reward,
            plots=str(plots) if plots else None,
            max_rows=max_rows,
            seed=seed,
            folds=folds,
            top_words=top_words,
            quiet=quiet,
        )
        summary = run_inspect(opts)
    except PrefcliError as e:
        fail("data inspect", e, e.exit_code, {EXIT_USAGE: "invalid"}.get(e.exit_code, "failed"))
    if not quiet:
        from rich.console import Console

        print_report(summary, Console(stderr=True, highlight=False))
    else:
        for w in summary["warnings"]:
            typer.echo(f"warning: {w}", err=True)
    print(json.dumps(_finite(summary)), flush=True)


def _finite(v):
    """JSON has no NaN: written as null."""
    import math

    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


# ------------------------------------------------------------------------------------ explain


@app.command(
    epilog=examples(
        'prefcli explain runs/quickstart/reward/final --prompt "And the people" --text " rejoiced with gladness"',
        "prefcli explain runs/quickstart/reward/final --pairs data/quickstart/preferences_eval.jsonl --html e.html",
        'prefcli explain MODEL --text "..." -q | head -n -1 | jq -c "select(.score > 0.5)"   # the per-token rows',
    )
)
def explain(
    model: Annotated[
        Path,
        typer.Argument(
            help="A reward model (from `prefcli reward`) or a tuned policy (from `prefcli contrastive` / `rlhf`).",
            show_default=False,
        ),
    ],
    text: Annotated[
        list[str] | None, typer.Option("--text", "-t", help="A completion to explain (repeatable).")
    ] = None,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The prompt before every --text.")] = "",
    pairs: Annotated[
        Path | None,
        typer.Option(help="JSONL of preference pairs (prompt, chosen, rejected): which tokens drive each preference."),
    ] = None,
    max_rows: Annotated[int, typer.Option(help="At most this many rows of --pairs.")] = 20,
    method: Annotated[
        str,
        typer.Option(
            help="auto (ig for a reward model, implicit for a policy), ig (integrated gradients, needs captum), "
            "prefix (prefix-score differences), implicit (beta log pi/pi_ref per token)."
        ),
    ] = "auto",
    reference: Annotated[
        Path | None,
        typer.Option(help="The reference (base) model of a policy (default: the model.path of the run's recipe.yaml)."),
    ] = None,
    beta: Annotated[
        float | None, typer.Option(help="beta of the implicit reward (default: the run's recipe, else 0.1).")
    ] = None,
    steps: Annotated[int, typer.Option(help="Integration steps of integrated gradients.")] = 64,
    plots: Annotated[
        Path | None, typer.Option(help="Write attention heatmaps and per-token bar charts (PNG) here.")
    ] = None,
    layer: Annotated[
        int | None, typer.Option(help="Attention layer to draw (0-based; default: the mean over layers).")
    ] = None,
    head: Annotated[int | None, typer.Option(help="Attention head to draw (default: the mean over heads).")] = None,
    html: Annotated[Path | None, typer.Option(help="Write a self-contained HTML page of the coloured tokens.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    quiet: QuietOpt = False,
) -> None:
    """See inside a model: per-token attribution of a reward model's score (integrated gradients, prefix
    scores), a policy's per-token implicit reward beta log pi/pi_ref, attention maps.

    Per-token JSONL rows on stdout, the summary as the last line; coloured tokens on stderr."""
    try:
        from ..analysis.explain import ExplainOptions, run_explain

        opts = ExplainOptions(
            model=str(model),
            texts=list(text or []),
            prompt=prompt,
            pairs=str(pairs) if pairs else None,
            max_rows=max_rows,
            method=method,
            reference=str(reference) if reference else None,
            beta=beta,
            steps=steps,
            plots=str(plots) if plots else None,
            layer=layer,
            head=head,
            html=str(html) if html else None,
            device=device,
            quiet=quiet,
        )
        summary = run_explain(opts, emit=lambda row: print(json.dumps(_finite(row), ensure_ascii=False), flush=True))
    except PrefcliError as e:
        fail("explain", e, e.exit_code, {EXIT_USAGE: "invalid"}.get(e.exit_code, "failed"))
    except KeyboardInterrupt:
        fail("explain", RuntimeError("interrupted"), EXIT_INTERRUPTED, "interrupted")
    print(json.dumps(_finite(summary), ensure_ascii=False), flush=True)
