"""What is wrong with a data file, found when it is loaded and named by line, byte or row: empty files,
bytes that are not UTF-8 (which pyarrow reads silently and fails on mid-training), values of the wrong kind."""

from __future__ import annotations

import os
import re

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


# ------------------------------------------------------------------------------------------- JSON rows

# How deep a JSON row may nest. Real rows nest a few levels (a chat with tool calls: about 8). pyarrow's JSON reader,
# which datasets uses, recurses once per level and crashes the process (a segmentation fault, no message) on a line
# nested some 100,000 levels deep; Python's json raises RecursionError past about 1,000. Rows are checked against
# this limit before either reads them, so such a line is an error that names it.
MAX_ROW_DEPTH = 100
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_BRACKETS = re.compile(rb"[\[\]{}]")


def json_depth(line: bytes) -> int:
    """How deep the JSON text `line` nests (brackets inside strings do not count). Cheap for ordinary rows:
    a line with fewer opening brackets than MAX_ROW_DEPTH cannot nest deeper, and is not scanned."""
    if line.count(b"[") + line.count(b"{") <= MAX_ROW_DEPTH:
        return 0  # at most MAX_ROW_DEPTH: within the limit, whatever it is exactly
    depth = deepest = 0
    for m in _BRACKETS.finditer(_STRING.sub(b'""', line)):
        depth += 1 if m.group() in (b"[", b"{") else -1
        deepest = max(deepest, depth)
    return deepest


def too_deep_message(where: str, depth: int) -> str:
    return (
        f"{where}: a value nested {depth:,} levels deep; prefcli reads rows nested at most {MAX_ROW_DEPTH} levels "
        "(its limit, which keeps the JSON readers from running out of stack); fix or remove the row"
    )


def text_line(line: str | bytes, where: str) -> str:
    """A line read as bytes (a file opened "rb", stdin's buffer) or as text that Python decoded with
    surrogateescape (stdin in some locales), as UTF-8 text; a byte that is not UTF-8 is named by its column."""
    if isinstance(line, str):
        try:
            line.encode("utf-8")
            return line
        except UnicodeEncodeError:  # lone surrogates \udc80-\udcff stand for the bytes that did not decode
            line = line.encode("utf-8", "surrogateescape")
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{where}: not UTF-8 text (byte 0x{line[e.start]:02x} at column {e.start + 1}); save the input as UTF-8 "
            "(e.g. iconv -f latin1 -t utf-8 in > out)"
        ) from None


def parse_json_row(line: str | bytes, where: str, hint: str = "expected one JSON object per line"):
    """One JSON row (a line of JSONL), its errors named by `where` ('file:line') and the column, then `hint`."""
    import json

    raw = line.encode("utf-8", "surrogateescape") if isinstance(line, str) else line
    depth = json_depth(raw)
    if depth > MAX_ROW_DEPTH:
        raise DataError(too_deep_message(where, depth))
    try:
        return json.loads(line.rstrip(b"\r\n" if isinstance(line, bytes) else "\r\n"))  # columns count on the line
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); {hint}") from None


def _lines(path: str):
    import gzip

    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        yield from enumerate(f, 1)


_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}\n")


def check_json_depth(path: str, what: str) -> None:
    """Before datasets reads a JSON or JSONL file (line by line, through pyarrow): no line nests deeper than
    MAX_ROW_DEPTH. Read in blocks; `bytes.translate` keeps only brackets and newlines (C speed, about a second
    per GB), and only a line with more than MAX_ROW_DEPTH brackets is scanned exactly."""
    import gzip

    opener = gzip.open if path.endswith(".gz") else open
    first_line, tail = 1, b""
    with opener(path, "rb") as f:
        while True:
            block = f.read(1 << 24)
            data = tail + block
            cut = data.rfind(b"\n") + 1 if block else len(data)  # whole lines only; the rest waits for the next block
            data, tail = data[:cut], data[cut:]
            kept = data.translate(None, _NOT_BRACKETS).split(b"\n")
            lines: list[bytes] = []
            for i, seg in enumerate(kept):
                if len(seg) > MAX_ROW_DEPTH:
                    lines = lines or data.split(b"\n")
                    depth = json_depth(lines[i])
                    if depth > MAX_ROW_DEPTH:
                        raise DataError(too_deep_message(f"{what}: {path}: line {first_line + i}", depth))
            first_line += len(kept) - 1
            if not block:
                return


def json_syntax_error(path: str) -> str | None:
    """Where a JSON or JSONL file that could not be read breaks JSON's syntax: 'line N is not valid JSON (...)',
    or None when every line is JSON (the problem is elsewhere). Read only after a failure: pyarrow's own message
    gives a byte position in a block ("Trailing data at position 12"), no line."""
    import json

    try:
        for n, line in _lines(path):
            if not line.strip():
                continue
            try:
                json.loads(line.rstrip(b"\r\n"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                if n == 1 and path.endswith((".json", ".json.gz")):
                    return _whole_document_error(path)  # a pretty-printed .json: its lines are not documents
                if not isinstance(e, json.JSONDecodeError):
                    return None  # bytes that are not UTF-8: named by not_utf8_message
                return f"line {n} is not valid JSON ({e.msg} at column {e.colno}); expected one JSON object per line"
    except (OSError, EOFError):
        return None
    return None


def _whole_document_error(path: str) -> str | None:
    import gzip
    import json

    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            json.load(f)
    except json.JSONDecodeError as e:
        return f"line {e.lineno} is not valid JSON ({e.msg} at column {e.colno})"
    except (OSError, EOFError, UnicodeDecodeError, RecursionError):
        return None
    return None
