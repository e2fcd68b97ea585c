"""Load a YAML recipe, apply `--set` overrides, validate, and explain every problem.

An error names the file, the line, the dotted field path and what was expected, and suggests the
closest valid key for a typo:

    invalid recipe recipes/tiny/sft.yaml (1 problem):
      recipes/tiny/sft.yaml:17: train.learning_rate: unknown field (did you mean 'lr'?)
"""

from __future__ import annotations

import difflib
import math
import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from ..errors import RecipeError, UsageError
from . import bounded
from .bounded import dotted as _dotted
from .commands import SCHEMAS, RecipeBase

Loc = tuple[Any, ...]

# Names other tools (transformers TrainingArguments, TRL configs) use for our fields: a typo
# suggestion should find `lr` for `learning_rate` even though the strings are far apart.
ALIASES = {
    "learning_rate": "lr",
    "gradient_accumulation_steps": "grad_accum_steps",
    "per_device_train_batch_size": "batch_size",
    "train_batch_size": "batch_size",
    "num_train_epochs": "epochs",
    "lr_scheduler_type": "lr_schedule",
    "max_seq_length": "max_length",
    "max_seq_len": "max_length",
    "model_name_or_path": "path",
    "output_dir": "dir",
    "bf16": "precision",
    "fp16": "precision",
    "torch_dtype": "precision",
    "dtype": "precision",
    "warmup": "warmup_ratio",
    "logging_steps": "every_steps",
    "save_steps": "save_every_steps",
    "eval_steps": "eval_every_steps",
}


@dataclass
class LoadedRecipe:
    recipe: RecipeBase
    path: Path  # the recipe file as given
    overrides: list[str]

    @property
    def command(self) -> str:
        return self.recipe.command


# ------------------------------------------------------------------------------------ YAML


