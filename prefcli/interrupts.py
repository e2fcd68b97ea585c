"""SIGINT and SIGTERM, and code of the user's that tries to end the run.

Both signals mean "stop": a person's Ctrl-C, or a scheduler, `timeout` or `kill` sending SIGTERM. While a command
runs (`handled()`, around the CLI's entry point) each raises KeyboardInterrupt wherever the process is, so every
command ends its one way for an interrupt: exit 130 with the JSON object on stdout (docs/cli.md). Without this,
SIGTERM kills the process at once outside the training loop's own handler (while loading, while curves are drawn),
with no object and no exit code of prefcli's. The training loop counts the signals it catches here too (`note`).

User code (a reward function, its module's import) runs inside `user_code()`: there a SystemExit (`sys.exit()`,
`exit()`), or a KeyboardInterrupt raised with no signal received, is the user code failing, not the run ending: it
becomes the given PrefcliError naming the function, never a silent exit with the function's code.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

from .errors import PrefcliError

_received = [0]  # SIGINT/SIGTERM received by this process while handled() or the training loop's handler was set
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def note() -> None:
    """A stop signal arrived (called by every handler of ours)."""
    _received[0] += 1


def received() -> int:
    return _received[0]


def _raise(signum, frame) -> None:
    note()
    raise KeyboardInterrupt


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """SIGINT and SIGTERM raise KeyboardInterrupt inside the block; the previous handlers come back after it."""
    old = {}
    for s in STOP_SIGNALS:
        try:
            old[s] = signal.signal(s, _raise)
        except ValueError:  # not the main thread: the signals stay as they are
            pass
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def user_code(label: str, error: type[PrefcliError]) -> Iterator[None]:
    """Run user code: its SystemExit, and a KeyboardInterrupt it raised itself, become `error` naming `label`."""
    before = received()
    try:
        yield
    except SystemExit as e:
        raise error(
            f"{label} called sys.exit({e.code!r}): code called by prefcli must return its result or raise an "
            "exception, not end the process; remove the exit"
        ) from None
    except KeyboardInterrupt:
        if received() != before:  # a real SIGINT/SIGTERM arrived while it ran: the run is interrupted
            raise
        raise error(
            f"{label} raised KeyboardInterrupt with no interrupt received: code called by prefcli must return its "
            "result or raise an ordinary exception"
        ) from None
