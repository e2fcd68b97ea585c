"""A labelling task's store: one SQLite file (WAL) holding items, raters, sessions, assignments and answers.

Schema (docs/labelling.md, "The store"): `meta` (key/value: app, schema version, mode, scale, owner token
hash), `items` (candidates in file order; `gold` holds a gold item's answer and is never sent to a rater),
`raters` (name, sha256 of the invite token), `sessions` (sha256 of the cookie, its CSRF token), `assignments`
(an item handed to a rater: the shown order, the lease; UNIQUE(item, rater): nobody sees an item twice),
`answers` (the rater's answer as shown and in candidate terms, times, the client's id for idempotent
retries; undo sets `undone_at`; one live answer per assignment).

Durability: every answer is one transaction, committed (synchronous=FULL: the WAL fsynced) before the request
is acknowledged and before the next item is handed out, so every acknowledged answer survives the server
being killed at any moment, and a power cut. Assignments and lease renewals commit with synchronous=NORMAL:
in the WAL file before the item is shown (a killed server keeps them), fsynced with the next answer. Assignment runs from an index kept in memory (rebuilt from the tables when the
store opens) so that handing out an item costs no table scan; only the serving process assigns.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
import secrets
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .items import TaskItem

APP = "prefcli-label"
SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE items (
    id INTEGER PRIMARY KEY, key TEXT NOT NULL UNIQUE, prompt TEXT NOT NULL, candidates TEXT NOT NULL,
    gold TEXT, source TEXT NOT NULL);
CREATE TABLE raters (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, token_hash TEXT NOT NULL UNIQUE, created_at REAL NOT NULL);
CREATE TABLE sessions (
    token_hash TEXT PRIMARY KEY, rater_id INTEGER REFERENCES raters(id), owner INTEGER NOT NULL DEFAULT 0,
    csrf TEXT NOT NULL, created_at REAL NOT NULL);
CREATE TABLE assignments (
    id INTEGER PRIMARY KEY, item_id INTEGER NOT NULL REFERENCES items(id), rater_id INTEGER NOT NULL REFERENCES raters(id),
    shown TEXT NOT NULL, opened_at REAL NOT NULL, lease_until REAL NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('open', 'answered', 'skipped', 'released')), UNIQUE (item_id, rater_id));
CREATE TABLE answers (
    id INTEGER PRIMARY KEY, assignment_id INTEGER NOT NULL REFERENCES assignments(id),
    item_id INTEGER NOT NULL REFERENCES items(id), rater_id INTEGER NOT NULL REFERENCES raters(id),
    answer TEXT NOT NULL, choice TEXT NOT NULL, shown TEXT, shown_at REAL, answered_at REAL NOT NULL,
    client_id TEXT, undone_at REAL, undo_client_id TEXT, origin TEXT NOT NULL DEFAULT 'web',
    UNIQUE (rater_id, client_id));
CREATE UNIQUE INDEX one_live_answer ON answers (assignment_id) WHERE undone_at IS NULL;
CREATE INDEX answers_by_rater ON answers (rater_id, id);
"""


def token_hash(token: str) -> str:
    """Tokens are 192 random bits, so a plain SHA-256 is enough (no slow KDF: nothing to brute-force)."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return secrets.token_urlsafe(24)


class Refused(Exception):
    """A request the store turns down: `status` is the HTTP status the web layer answers with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Shown:
    """An assignment as the rater sees it: the candidates in the shown order; no gold flag."""

    assignment: int
    prompt: str
    candidates: list[str]


def default_store_path(task, task_path: str | Path) -> Path:
    p = Path(task_path)
    return Path(task.store) if task.store else p.resolve().with_name(p.stem + ".db")


# ------------------------------------------------------------------------------------ answers


