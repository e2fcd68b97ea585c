"""Generate docs/recipe-reference.md from the schemas' field descriptions.

    python -m prefcli.recipe.docs > docs/recipe-reference.md     (make docs)

tests/test_docs.py fails when the committed file differs from what this prints.
"""

from __future__ import annotations

import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from .commands import SCHEMAS


def _type_name(ann: Any) -> str:
    origin = typing.get_origin(ann)
    args = typing.get_args(ann)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        parts = [_type_name(a) for a in args if a is not type(None)]
        s = " or ".join(parts)
        return s + (" or null" if type(None) in args else "")
    if origin in (list, tuple, dict):
        inner = ", ".join(_type_name(a) for a in args if a is not Ellipsis)
        return f"{origin.__name__}[{inner}]"
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return f"[{ann.__name__}](#{ann.__name__.lower()})"
    if typing.get_origin(ann) is typing.Annotated:
        return _type_name(args[0])
    return getattr(ann, "__name__", str(ann)).replace("typing.", "")


def _default(field) -> str:
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        v = field.default_factory()
        if isinstance(v, BaseModel):
            return "(section defaults)"
        return f"`{v!r}`"
    if field.default is PydanticUndefined:
        return ""
    return f"`{field.default!r}`" if field.default is not None else "`null`"


def _models_in(ann: Any, out: list) -> None:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        if ann not in out:
            out.append(ann)
            for f in ann.model_fields.values():
                _models_in(f.annotation, out)
        return
    for a in typing.get_args(ann):
        _models_in(a, out)


def _table(model: type[BaseModel]) -> list[str]:
    lines = ["| field | type | default | description |", "|---|---|---|---|"]
    for name, f in model.model_fields.items():
        desc = (f.description or "").replace("|", "\\|").replace("\n", " ")
        lines.append(f"| `{name}` | {_type_name(f.annotation)} | {_default(f)} | {desc} |")
    return lines


def render() -> str:
    out = [
        "# Recipe reference",
        "",
        "Generated from the recipe schemas by `make docs`; do not edit by hand.",
        "Every section rejects unknown keys. Paths resolve relative to the recipe file.",
        "",
    ]
    sections: list[type[BaseModel]] = []
    for command, schema in SCHEMAS.items():
        out += [f"## `prefcli {command}`", "", (schema.__doc__ or "").strip(), ""]
        out += _table(schema) + [""]
        for f in schema.model_fields.values():
            _models_in(f.annotation, sections)
    out += ["## Sections", ""]
    for model in sections:
        out += [f"### {model.__name__}", ""]
        if model.__doc__ and not model.__doc__.startswith(("Usage docs", "!!!", "A base class")):
            out += [" ".join(model.__doc__.split()), ""]
        out += _table(model) + [""]
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    import sys

    sys.stdout.write(render())
