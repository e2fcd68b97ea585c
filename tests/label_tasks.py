"""Labelling tasks for the tests: recipes/tiny/label-task.yaml copied into a folder (its store lands there),
and the app served in this process (Starlette's TestClient) or in a real `prefcli label serve` process."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

from .conftest import ROOT

TINY_TASK = ROOT / "recipes" / "tiny" / "label-task.yaml"
ITEMS = ROOT / "data" / "tiny" / "label-items.jsonl"
GOLD = ROOT / "data" / "tiny" / "label-gold.jsonl"


def task_dict(**upd) -> dict:
    d = yaml.safe_load(TINY_TASK.read_text())
    d["items"]["path"] = str(ITEMS)
    d["gold"]["path"] = str(GOLD)
    for k, v in upd.items():
        if v is None:
            d.pop(k, None)
        elif isinstance(v, dict) and isinstance(d.get(k), dict):
            d[k].update(v)
        else:
            d[k] = v
    return d


def make_task(folder: Path, name: str = "task.yaml", **upd) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / name
    p.write_text(yaml.safe_dump(task_dict(**upd), sort_keys=False))
    return p


@contextlib.contextmanager
def served(task_path: Path, clock=None):
    """(store, desk, client) of the task served in this process."""
    from starlette.testclient import TestClient

    from prefcli.label.assign import Desk
    from prefcli.label.serve import instructions_html, load_task, open_store
    from prefcli.label.web import make_app

    task = load_task(task_path)
    store = open_store(task_path, task, create=True, hold=True)
    desk = Desk(store, clock) if clock else Desk(store)
    app = make_app(store, desk, task, "tiny task", instructions_html(task))
    try:
        with TestClient(app, base_url="http://127.0.0.1") as client:
            yield store, desk, client
    finally:
        store.close()


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(task_path: Path, port: int, env: dict | None = None) -> subprocess.Popen:
    """A real `prefcli label serve` process; returns once it answers /healthz."""
    e = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefcli", "label", "serve", str(task_path), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=e,
    )
    import httpx

    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited: {proc.stderr.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError("the server did not start in 60 s")


def stop_server(proc: subprocess.Popen) -> tuple[dict, str]:
    """SIGTERM, then (summary JSON, stderr)."""
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    lines = [x for x in out.splitlines() if x.strip()]
    return (json.loads(lines[-1]) if lines else {}), err


def owner_link(stderr_text: str) -> str | None:
    m = re.search(r"(http://\S+/owner/\S+)", stderr_text)
    return m.group(1) if m else None


@contextlib.contextmanager
def live_server(task_path: Path):
    """The task served by uvicorn on a free port of 127.0.0.1, in a thread of this process: (store, base URL).
    Invite before the browser starts (the store's connection then belongs to the server's thread); read with
    a connection of your own."""
    import threading

    import uvicorn

    from prefcli.label.assign import Desk
    from prefcli.label.serve import bind, instructions_html, load_task, open_store
    from prefcli.label.web import make_app

    task = load_task(task_path)
    store = open_store(task_path, task, create=True, hold=True)
    app = make_app(store, Desk(store), task, task.title or "task", instructions_html(task))
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    try:
        yield store, f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
        store.close()
