"""Dataset formats people already have, read as prefcli's own rows: detected from the columns, or named by
`data.format`.

| format   | demonstrations (sft)                                   | preference pairs (reward, contrastive)            |
|----------|--------------------------------------------------------|---------------------------------------------------|
| sharegpt | `conversations`: [{from, value}], optional `system`    | `conversations` (the prompt) + `chosen`/`rejected` |
|          |                                                        | ({from: gpt, value}: LLaMA-Factory's pairwise)     |
| alpaca   | `instruction`, `input` (optional), `output`, optional  | `instruction`, `input`, `chosen`, `rejected`       |
|          | `system` and `history` ([[user, assistant], ...])      | (strings), optional `system` and `history`         |
| openai   | `messages` (already prefcli's chat rows; an assistant  | `input: {messages}`, `preferred_output`,           |
|          | message's `weight: 0` leaves it untrained)             | `non_preferred_output` (OpenAI's DPO fine-tuning)  |

Every one becomes chat messages ({role, content}) rendered with the chat template (a model that ships none names
one: model.chat_template), as LLaMA-Factory renders its `sharegpt` and `alpaca` sets: sft rows become `messages`,
pairs become `prompt`, `chosen` and `rejected` message lists. The mappings are LLaMA-Factory's (its
data/README.md): ShareGPT's `human` is the user and `gpt` the assistant; Alpaca's user turn is the instruction, then
a newline and the input when there is one. A value that does not fit is an error naming the row and the field.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..errors import DataError
from .datacheck import describe_value

# ShareGPT's speakers (and the OpenAI-style roles some ShareGPT sets use) -> chat roles
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class RowProblem(ValueError):
    """What is wrong with one row's value (the caller adds the file and the row)."""


def _text(v, field: str) -> str:
    if not isinstance(v, str):
        raise RowProblem(f"'{field}' is {describe_value(v)}, expected text (a string)")
    return v


def _sharegpt_turns(turns, field: str) -> list[dict]:
    if not isinstance(turns, list) or not turns:
        raise RowProblem(f"'{field}' is {describe_value(turns)}, expected a list of {{from, value}} turns")
    out = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            raise RowProblem(f"'{field}[{i}]' is {describe_value(t)}, expected a {{from, value}} turn")
        who = t.get("from", t.get("role"))
        role = SHAREGPT_ROLES.get(who) if isinstance(who, str) else None
        if role is None:
            raise RowProblem(
                f"'{field}[{i}].from' is {who!r}; prefcli reads the speakers {', '.join(SHAREGPT_ROLES)} "
                "(tool and function turns are not read)"
            )
        out.append({"role": role, "content": _text(t.get("value", t.get("content")), f"{field}[{i}].value")})
    return out


def _system(row) -> list[dict]:
    s = row.get("system")
    return [{"role": "system", "content": _text(s, "system")}] if s else []


def _alpaca_history(row) -> list[dict]:
    out = []
    for i, pair in enumerate(row.get("history") or []):
        if not (isinstance(pair, list) and len(pair) == 2):
            raise RowProblem(f"'history[{i}]' is {describe_value(pair)}, expected [instruction, answer]")
        out += [
            {"role": "user", "content": _text(pair[0], f"history[{i}][0]")},
            {"role": "assistant", "content": _text(pair[1], f"history[{i}][1]")},
        ]
    return out


def _alpaca_prompt(row) -> list[dict]:
    query = _text(row.get("instruction"), "instruction")
    extra = row.get("input")
    if extra:
        query += "\n" + _text(extra, "input")
    return _system(row) + _alpaca_history(row) + [{"role": "user", "content": query}]


def _assistant(v, field: str) -> list[dict]:
    """One answer of a pair: a string, a {from/role, value/content} turn, or a list of such turns."""
    if isinstance(v, str):
        return [{"role": "assistant", "content": v}]
    turns = _sharegpt_turns(v if isinstance(v, list) else [v], field)
    if any(t["role"] != "assistant" for t in turns):
        raise RowProblem(f"'{field}' holds a turn that is not the assistant's")
    return turns


