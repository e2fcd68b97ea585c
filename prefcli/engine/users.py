"""The user column: who gave each label. Personalised models serve each user; every preference task reports
held-out figures per user; held-out *users* (never trained on) give the new-user figures.

- `find_user_column`: `data.user_column`, else the first of USER_COLUMNS the data has ('rater' is what
  `prefcli label` and its web server write; 'user_id' is common elsewhere);
- `read_users`: one id per row (None for a row without one), checked: an id is a string or an integer;
- `split_users`: the rows of held-out users moved out of the training rows.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from ..errors import DataError

USER_COLUMNS = ("rater", "user_id")


def find_user_column(columns: Sequence[str], requested: str | None) -> str | None:
    """The user column of data with these columns: the requested one when it is there, else the first of
    USER_COLUMNS it has; None when there is none (callers that need one raise `missing_user_column`)."""
    if requested is not None:
        return requested if requested in columns else None
    return next((c for c in USER_COLUMNS if c in columns), None)


def missing_user_column(what: str, source: str, columns: Sequence[str], requested: str | None, why: str) -> DataError:
    wanted = f"column '{requested}' (data.user_column)" if requested else "a user column ('rater' or 'user_id')"
    return DataError(
        f"{what}: {source}: {why} needs {wanted}, which the data does not have (columns: {', '.join(columns)}); "
        + ("fix data.user_column" if requested else "add one, or name yours with data.user_column")
    )


def read_users(ds, column: str | None, source: str, what: str) -> list[str | None]:
    """One user id per row (ids are strings; integers are read as their decimal string), None for an empty one."""
    if column is None:
        return [None] * len(ds)
    out: list[str | None] = []
    for i, v in enumerate(ds[column]):
        if v is None or (isinstance(v, str) and not v.strip()):
            out.append(None)
        elif isinstance(v, bool) or not isinstance(v, (str, int)):
            raise DataError(
                f"{what}: {source}: row {i + 1}: user '{column}' is {v!r}; expected a user id (a string or an integer)"
            )
        else:
            out.append(str(v).strip())
    return out


def split_users(ds, users: list[str | None], held: Sequence[str], fraction: float, seed: int, source: str):
    """(training rows, rows of the held-out users or None, the held-out user ids). `held`: named users (each must
    have rows); `fraction`: that share of the distinct users (at least one, never all), drawn with `seed`."""
    present = sorted({u for u in users if u is not None})
    if held:
        absent = [u for u in held if u not in present]
        if absent:
            raise DataError(f"data.eval_users: {', '.join(absent)} never appear in {source} (users: {_some(present)})")
        chosen = list(held)
    elif fraction > 0:
        if len(present) < 2:
            raise DataError(
                f"data.eval_user_fraction: {source} has {len(present)} user(s); holding users out needs at least 2"
            )
        k = min(len(present) - 1, max(1, int(round(len(present) * fraction))))
        chosen = sorted(random.Random(seed).sample(present, k))
    else:
        return ds, None, []
    out = set(chosen)
    keep = [i for i, u in enumerate(users) if u not in out]
    gone = [i for i, u in enumerate(users) if u in out]
    if not keep:
        raise DataError(f"data.eval_users: holding out {', '.join(chosen)} leaves no training row in {source}")
    return ds.select(keep), ds.select(gone), chosen


def _some(names: list[str], n: int = 12) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")
