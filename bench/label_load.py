"""Load and faults for `prefcli label serve`: simulated raters answering through the JSON API while the server
is killed (SIGKILL) and restarted; then every acknowledged answer must be in the store, once.

    python bench/label_load.py --raters 50 --seconds 60 --kill-at 30 --out bench/results/label-load.jsonl

Each rater is an async HTTP/1.1 keep-alive client (a few lines on asyncio streams: see Conn) in this process, against a real `prefcli label serve`
process on 127.0.0.1: GET /api/next, then POST /api/answer with a fresh client_id, in a closed loop (no think
time unless --think-ms: then a pause of 0.5 to 1.5 times it after each answer), for --seconds. A request that fails because the server is down is retried with the
same client_id until the server is back, so an answer committed just before the kill is acknowledged once,
as a duplicate. Figures: answers acknowledged per second, submit latency (p50, p99, max) of the submits that
did not span the outage, and the check: answers in the store == answers acknowledged, none missing, none
twice. tests/test_label_load.py runs a short version of this in the suite.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def make_task(folder: Path, items: int, overlap: int) -> Path:
    rows = (
        json.dumps({"prompt": f"Prompt number {i}", "completions": [f"first answer {i}", f"second answer {i}"]})
        for i in range(items)
    )
    (folder / "items.jsonl").write_text("\n".join(rows) + "\n")
    task = folder / "task.yaml"
    task.write_text(f"command: label\nitems: {{path: items.jsonl}}\nmode: pair\noverlap: {overlap}\n")
    return task


def invite(task: Path, n: int) -> list[str]:
    sys.path.insert(0, str(ROOT))
    from prefcli.label.serve import load_task, open_store

    store = open_store(task, load_task(task), create=True)
    try:
        return [store.invite(f"rater{i:03d}")[0] for i in range(n)]
    finally:
        store.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(task: Path, port: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefcli", "label", "serve", str(task), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("the server did not start")


class Conn:
    """A minimal HTTP/1.1 keep-alive client on asyncio streams, for JSON requests to one server. The load
    generator shares 2 cores with the server, so it must cost little: httpx's AsyncClient spends ~1 ms of CPU
    per request, which would measure the client instead of the server. Raises OSError when the server is down."""

    def __init__(self, port: int, token: str):
        self.port, self.token = port, token
        self.reader = self.writer = None

    async def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        data = json.dumps(body).encode() if body is not None else b""
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {self.token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
        )
        try:
            self.writer.write(head.encode() + data)
            await self.writer.drain()
            status_line = await self.reader.readline()
            if not status_line:
                raise ConnectionError("closed")
            status = int(status_line.split()[1])
            length = 0
            while (line := await self.reader.readline()) not in (b"\r\n", b""):
                k, _, v = line.decode().partition(":")
                if k.lower() == "content-length":
                    length = int(v)
            payload = await self.reader.readexactly(length)
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as e:
            self.writer.close()
            self.writer = None
            raise ConnectionError(str(e)) from None
        return status, json.loads(payload or b"{}")


class Run:
    def __init__(self, port: int, tokens: list[str], seconds: float, think_ms: float):
        self.port, self.tokens, self.seconds, self.think = port, tokens, seconds, think_ms / 1000
        self.acked: set[tuple[str, str]] = set()  # (token, client_id)
        self.ack_times: list[float] = []  # when each acknowledgement arrived (monotonic)
        self.latency: list[float] = []  # submits answered at the first try
        self.spanning: list[float] = []  # submits that were retried (the server was down)
        self.duplicates = 0  # acknowledged as already recorded (committed before a kill, retried after)
        self.refused: dict[int, int] = {}
        self.after_restart = 0  # submits acknowledged by the restarted server without a retry
        self.restarted = False
        self.finished = False

    async def call(self, conn: Conn, method: str, path: str, body=None):
        """The request, retried on connection errors until the server answers: (status, body, retried)."""
        retried = False
        deadline = time.monotonic() + 120
        while True:
            try:
                status, obj = await conn.request(method, path, body)
                return status, obj, retried
            except (ConnectionError, OSError):
                if time.monotonic() > deadline:
                    raise
                retried = True
                await asyncio.sleep(0.05)

    async def rater(self, token: str, stop_at: float) -> None:
        conn = Conn(self.port, token)
        while time.monotonic() < stop_at:
            _, nxt, _ = await self.call(conn, "GET", "/api/next")
            if nxt.get("done"):
                return
            if nxt.get("wait"):
                await asyncio.sleep(min(nxt["retry_after_s"], 1.0))
                continue
            body = {
                "assignment": nxt["assignment"],
                "answer": "AB"[nxt["assignment"] % 2],
                "client_id": secrets.token_hex(12),
            }
            t0 = time.perf_counter()
            status, res, retried = await self.call(conn, "POST", "/api/answer", body)
            dt = time.perf_counter() - t0
            if status == 200:
                self.acked.add((token, body["client_id"]))
                self.ack_times.append(time.monotonic())
                self.duplicates += res["duplicate"]
                (self.spanning if retried else self.latency).append(dt)
                self.after_restart += self.restarted and not retried
            else:
                self.refused[status] = self.refused.get(status, 0) + 1
            if self.think:
                await asyncio.sleep(self.think * (0.5 + random.random()))

    async def main(self) -> float:
        stop_at = time.monotonic() + self.seconds
        self.t0 = t0 = time.monotonic()
        try:
            await asyncio.gather(*(self.rater(t, stop_at) for t in self.tokens))
        finally:
            self.finished = True
        return time.monotonic() - t0


def killer(proc_box: list, task: Path, port: int, kill_at: float | None, after: int | None, log: list, run) -> None:
    """SIGKILL the server once `kill_at` seconds have passed or `after` answers were acknowledged (whichever
    comes first), then start it again. A kill by answer count lands mid-run on a fast machine and a loaded one
    alike; a kill by time alone can come after the raters have finished. Does nothing if the run ends first."""
    t0 = time.monotonic()
    while not run.finished:
        if (kill_at is not None and time.monotonic() - t0 >= kill_at) or (
            after is not None and len(run.acked) >= after
        ):
            break
        time.sleep(0.01)
    else:
        return
    proc_box[0].send_signal(signal.SIGKILL)
    proc_box[0].wait()
    t = time.monotonic()
    proc_box[0] = start(task, port)
    log.append(round(time.monotonic() - t, 2))
    run.restarted = True


def check(db: Path, acked: set[tuple[str, str]], tokens: list[str]) -> dict:
    from hashlib import sha256

    by_hash = {sha256(t.encode()).hexdigest(): t for t in tokens}
    with sqlite3.connect(db) as c:
        rows = c.execute(
            "SELECT r.token_hash, a.client_id, a.item_id, a.rater_id FROM answers a JOIN raters r ON r.id = a.rater_id "
            "WHERE a.undone_at IS NULL"
        ).fetchall()
    stored = {(by_hash[h], cid) for h, cid, _, _ in rows}
    pairs = [(item, rater) for _, _, item, rater in rows]
    return {
        "stored": len(rows),
        "acknowledged": len(acked),
        "missing": len(acked - stored),
        "not_acknowledged": len(stored - acked),
        "same_item_twice_by_one_rater": len(pairs) - len(set(pairs)),
    }


def run(
    raters: int,
    seconds: float,
    kill_at: float | None,
    items: int,
    overlap: int,
    think_ms: float = 0.0,
    kill_after_answers: int | None = None,
) -> dict:
    import threading

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        task = make_task(folder, items, overlap)
        tokens = invite(task, raters)
        port = free_port()
        box = [start(task, port)]
        restart: list[float] = []
        run = Run(port, tokens, seconds, think_ms)
        killer_thread = None
        if kill_at is not None or kill_after_answers is not None:
            args = (box, task, port, kill_at, kill_after_answers, restart, run)
            killer_thread = threading.Thread(target=killer, args=args, daemon=True)
            killer_thread.start()
        wall = asyncio.run(run.main())
        if killer_thread is not None:
            killer_thread.join()  # a restart under way finishes before the server is stopped and the folder goes
        box[0].send_signal(signal.SIGTERM)
        out, _ = box[0].communicate(timeout=30)
        summary = json.loads(out.decode().strip().splitlines()[-1])
        verdict = check(folder / "task.db", run.acked, tokens)
    lat = sorted(run.latency)

    def q(p: float) -> float | None:
        return round(1000 * lat[min(len(lat) - 1, int(p * len(lat)))], 2) if lat else None

    return {
        "raters": raters,
        "seconds": seconds,
        "wall_s": round(wall, 2),
        "answers_per_s": round(len(run.acked) / wall, 1),
        "submit_ms": {"p50": q(0.5), "p99": q(0.99), "max": q(1.0), "n": len(lat)},
        "killed_at_s": kill_at,
        "killed_after_answers": kill_after_answers,
        "restart_s": restart[0] if restart else None,
        "answers_per_10s": [
            sum(1 for t in run.ack_times if i <= (t - run.t0) / 10 < i + 1) for i in range(int(seconds // 10) + 1)
        ],
        "submits_spanning_the_outage": len(run.spanning),
        "acknowledged_after_restart": run.after_restart,
        "acknowledged_as_duplicates": run.duplicates,
        "refused": run.refused,
        "think_ms": think_ms,
        "items": items,
        "overlap": overlap,
        "server_summary_answers": summary.get("answers"),
        **verdict,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--raters", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--kill-at", type=float, default=None, help="SIGKILL the server this many seconds in, then restart")
    ap.add_argument(
        "--kill-after-answers",
        type=int,
        default=None,
        help="SIGKILL the server once this many answers were acknowledged",
    )
    ap.add_argument("--items", type=int, default=20000)
    ap.add_argument("--overlap", type=int, default=3)
    ap.add_argument("--think-ms", type=float, default=0.0, help="pause between a rater's answers")
    ap.add_argument("--out", type=Path, default=None, help="append the result row (JSON) to this file")
    a = ap.parse_args()
    res = run(a.raters, a.seconds, a.kill_at, a.items, a.overlap, a.think_ms, a.kill_after_answers)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    row = {
        "date": time.strftime("%Y-%m-%d"),
        "commit": commit.strip(),
        "machine": {"host": platform.node(), "cpu_count": os.cpu_count(), "python": platform.python_version()},
        "bench": "label-load",
        **res,
    }
    print(json.dumps(row))
    if a.out:
        with open(a.out, "a") as f:
            f.write(json.dumps(row) + "\n")
    ok = res["missing"] == 0 and res["not_acknowledged"] == 0 and res["same_item_twice_by_one_rater"] == 0
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