# ------------------------------------------------------------------------------------- converters


def sharegpt_sft(row) -> dict:
    return {"messages": _system(row) + _sharegpt_turns(row.get("conversations"), "conversations")}


def alpaca_sft(row) -> dict:
    return {"messages": _alpaca_prompt(row) + [{"role": "assistant", "content": _text(row.get("output"), "output")}]}


def sharegpt_pairs(row) -> dict:
    prompt = _system(row) + _sharegpt_turns(row.get("conversations"), "conversations")
    return {"prompt": prompt, "chosen": _assistant(row.get("chosen"), "chosen"),
            "rejected": _assistant(row.get("rejected"), "rejected")}  # fmt: skip


def alpaca_pairs(row) -> dict:
    return {"prompt": _alpaca_prompt(row), "chosen": _assistant(row.get("chosen"), "chosen"),
            "rejected": _assistant(row.get("rejected"), "rejected")}  # fmt: skip


def openai_pairs(row) -> dict:
    inp = row.get("input")
    if not isinstance(inp, dict):
        raise RowProblem(f"'input' is {describe_value(inp)}, expected {{messages: [{{role, content}}, ...]}}")
    msgs = inp.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise RowProblem(f"'input.messages' is {describe_value(msgs)}, expected a list of {{role, content}} messages")
    prompt = []
    for i, m in enumerate(msgs):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)):
            raise RowProblem(f"'input.messages[{i}]' is {describe_value(m)}, expected a {{role, content}} message")
        prompt.append({"role": m["role"], "content": _text(m.get("content"), f"input.messages[{i}].content")})
    return {"prompt": prompt, "chosen": _assistant(row.get("preferred_output"), "preferred_output"),
            "rejected": _assistant(row.get("non_preferred_output"), "non_preferred_output")}  # fmt: skip


@dataclass(frozen=True)
class RowFormat:
    columns: tuple[str, ...]  # the columns that identify it (all present)
    convert: Callable[[dict], dict]


# kind ('sft' or 'pairs') -> format name -> how it is recognised and read. 'openai' sft rows are `messages`, the
# chat rows prefcli reads as they are (encode_messages honours their `weight`), so only pairs convert them.
FORMATS: dict[str, dict[str, RowFormat]] = {
    "sft": {
        "sharegpt": RowFormat(("conversations",), sharegpt_sft),
        "alpaca": RowFormat(("instruction", "output"), alpaca_sft),
    },
    "pairs": {
        "sharegpt": RowFormat(("conversations", "chosen", "rejected"), sharegpt_pairs),
        "alpaca": RowFormat(("instruction", "chosen", "rejected"), alpaca_pairs),
        "openai": RowFormat(("input", "preferred_output", "non_preferred_output"), openai_pairs),
    },
}


def outside_format(columns: Sequence[str], requested: str, kind: str) -> str | None:
    """The outside format of rows with these columns: the one `data.format` names, or (auto) the first whose
    columns are all there; None for prefcli's own rows."""
    table = FORMATS[kind]
    if requested in table:
        return requested
    if requested != "auto":
        return None
    return next((name for name, f in table.items() if set(f.columns) <= set(columns)), None)


def convert_rows(ds, fmt: str, kind: str, source: str, what: str):
    """`ds` read as `fmt`: its rows turned into prefcli's (sft: messages; pairs: prompt, chosen, rejected)."""
    spec = FORMATS[kind][fmt]
    missing = [c for c in spec.columns if c not in ds.column_names]
    if missing:
        raise DataError(
            f"{what}: {source}: format '{fmt}' needs column(s) {', '.join(missing)} "
            f"(columns: {', '.join(ds.column_names)})"
        )

    def one(row, i):
        try:
            return spec.convert(row)
        except RowProblem as e:
            raise DataError(f"{what}: {source}: row {i + 1} ({fmt}): {e}; fix the row") from None

    return ds.map(one, with_indices=True, remove_columns=ds.column_names, desc=f"reading {fmt} rows")
