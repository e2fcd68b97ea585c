"""Tool calls in a model's turn, in the formats chat templates teach (`TOOL_FORMATS`):

  hermes     Hermes / Qwen2.5 / Qwen3:  <tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>  (one block per
             call; the text outside the blocks is the message's content)
  pythonic   Llama 3.2 / Llama 4:  [f(x=1), g(y="a")]  (the whole turn is one Python list of calls with keyword
             arguments of literal values)

Each parser returns a `ParsedTurn`: the content, the calls that parsed, and one error per call that did not (the
model is shown the error as the tool's reply, and it is counted in env/tool_errors). Written by hand: the
formats are small, and transformers' response parsing (`parse_response`) needs a per-model response template
and reports a malformed call as a parse failure of the whole message, while a trainer must tell the model which
call was wrong and count it; JSON is read by `json`, the pythonic format by Python's own `ast`.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]


@dataclass
class ParsedTurn:
    content: str  # the text outside the calls
    items: list[ToolCall | str] = field(default_factory=list)  # in the turn's order: a call, or why one is malformed

    @property
    def calls(self) -> list[ToolCall]:
        return [x for x in self.items if isinstance(x, ToolCall)]

    @property
    def errors(self) -> list[str]:
        return [x for x in self.items if isinstance(x, str)]

    @property
    def attempted(self) -> int:
        """Calls the model tried to make (parsed or not)."""
        return len(self.items)


_HERMES = re.compile(r"<tool_call>(.*?)(</tool_call>|$)", re.DOTALL)


def _call_from_json(obj: Any) -> ToolCall | str:
    """A decoded {"name": ..., "arguments": {...}} as a call, or the error message."""
    if not isinstance(obj, dict):
        return f"a tool call is a JSON object with 'name' and 'arguments', got a {type(obj).__name__}"
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return "the tool call has no 'name' (a string)"
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError as e:
            return f"the arguments of {name} are not valid JSON: {e.msg} (column {e.colno})"
    if not isinstance(args, dict):
        return f"the arguments of {name} must be a JSON object, got a {type(args).__name__}"
    return ToolCall(name, args)


def parse_hermes(text: str) -> ParsedTurn:
    items, spans = [], []
    for m in _HERMES.finditer(text):
        spans.append(m.span())
        body, closed = m.group(1).strip(), bool(m.group(2))
        if not closed:
            items.append("the tool call is not closed with </tool_call>")
            continue
        try:
            obj = json.loads(body)
        except json.JSONDecodeError as e:
            items.append(f"the tool call is not valid JSON: {e.msg} (column {e.colno}): {body[:80]!r}")
            continue
        items.append(_call_from_json(obj))
    content, last = [], 0
    for a, b in spans:
        content.append(text[last:a])
        last = b
    content.append(text[last:])
    if "</tool_call>" in "".join(content):
        items.append("</tool_call> without an opening <tool_call>")
    return ParsedTurn("".join(content).replace("</tool_call>", "").strip(), items)


def _literal(node: ast.AST, name: str, key: str) -> Any:
    try:
        return ast.literal_eval(node)
    except (ValueError, SyntaxError, TypeError):
        raise ValueError(
            f"argument {key} of {name} is not a literal value (a number, string, list, dict, ...)"
        ) from None


def parse_pythonic(text: str) -> ParsedTurn:
    body = text.strip()
    if not (body.startswith("[") and "(" in body):
        return ParsedTurn(text.strip())
    if not body.endswith("]"):
        return ParsedTurn("", ["the tool call list is not closed with ]"])
    try:
        tree = ast.parse(body, mode="eval").body
    except SyntaxError as e:
        return ParsedTurn("", [f"the tool call list is not valid: {e.msg}"])
    if not isinstance(tree, ast.List):
        return ParsedTurn("", ["tool calls are written as a list: [f(x=1), g(y=2)]"])
    if not any(isinstance(node, ast.Call) for node in tree.elts):
        return ParsedTurn(text.strip())  # a list of plain values, not calls: text
    items: list[ToolCall | str] = []
    for node in tree.elts:
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
            items.append(f"not a call of a tool by name: {ast.unparse(node)[:60]!r}")
            continue
        name = node.func.id
        if node.args:
            items.append(f"call {name} with keyword arguments (name=value), not positional ones")
            continue
        try:
            items.append(
                ToolCall(name, {kw.arg: _literal(kw.value, name, str(kw.arg)) for kw in node.keywords if kw.arg})
            )
        except ValueError as e:
            items.append(str(e))
    return ParsedTurn("", items)


# env.tool_format -> parser of a model's turn
TOOL_FORMATS: dict[str, Callable[[str], ParsedTurn]] = {
    "hermes": parse_hermes,
    "pythonic": parse_pythonic,
}
