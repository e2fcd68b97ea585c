"""What is wrong with a data file, found when it is loaded and named by line, byte or row: empty files,
bytes that are not UTF-8 (which pyarrow reads silently and fails on mid-training), values of the wrong kind."""

from __future__ import annotations

import os

from ..errors import DataError


def exception_chain(e: BaseException) -> list[BaseException]:
    """`e` and the exceptions it was raised from, outermost first (datasets wraps the reader's own error)."""
    out: list[BaseException] = []
    while e is not None and e not in out and len(out) < 10:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def is_blank_file(path: str) -> bool:
    """A file with nothing but whitespace (datasets fails on it with a bare StopIteration)."""
    size = os.path.getsize(path)
    if size == 0:
        return True
    if size > 1 << 16 or path.endswith((".gz", ".parquet", ".arrow")):
        return False
    with open(path, "rb") as f:
        return not f.read().strip()


def bad_utf8_line(path: str) -> tuple[int, int, int] | None:
    """(line, column, byte) of the first byte that is not UTF-8 in a text file, or None."""
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                return n, e.start + 1, line[e.start]
    return None


def not_utf8_message(what: str, path: str, row: int | None) -> str:
    at = None
    if os.path.isfile(path) and not path.endswith((".gz", ".parquet", ".arrow")):
        at = bad_utf8_line(path)
    if at is not None:
        where = f"line {at[0]} is not UTF-8 text (byte 0x{at[2]:02x} at column {at[1]})"
    elif row is not None:
        where = f"row {row} holds text that is not UTF-8"
    else:
        where = "it holds text that is not UTF-8"
    return f"{what}: {path}: {where}. Save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8 in > out)"


def check_utf8(ds, what: str, path: str) -> None:
    """pyarrow reads invalid UTF-8 into string columns without a word and fails only when a row is read
    (a UnicodeDecodeError deep inside training): validate every column once, here."""
    import pyarrow as pa

    table = ds.data.table if hasattr(ds.data, "table") else ds.data
    for name in table.column_names:
        offset = 0
        for chunk in table.column(name).chunks:
            try:
                chunk.validate(full=True)
            except pa.ArrowInvalid as e:
                if "utf8" not in str(e).lower():
                    raise
                row = None
                for j in range(len(chunk)):
                    try:
                        chunk[j].as_py()
                    except UnicodeDecodeError:
                        row = offset + j + 1
                        break
                raise DataError(not_utf8_message(what, path, row)) from None
            offset += len(chunk)


def is_messages(v) -> bool:
    """A chat value: a list of {role, content} mappings."""
    return isinstance(v, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in v)


def describe_value(v) -> str:
    """What a data value is, for an error message: 'int (5)', 'a list of str', ..."""
    if isinstance(v, list):
        if v and isinstance(v[0], dict):
            return "a list of mappings" + ("" if is_messages(v) else " without 'role' and 'content'")
        return f"a list of {type(v[0]).__name__}" if v else "an empty list"
    if isinstance(v, dict):
        return f"a mapping with keys {', '.join(map(str, list(v)[:4]))}"
    if isinstance(v, str):
        return "a string"
    return f"{type(v).__name__} ({str(v)[:40]})"
