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


def _output_path(value: str, info: ValidationInfo) -> str:
    p = _resolve(value, info)
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