def parse_answer(mode: str, value: Any, n: int, scale: int) -> Any:
    """A rater's answer as submitted (JSON or a form field) in shown terms, checked; Refused(400) if malformed.
    pair: 'A' | 'B' | 'tie' | 'skip'; rate: 1..scale | 'skip'; rank: shown positions 1..n best first (a list, or
    a string such as '2 1 3' or '213') | 'skip'."""
    if isinstance(value, str):
        v = value.strip()
        if v.lower() == "skip":
            return "skip"
    else:
        v = value
    if mode == "pair":
        if isinstance(v, str) and v.upper() in ("A", "B"):
            return v.upper()
        if isinstance(v, str) and v.lower() == "tie":
            return "tie"
        raise Refused(400, "answer: expected A, B, tie or skip")
    if mode == "rate":
        if isinstance(v, str) and v.isdigit():
            v = int(v)
        if isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= scale:
            return v
        raise Refused(400, f"answer: expected a score from 1 to {scale}, or skip")
    if isinstance(v, str):
        parts = v.replace(",", " ").split()
        v = (
            [int(c) for c in (parts if len(parts) > 1 else list(v))]
            if v.replace(",", "").replace(" ", "").isdigit()
            else v
        )
    if isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        if sorted(v) == list(range(1, n + 1)):
            return v
        if len(v) == n - 1 and len(set(v)) == len(v) and set(v) < set(range(1, n + 1)):
            return v + [next(iter(set(range(1, n + 1)) - set(v)))]  # the last place follows
    raise Refused(400, f"answer: expected the {n} shown positions 1..{n}, best first, or skip")


def to_choice(mode: str, answer: Any, shown: list[int]) -> Any:
    """An answer in candidate terms: pair 0 | 1 | 'tie' | 'skip'; rate the score; rank candidate indices best first."""
    if answer == "skip" or mode == "rate":
        return answer
    if mode == "pair":
        return "tie" if answer == "tie" else shown["AB".index(answer)]
    return [shown[p - 1] for p in answer]


# -------------------------------------------------------------------------------------- store


