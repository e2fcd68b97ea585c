"""Answers in and out of a task's store: the records the statistics read, `prefcli label export` (the JSONL
shapes the training commands read) and `prefcli label import` (the terminal tool's files).

Export shapes, one row per live answer (gold items and, for pairs, ties and skips left out unless asked):

- pair: {"prompt", "chosen", "rejected", "chosen_position"} -> `prefcli reward` and `contrastive`;
- rate: {"prompt", "completion", "score"} -> the `human_scores` reward source, reward regression;
- rank: {"prompt", "completions" (best first)} -> reward's ranking objective;

each with "rater", "item" (the item's key), "shown_at" and "answered_at" (ISO 8601, UTC) and "time_s" (from
the item being handed out to the answer). `--all` writes every answer instead, as {"prompt", "completions"
(file order), "answer" (as shown), "choice" (candidate indices), "gold", ...}.
"""

from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path

from ..errors import DataError, UsageError
from .items import item_key
from .stats import Record
from .store import LabelStore, new_token, token_hash


def load_records(db) -> list[Record]:
    """Every live answer, oldest first."""
    rows = db.execute(
        "SELECT r.name, i.key, i.prompt, i.candidates, i.gold, a.answer, a.choice, a.shown, a.shown_at, a.answered_at "
        "FROM answers a JOIN items i ON i.id = a.item_id JOIN raters r ON r.id = a.rater_id "
        "WHERE a.undone_at IS NULL ORDER BY a.id"
    ).fetchall()
    return [
        Record(
            rater=name,
            item=key,
            prompt=prompt,
            candidates=json.loads(cands),
            gold=None if gold is None else json.loads(gold),
            answer=json.loads(answer),
            choice=json.loads(choice),
            shown=json.loads(shown) if shown else None,
            shown_at=shown_at,
            answered_at=answered_at,
        )
        for name, key, prompt, cands, gold, answer, choice, shown, shown_at, answered_at in rows
    ]


def iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds")


def export_rows(records: list[Record], mode: str, everything: bool = False, gold: bool = False) -> tuple[list, dict]:
    """(rows, counts of what was left out)."""
    rows, left = [], {"gold": 0, "ties": 0, "skips": 0}
    for r in records:
        meta = {
            "rater": r.rater,
            "item": r.item,
            "shown_at": iso(r.shown_at),
            "answered_at": iso(r.answered_at),
            "time_s": None if r.shown_at is None else round(r.answered_at - r.shown_at, 3),
        }
        if everything:
            rows.append(
                {"prompt": r.prompt, "completions": r.candidates, "answer": r.answer, "choice": r.choice}
                | {"gold": r.gold, "shown": r.shown, **meta}
            )
            continue
        if r.is_gold and not gold:
            left["gold"] += 1
        elif r.choice == "skip":
            left["skips"] += 1
        elif r.choice == "tie":
            left["ties"] += 1
        elif mode == "pair":
            c = r.choice
            rows.append(
                {"prompt": r.prompt, "chosen": r.candidates[c], "rejected": r.candidates[1 - c]}
                | {"chosen_position": r.answer, **meta}
            )
        elif mode == "rate":
            rows.append({"prompt": r.prompt, "completion": r.candidates[0], "score": r.choice, **meta})
        else:
            rows.append({"prompt": r.prompt, "completions": [r.candidates[i] for i in r.choice], **meta})
    return rows, left


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Written beside the target and renamed over it: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------ import


