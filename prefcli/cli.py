"""The `prefcli` command line. Each command: load recipe -> build run -> engine.

stdout carries exactly one JSON object (the run summary) as its last line; progress, tables and
logs go to stderr. Exit codes: 0 done; 2 bad recipe, data or usage; 1 failure during training;
130 interrupted after writing a checkpoint. torch and transformers are imported only inside the
commands that need them, so `prefcli --help` and `prefcli validate` answer at once.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import __version__
from .errors import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_USAGE, PrefcliError

app = typer.Typer(
    name="prefcli",
    help="Train language models on human preferences. Each command reads a YAML recipe; "
    "`prefcli validate` checks recipes without running them. Docs: docs/index.md.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)]
SetOpt = Annotated[Optional[list[str]], typer.Option(
    "--set", "-s", metavar="KEY=VALUE",
    help="Override a recipe field, e.g. --set train.lr=1e-4 (repeatable; validated like the file).")]
OutOpt = Annotated[Optional[Path], typer.Option(
    "--output-dir", "-o", help="Run folder (default: the recipe's output.dir, else runs/<command>-<recipe>).")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue from the newest checkpoint in the run folder.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace a previous run in the run folder.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress output; errors and the JSON summary only.")]
SmokeOpt = Annotated[bool, typer.Option(
    "--smoke", help="A few steps on a few rows with a tiny random model of the same architecture and the real "
    "tokenizer (CPU when there is no GPU): proves a recipe, its data and its pipeline fit together.")]


def _fail(command: str, err: BaseException, code: int, status: str) -> None:
    typer.echo(f"error: {err}", err=True)
    print(json.dumps({"command": command, "status": status, "exit_code": code, "error": str(err)}), flush=True)
    raise typer.Exit(code)


def _train(command: str, recipe: Path, set_: list[str] | None, output_dir: Path | None, resume: bool,
           overwrite: bool, quiet: bool, smoke: bool) -> None:
    from .runner import RunOptions, run_training

    opts = RunOptions(overrides=list(set_ or []), output_dir=str(output_dir) if output_dir else None,
                      resume=resume, overwrite=overwrite, quiet=quiet, smoke=smoke)
    try:
        summary = run_training(command, recipe, opts)
    except PrefcliError as e:
        status = {EXIT_USAGE: "invalid", EXIT_INTERRUPTED: "interrupted"}.get(e.exit_code, "failed")
        _fail(command, e, e.exit_code, status)
    except KeyboardInterrupt:
        _fail(command, RuntimeError("interrupted before training started; nothing was written"),
              EXIT_INTERRUPTED, "interrupted")
    from .engine.progress import emit_summary

    import os
    if int(os.environ.get("RANK", "0")) == 0:
        emit_summary(summary)


@app.command()
def sft(recipe: RecipeArg, set_: SetOpt = None, output_dir: OutOpt = None, resume: ResumeOpt = False,
        overwrite: OverwriteOpt = False, quiet: QuietOpt = False, smoke: SmokeOpt = False) -> None:
    """Supervised fine-tuning, and pretraining from scratch (model.init). Logs held-out perplexity."""
    _train("sft", recipe, set_, output_dir, resume, overwrite, quiet, smoke)


@app.command()
def reward(recipe: RecipeArg, set_: SetOpt = None, output_dir: OutOpt = None, resume: ResumeOpt = False,
           overwrite: OverwriteOpt = False, quiet: QuietOpt = False, smoke: SmokeOpt = False) -> None:
    """Reward model (a scalar head at the last real token) from preference pairs (Bradley-Terry), human
    scores or rankings. Logs held-out pairwise accuracy, margin and calibration."""
    _train("reward", recipe, set_, output_dir, resume, overwrite, quiet, smoke)


@app.command()
def contrastive(recipe: RecipeArg, set_: SetOpt = None, output_dir: OutOpt = None, resume: ResumeOpt = False,
                overwrite: OverwriteOpt = False, quiet: QuietOpt = False, smoke: SmokeOpt = False) -> None:
    """Policy from preferences (dpo, cdpo, robust, ipo, hinge, simpo, cpo, orpo, kto) or an InfoNCE
    preference encoder (infonce). Logs preference accuracy, rewards, margins and log-probs."""
    _train("contrastive", recipe, set_, output_dir, resume, overwrite, quiet, smoke)


@app.command()
def validate(
    recipes: Annotated[list[Path], typer.Argument(help="Recipe files to check.", show_default=False)],
    command: Annotated[Optional[str], typer.Option(
        "--command", "-c", help="Validate as this command's recipe (default: each recipe's own 'command:').")] = None,
    set_: SetOpt = None,
) -> None:
    """Check recipes without running them: schema, types, paths. Exit 2 if any is invalid."""
    from .recipe import load_recipe

    results = []
    bad = 0
    for path in recipes:
        try:
            loaded = load_recipe(path, command, list(set_ or []))
            typer.echo(f"ok       {path} ({loaded.command})", err=True)
            results.append({"recipe": str(path), "valid": True, "command": loaded.command})
        except PrefcliError as e:
            bad += 1
            typer.echo(f"invalid  {e}", err=True)
            results.append({"recipe": str(path), "valid": False, "error": str(e)})
    print(json.dumps({"status": "invalid" if bad else "valid", "invalid": bad, "recipes": results}), flush=True)
    if bad:
        raise typer.Exit(EXIT_USAGE)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"prefcli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    pass


def main() -> None:
    try:
        app()
    except SystemExit:
        raise
    except Exception as e:  # an unexpected bug: say so plainly, exit 1
        typer.echo(f"error: unexpected {type(e).__name__}: {e}", err=True)
        sys.exit(EXIT_FAILURE)


if __name__ == "__main__":
    main()