class LabelStore:
    def __init__(self, path: Path, conn: sqlite3.Connection, task):
        self.path = path
        self.db = conn
        self.task = task
        self.mode = task.mode
        self.lock_fd: int | None = None
        self._sync = "FULL"

    # ---------------------------------------------------------------------------- opening

    @classmethod
    def open(
        cls,
        path: Path,
        task,
        items: list[TaskItem] | None,
        gold: list[TaskItem] | None,
        create: bool = True,
        hold: bool = False,
    ) -> LabelStore:
        """Open (or with `create` make) the store of `task`. Everything is checked before anything is written:
        a folder or a non-SQLite file, a store made for another task (other mode, or items this task lacks),
        a file another process holds locked, and with `hold` another server on it (see hold()).
        `items`/`gold` None: the store must exist (stats, export)."""
        path = Path(path)
        if path.is_dir():
            raise UsageError(f"store {path} is a folder; set store: to a file name")
        exists = path.exists() and path.stat().st_size > 0
        if not exists and (not create or items is None):
            raise UsageError(f"no store yet at {path}: `prefcli label serve` or `invite` creates it")
        if not exists and not os.access(path.parent, os.W_OK | os.X_OK):
            raise UsageError(f"cannot create the store {path}: the folder {path.parent} is not writable")
        if exists and (items is not None or hold):  # it will be written: SQLite would find out at the first write
            if not os.access(path, os.R_OK | os.W_OK):
                raise UsageError(f"the store {path} is read-only; nothing was changed")
            if not os.access(path.parent, os.W_OK | os.X_OK):
                raise UsageError(
                    f"the folder {path.parent} is not writable: SQLite keeps the store's -wal and -shm files beside it"
                )
        try:
            conn = sqlite3.connect(str(path), isolation_level=None, timeout=1.0, check_same_thread=False)
        except sqlite3.Error as e:
            raise UsageError(f"cannot open the store {path}: {e}") from None
        store = cls(path, conn, task)
        try:
            if exists:
                store._check_existing(items, gold)
            if hold:
                store.hold()
            store._configure()
            if items is not None:
                store._write_task(items, gold or [], fresh=not exists)
        except BaseException:
            store.close()
            if not exists:  # leave no empty file behind
                for suffix in ("", "-wal", "-shm"):
                    Path(str(path) + suffix).unlink(missing_ok=True)
            raise
        return store

    def _check_existing(self, items, gold) -> None:
        p = self.path
        try:
            names = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.DatabaseError as e:
            raise UsageError(
                f"{p} is not a prefcli labelling store (SQLite: {e}); move it aside or set store:"
            ) from None
        meta = dict(self.db.execute("SELECT key, value FROM meta")) if "meta" in names else {}
        if meta.get("app") != APP:
            raise UsageError(
                f"{p} is not a prefcli labelling store (no prefcli meta table); move it aside or set store:"
            )
        if int(meta.get("schema_version", 0)) != SCHEMA_VERSION:
            raise UsageError(f"{p} has store schema {meta.get('schema_version')}; this prefcli reads {SCHEMA_VERSION}")
        want = {"mode": self.task.mode, "scale": str(self.task.scale)}
        for k, v in want.items():
            if meta.get(k) != v and not (k == "scale" and self.task.mode != "rate"):
                raise UsageError(
                    f"{p} was made for another task ({k} {meta.get(k)}, this task's is {v}); nothing was changed. "
                    "Give this task its own store: (or move the file aside)"
                )
        if items is not None:
            known = {it.key for it in items} | {g.key for g in gold or []}
            rows = self.db.execute("SELECT key, prompt, source FROM items").fetchall()
            missing = [r for r in rows if r[0] not in known]
            if missing:
                k, prompt, src = missing[0]
                raise UsageError(
                    f"{p} was made for another task: {len(missing)} of its {len(rows)} items are not in this task's "
                    f"items (first: {src}, prompt {prompt[:60]!r}); nothing was changed. Give this task its own "
                    "store: (or move the file aside)"
                )

    def _configure(self) -> None:
        try:
            self.db.execute("PRAGMA busy_timeout = 1000")
            mode = self.db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            self.db.execute("PRAGMA synchronous = FULL")
            self.db.execute("PRAGMA foreign_keys = ON")
            self.db.execute("BEGIN IMMEDIATE")  # a store another process holds locked is found here
            self.db.execute("ROLLBACK")
        except sqlite3.OperationalError as e:
            if "locked" in str(e) or "busy" in str(e):
                raise UsageError(
                    f"the store {self.path} is locked by another process (a `prefcli label` command still "
                    "running?); nothing was changed"
                ) from None
            if "readonly" in str(e).replace("-", "").replace(" ", "") or "read only" in str(e):
                raise UsageError(f"the store {self.path} is read-only; nothing was changed") from None
            raise UsageError(f"cannot use the store {self.path}: {e}") from None
        if mode != "wal":
            raise UsageError(f"the store {self.path} cannot use WAL journaling (got {mode}); is it on a network drive?")

    def _write_task(self, items: list[TaskItem], gold: list[TaskItem], fresh: bool) -> None:
        now = time.time()
        try:
            with self.tx():
                if fresh:
                    # one statement at a time: executescript() would commit the open transaction
                    for stmt in SCHEMA.split(";"):
                        if stmt.strip():
                            self.db.execute(stmt)
                    meta = {"app": APP, "schema_version": SCHEMA_VERSION, "mode": self.task.mode}
                    meta |= {"scale": self.task.scale, "created_at": now}
                    self.db.executemany("INSERT INTO meta VALUES (?, ?)", [(k, str(v)) for k, v in meta.items()])
                have = {r[0] for r in self.db.execute("SELECT key FROM items")}
                rows = [
                    (
                        it.key,
                        it.prompt,
                        json.dumps(it.candidates, ensure_ascii=False),
                        None if it.gold is None else json.dumps(it.gold),
                        it.source,
                    )
                    for it in [*items, *gold]
                    if it.key not in have
                ]
                self.db.executemany(
                    "INSERT INTO items (key, prompt, candidates, gold, source) VALUES (?,?,?,?,?)", rows
                )
        except sqlite3.OperationalError as e:
            raise UsageError(f"cannot write the store {self.path}: {e}") from None
        self.added = 0 if fresh else len(rows)

    def tx(self, durable: bool = False):
        """One transaction. `durable`: committed with synchronous=FULL (the WAL fsynced before COMMIT returns: an
        answer survives a power cut); else NORMAL, which survives the process being killed at any moment (the
        commit is in the WAL file) but not a power cut: assignments and leases, which a lost one only re-deals."""
        want = "FULL" if durable else "NORMAL"
        if want != self._sync:
            self.db.execute(f"PRAGMA synchronous = {want}")
            self._sync = want
        return _Tx(self.db)

    def hold(self) -> None:
        """Take the serving lock (flock on the store file): one `prefcli label serve` per task. SQLite's own
        locks are fcntl locks, independent of flock; the descriptor stays open until close()."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise UsageError(
                f"the store {self.path} is in use by another `prefcli label serve`; stop it first (or give this "
                "task another store:)"
            ) from None
        self.lock_fd = fd

    def close(self) -> None:
        self.db.close()
        if self.lock_fd is not None:  # after the connection: closing any descriptor drops this process's fcntl locks
            os.close(self.lock_fd)
            self.lock_fd = None

    def meta(self, key: str) -> str | None:
        r = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return r[0] if r else None

    # --------------------------------------------------------------------- raters, sessions

    def invite(self, name: str) -> tuple[str, bool]:
        """A new token for rater `name` (made if new): (token, whether the rater already existed, whose old
        link and sessions stop working). Only the token's hash is kept."""
        name = name.strip()
        if not name or len(name) > 100 or any(ord(c) < 32 for c in name):
            raise UsageError("--rater: a name of 1 to 100 printable characters")
        token = new_token()
        with self.tx():
            row = self.db.execute("SELECT id FROM raters WHERE name = ?", (name,)).fetchone()
            if row:
                self.db.execute("UPDATE raters SET token_hash = ? WHERE id = ?", (token_hash(token), row[0]))
                self.db.execute("DELETE FROM sessions WHERE rater_id = ?", (row[0],))
            else:
                self.db.execute(
                    "INSERT INTO raters (name, token_hash, created_at) VALUES (?, ?, ?)",
                    (name, token_hash(token), time.time()),
                )
        return token, row is not None

    def owner_token(self) -> str:
        """A new owner token (the dashboard); the old owner link and sessions stop working."""
        token = new_token()
        with self.tx():
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('owner_token_hash', ?)", (token_hash(token),))
            self.db.execute("DELETE FROM sessions WHERE owner = 1")
        return token

    def has_owner(self) -> bool:
        return self.meta("owner_token_hash") is not None

    def rater_for_token(self, token: str) -> int | None:
        r = self.db.execute("SELECT id FROM raters WHERE token_hash = ?", (token_hash(token),)).fetchone()
        return r[0] if r else None

    def is_owner_token(self, token: str) -> bool:
        want = self.meta("owner_token_hash")
        return want is not None and secrets.compare_digest(want, token_hash(token))

    def new_session(self, rater_id: int | None, owner: bool) -> tuple[str, str]:
        """(cookie value, CSRF token) of a new session; the cookie's hash is kept."""
        cookie, csrf = new_token(), new_token()
        with self.tx():
            self.db.execute(
                "INSERT INTO sessions VALUES (?, ?, ?, ?, ?)",
                (token_hash(cookie), rater_id, int(owner), csrf, time.time()),
            )
        return cookie, csrf

    def session(self, cookie: str) -> tuple[int | None, bool, str] | None:
        """(rater id, owner, CSRF token) of a session cookie, or None."""
        r = self.db.execute(
            "SELECT rater_id, owner, csrf FROM sessions WHERE token_hash = ?", (token_hash(cookie),)
        ).fetchone()
        return (r[0], bool(r[1]), r[2]) if r else None

    def rater_name(self, rater_id: int) -> str:
        return self.db.execute("SELECT name FROM raters WHERE id = ?", (rater_id,)).fetchone()[0]


class _Tx:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on an exception): one transaction, committed on exit."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.db.execute("COMMIT")
        else:
            self.db.execute("ROLLBACK")
        return False


def shown_order(task, item_key: str, rater: str, n: int) -> list[int]:
    """The order candidates are shown to a rater: a permutation seeded by the task seed, the item and the rater."""
    order = list(range(n))
    if task.shuffle and n > 1:
        random.Random(f"{task.seed}:{item_key}:{rater}").shuffle(order)
    return order
