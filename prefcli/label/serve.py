"""`prefcli label serve|invite|stats|export|import TASK.yaml`: the commands of a labelling task.

Order matters for the bad-input contract: the task is validated and its items read, the port bound and the
store checked (a folder, a file of another task, one that is read-only or locked, another server on it)
before anything is written; only then is the store created or extended.

The web stack (Starlette, uvicorn, Jinja2, krippendorff: `pip install 'prefcli[label]'`) is imported inside
these functions only, so `prefcli --help` and `prefcli validate` never pay for it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path

from ..errors import UsageError
from .store import LabelStore, default_store_path

WEB_MODULES = {"starlette": "starlette", "uvicorn": "uvicorn", "jinja2": "jinja2", "multipart": "python-multipart"}
STATS_MODULES = {"krippendorff": "krippendorff", "numpy": "numpy"}


def require(modules: dict[str, str], what: str) -> None:
    missing = [pkg for mod, pkg in modules.items() if find_spec(mod) is None]
    if missing:
        raise UsageError(
            f"{what} needs the labelling extra: pip install 'prefcli[label]' (in a prefcli checkout: "
            f"pip install -e '.[label]'); missing: {', '.join(missing)}"
        )


@dataclass
class ServeOptions:
    overrides: list[str] = field(default_factory=list)
    host: str | None = None
    port: int | None = None
    quiet: bool = False


def load_task(path: str | Path, overrides: list[str] | None = None):
    from ..recipe import load_recipe

    return load_recipe(path, "label", list(overrides or [])).recipe


def open_store(path, task, create: bool, hold: bool = False, warn=None) -> LabelStore:
    """The task's store; `create`: read the items (exit 2 on bad ones) and make or extend the store. Items a model
    samples are sampled once, when the store is made; later opens take them from the store."""
    from .items import read_task_items

    where = default_store_path(task, path)
    items = gold = None
    sampled_before = task.items.model is not None and where.is_file() and where.stat().st_size > 0
    if create and not sampled_before:
        items, gold = read_task_items(task, warn or (lambda t: print(t, file=sys.stderr)))
    return LabelStore.open(where, task, items, gold, create=create, hold=hold)


def base_url(task, host: str, port: int) -> str:
    if task.server.public_url:
        return task.server.public_url.rstrip("/")
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def instructions_html(task) -> str:
    """The instructions, Markdown rendered by markdown-it (CommonMark) with raw HTML off: text is escaped and
    links to javascript:/data: URLs are dropped by markdown-it's link validation."""
    from markdown_it import MarkdownIt

    text = Path(task.instructions_file).read_text(encoding="utf-8") if task.instructions_file else task.instructions
    return MarkdownIt("commonmark", {"html": False}).render(text) if text.strip() else ""


def exposure_warning(host: str) -> str | None:
    """What to say when the app listens beyond this machine."""
    if host in ("127.0.0.1", "::1", "localhost"):
        return None
    where = "all interfaces" if host in ("0.0.0.0", "::", "") else host
    return (
        f"listening on {where} ({host}): anyone who can reach this machine there can reach the app; only the "
        "tokens protect it, and without TLS they travel in clear (use a reverse proxy: docs/labelling.md)"
    )


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise UsageError(f"port {port} on {host} is in use (another server?); pick another with --port") from None
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(1024)
    return sock


def serve(task_path: str | Path, opts: ServeOptions) -> dict:
    require(WEB_MODULES | STATS_MODULES, "prefcli label serve")
    import uvicorn

    from .assign import Desk
    from .web import make_app

    task = load_task(task_path, opts.overrides)
    host = opts.host if opts.host is not None else task.server.host
    port = opts.port if opts.port is not None else task.server.port
    err = sys.stderr
    sock = bind(host, port)
    try:
        store = open_store(task_path, task, create=True, hold=True)
    except BaseException:
        sock.close()
        raise
    port = sock.getsockname()[1]
    url = base_url(task, host, port)
    title = task.title or Path(task_path).stem
    desk = Desk(store)
    app = make_app(store, desk, task, title, instructions_html(task))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=err)
    if (warning := exposure_warning(host)) is not None:
        print(f"warning: {warning}", file=err)
    n_raters = store.db.execute("SELECT COUNT(*) FROM raters").fetchone()[0]
    ov = desk.overall()
    print(f"serving {title}: {ov['items']} items ({task.mode}, overlap {task.overlap}) from {store.path}", file=err)
    print(f"listening on {url}", file=err, flush=True)
    if not store.has_owner():
        print(f"dashboard (owner link, keep it private): {url}/owner/{store.owner_token()}", file=err)
    else:
        print(
            f"dashboard: {url}/dashboard (`prefcli label invite {task_path} --owner` prints a new owner link)", file=err
        )
    print(f"{n_raters} raters invited; `prefcli label invite {task_path} --rater NAME` prints a rater's link", file=err)
    started = time.time()
    server = _server(
        uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=3)
    )
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        ov = desk.overall()
        answers = store.db.execute("SELECT COUNT(*) FROM answers WHERE undone_at IS NULL").fetchone()[0]
        store.close()
    return {
        "command": "label serve",
        "status": "stopped",
        "exit_code": 0,
        "store": str(store.path),
        "url": url,
        "answers": answers,
        "items": ov["items"],
        "items_complete": ov["items_complete"],
        "complete": ov["complete"],
        "served_s": round(time.time() - started, 1),
    }


