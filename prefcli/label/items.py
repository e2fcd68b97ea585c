"""The items of a labelling task, read and checked before anything is served or written.

An item is a prompt with its candidates in the order the files give them; answers are stored in those
terms (candidate indices), whatever order a rater saw. Rows (one JSON object per line):

- pairs and rankings: `{"prompt", "completions": [...]}`, or `{"prompt", "completion_a", "completion_b"}`;
- ratings: `{"prompt", "completion"}` (what `prefcli generate` writes), or `completions` (each one an item);
- several files: row n of each file joined into one item, candidates in file order (the outputs of
  `prefcli generate` for two models on the same prompts make pairs).

Gold items carry their answer in `gold`: pairs 0, 1 (the better completion's index) or "tie"; ratings
the score; rankings the completion indices best first.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError

# how many candidates an item of each mode has (rate: one per item; a row's several completions are split)
NEEDS = {"pair": "exactly 2 completions", "rate": "one completion per item", "rank": "2 or more completions"}


@dataclass
class TaskItem:
    key: str  # stable id: a hash of the prompt and candidates
    prompt: str
    candidates: list[str]
    source: str  # file:line (or the prompts file for sampled items)
    gold: Any = None  # the known answer, in candidate terms (gold items only)


def item_key(prompt: str, candidates: list[str]) -> str:
    return hashlib.sha1(json.dumps([prompt, candidates], ensure_ascii=False).encode()).hexdigest()[:16]


def row_candidates(obj: Any, where: str) -> tuple[str, list[str]]:
    """(prompt, candidates) of one JSONL row, or a DataError naming `where` (file:line) and what is expected."""
    if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
        raise DataError(f"{where}: expected an object with a 'prompt' string")
    if "completions" in obj:
        comps = obj["completions"]
    elif "completion_a" in obj or "completion_b" in obj:
        comps = [obj.get("completion_a"), obj.get("completion_b")]
    elif "completion" in obj:
        comps = [obj["completion"]]
    else:
        have = ", ".join(sorted(obj)) or "none"
        raise DataError(
            f"{where}: no completions: give 'completions' (a list), 'completion_a' and 'completion_b', or "
            f"'completion' (the row has: {have})"
        )
    if not isinstance(comps, list) or not comps or not all(isinstance(c, str) for c in comps):
        raise DataError(f"{where}: completions must be a non-empty list of strings")
    return obj["prompt"], comps


def _rows(path: str) -> list[tuple[int, dict]]:
    out = []
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    with f:
        try:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    out.append((n, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
        except UnicodeDecodeError:
            raise DataError(f"{path}: not UTF-8 text") from None
    if not out:
        raise DataError(f"{path} has no rows")
    return out


def _joined(files: list[str]) -> list[tuple[str, dict, list[str], str]]:
    """(where, first row, candidates, prompt) per item, the files' rows joined line by line."""
    tables = [_rows(f) for f in files]
    if len({len(t) for t in tables}) > 1:
        sizes = ", ".join(f"{f}: {len(t)}" for f, t in zip(files, tables))
        raise DataError(f"items.path: the files have different numbers of rows ({sizes}); row n of each is joined")
    out = []
    for rows in zip(*tables):
        where = " + ".join(f"{f}:{n}" for f, (n, _) in zip(files, rows))
        prompt, comps = None, []
        for f, (n, obj) in zip(files, rows):
            p, c = row_candidates(obj, f"{f}:{n}")
            if prompt is not None and p != prompt:
                raise DataError(f"{where}: the prompts differ; joined rows must hold the same prompt")
            prompt = p
            comps += c
        out.append((where, rows[0][1], comps, prompt))
    return out


def _check_gold(value: Any, mode: str, n: int, scale: int, where: str) -> Any:
    if mode == "pair" and (value in (0, 1, "tie") and not isinstance(value, bool)):
        return value
    if mode == "rate" and isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= scale:
        return value
    if mode == "rank" and isinstance(value, list) and sorted(value) == list(range(n)):
        return value
    expected = {
        "pair": "0 or 1 (the index of the better completion) or 'tie'",
        "rate": f"a score from 1 to {scale}",
        "rank": f"the completion indices best first, a permutation of 0..{n - 1}",
    }[mode]
    raise DataError(f"{where}: gold: expected {expected}, got {json.dumps(value)}")


