"""Path fields of a recipe. Relative paths resolve against the recipe file's folder.

The loader passes `{"base_dir": <folder of the recipe file>}` as pydantic validation context;
without it (a recipe built in Python) the current directory is the base.

Four kinds:
- `LocalPath`: a file or folder that must exist (tokenizer file, prompts file, ...).
- `OutputPath`: a folder that will be written; it need not exist.
- `OutputFile`: a file that will be written (a labelling task's store); its folder must exist.
- `PathOrHubId`: a local path when one exists (or when the value is written as a path:
  `./x`, `../x`, `/x`, `~/x`, or a data-file name like `x.jsonl`), otherwise a Hugging Face hub id
  such as `Qwen/Qwen2.5-0.5B` that is looked up when the model or dataset is loaded.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, ValidationInfo

DATA_FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt", ".arrow", ".tsv", ".gz", ".yaml", ".yml")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def _base_dir(info: ValidationInfo) -> Path:
    ctx = info.context or {}
    return Path(ctx.get("base_dir") or os.getcwd())


def written_as_path(value: str) -> bool:
    return value.startswith(("./", "../", "/", "~")) or value in (".", "..") or value.endswith(DATA_FILE_SUFFIXES)


def _resolve(value: str, info: ValidationInfo) -> Path:
    p = Path(os.path.expanduser(value))
    return p if p.is_absolute() else (_base_dir(info) / p)


def _local_path(value: str, info: ValidationInfo) -> str:
    p = _resolve(value, info)
    if not p.exists():
        raise ValueError(f"no such file or folder: {p}")
    return str(p.resolve())


def output_problem(p: Path) -> str | None:
    """Why a folder cannot be made at `p` whatever its permissions, or None: a name longer than the file system
    allows (NAME_MAX, usually 255 bytes), a path longer than PATH_MAX, or a symlink loop on the way (ELOOP).
    Each would otherwise surface as an OSError or RuntimeError from the first write."""
    import errno

    def exists(q: Path) -> bool:  # Path.exists raises on a name too long
        try:
            return q.exists()
        except OSError:
            return False

    anchor = p
    while not exists(anchor) and anchor != anchor.parent:
        anchor = anchor.parent
    try:
        name_max = os.pathconf(anchor, "PC_NAME_MAX")
        path_max = os.pathconf(anchor, "PC_PATH_MAX")
    except (OSError, ValueError):
        name_max, path_max = 255, 4096
    for part in p.parts:
        if len(os.fsencode(part)) > name_max:
            return (
                f"the name '{part[:40]}...' is {len(os.fsencode(part))} bytes, longer than the {name_max} bytes the "
                "file system allows for one name (NAME_MAX); choose a shorter one"
            )
    if len(os.fsencode(str(p))) >= path_max:
        return f"the path is {len(os.fsencode(str(p)))} bytes, longer than the file system allows (PATH_MAX {path_max})"
    try:
        p.resolve()
        os.stat(p)
    except RuntimeError:  # Python 3.11-3.12: Path.resolve reports a symlink loop so
        return "a symbolic link on the way points back to itself (a symlink loop); remove the link or choose another"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return (
                "a symbolic link on the way points back to itself (a symlink loop); remove the link or choose another"
            )
        if e.errno == errno.ENAMETOOLONG:
            return "the path is longer than the file system allows (ENAMETOOLONG); choose a shorter one"
    return None


def _output_path(value: str, info: ValidationInfo) -> str:
    p = _resolve(value, info)
    why = output_problem(p)
    if why:
        raise ValueError(f"{p}: {why}")
    if p.exists() and not p.is_dir():
        raise ValueError(f"{p} exists and is not a folder")
    return str(p.resolve())


def _output_file(value: str, info: ValidationInfo) -> str:
    p = _resolve(value, info)
    if p.is_dir():
        raise ValueError(f"{p} is a folder; give a file name")
    if not p.parent.is_dir():
        raise ValueError(f"no such folder: {p.parent}")
    return str(p.resolve())


def _path_or_hub_id(value: str, info: ValidationInfo) -> str:
    p = _resolve(value, info)
    if p.exists():
        return str(p.resolve())
    if written_as_path(value):
        raise ValueError(f"no such file or folder: {p}")
    if not _HUB_ID.match(value):
        raise ValueError(f"no such file or folder: {p} (and '{value}' is not a hub id of the form 'org/name')")
    return value  # a hub id, resolved when loaded


def _data_path(value: str, info: ValidationInfo) -> str:
    return value if value == "-" else _path_or_hub_id(value, info)


LocalPath = Annotated[str, AfterValidator(_local_path)]
# a data file, folder or hub dataset, or `-` for JSONL rows on stdin (the data sources of `prefcli eval`)
DataPath = Annotated[str, AfterValidator(_data_path)]
OutputPath = Annotated[str, AfterValidator(_output_path)]
# a file that will be written (and may exist): its folder must exist
OutputFile = Annotated[str, AfterValidator(_output_file)]
PathOrHubId = Annotated[str, AfterValidator(_path_or_hub_id)]


def is_local(value: str) -> bool:
    """True for a value that a `PathOrHubId` field resolved to a local path."""
    return os.path.isabs(value) and os.path.exists(value)