def _read_yaml(path: Path) -> tuple[dict, dict[Loc, int]]:
    shown = str(path)
    if not path.exists():
        raise UsageError(f"recipe not found: {shown}")
    if path.is_dir():
        raise UsageError(f"{shown} is a folder; give a recipe .yaml file")
    try:
        raw = bounded.read_bounded(path)
    except OSError as e:
        raise UsageError(f"cannot read the recipe {shown}: {e.strerror or e}; check its permissions") from None
    except bounded.LimitExceeded as e:
        raise RecipeError(shown, [f"{shown}: {e}"]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise RecipeError(
            shown,
            [
                f"{shown}:{line}:{col}: not UTF-8 text (byte 0x{raw[e.start]:02x}); save the recipe as UTF-8 "
                "(e.g. iconv -f latin1 -t utf-8 in.yaml > out.yaml)"
            ],
        ) from None
    try:
        node = bounded.compose(text)
        data = yaml.safe_load(text)
    except bounded.LimitExceeded as e:
        raise RecipeError(shown, [f"{shown}: {e}"]) from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{shown}:{mark.line + 1}:{mark.column + 1}" if mark else shown
        raise RecipeError(shown, [f"{where}: YAML syntax error: {e.problem or e}"]) from None
    except yaml.YAMLError as e:
        raise RecipeError(shown, [f"{shown}: YAML error: {e}"]) from None
    if data is None:
        raise RecipeError(shown, [f"{shown}:1: the file is empty; a recipe is a mapping such as 'command: sft'"])
    if not isinstance(data, dict):
        raise RecipeError(shown, [f"{shown}:1: a recipe is a mapping of sections, got a {type(data).__name__}"])
    lines: dict[Loc, int] = {}
    dups: list[tuple[Loc, int]] = []
    try:
        bounded.walk(node, lines, dups)
    except bounded.LimitExceeded as e:
        raise RecipeError(shown, [f"{shown}:{e.line or 1}: {e}"]) from None
    if dups:
        raise RecipeError(shown, [f"{shown}:{ln}: {_dotted(p)}: key given twice" for p, ln in dups])
    return data, lines


# ------------------------------------------------------------------------------- overrides


def parse_override(item: str) -> tuple[list[str], Any]:
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UsageError(f"--set expects key.path=value, got '{item}'")
    parts = key.split(".")
    try:
        bounded.check_key_depth(parts, item)
        value = bounded.load_value(raw) if raw.strip() else None
    except bounded.LimitExceeded as e:
        raise UsageError(str(e) if str(e).startswith("--set") else f"--set {item[:80]}: the value: {e}") from None
    except yaml.YAMLError as e:
        raise UsageError(f"--set {item}: the value is not valid YAML: {e}") from None
    return parts, value


def _path_field_names() -> set[str]:
    """Names of the fields typed as paths in any schema (`path`, `tokenizer`, `dir`, ...)."""
    from . import paths

    kinds = {paths._local_path, paths._output_path, paths._output_file, paths._path_or_hub_id}
    names: set[str] = set()
    seen: set[type] = set()

    def is_path(annotation: Any, metadata: list) -> bool:
        if any(getattr(m, "func", None) in kinds for m in metadata):
            return True
        return any(is_path(a, list(getattr(a, "__metadata__", ()))) for a in typing.get_args(annotation))

    def walk(model: type[BaseModel]) -> None:
        if model in seen:
            return
        seen.add(model)
        for name, field in model.model_fields.items():
            if is_path(field.annotation, field.metadata):
                names.add(name)
            for sub in _models_in(field.annotation):
                walk(sub)

    for schema in SCHEMAS.values():
        walk(schema)
    return names


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _from_cwd(value: Any, key: str, path_fields: set[str], folder: str | None = None) -> Any:
    """A relative path typed on the command line means what the shell means: relative to the
    current directory, not to the recipe's folder. Rewrites such values (also inside lists and
    mappings, e.g. `rewards=[{kind: model, path: runs/rm/final}]`) to absolute paths; a value that
    names nothing here and is not written as a path (a hub id such as `Qwen/Qwen2.5-0.5B`) is
    left for the schema to judge. With `folder`, relative to that folder instead (a base recipe's
    values: relative to the base file)."""
    from .paths import written_as_path

    if isinstance(value, dict):
        return {k: _from_cwd(v, str(k), path_fields, folder) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_cwd(v, key, path_fields, folder) for v in value]
    if not isinstance(value, str) or not value or os.path.isabs(os.path.expanduser(value)):
        return value
    here = folder or os.getcwd()
    if key == "function":  # file.py:function
        mod, sep, attr = value.rpartition(":")
        if sep and mod.endswith(".py") and not os.path.isabs(os.path.expanduser(mod)):
            return f"{os.path.normpath(os.path.join(here, mod))}:{attr}"
        return value
    full = os.path.normpath(os.path.join(here, value))
    if key in path_fields and value != "-" and (key == "dir" or os.path.exists(full) or written_as_path(value)):
        return full
    return value


def apply_overrides(data: dict, overrides: list[str]) -> dict[Loc, str]:
    """Set each `a.b.c=value` into `data` (in place). Returns {path: override text} for errors.
    Relative paths in the values resolve against the current directory (see `_from_cwd`)."""
    origin: dict[Loc, str] = {}
    path_fields = _path_field_names() if overrides else set()
    for item in overrides:
        parts, value = parse_override(item)
        value = _from_cwd(value, parts[-1], path_fields)
        cur: Any = data
        for i, part in enumerate(parts[:-1]):
            nxt = cur.get(part) if isinstance(cur, dict) else None
            if nxt is None:
                nxt = cur[part] = {}
            if not isinstance(nxt, dict):
                raise UsageError(f"--set {item}: '{'.'.join(parts[: i + 1])}' is not a section")
            cur = nxt
        cur[parts[-1]] = value
        origin[tuple(parts)] = item
    return origin


# ------------------------------------------------------------------------------ validation


def _origin_of(loc: Loc, origin: dict[Loc, str]) -> str | None:
    """The --set item that wrote `loc`, or one of its parents, or (a new section) one of its children."""
    for n in range(len(loc), 0, -1):
        if loc[:n] in origin:
            return origin[loc[:n]]
    for key, item in origin.items():
        if key[: len(loc)] == loc and loc:
            return item
    return None


def _non_finite(data: Any, loc: Loc = ()) -> list[tuple[Loc, float]]:
    """Every float in the recipe that is inf or NaN (YAML's .inf, .nan), in fields of any type."""
    if isinstance(data, float) and not math.isfinite(data):
        return [(loc, data)]
    if isinstance(data, dict):
        return [x for k, v in data.items() for x in _non_finite(v, loc + (k,))]
    if isinstance(data, list):
        return [x for i, v in enumerate(data) for x in _non_finite(v, loc + (i,))]
    return []


def check_finite(data: dict, shown: str, lines: dict[Loc, int | str], origin: dict[Loc, str]) -> None:
    """A recipe holds finite numbers only: inf or NaN in a learning rate, a coefficient or a model config
    trains nothing useful (and a NaN passes every bound check)."""
    problems = []
    for loc, value in _non_finite(data):
        item = _origin_of(loc, origin)
        where = f"(--set {item})" if item else _where(_nearest_line(loc, lines), shown)
        problems.append(f"{where}: {_dotted(loc)}: {value} is not a finite number; give a finite value")
    if problems:
        raise RecipeError(shown, problems)


def _nearest_line(loc: Loc, lines: dict[Loc, int | str]) -> int | str:
    for n in range(len(loc), -1, -1):
        if loc[:n] in lines:
            return lines[loc[:n]]
    return 1


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _fields_at(schema: type[BaseModel], loc: Loc) -> list[str]:
    cur: type[BaseModel] | None = schema
    for part in loc:
        if cur is None or part not in cur.model_fields:
            return []
        cur = _model_in(cur.model_fields[part].annotation)
    return list(cur.model_fields) if cur is not None else []


def _value_at(data: Any, loc: Loc) -> Any:
    for part in loc:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def _clean_loc(loc: Loc, data: Any) -> Loc:
    """Drop pydantic's union/type tags (e.g. 'list[str]') so the path is the one in the file."""
    out: list[Any] = []
    cur = data
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(cur, dict) and part in cur:
            out.append(part)
            cur = cur[part]
        elif isinstance(cur, list) and isinstance(part, int) and part < len(cur):
            out.append(part)
            cur = cur[part]
        elif isinstance(cur, dict) and last:
            out.append(part)  # a missing field
        # otherwise: a type tag of a union member; skip it
    return tuple(out)


def _tuple_field(schema: type[BaseModel], loc: Loc) -> tuple[int, Any] | None:
    """(number of items, default) of a fixed-length tuple field at `loc` (train.adam_betas: 2, (0.9, 0.999))."""
    cur: type[BaseModel] | None = schema
    field = None
    for part in loc:
        if cur is None or part not in cur.model_fields:
            return None
        field = cur.model_fields[part]
        cur = _model_in(field.annotation)
    if field is None:
        return None
    for a in [field.annotation, *typing.get_args(field.annotation)]:
        if typing.get_origin(a) is tuple and Ellipsis not in typing.get_args(a):
            return len(typing.get_args(a)), field.default
    return None


def _describe(err: dict, schema: type[BaseModel], loc: Loc, raw_loc: Loc = (), data: Any = None) -> str:
    kind = err["type"]
    msg = err["msg"]
    if kind == "missing" and raw_loc and isinstance(raw_loc[-1], int):  # an item missing from a fixed-length list
        tup = _tuple_field(schema, loc)
        got = _value_at(data, loc)
        if tup is not None and isinstance(got, list):
            n, default = tup
            example = f", e.g. {list(default)} (the default)" if isinstance(default, tuple) else ""
            return f"expected {n} values, got {len(got)}: {got}; give all {n}{example}"
    if kind == "missing":
        return "required field is missing"
    if kind == "extra_forbidden":
        allowed = _fields_at(schema, loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1, cutoff=0.5)
        if not close and ALIASES.get(str(loc[-1])) in allowed:
            close = [ALIASES[str(loc[-1])]]
        hint = f" (did you mean '{close[0]}'?)" if close else (f" (allowed: {', '.join(allowed)})" if allowed else "")
        return "unknown field" + hint
    if kind == "finite_number":
        return f"{err.get('input')!r} is not a finite number; give a finite value"
    if kind in ("value_error", "assertion_error"):
        return msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if kind == "literal_error":
        expected = [e.strip(" '") for e in err.get("ctx", {}).get("expected", "").replace(" or ", ",").split(",")]
        close = difflib.get_close_matches(str(err.get("input")), [e for e in expected if e], n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return f"{msg}, got {err.get('input')!r}{hint}"
    got = err.get("input")
    if isinstance(got, (dict, list)):
        return f"{msg}, got a {type(got).__name__}"
    return f"{msg}, got {got!r}"


def validate_data(
    data: dict,
    schema: type[RecipeBase],
    shown: str,
    lines: dict[Loc, int | str],
    origin: dict[Loc, str],
    base_dir: Path,
    fragment: bool = False,
) -> RecipeBase | None:
    """The recipe, or RecipeError naming every problem. `fragment`: the fields the data leaves out are not asked
    for (a `base:` fragment on its own; nothing is returned then)."""
    try:
        return schema.model_validate(data, context={"base_dir": str(base_dir)})
    except ValidationError as exc:
        errors = _fragment_errors(exc.errors(), data) if fragment else exc.errors()
        if not errors:
            return None
        problems = []
        for err in errors:
            loc = _clean_loc(tuple(err["loc"]), data)
            item = _origin_of(loc, origin)
            n = len(loc)
            while n > 0 and loc[:n] not in lines:
                n -= 1
            where = f"(--set {item})" if item else (_where(lines[loc[:n]], shown) if loc[:n] in lines else shown)
            field = _dotted(loc) or "(recipe)"
            text = _describe(err, schema, loc, tuple(err["loc"]), data)
            line = lines.get(loc[:n], 0)
            problems.append((line if isinstance(line, int) else 0, f"{where}: {field}: {text}"))
        raise RecipeError(shown, [p for _, p in sorted(problems, key=lambda t: t[0])]) from None


def _union_branch(raw: Loc, data: Any) -> tuple[Loc, Any] | None:
    """(the union's place in the file, the branch's tag) of an error inside one member of a union, e.g.
    (('data', 'train'), 'list[DataSource]'); None outside unions (the walk of `_clean_loc`)."""
    cur = data
    for i, part in enumerate(raw):
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        elif isinstance(cur, list) and isinstance(part, int) and part < len(cur):
            cur = cur[part]
        elif isinstance(cur, dict) and i == len(raw) - 1:
            return None  # a missing field
        else:
            return tuple(raw[:i]), part
    return None


def _fragment_errors(errors: list[dict], data: dict) -> list[dict]:
    """The errors that remain of a fragment's validation once the fields it leaves out are not asked for:
    'missing' errors go, and so does every error of a union member when another member lacks only fields."""
    branches: dict[Loc, dict[Any, bool]] = {}  # union place -> {branch tag: lacks only fields}
    for err in errors:
        u = _union_branch(tuple(err["loc"]), data)
        if u is not None:
            ok = branches.setdefault(u[0], {}).setdefault(u[1], True)
            branches[u[0]][u[1]] = ok and err["type"] == "missing"
    out = []
    for err in errors:
        if err["type"] == "missing":
            continue
        u = _union_branch(tuple(err["loc"]), data)
        if u is not None and any(branches[u[0]].values()):
            continue
        out.append(err)
    return out


def is_fragment(path: str | os.PathLike) -> bool:
    """The convention for `base:` fragments: a recipe file whose name starts with '_' (recipes/_model.yaml)."""
    return Path(path).name.startswith("_")


def check_fragment(
    path: str | os.PathLike, command: str | None = None, overrides: list[str] | None = None
) -> list[str]:
    """A fragment on its own: its YAML, its own bases, and every key and value it sets, against the schema of its
    `command:` (or `command`), or else of any command (a model section fits them all). The fields it leaves out
    are not asked for: the recipes that use it as `base:` give them. Returns the commands it fits; RecipeError
    with the problems of the closest fit when it fits none."""
    path = Path(path)
    shown = str(path)
    data, lines = compose_file(path)
    origin = apply_overrides(data, list(overrides or []))
    check_finite(data, shown, lines, origin)
    declared = data.get("command")
    if declared is not None and declared not in SCHEMAS:
        where = _where(lines.get(("command",), 1), shown)
        raise RecipeError(shown, [f"{where}: command: unknown command {declared!r}; one of: {', '.join(SCHEMAS)}"])
    names = [command or declared] if (command or declared) else list(SCHEMAS)
    fits, failures = [], []
    for name in names:
        try:
            validate_data({**data, "command": name}, SCHEMAS[name], shown, lines, origin, path.resolve().parent, True)
            fits.append(name)
        except RecipeError as e:
            failures.append(e)
    if not fits:
        raise min(failures, key=lambda e: len(e.problems))
    return fits


def load_recipe(
    path: str | os.PathLike, command: str | None = None, overrides: list[str] | None = None
) -> LoadedRecipe:
    """Read, override and validate a recipe. `command` is the invoking subcommand (None for
    `prefcli validate`, which then needs the recipe's own `command:` key)."""
    path = Path(path)
    shown = str(path)
    overrides = list(overrides or [])
    data, lines = compose_file(path)
    origin = apply_overrides(data, overrides)
    declared = data.get("command")
    if declared is not None and declared not in SCHEMAS:
        close = difflib.get_close_matches(str(declared), list(SCHEMAS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        where = _where(lines.get(("command",), 1), shown)
        raise RecipeError(
            shown, [f"{where}: command: unknown command {declared!r}{hint}; one of: {', '.join(SCHEMAS)}"]
        )
    if command is not None and declared is not None and declared != command:
        where = _where(lines.get(("command",), 1), shown)
        raise RecipeError(
            shown, [f"{where}: command: this recipe is for `prefcli {declared}`, not `prefcli {command}`"]
        )
    cmd = command or declared
    if cmd is None:
        typo = difflib.get_close_matches("command", [str(k) for k in data], n=1, cutoff=0.6)
        if typo:
            line = _where(lines.get((typo[0],), 1), shown)
            problem = f"{line}: {typo[0]}: unknown key (did you mean 'command'?); the recipe needs 'command: <name>'"
        else:
            problem = f"{shown}:1: command: missing; add a line such as 'command: sft' (one of: {', '.join(SCHEMAS)})"
            if not is_fragment(path):
                problem += (
                    f", or, if the file is a fragment other recipes name as base:, name it with a leading '_' "
                    f"(_{path.name}): `prefcli validate` then checks it as a fragment"
                )
        raise RecipeError(shown, [problem])
    data["command"] = cmd
    check_finite(data, shown, lines, origin)
    recipe = validate_data(data, SCHEMAS[cmd], shown, lines, origin, path.resolve().parent)
    return LoadedRecipe(recipe=recipe, path=path, overrides=overrides)


def _where(line: int | str, shown: str) -> str:
    """'file:line' of a value: a line of the recipe itself (int), or already 'base.yaml:line' (from a base)."""
    return line if isinstance(line, str) else f"{shown}:{line}"


def compose_file(path: Path) -> tuple[dict, dict[Loc, int | str]]:
    """The recipe's YAML with its `base:` recipes merged in (compose.py), and where each value came from."""
    from .compose import compose

    fields: set[str] = set()

    def anchor(data: dict, folder: Path) -> dict:
        if not fields:
            fields.update(_path_field_names())
        return _from_cwd(data, "", fields, str(folder))

    return compose(path, _read_yaml, anchor)


def dump_recipe(recipe: RecipeBase) -> str:
    """The fully resolved recipe (absolute paths, every default written out) as YAML."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