def build_items(rows: list[tuple[str, dict, list[str], str]], mode: str, scale: int, gold: bool) -> list[TaskItem]:
    """TaskItems from joined rows, checked for `mode`. Rate mode splits a row's completions into items."""
    items = []
    for where, obj, comps, prompt in rows:
        if mode == "pair" and len(comps) != 2:
            raise DataError(f"{where}: a pair needs exactly 2 completions, got {len(comps)}")
        if mode == "rank" and len(comps) < 2:
            raise DataError(f"{where}: a ranking needs 2 or more completions, got {len(comps)}")
        if mode in ("pair", "rank") and len(set(comps)) < len(comps):
            raise DataError(f"{where}: two completions are identical; a rater cannot prefer one")
        answer = None
        if gold:
            if "gold" not in obj:
                raise DataError(f"{where}: a gold item needs a 'gold' answer")
            if mode == "rate" and len(comps) != 1:
                raise DataError(f"{where}: a gold rating holds one completion (its score is the gold answer)")
            answer = _check_gold(obj["gold"], mode, len(comps), scale, where)
        groups = [[c] for c in comps] if mode == "rate" else [comps]
        for cands in groups:
            items.append(TaskItem(item_key(prompt, cands), prompt, cands, where, answer))
    seen: dict[str, str] = {}
    for it in items:
        if it.key in seen:
            raise DataError(f"{it.source}: the same item as {seen[it.key]} (prompt and completions); remove one")
        seen[it.key] = it.source
    return items


def read_task_items(task, warn=print) -> tuple[list[TaskItem], list[TaskItem]]:
    """(items, gold items) of a validated LabelRecipe. Sampled items need the model: see sample_items."""
    if task.items.model is not None:
        items = sample_items(task, warn)
    else:
        items = build_items(_joined(task.items.files()), task.mode, task.scale, gold=False)
    gold: list[TaskItem] = []
    if task.gold is not None:
        gold = build_items(_joined([task.gold.path]), task.mode, task.scale, gold=True)
        real = {it.key: it.source for it in items}
        for g in gold:
            if g.key in real:
                raise DataError(f"{g.source}: this gold item is also an item to label ({real[g.key]})")
    return items, gold


def sample_items(task, warn) -> list[TaskItem]:
    """Candidates sampled by `items.model` for every prompt of `items.prompts` (torch is imported here only).
    Items whose candidates came out identical are left out, with a warning."""
    import torch

    from ..evaluate.generation import GenerateOptions, Generator, read_prompts, resolve_generate_model
    from ..evaluate.loading import load_lm, make_runtime

    spec = task.items
    ppath = Path(spec.prompts)
    fmt = "jsonl" if ppath.name.endswith(".jsonl") else "lines"
    with open(ppath, encoding="utf-8") as f:
        prompts = [p for p, _ in read_prompts(f, fmt, str(ppath))]
    if not prompts:
        raise DataError(f"{ppath} has no prompts")
    section, _base, _seed, (device, precision, chunk) = resolve_generate_model(GenerateOptions(model_dir=spec.model))
    rt = make_runtime(device, precision, chunk)
    lm, tok = load_lm(section, rt)
    gen = Generator(lm, tok, spec.generation, rt.device, autocast=rt.autocast, warn=lambda t: warn(f"warning: {t}"))
    n = 2 if task.mode == "pair" else spec.candidates
    warn(f"sampling {n} candidates for each of {len(prompts)} prompts from {spec.model} ...")
    rows, same = [], 0
    for i, p in enumerate(prompts):
        torch.manual_seed(spec.seed * 1_000_003 + i)
        comps = [g.completion for g in gen.generate([p] * n)]
        if task.mode != "rate" and len(set(comps)) < len(comps):
            same += 1
            continue
        rows.append((f"{ppath}:{i + 1}", {}, comps, p))
    if same:
        warn(f"warning: left out {same} prompts whose sampled candidates were identical")
    return build_items(rows, task.mode, task.scale, gold=False)
