"""Errors a person can act on, and the exit codes they map to.

The CLI contract (docs/cli.md): 0 done; 2 bad recipe, bad data or bad usage (nothing trained);
1 failure during training (NaN, out of memory, a reward function that raises, ...), with the last
good checkpoint kept; 130 interrupted by SIGINT/SIGTERM after writing a checkpoint.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class PrefcliError(Exception):
    """Base class: `str(err)` is the whole message shown to the user (a few lines at most)."""

    exit_code = EXIT_FAILURE
    checkpoint: str | None = None  # the last good checkpoint, when a failure during training names one


class UsageError(PrefcliError):
    """Bad recipe, bad data, bad arguments: detected before anything is trained or overwritten."""

    exit_code = EXIT_USAGE


class RecipeError(UsageError):
    """A recipe that does not validate. `problems` holds one line per problem, each naming the
    file, the line, the dotted field path and what was expected."""

    def __init__(self, path: str, problems: list[str]):
        self.path = path
        self.problems = problems
        n = len(problems)
        head = f"invalid recipe {path} ({n} problem{'s' if n != 1 else ''}):"
        super().__init__("\n".join([head] + ["  " + p for p in problems]))


class DataError(UsageError):
    """Data that cannot be used: missing file, missing column, empty after filtering, ..."""


class TrainingError(PrefcliError):
    """A failure during training (non-finite loss, a reward function that raises, ...)."""

    exit_code = EXIT_FAILURE


class Interrupted(PrefcliError):
    """SIGINT/SIGTERM arrived; a checkpoint was written before raising this."""

    exit_code = EXIT_INTERRUPTED


def out_of_memory(e: BaseException) -> bool:
    """Whether `e` is the machine running out of memory (Python's MemoryError, torch's OutOfMemoryError on a GPU,
    or torch's CPU allocator failing: a RuntimeError "can't allocate memory"), which is not a bug but a model or
    batch too large for the machine."""
    text = str(e).lower()
    return (
        isinstance(e, MemoryError)
        or type(e).__name__ == "OutOfMemoryError"
        or "can't allocate memory" in text
        or "out of memory" in text
    )
