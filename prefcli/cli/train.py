"""The training commands, one per training row of the command table (`prefcli.recipe.COMMANDS`): each reads a
recipe and hands it to prefcli.runner; their help and examples are the table's."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import EXIT_INTERRUPTED, PrefcliError
from ..recipe.commands import COMMANDS, Command
from .base import (
    STATUS,
    OutOpt,
    OverwriteOpt,
    QuietOpt,
    RecipeArg,
    ResumeOpt,
    SetOpt,
    SmokeOpt,
    app,
    emit_json,
    examples,
    fail,
)


def train_command(
    command: str,
    recipe: Path,
    set_: list[str] | None,
    output_dir: Path | None,
    resume: bool,
    overwrite: bool,
    quiet: bool,
    smoke: bool,
) -> None:
    from ..runner import RunOptions, run_training

    opts = RunOptions(
        overrides=list(set_ or []),
        output_dir=str(output_dir) if output_dir else None,
        resume=resume,
        overwrite=overwrite,
        quiet=quiet,
        smoke=smoke,
    )
    try:
        summary = run_training(command, recipe, opts)
    except PrefcliError as e:
        fail(command, e, e.exit_code, STATUS.get(e.exit_code, "failed"))
    except KeyboardInterrupt:
        fail(
            command,
            RuntimeError("interrupted before training started; nothing was written"),
            EXIT_INTERRUPTED,
            "interrupted",
        )
    if int(os.environ.get("RANK", "0")) == 0:
        emit_json(summary)


def register(name: str, row: Command) -> None:
    """`prefcli <name> RECIPE` with the options every training command takes."""

    def command(
        recipe: RecipeArg,
        set_: SetOpt = None,
        output_dir: OutOpt = None,
        resume: ResumeOpt = False,
        overwrite: OverwriteOpt = False,
        quiet: QuietOpt = False,
        smoke: SmokeOpt = False,
    ) -> None:
        train_command(name, recipe, set_, output_dir, resume, overwrite, quiet, smoke)

    command.__name__ = name
    app.command(name, help=row.help, epilog=examples(*row.examples))(command)


for _name, _row in COMMANDS.items():
    if _row.task is not None:
        register(_name, _row)
