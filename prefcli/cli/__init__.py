"""The `prefcli` command line: the training commands (train.py, one per training row of the command table
`prefcli.recipe.COMMANDS`), the tools around training (tools.py: eval, generate, plot, validate), labelling
(label.py: label and its subcommands) and the analysis commands (analysis.py: data inspect, explain), all on
the command group of base.py, which keeps the stdout contract (docs/cli.md). torch and transformers are
imported only inside the commands that need them, so `prefcli --help` and `prefcli validate` answer at once.
"""

from __future__ import annotations

from typing import Annotated

import typer

from .. import __version__

# the modules register their commands on `app` as they are imported, in the order `prefcli --help` lists
# them: training first
# isort: off
from . import train  # noqa: F401
from . import tools  # noqa: F401
from . import analysis  # noqa: F401
from . import label  # noqa: F401
from .base import app

# isort: on

__all__ = ["app", "main"]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"prefcli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    pass


def main(argv: list[str] | None = None) -> None:
    """The console entry point (`prefcli`). Exits with the command's code (docs/cli.md)."""
    import signal

    from ..interrupts import handled

    if hasattr(signal, "SIGXFSZ"):  # `ulimit -f`: a write past the limit fails with EFBIG, reported as such,
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # instead of the signal killing the process
    with handled():  # SIGTERM, like SIGINT, ends every command with exit 130 and the JSON object
        app(args=argv)


if __name__ == "__main__":
    main()
