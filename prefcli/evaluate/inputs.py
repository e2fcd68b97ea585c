"""`prefcli eval`'s inputs: the recipe's data (text, prompts, references, pairs) and given completions, read and checked before any model runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import DataError
from ..recipe.commands import EvalRecipe

# ------------------------------------------------------------------------------- data


@dataclass
class EvalInputs:
    text_rows: Any = None
    text_format: str | None = None
    prompts: list[str] = field(default_factory=list)
    references: list[str] | None = None
    pairs: Any = None
    given: list | None = None  # Generation objects of data.completions (scored as given, nothing sampled)
    given_name: str | None = None
    users: list[str | None] | None = None  # whom each prompt (or given completion) is for; None: nobody in particular
    pair_users: list[str | None] | None = None  # whom each pair of data.pairs was labelled by
    skipped: dict[str, str] = field(default_factory=dict)  # metric -> why it is not computed (a warning)


# BLEU and ROUGE compare each completion with its reference: rows without a 'reference' column skip them (with a
# warning, as kl and win_rate are skipped for given completions), unless nothing else would be measured.
REFERENCE_METRICS = ("bleu", "rouge")


def _references(rows, r: EvalRecipe, out: EvalInputs, source: str, what: str, hint: str = "") -> None:
    """out.references from the rows' 'reference' column, when a listed metric reads it. Rows without the column:
    the reference metrics are skipped when another metric is listed, an error when they are all there is."""
    from ..engine.data import check_values

    wanted = [m for m in REFERENCE_METRICS if m in r.metrics]
    if not wanted:
        return
    if "reference" not in rows.column_names:
        if all(m in REFERENCE_METRICS for m in r.metrics):
            raise DataError(
                f"{what}: {source}: missing column(s) reference (columns: {', '.join(rows.column_names)}); "
                f"{' and '.join(wanted)} compare each completion with its 'reference'{hint}"
            )
        for m in wanted:
            out.skipped[m] = f"{m} needs a 'reference' in the rows of {what} ({source}), which have none; skipped"
        return
    check_values(rows, ["reference"], source, what=what)
    out.references = [str(x) for x in rows["reference"]]


def row_users(r: EvalRecipe, rows, source: str, what: str) -> list[str | None] | None:
    """Each row's user: the recipe's `user` for every row, else the rows' user column, else None."""
    from ..engine.users import find_user_column, missing_user_column, read_users

    if r.user is not None:
        return [r.user] * len(rows)
    col = find_user_column(rows.column_names, r.data.user_column)
    if col is None:
        if r.data.user_column is not None:
            raise missing_user_column(what, source, rows.column_names, r.data.user_column, "data.user_column")
        return None
    return read_users(rows, col, source, what)


def read_inputs(r: EvalRecipe) -> EvalInputs:
    from ..engine.data import FORMAT_COLUMNS, check_values, detect_format, load_rows

    out = EvalInputs()
    d = r.data
    if d.text is not None:
        rows = load_rows(d.text, what="data.text")
        fmt = detect_format(rows.column_names, d.text_format)
        missing = [c for c in FORMAT_COLUMNS[fmt] if c not in rows.column_names]
        if missing:
            raise DataError(
                f"data.text: {d.text.path}: format '{fmt}' needs column(s) {', '.join(missing)} "
                f"(columns: {', '.join(rows.column_names)})"
            )
        out.text_rows, out.text_format = rows, fmt
    if d.completions is not None:
        read_completions(r, out)
    elif d.prompts is not None:
        rows = load_rows(d.prompts, required=["prompt"], what="data.prompts")
        check_values(rows, ["prompt"], d.prompts.path, what="data.prompts")
        out.prompts = [str(p) for p in rows["prompt"]]
        out.users = row_users(r, rows, d.prompts.path, "data.prompts")
        _references(
            rows, r, out, d.prompts.path, "data.prompts", "; map another column with columns: {reference: answer}"
        )
    if d.pairs is not None:
        rows = load_rows(d.pairs, required=["prompt", "chosen", "rejected"], what="data.pairs")
        check_values(rows, ["chosen", "rejected"], d.pairs.path, what="data.pairs")
        out.pairs = rows
        out.pair_users = row_users(r, rows, d.pairs.path, "data.pairs")
    return out


def read_completions(r: EvalRecipe, out: EvalInputs) -> None:
    """data.completions: JSONL rows with prompt and completion (and reference), as `prefcli generate` writes them."""
    from ..engine.data import check_values, load_rows
    from .generation import Generation

    d = r.data.completions
    rows = load_rows(d, required=["prompt", "completion"], what="data.completions")
    check_values(rows, ["prompt"], d.path, what="data.completions")
    out.prompts = [str(p) for p in rows["prompt"]]
    out.users = row_users(r, rows, d.path, "data.completions")
    _references(
        rows, r, out, "<stdin>" if d.path == "-" else d.path, "data.completions",
        ": `prefcli generate` passes one through from a JSONL prompts file whose rows have a 'reference' field",
    )  # fmt: skip
    cols = rows.column_names
    out.given = [
        Generation(
            prompt=str(row["prompt"]),
            completion=str(row["completion"] or ""),
            prompt_ids=[],
            token_ids=[],
            finish_reason=str(row.get("finish_reason") or "given"),
            missing=list(row.get("missing") or []) if "missing" in cols else [],
            n_tokens=row.get("tokens") if isinstance(row.get("tokens"), int) else None,
        )
        for row in rows
    ]
    out.given_name = "completions"  # the same key for a file and for stdin; the summary's 'source' names which
