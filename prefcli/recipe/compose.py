"""`base:` composition: a recipe can start from other recipes.

    base: _contrastive.yaml            # or a list: [_model.yaml, _data.yaml], merged in that order
    contrastive: {objective: ipo}      # this file's own keys are merged last

Mappings merge key by key, to any depth; any other value (a list, a number, `null`) replaces what the
bases set. A relative path in a base resolves against the folder of the file that wrote it (the base's),
not the recipe's. A base may have bases of its own; a cycle is an error. Every value remembers the file
and line it came from, so a validation error names the base file and line when the value came from there.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import RecipeError

Loc = tuple[Any, ...]
# where a value came from: an int (a line of the recipe file itself) or "file:line" (a line of a base)
Where = dict[Loc, "int | str"]


def compose(
    path: Path,
    read: Callable[[Path], tuple[dict, dict[Loc, int]]],
    anchor: Callable[[dict, Path], dict],
    _stack: tuple[Path, ...] = (),
    _top: bool = True,
) -> tuple[dict, Where]:
    """The recipe at `path` with its bases merged in. `read` parses one file into (data, {loc: line});
    `anchor(data, folder)` makes the relative paths of a base's data absolute against its folder."""
    shown = str(path)
    real = path.resolve()
    data, lines = read(path)
    where: Where = {loc: (ln if _top else f"{shown}:{ln}") for loc, ln in lines.items()}
    if "base" not in data:
        return data, where
    bases = data.pop("base")
    base_line = lines.get(("base",), 1)
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not bases or not all(isinstance(b, str) and b for b in bases):
        raise RecipeError(shown, [f"{shown}:{base_line}: base: expected a recipe file name or a list of them"])
    merged: dict = {}
    mwhere: Where = {}
    for i, b in enumerate(bases):
        line = lines.get(("base", i), base_line)
        bpath = Path(os.path.expanduser(b))
        if not bpath.is_absolute():
            bpath = path.parent / bpath
        if not bpath.is_file():
            raise RecipeError(
                shown, [f"{shown}:{line}: base: no such file: {bpath} (a base is resolved against {path.parent}/)"]
            )
        if bpath.resolve() in _stack + (real,):
            chain = " -> ".join(str(p) for p in (*_stack, real, bpath.resolve()))
            raise RecipeError(shown, [f"{shown}:{line}: base: a cycle: {chain}"])
        bdata, bwhere = compose(bpath, read, anchor, _stack + (real,), _top=False)
        merge(merged, mwhere, anchor(bdata, bpath.resolve().parent), bwhere)
    merge(merged, mwhere, data, where)
    return merged, mwhere


def merge(dst: dict, dwhere: Where, src: dict, swhere: Where, prefix: Loc = ()) -> None:
    """Merge `src` into `dst` in place: mappings key by key, anything else replaced; `dwhere` follows."""
    for k, v in src.items():
        loc = prefix + (k,)
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            merge(dst[k], dwhere, v, swhere, loc)
            if loc in swhere:
                dwhere[loc] = swhere[loc]
            continue
        dst[k] = copy.deepcopy(v)
        for old in [w for w in dwhere if w[: len(loc)] == loc]:
            del dwhere[old]
        dwhere.update({w: ln for w, ln in swhere.items() if w[: len(loc)] == loc})
