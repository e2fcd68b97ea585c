"""What every `prefcli` command shares: the command group and its stdout contract, the common options.

stdout carries exactly one JSON object (the run summary) as its last line; progress, tables and logs go to
stderr. (`generate` is the exception: its stdout is the data, one JSON object per prompt.) Exit codes: 0
done; 2 bad recipe, data or usage; 1 failure during training; 130 interrupted after writing a checkpoint.

Failures that never reach a command's own handler (usage errors found by click before the command
runs, and unexpected exceptions) go through `PrefcliGroup.main`, which prints the same failure object,
so `prefcli ... | jq .status` prints something on every path (docs/cli.md, "Output streams").
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperGroup

from ..errors import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_USAGE, out_of_memory
from ..interrupts import received

STATUS = {EXIT_USAGE: "invalid", EXIT_INTERRUPTED: "interrupted"}  # any other non-zero code: "failed"
_stdout_json = {"written": False}  # whether this invocation has printed its JSON object yet
_DATA_ON_STDOUT = {"generate"}  # commands whose stdout is data: no failure object is added to it


def emit_json(obj: dict) -> None:
    """The one JSON object of an invocation, as the last line of stdout."""
    print(json.dumps(obj, default=str), flush=True)
    _stdout_json["written"] = True


class PrefcliGroup(TyperGroup):
    """The command group, run in non-standalone mode so that every way out of the CLI keeps the stdout
    contract: click's usage errors (unknown option or command, missing or extra argument, an option without
    its value), an interrupt outside a command's handler, and unexpected exceptions all print the failure
    object `{"command", "status", "exit_code", "error"}` on stdout (not for `generate`, whose stdout is data),
    the message on stderr without a traceback (PREFCLI_DEBUG=1 shows it), and exit with the documented code."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        args = list(sys.argv[1:] if args is None else args)
        command = next((a for a in args if not a.startswith("-")), None)
        command = command if command in self.commands else None
        _stdout_json["written"] = False
        _stdout_json["signals"] = received()
        try:
            if not args:  # `prefcli` alone: the help, on stderr (stdout keeps only the failure object)
                with contextlib.redirect_stdout(sys.stderr):
                    rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            else:
                rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            code = rv if isinstance(rv, int) else 0
            if code and not _stdout_json["written"]:  # e.g. an interrupt while the command was starting
                self._failure(command, code, "interrupted" if code == EXIT_INTERRUPTED else f"exit code {code}")
        except BaseException as e:  # DCP's CheckpointException is a BaseException, not an Exception
            if isinstance(e, (SystemExit, KeyboardInterrupt, GeneratorExit)):
                raise
            if _is_click_error(e):  # usage errors, found before any command body ran
                if not args:
                    with contextlib.redirect_stdout(sys.stderr):
                        e.show()
                    text = "no command given; the commands are listed on stderr (prefcli -h)"
                else:
                    e.show()
                    text = e.format_message().strip()
                code = e.exit_code
                self._failure(command, code, text.splitlines()[0] if text else "")
            elif type(e).__name__ == "Abort":  # click's Ctrl-C / end of input inside a prompt
                code = EXIT_INTERRUPTED
                self._failure(command, code, "aborted")
            elif _interrupted_since_start():  # a library broken by the KeyboardInterrupt it was stopped with
                code = EXIT_INTERRUPTED
                typer.echo(f"error: interrupted ({type(e).__name__} while stopping)", err=True)
                self._failure(command, code, "interrupted")
            elif out_of_memory(e):  # not a bug: the model or the batch does not fit this machine
                first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
                msg = (
                    f"out of memory ({type(e).__name__}: {first}); the model or the batch does not fit this machine: "
                    "use a smaller model or batch (train.batch_size, data.max_length, generation.batch_size), or a "
                    "machine with more memory"
                )
                typer.echo(f"error: {msg}", err=True)
                code = EXIT_FAILURE
                self._failure(command, code, msg)
            else:  # a bug: say so plainly, exit 1
                if os.environ.get("PREFCLI_DEBUG"):
                    import traceback

                    traceback.print_exc()
                from ..engine.runfolder import error_text  # the failure inside a CheckpointException, named

                msg = f"unexpected {error_text(e)}"
                typer.echo(f"error: {msg} (a bug in prefcli: please report it; PREFCLI_DEBUG=1 shows where)", err=True)
                code = EXIT_FAILURE
                self._failure(command, code, msg)
        if standalone_mode:
            sys.exit(code)
        return code

    @staticmethod
    def _failure(command: str | None, code: int, error: str) -> None:
        if command in _DATA_ON_STDOUT or _stdout_json["written"]:
            return
        emit_json({"command": command, "status": STATUS.get(code, "failed"), "exit_code": code, "error": error})


def _is_click_error(e: BaseException) -> bool:
    """click's ClickException (usage errors and the like), whichever click typer runs on (typer 0.2x vendors its
    own copy, older releases use the click package): it shows itself and carries its exit code."""
    return (
        callable(getattr(e, "show", None))
        and callable(getattr(e, "format_message", None))
        and isinstance(getattr(e, "exit_code", None), int)
    )


app = typer.Typer(
    cls=PrefcliGroup,
    name="prefcli",
    help="Train language models on human preferences. Each command reads a YAML recipe; "
    "`prefcli validate` checks recipes without running them. `prefcli COMMAND --help` shows a command's options "
    "and examples; the full manual is docs/index.md in the prefcli source repository.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # plain help: rich markup would eat '[a, b]' in help texts and show a '<bool>' value after every flag
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def examples(*lines: str) -> str:
    """A help epilog of example command lines, kept as written (click rewraps paragraphs unless marked \\b)."""
    return "Examples:\n\n\b\n" + "\n".join(f"  {x}" for x in lines)


RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-s",
        metavar="KEY=VALUE",
        help="Override a recipe field, e.g. --set train.lr=1e-4 (repeatable; validated like the file).",
    ),
]
OutOpt = Annotated[
    Path | None,
    typer.Option(
        "--output-dir", "-o", help="Run folder (default: the recipe's output.dir, else runs/<command>-<recipe>)."
    ),
]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue from the newest checkpoint in the run folder.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace a previous run in the run folder.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress output; errors and the JSON summary only.")]
SmokeOpt = Annotated[
    bool,
    typer.Option(
        "--smoke",
        help="A few steps on a few rows with a tiny random model of the same architecture and the real "
        "tokenizer (CPU when there is no GPU): proves a recipe, its data and its pipeline fit together.",
    ),
]


def _interrupted_since_start() -> bool:
    """A SIGINT/SIGTERM arrived during this invocation (prefcli.interrupts counts them)."""
    return received() > _stdout_json.get("signals", received())


def fail(command: str, err: BaseException, code: int, status: str) -> None:
    if code == EXIT_USAGE and _interrupted_since_start():
        # stopped while starting: a library interrupted half-way (an import cut short) can fail in a way that reads
        # as bad input; the interrupt is what happened
        err = RuntimeError(f"interrupted before training started; nothing was written (it stopped at: {err})")
        code, status = EXIT_INTERRUPTED, "interrupted"
    typer.echo(f"error: {err}", err=True)
    out = {"command": command, "status": status, "exit_code": code, "error": str(err)}
    if getattr(err, "checkpoint", None):
        out["checkpoint"] = err.checkpoint  # the last good checkpoint (failures and interrupts during training)
    emit_json(out)
    raise typer.Exit(code)