def _server(config):
    """uvicorn's Server, except that a SIGINT/SIGTERM that stopped it is not raised again afterwards (uvicorn
    re-raises it to end the process): `prefcli label serve` still closes the store and prints its summary.
    (The class is made here: uvicorn is imported only when serving.)"""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            old = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, h in old.items():
                    signal.signal(s, h)

    return Server(config)


# ----------------------------------------------------------------------------- the other commands


def invite(task_path, overrides, rater: str | None, owner: bool, url: str | None) -> dict:
    task = load_task(task_path, overrides)
    if (rater is None) == (not owner):
        raise UsageError("give --rater NAME (a rater's link) or --owner (the dashboard's link)")
    store = open_store(task_path, task, create=True)
    try:
        base = (url or base_url(task, task.server.host, task.server.port)).rstrip("/")
        if owner:
            link, replaced = f"{base}/owner/{store.owner_token()}", True
        else:
            token, replaced = store.invite(rater)
            link = f"{base}/r/{token}"
    finally:
        store.close()
    print(link, file=sys.stderr)
    if replaced:
        print("(a new link: the previous one, and its sessions, no longer work)", file=sys.stderr)
    return {
        "command": "label invite",
        "status": "completed",
        "exit_code": 0,
        "rater": rater,
        "owner": owner,
        "link": link,
        "replaced": replaced,
    }


def stats(task_path, overrides) -> dict:
    require(STATS_MODULES, "prefcli label stats")
    from .assign import Desk
    from .exchange import load_records
    from .stats import summarize

    task = load_task(task_path, overrides)
    store = open_store(task_path, task, create=False)
    try:
        s = summarize(load_records(store.db), task, Desk(store).overall())
    finally:
        store.close()
    return {"command": "label stats", "status": "completed", "exit_code": 0, **s}


def export(task_path, overrides, out: Path, everything: bool, gold: bool) -> dict:
    from .exchange import export_rows, load_records, write_jsonl

    task = load_task(task_path, overrides)
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder; give a .jsonl file name")
    if not out.parent.is_dir():
        raise UsageError(f"--out: no such folder: {out.parent}")
    store = open_store(task_path, task, create=False)
    try:
        records = load_records(store.db)
    finally:
        store.close()
    rows, left = export_rows(records, task.mode, everything, gold)
    write_jsonl(out, rows)
    print(f"wrote {len(rows)} rows to {out}", file=sys.stderr)
    return {
        "command": "label export",
        "status": "completed",
        "exit_code": 0,
        "out": str(out),
        "rows": len(rows),
        "raters": len({r["rater"] for r in rows}),
        "left_out": {} if everything else left,
    }


def import_(task_path, overrides, answers: Path, log: Path | None, rater: str | None) -> dict:
    from .exchange import import_answers, terminal_answers
    from .terminal import default_log_path

    task = load_task(task_path, overrides)
    if task.mode == "rank":
        raise UsageError("import reads the terminal tool's pairs and ratings; this task ranks")
    journal = log if log is not None else default_log_path(answers)
    if log is not None and not log.is_file():
        raise UsageError(f"--log: no such file: {log}")
    found = terminal_answers(answers, journal, rater)
    store = open_store(task_path, task, create=True, hold=True)  # not while a server assigns from its own index
    try:
        counts = import_answers(store, found)
    finally:
        store.close()
    print(
        f"imported {counts['imported']} answers; {counts['not_in_task']} for items this task lacks and "
        f"{counts['already_answered']} already there were left out",
        file=sys.stderr,
    )
    return {"command": "label import", "status": "completed", "exit_code": 0, **counts}
