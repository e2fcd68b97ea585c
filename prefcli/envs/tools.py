"""A class's public, documented methods as tools, the way TRL's environment classes work: every public method
that is not part of the protocol (reset, step, close, state) is a tool; its JSON schema comes from its
signature and its Google-style docstring through transformers' `get_json_schema` (the schema chat templates
take as `tools=`), and a call's arguments are checked against the signature by pydantic's `validate_call`.

    class Lookup(Environment):
        def lookup(self, key: int) -> str:
            '''The code word stored under a key.

            Args:
                key: Which entry to read.
            '''

A method without a docstring, a parameter without a type hint or a description, or a type that has no JSON
schema (a custom class) is a bad recipe: `tool_schemas` raises ToolSpecError naming the method.
"""

from __future__ import annotations

import inspect
import json
from typing import Any

from .base import PROTOCOL, Environment


class ToolSpecError(Exception):
    """A method that cannot be a tool (no docstring, an unsupported annotation): names the method and why."""


def tool_names(cls: type) -> list[str]:
    """The public methods of `cls` that are tools, in definition order (base classes' first)."""
    names: list[str] = []
    for klass in reversed(cls.__mro__):
        if klass in (object, Environment):
            continue  # prefcli's own base class has only protocol methods
        for name, value in vars(klass).items():
            if name.startswith("_") or name in PROTOCOL or name in names:
                continue
            if inspect.isfunction(value):
                names.append(name)
    return names


def tool_schemas(cls: type) -> list[dict]:
    """The JSON schema of each tool of `cls` (the chat template's `tools=` format). Raises ToolSpecError."""
    from transformers.utils import get_json_schema
    from transformers.utils.chat_template_utils import DocstringParsingException, TypeHintParsingException

    probe = cls.__new__(cls)  # an instance that skips __init__: its bound methods have signatures without self
    out = []
    for name in tool_names(cls):
        method = getattr(probe, name)
        if not (inspect.getdoc(method) or "").strip():
            raise ToolSpecError(
                f"{cls.__name__}.{name} is a public method, so a tool, but has no docstring: document it (a "
                f"summary line and an Args: section describing each parameter) or make it private (_{name})"
            )
        try:
            out.append(get_json_schema(method))
        except (DocstringParsingException, TypeHintParsingException) as e:
            raise ToolSpecError(f"{cls.__name__}.{name} cannot be a tool: {e}") from None
    return out


def run_tool(instance: Any, name: str, arguments: Any, names: list[str]) -> str:
    """Call tool `name` of `instance` with `arguments` (a dict), checked against its signature. Returns the
    result as text (JSON for anything but a string). Raises ToolCallError with the message the model is shown
    for an unknown tool or bad arguments; whatever the tool itself raises propagates (the caller contains it)."""
    import pydantic

    if name not in names:
        known = ", ".join(names) if names else "none"
        raise ToolCallError("unknown_tool", f"unknown tool {name!r}; the tools are: {known}")
    if not isinstance(arguments, dict):
        raise ToolCallError("bad_arguments", f"arguments of {name} must be an object, got {type(arguments).__name__}")
    try:
        checked = pydantic.validate_call(getattr(instance, name))
    except pydantic.PydanticUserError:  # a signature pydantic cannot check: call it as it is
        checked = getattr(instance, name)
    try:
        result = checked(**arguments)
    except pydantic.ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or name}: {err['msg']}" for err in e.errors())
        raise ToolCallError("bad_arguments", f"bad arguments for {name}: {problems}") from None
    return result if isinstance(result, str) else json.dumps(result, default=str)


class ToolCallError(Exception):
    """A call the model got wrong (unparseable, unknown tool, bad arguments): `kind` for the counters, the
    message for the model."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
