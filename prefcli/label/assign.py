"""Handing out items, taking answers and undoing them: the rater's side of the store (`Desk`).

Assignment: a rater asking for work first gets back their open assignment (a reload shows the same item),
else a gold item at the task's gold rate (one they have not seen), else the real item closest to its
overlap target: items are kept in buckets by how many answers they have, and the fullest bucket is
searched first, so items are completed before new ones are started and few are in flight at once. An item
counts an assignment as in flight while its lease runs (`assignment_timeout_s`, renewed when the rater
loads the page); once it lapses the slot may go to someone else. Skips do not count towards the overlap.

Each change is one committed transaction before the in-memory index follows it, so the index never runs
ahead of the disk. One process serves a task (LabelStore.hold), so nothing else moves the index.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass

from .store import LabelStore, Refused, Shown, parse_answer, shown_order, to_choice


@dataclass
class Done:
    reason: str  # 'complete' (every item has its answers), 'quota', 'none_left' (all the rater can do is done)
    message: str


@dataclass
class Wait:
    retry_after_s: float  # every open item is held by other raters; one may come free
    message: str


@dataclass
class _Item:
    key: str
    prompt: str
    candidates: list[str]
    gold: bool


class Desk:
    def __init__(self, store: LabelStore, clock=time.time):
        self.store, self.db, self.task, self.clock = store, store.db, store.task, clock
        self.k = self.task.overlap
        self.timeout = self.task.assignment_timeout_s
        self.items: dict[int, _Item] = {}
        for i, key, prompt, cands, gold in self.db.execute("SELECT id, key, prompt, candidates, gold FROM items"):
            self.items[i] = _Item(key, prompt, json.loads(cands), gold is not None)
        self.gold_ids = [i for i, it in self.items.items() if it.gold]
        self.answered: dict[int, int] = {i: 0 for i, it in self.items.items() if not it.gold}
        for i, n in self.db.execute(
            "SELECT item_id, COUNT(*) FROM answers WHERE undone_at IS NULL AND choice != '\"skip\"' GROUP BY item_id"
        ):
            if i in self.answered:
                self.answered[i] = n
        self.leases: dict[int, dict[int, float]] = {}
        self.assigned: dict[int, set[int]] = {}
        self.real_count: dict[int, int] = {}
        for item, rater, state, lease in self.db.execute(
            "SELECT item_id, rater_id, state, lease_until FROM assignments"
        ):
            self.assigned.setdefault(rater, set()).add(item)
            if state == "open":
                self.leases.setdefault(item, {})[rater] = lease
            if state != "released" and not self.items[item].gold:
                self.real_count[rater] = self.real_count.get(rater, 0) + 1
        self.buckets: list[dict[int, None]] = [{} for _ in range(self.k)]
        for i in sorted(self.answered):
            if self.answered[i] < self.k:
                self.buckets[self.answered[i]][i] = None
        # kept up to date by _count, so that progress costs nothing per request
        self.n_complete = sum(1 for c in self.answered.values() if c >= self.k)
        self.filled = sum(min(c, self.k) for c in self.answered.values())

    # ------------------------------------------------------------------------------ counts

    def _in_flight(self, item: int, now: float, exclude: int | None = None) -> int:
        return sum(1 for r, t in self.leases.get(item, {}).items() if t > now and r != exclude)

    def _room(self, item: int, now: float, exclude: int) -> bool:
        return self.items[item].gold or self.answered[item] + self._in_flight(item, now, exclude) < self.k

    def _count(self, item: int, delta: int) -> None:
        if self.items[item].gold:
            return
        old = self.answered[item]
        self.answered[item] = new = old + delta
        self.filled += min(new, self.k) - min(old, self.k)
        self.n_complete += (new >= self.k) - (old >= self.k)
        if old < self.k:
            self.buckets[old].pop(item, None)
        if new < self.k:
            self.buckets[new][item] = None  # (re-entering a bucket puts it last: order within a bucket is a tie)

    def complete(self) -> bool:
        return not any(self.buckets)

    # -------------------------------------------------------------------------- next item

    def next(self, rater: int) -> Shown | Done | Wait:
        now = self.clock()
        for aid, item, shown in self.db.execute(
            "SELECT id, item_id, shown FROM assignments WHERE rater_id = ? AND state = 'open' "
            "ORDER BY opened_at DESC, id DESC",
            (rater,),
        ).fetchall():
            if self._room(item, now, exclude=rater):
                with self.store.tx():
                    self.db.execute("UPDATE assignments SET lease_until = ? WHERE id = ?", (now + self.timeout, aid))
                self.leases.setdefault(item, {})[rater] = now + self.timeout
                return self._shown(aid, item, json.loads(shown))
            self._release(aid, item, rater)
        quota = self.task.quota
        if quota is not None and self.real_count.get(rater, 0) >= quota:
            return Done("quota", f"You have answered your {quota} items. Thank you!")
        seen = self.assigned.get(rater, set())
        n_seen = len(seen)
        if self.task.gold is not None and not self.complete():
            unseen = [g for g in self.gold_ids if g not in seen]
            rng = random.Random(f"{self.task.seed}:gold:{rater}:{n_seen}")
            if unseen and rng.random() < self.task.gold.rate:
                return self._assign(rater, rng.choice(unseen), now)
        item = self._pick(rater, seen, now)
        if item is not None:
            return self._assign(rater, item, now)
        if self.complete():
            return Done("complete", "Every item has its answers: the task is complete. Thank you!")
        held = [
            t
            for i in self.answered
            if self.answered[i] < self.k and i not in seen
            for t in self.leases.get(i, {}).values()
            if t > now
        ]
        if held:
            return Wait(min(held) - now, "Every remaining item is with another rater just now; try again shortly.")
        return Done("none_left", "You have answered every item you can. Thank you!")

    def _pick(self, rater: int, seen: set[int], now: float) -> int | None:
        for c in range(self.k - 1, -1, -1):
            for item in self.buckets[c]:
                if item not in seen and c + self._in_flight(item, now) < self.k:
                    return item
        return None

    def _assign(self, rater: int, item: int, now: float) -> Shown:
        it = self.items[item]
        name = self.store.rater_name(rater)
        order = shown_order(self.task, it.key, name, len(it.candidates))
        with self.store.tx():
            aid = self.db.execute(
                "INSERT INTO assignments (item_id, rater_id, shown, opened_at, lease_until, state) "
                "VALUES (?, ?, ?, ?, ?, 'open')",
                (item, rater, json.dumps(order), now, now + self.timeout),
            ).lastrowid
        self.assigned.setdefault(rater, set()).add(item)
        self.leases.setdefault(item, {})[rater] = now + self.timeout
        if not it.gold:
            self.real_count[rater] = self.real_count.get(rater, 0) + 1
        return self._shown(aid, item, order)

    def _release(self, aid: int, item: int, rater: int) -> None:
        with self.store.tx():
            self.db.execute("UPDATE assignments SET state = 'released' WHERE id = ?", (aid,))
        self.leases.get(item, {}).pop(rater, None)
        if not self.items[item].gold:
            self.real_count[rater] -= 1

    def _shown(self, aid: int, item: int, order: list[int]) -> Shown:
        it = self.items[item]
        return Shown(aid, it.prompt, [it.candidates[i] for i in order])

    # ----------------------------------------------------------------------- answer, undo

    def answer(self, rater: int, assignment: int, value, client_id: str | None = None) -> dict:
        """Record an answer to one of the rater's open assignments. A retry (the same client_id) is
        acknowledged again without a second answer. Refused: not this rater's assignment (404), already
        answered or handed to someone else (409), a malformed answer (400)."""
        now = self.clock()
        if client_id is not None:
            if not isinstance(client_id, str) or not 8 <= len(client_id) <= 100:
                raise Refused(400, "client_id: expected a string of 8 to 100 characters")
            r = self.db.execute(
                "SELECT assignment_id FROM answers WHERE rater_id = ? AND client_id = ?", (rater, client_id)
            ).fetchone()
            if r:
                return {"ok": True, "duplicate": True, "assignment": r[0]}
        if not isinstance(assignment, int) or isinstance(assignment, bool):
            raise Refused(400, "assignment: expected the assignment's number")
        row = self.db.execute(
            "SELECT item_id, rater_id, shown, state, opened_at, lease_until FROM assignments WHERE id = ?",
            (assignment,),
        ).fetchone()
        if row is None or row[1] != rater:
            raise Refused(404, "no such assignment of yours")
        item, _, shown, state, opened, lease = row
        if state in ("answered", "skipped"):
            raise Refused(409, "this item is already answered (undo takes an answer back)")
        if state == "released" or (lease < now and not self._room(item, now, exclude=rater)):
            if state != "released":
                self._release(assignment, item, rater)
            raise Refused(409, "this item went to another rater after a long pause; load the next one")
        order = json.loads(shown)
        ans = parse_answer(self.task.mode, value, len(order), self.task.scale)
        choice = to_choice(self.task.mode, ans, order)
        with self.store.tx(durable=True):
            self.db.execute(
                "INSERT INTO answers (assignment_id, item_id, rater_id, answer, choice, shown, shown_at, answered_at, "
                "client_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (assignment, item, rater, json.dumps(ans), json.dumps(choice), shown, opened, now, client_id),
            )
            new_state = "skipped" if ans == "skip" else "answered"
            self.db.execute("UPDATE assignments SET state = ? WHERE id = ?", (new_state, assignment))
        self.leases.get(item, {}).pop(rater, None)
        if ans != "skip":
            self._count(item, +1)
        return {"ok": True, "duplicate": False, "assignment": assignment}

    def undo(self, rater: int, client_id: str | None = None) -> dict:
        """Take back the rater's newest live answer: its assignment opens again (the item comes back next)."""
        now = self.clock()
        if client_id is not None:
            r = self.db.execute(
                "SELECT assignment_id FROM answers WHERE rater_id = ? AND undo_client_id = ?", (rater, client_id)
            ).fetchone()
            if r:
                return {"ok": True, "duplicate": True, "assignment": r[0]}
        r = self.db.execute(
            "SELECT id, assignment_id, item_id, choice FROM answers WHERE rater_id = ? AND undone_at IS NULL "
            "AND origin = 'web' ORDER BY id DESC LIMIT 1",
            (rater,),
        ).fetchone()
        if r is None:
            raise Refused(409, "nothing to undo")
        answer_id, aid, item, choice = r
        with self.store.tx(durable=True):
            self.db.execute(
                "UPDATE answers SET undone_at = ?, undo_client_id = ? WHERE id = ?", (now, client_id, answer_id)
            )
            self.db.execute(
                "UPDATE assignments SET state = 'open', opened_at = ?, lease_until = ? WHERE id = ?",
                (now, now + self.timeout, aid),
            )
        self.leases.setdefault(item, {})[rater] = now + self.timeout
        if json.loads(choice) != "skip":
            self._count(item, -1)
        return {"ok": True, "duplicate": False, "assignment": aid}

    # ---------------------------------------------------------------------------- progress

    def progress(self, rater: int) -> dict:
        mine = self.db.execute(
            "SELECT COUNT(*) FROM answers WHERE rater_id = ? AND undone_at IS NULL", (rater,)
        ).fetchone()[0]
        out = {"answered": mine, "quota": self.task.quota, **self.overall()}
        if self.task.quota:
            out["quota_used"] = self.real_count.get(rater, 0) - sum(
                1
                for item, leases in self.leases.items()
                if rater in leases and not self.items[item].gold  # the item on screen is not done yet
            )
        return out

    def overall(self) -> dict:
        n = len(self.answered)
        return {
            "items": n,
            "items_complete": self.n_complete,
            "task_fraction": self.filled / (n * self.k) if n else 1.0,
            "complete": self.complete(),
        }