def _journal_answers(log: Path) -> list[dict]:
    """The live answers of a terminal journal (answers pushed, undos popped), as the terminal replays it."""
    stack: list[dict] = []
    with open(log, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                e = json.loads(line)
            except json.JSONDecodeError:
                raise DataError(f"{log}:{n}: not valid JSON") from None
            if e.get("action") == "answer":
                stack.append(e)
            elif e.get("action") == "undo" and stack:
                stack.pop()
    return stack


def terminal_answers(out: Path, log: Path | None, rater: str | None) -> list[dict]:
    """The answers of a terminal session as {rater, key, prompt, candidates, answer, choice, shown, t}: from the
    journal when there is one (ties and skips included), else from the answers file alone."""
    if not out.is_file():
        raise UsageError(f"import: no such file: {out}")
    raw = out.read_bytes()
    rows = []
    for n, line in enumerate(raw.decode("utf-8", "replace").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise DataError(f"{out}:{n}: not valid JSON") from None
    named = {r.get("rater") for r in rows if isinstance(r, dict) and r.get("rater")}
    fallback = rater or (next(iter(named)) if len(named) == 1 else None)
    out_rows = []
    if log is not None and log.is_file():
        for e in _journal_answers(log):
            row = json.loads(raw[e["out_offset"] : e["out_end"]]) if e.get("out_offset") is not None else None
            who = rater or (row or {}).get("rater") or fallback
            if not who:
                raise UsageError(f"import: {log} does not say who answered; pass --rater NAME")
            out_rows.append(_from_terminal(e["prompt"], e["completions"], e["answer"], row, who, e.get("t")))
        return out_rows
    for n, row in enumerate(rows, 1):
        who = rater or row.get("rater")
        if not who:
            raise UsageError(f"import: {out}:{n} has no rater; pass --rater NAME")
        if "chosen" in row and "rejected" in row:
            pos = row.get("chosen_position", "A")
            cands = [row["chosen"], row["rejected"]] if pos == "A" else [row["rejected"], row["chosen"]]
            out_rows.append(_from_terminal(row["prompt"], cands, pos, row, who, None))
        elif "completion" in row and "score" in row:
            out_rows.append(_from_terminal(row["prompt"], [row["completion"]], row["score"], row, who, None))
        else:
            raise DataError(
                f"{out}:{n}: expected a pair (prompt, chosen, rejected) or a rating (prompt, completion, score)"
            )
    return out_rows


def _from_terminal(prompt: str, cands: list[str], answer, row: dict | None, rater: str, t: float | None) -> dict:
    shown = choice = None
    if answer in ("A", "B") and row is not None:
        choice = cands.index(row["chosen"])
        shown = [choice, 1 - choice] if answer == "A" else [1 - choice, choice]
    else:
        choice = answer
    return {
        "rater": rater,
        "key": item_key(prompt, cands),
        "keys": [item_key(prompt, cands), item_key(prompt, cands[::-1])]
        if len(cands) == 2
        else [item_key(prompt, cands)],
        "candidates": cands,
        "answer": answer,
        "choice": choice,
        "shown": shown,
        "t": t,
    }


def import_answers(store: LabelStore, answers: list[dict]) -> dict:
    """Insert imported answers (origin 'import') for the task's items: one answered assignment each. Answers for
    items the task lacks, or that the rater already answered, are counted and left out."""
    db = store.db
    items = {k: (i, json.loads(c)) for i, k, c in db.execute("SELECT id, key, candidates FROM items")}
    counts = {"imported": 0, "not_in_task": 0, "already_answered": 0}
    now = time.time()
    with store.tx():
        for a in answers:
            hit = next((k for k in a["keys"] if k in items), None)
            if hit is None:
                counts["not_in_task"] += 1
                continue
            item_id, cands = items[hit]
            choice, shown = a["choice"], a["shown"]
            if hit != a["key"] and isinstance(choice, int):  # the task lists the pair the other way round
                choice, shown = 1 - choice, (None if shown is None else [1 - s for s in shown])
            r = db.execute("SELECT id FROM raters WHERE name = ?", (a["rater"],)).fetchone()
            rater_id = (
                r[0]
                if r
                else db.execute(
                    "INSERT INTO raters (name, token_hash, created_at) VALUES (?, ?, ?)",
                    (a["rater"], token_hash(new_token()), now),  # nobody holds this token: `invite` gives a link
                ).lastrowid
            )
            if db.execute(
                "SELECT 1 FROM assignments WHERE item_id = ? AND rater_id = ?", (item_id, rater_id)
            ).fetchone():
                counts["already_answered"] += 1
                continue
            t = a["t"] or now
            state = "skipped" if choice == "skip" else "answered"
            aid = db.execute(
                "INSERT INTO assignments (item_id, rater_id, shown, opened_at, lease_until, state) VALUES (?,?,?,?,?,?)",
                (item_id, rater_id, json.dumps(shown), t, t, state),
            ).lastrowid
            db.execute(
                "INSERT INTO answers (assignment_id, item_id, rater_id, answer, choice, shown, shown_at, answered_at, "
                "origin) VALUES (?, ?, ?, ?, ?, ?, NULL, ?, 'import')",
                (aid, item_id, rater_id, json.dumps(a["answer"]), json.dumps(choice), json.dumps(shown), t),
            )
            counts["imported"] += 1
    return counts
