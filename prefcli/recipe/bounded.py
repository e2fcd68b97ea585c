"""Limits on what a recipe may be, so that no input makes `prefcli validate` (or any command) run without end.

A recipe is a few kilobytes of YAML nested a few levels. YAML itself allows three ways to ask for unbounded work:
a file that never ends (`/dev/zero`), aliases that expand exponentially ("billion laughs": 1 KB that stands for
10^9 values), and structures that are deeper than the parser's stack (thousands of `[`, an alias that contains
itself, a `--set` key of thousands of parts). PyYAML refuses none of them, so prefcli checks, and each is a
RecipeError (exit 2) that names the limit:

- the file is read up to MAX_RECIPE_BYTES (1 MiB), never further;
- values are nested at most MAX_DEPTH (64) levels, in the file, in a `--set` key and in a `--set` value;
- aliases expand to at most MAX_VALUES (100,000) values in all, and none may contain itself.

`walk` is the one pass over the composed YAML nodes that checks the last two and maps every value to its line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

MAX_RECIPE_BYTES = 1 << 20
MAX_DEPTH = 64
MAX_VALUES = 100_000

Loc = tuple[Any, ...]


class LimitExceeded(Exception):
    """A limit of this module was passed; `str(e)` says which, and `line` is the 1-based line where (or None)."""

    def __init__(self, text: str, line: int | None = None):
        super().__init__(text)
        self.line = line


def read_bounded(path: Path) -> bytes:
    """The file's bytes, reading at most MAX_RECIPE_BYTES + 1 (a device or a pipe that never ends stops there)."""
    with open(path, "rb") as f:
        raw = f.read(MAX_RECIPE_BYTES + 1)
    if len(raw) > MAX_RECIPE_BYTES:
        kind = "" if os.path.isfile(path) else " (not a regular file)"
        raise LimitExceeded(
            f"larger than {MAX_RECIPE_BYTES:,} bytes{kind}, prefcli's limit for a recipe; a recipe is a few "
            "kilobytes of YAML: check that this is the recipe you meant"
        )
    return raw


def compose(text: str) -> yaml.Node | None:
    """The YAML node graph of `text`. A document nested past the parser's stack is a LimitExceeded, not a crash."""
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except RecursionError:
        raise LimitExceeded(f"nested deeper than {MAX_DEPTH} levels, prefcli's limit for a recipe") from None


def walk(node: yaml.Node | None, out: dict[Loc, int], dups: list[tuple[Loc, int]], prefix: Loc = ()) -> None:
    """Map every value under `node` to its line (`out`) and note keys given twice (`dups`), checking MAX_DEPTH,
    MAX_VALUES and self-containing aliases on the way. Iterative: its own depth is not Python's stack."""
    if node is None:
        return
    count = 0
    # (node, its path, the nodes that contain it: an alias that points back into them contains itself)
    stack: list[tuple[yaml.Node, Loc, frozenset[int]]] = [(node, prefix, frozenset())]
    while stack:
        cur, path, above = stack.pop()
        line = cur.start_mark.line + 1
        if id(cur) in above:
            raise LimitExceeded(
                f"{dotted(path) or '(recipe)'}: an alias that contains itself (a structure without end)", line
            )
        if len(path) - len(prefix) > MAX_DEPTH:
            raise LimitExceeded(f"nested deeper than {MAX_DEPTH} levels, prefcli's limit for a recipe", line)
        count += 1
        if count > MAX_VALUES:
            raise LimitExceeded(
                f"its aliases expand to more than {MAX_VALUES:,} values, prefcli's limit for a recipe "
                "(a 'billion laughs' of nested aliases); write the values out, or use fewer aliases",
                line,
            )
        inner = above | {id(cur)} if isinstance(cur, (yaml.MappingNode, yaml.SequenceNode)) else above
        if isinstance(cur, yaml.MappingNode):
            seen: set[Any] = set()
            for key_node, value_node in cur.value:
                key = key_node.value
                sub = path + (key,)
                if key in seen:
                    dups.append((sub, key_node.start_mark.line + 1))
                seen.add(key)
                out[sub] = key_node.start_mark.line + 1
                stack.append((value_node, sub, inner))
        elif isinstance(cur, yaml.SequenceNode):
            for i, item in enumerate(cur.value):
                out[path + (i,)] = item.start_mark.line + 1
                stack.append((item, path + (i,), inner))


def check_key_depth(parts: list[str], item: str) -> None:
    """A `--set` key of more than MAX_DEPTH parts."""
    if len(parts) > MAX_DEPTH:
        raise LimitExceeded(
            f"--set {item[:60]}...: the key has {len(parts):,} parts; a recipe nests at most {MAX_DEPTH} levels "
            "(prefcli's limit)"
        )


def load_value(raw: str) -> Any:
    """A `--set` value: YAML, under the same limits as a recipe file."""
    node = compose(raw)
    walk(node, {}, [])
    return yaml.safe_load(raw)


def dotted(loc: Loc) -> str:
    """('train', 'adam_betas', 0) -> 'train.adam_betas[0]'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out
