"""The HTTP layer of `prefcli label serve` (Starlette): authentication, CSRF, rendering; the work is the Desk's.

Routes (docs/labelling.md, "HTTP interface"): `/r/{token}` and `/owner/{token}` turn an invite link into a
session cookie; `/label` is the rater's page, posting to `/answer` and `/undo` (forms, CSRF token in the
`csrf` field); `/api/next`, `/api/answer`, `/api/undo`, `/api/progress` are the same as JSON (for the page's
script and for programs: `Authorization: Bearer <token>`, or the session cookie plus an `X-CSRF-Token`
header); `/dashboard` and `/api/stats` need the owner. Every text from data is escaped by Jinja2's
autoescape; the Content-Security-Policy allows only this server's own script and style.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .assign import Desk, Done, Wait
from .exchange import load_records
from .stats import summarize
from .store import LabelStore, Refused, new_token

HERE = Path(__file__).parent
RATER_COOKIE, OWNER_COOKIE = "prefcli_rater", "prefcli_owner"
MAX_BODY = 64 * 1024
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
log = logging.getLogger("prefcli.label")


class Limiter:
    """Failed token and cookie look-ups per client address: after `limit` in `window_s`, that address gets 429
    until the oldest failure ages out. (Tokens are 192 random bits; this stops a guessing loop early.)"""

    def __init__(self, limit: int = 20, window_s: float = 60.0):
        self.limit, self.window = limit, window_s
        self.fails: dict[str, deque] = {}

    def _recent(self, ip: str, now: float) -> deque:
        q = self.fails.setdefault(ip, deque())
        while q and q[0] < now - self.window:
            q.popleft()
        return q

    def blocked(self, ip: str) -> float | None:
        now = time.monotonic()
        q = self._recent(ip, now)
        return q[0] + self.window - now if len(q) >= self.limit else None

    def fail(self, ip: str) -> None:
        self._recent(ip, time.monotonic()).append(time.monotonic())


@dataclass
class Who:
    rater: int | None = None
    owner: bool = False
    csrf: str | None = None  # None: a bearer token (no ambient credential, so no CSRF check)


class App:
    def __init__(self, store: LabelStore, desk: Desk, task, title: str, instructions_html: str):
        self.store, self.desk, self.task, self.title = store, desk, task, title
        self.instructions = instructions_html
        self.limiter = Limiter()
        self.secure = task.server.secure_cookies
        self.jinja = Environment(
            loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(default=True)
        )
        self.completed_logged = desk.complete()

    # ------------------------------------------------------------------------------ plumbing

    def ip(self, request: Request) -> str:
        return request.client.host if request.client else "?"

    def check_limit(self, request: Request) -> None:
        wait = self.limiter.blocked(self.ip(request))
        if wait is not None:
            raise HTTPException(429, f"too many failed attempts; try again in {wait:.0f} s")

    def who(self, request: Request, need: str) -> Who:
        """The caller (`need`: 'rater' or 'owner'), from a bearer token or a session cookie; else 401."""
        h = request.headers.get("authorization", "")
        if h.lower().startswith("bearer "):
            self.check_limit(request)
            token = h[7:].strip()
            if need == "rater" and (rid := self.store.rater_for_token(token)) is not None:
                return Who(rater=rid)
            if need == "owner" and self.store.is_owner_token(token):
                return Who(owner=True)
            self.limiter.fail(self.ip(request))
            raise HTTPException(401, "this token is not valid here")
        cookie = request.cookies.get(RATER_COOKIE if need == "rater" else OWNER_COOKIE)
        if cookie:
            self.check_limit(request)
            s = self.store.session(cookie)
            if s is not None and ((need == "rater" and s[0] is not None) or (need == "owner" and s[1])):
                return Who(rater=s[0], owner=s[1], csrf=s[2])
            self.limiter.fail(self.ip(request))
        raise HTTPException(401, "open your personal link first" if need == "rater" else "open the owner link first")

    def check_csrf(self, who: Who, given: str | None) -> None:
        if who.csrf is not None and not (isinstance(given, str) and secrets.compare_digest(given, who.csrf)):
            raise HTTPException(403, "missing or wrong CSRF token (reload the page)")

    async def json_body(self, request: Request) -> dict:
        body = await request.body()
        try:
            obj = json.loads(body or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise HTTPException(400, "the body is not JSON") from None
        if not isinstance(obj, dict):
            raise HTTPException(400, "the body must be a JSON object")
        return obj

    async def form(self, request: Request) -> dict:
        try:
            form = await request.form()
        except Exception as e:  # python-multipart's parse errors: a malformed post, answered 400
            raise HTTPException(400, f"malformed form ({type(e).__name__})") from None
        return {k: v for k, v in form.items() if isinstance(v, str)}

    def page(self, name: str, status: int = 200, **ctx) -> HTMLResponse:
        html = self.jinja.get_template(name).render(title=self.title, **ctx)
        return HTMLResponse(html, status_code=status)

    def note_completion(self) -> None:
        if not self.completed_logged and self.desk.complete():
            self.completed_logged = True
            log.info("the task is complete: every item has %d answers", self.task.overlap)

    # ------------------------------------------------------------------------------ links

    async def rater_link(self, request: Request):
        self.check_limit(request)
        rid = self.store.rater_for_token(request.path_params["token"])
        if rid is None:
            self.limiter.fail(self.ip(request))
            return self.page(
                "message.html",
                404,
                heading="This link is not valid",
                text="It may have been replaced by a newer invite; ask the task's owner for your link.",
            )
        cookie, _ = self.store.new_session(rid, owner=False)
        return self.login(RATER_COOKIE, cookie, "/label")

    async def owner_link(self, request: Request):
        self.check_limit(request)
        if not self.store.is_owner_token(request.path_params["token"]):
            self.limiter.fail(self.ip(request))
            return self.page(
                "message.html",
                404,
                heading="This link is not valid",
                text="`prefcli label invite TASK --owner` prints a new owner link.",
            )
        cookie, _ = self.store.new_session(None, owner=True)
        return self.login(OWNER_COOKIE, cookie, "/dashboard")

    def login(self, name: str, cookie: str, to: str) -> Response:
        r = RedirectResponse(to, status_code=303)
        r.set_cookie(name, cookie, httponly=True, samesite="lax", secure=self.secure, max_age=90 * 24 * 3600)
        return r

    async def root(self, request: Request):
        for name, to in ((RATER_COOKIE, "/label"), (OWNER_COOKIE, "/dashboard")):
            if request.cookies.get(name):
                return RedirectResponse(to, status_code=303)
        return self.page("message.html", heading=self.title, text="Open the personal link you were sent to start.")

    # --------------------------------------------------------------------------- the rater

    async def label_page(self, request: Request):
        who = self.who(request, "rater")
        nxt = self.desk.next(who.rater)
        ctx = dict(
            csrf=who.csrf,
            rater=self.store.rater_name(who.rater),
            progress=self.desk.progress(who.rater),
            instructions=self.instructions,
            task=self.task,
            client_id=new_token(),
        )
        if isinstance(nxt, (Done, Wait)):
            return self.page("label.html", item=None, state=nxt, **ctx)
        return self.page("label.html", item=nxt, labels=_labels(self.task.mode, len(nxt.candidates)), **ctx)

    async def answer_form(self, request: Request):
        who = self.who(request, "rater")
        form = await self.form(request)
        self.check_csrf(who, form.get("csrf"))
        try:
            assignment = int(form.get("assignment", ""))
        except ValueError:
            raise HTTPException(400, "assignment: expected a number") from None
        answer = form.get("answer") or form.get("order", "")  # rank: the typed order (no script)
        self.desk.answer(who.rater, assignment, answer, form.get("client_id") or None)
        self.note_completion()
        return RedirectResponse("/label", status_code=303)

    async def undo_form(self, request: Request):
        who = self.who(request, "rater")
        form = await self.form(request)
        self.check_csrf(who, form.get("csrf"))
        self.desk.undo(who.rater, form.get("client_id") or None)
        return RedirectResponse("/label", status_code=303)

    async def api_next(self, request: Request):
        who = self.who(request, "rater")
        nxt = self.desk.next(who.rater)
        progress = self.desk.progress(who.rater)
        if isinstance(nxt, Done):
            return JSONResponse({"done": True, "reason": nxt.reason, "message": nxt.message, "progress": progress})
        if isinstance(nxt, Wait):
            body = {"done": False, "wait": True, "retry_after_s": round(nxt.retry_after_s, 1), "message": nxt.message}
            return JSONResponse(body | {"progress": progress})
        item = {
            "prompt": nxt.prompt,
            "candidates": nxt.candidates,
            "labels": _labels(self.task.mode, len(nxt.candidates)),
        }
        body = {"done": False, "assignment": nxt.assignment, "mode": self.task.mode, "scale": self.task.scale}
        return JSONResponse(body | {"item": item, "progress": progress})

    async def api_answer(self, request: Request):
        who = self.who(request, "rater")
        self.check_csrf(who, request.headers.get("x-csrf-token"))
        body = await self.json_body(request)
        res = self.desk.answer(who.rater, body.get("assignment"), body.get("answer"), body.get("client_id"))
        self.note_completion()
        return JSONResponse(res)

    async def api_undo(self, request: Request):
        who = self.who(request, "rater")
        self.check_csrf(who, request.headers.get("x-csrf-token"))
        body = await self.json_body(request)
        return JSONResponse(self.desk.undo(who.rater, body.get("client_id")))

    async def api_progress(self, request: Request):
        who = self.who(request, "rater")
        return JSONResponse(self.desk.progress(who.rater))

    async def instructions_page(self, request: Request):
        self.who(request, "rater")
        return self.page("message.html", heading="Instructions", html=self.instructions or "<p>No instructions.</p>")

    # ---------------------------------------------------------------------------- the owner

    def stats(self) -> dict:
        return summarize(load_records(self.store.db), self.task, self.desk.overall())

    async def dashboard(self, request: Request):
        self.who(request, "owner")
        s = self.stats()
        return self.page("dashboard.html", s=s, bars=_bars(s["distribution"]), task=self.task)

    async def api_stats(self, request: Request):
        self.who(request, "owner")
        return JSONResponse(self.stats())

    async def healthz(self, request: Request):
        return JSONResponse({"ok": True})


def _labels(mode: str, n: int) -> list[str]:
    return ["A", "B"] if mode == "pair" else [str(i + 1) for i in range(n)]


def _bars(dist: dict[str, int]) -> list[dict]:
    """The label distribution as SVG bars (x, height: at most 120 px above the axis at y = 150)."""
    top = max(dist.values(), default=0) or 1
    return [
        {"label": k, "count": v, "x": 40 + 60 * i, "h": round(120 * v / top), "y": 150 - round(120 * v / top)}
        for i, (k, v) in enumerate(dist.items())
    ]


def make_app(store: LabelStore, desk: Desk, task, title: str, instructions_html: str):
    a = App(store, desk, task, title, instructions_html)
    routes = [
        Route("/", a.root),
        Route("/r/{token}", a.rater_link),
        Route("/owner/{token}", a.owner_link),
        Route("/label", a.label_page),
        Route("/answer", a.answer_form, methods=["POST"]),
        Route("/undo", a.undo_form, methods=["POST"]),
        Route("/instructions", a.instructions_page),
        Route("/api/next", a.api_next),
        Route("/api/answer", a.api_answer, methods=["POST"]),
        Route("/api/undo", a.api_undo, methods=["POST"]),
        Route("/api/progress", a.api_progress),
        Route("/dashboard", a.dashboard),
        Route("/api/stats", a.api_stats),
        Route("/healthz", a.healthz),
        Route("/favicon.ico", lambda request: Response(status_code=204)),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]

    async def refused(request: Request, exc: Refused):
        return _error(request, exc.status, str(exc), a)

    async def http_error(request: Request, exc: HTTPException):
        return _error(request, exc.status_code, exc.detail, a)

    app = Starlette(routes=routes, exception_handlers={Refused: refused, HTTPException: http_error})
    app.state.label = a
    return Guard(app, a)


class Guard:
    """ASGI middleware around every request: a post must say its length (at most MAX_BODY), and every response
    gets the security headers (CSP, nosniff, no referrer, no framing; no-store except for the static files)."""

    HEADERS = [
        (b"content-security-policy", CSP.encode()),
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"no-referrer"),
        (b"x-frame-options", b"DENY"),
    ]

    def __init__(self, app, a: App):
        self.app, self.a = app, a
        self.state = app.state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        extra = list(self.HEADERS)
        if not scope["path"].startswith("/static/"):
            extra.append((b"cache-control", b"no-store"))

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + extra
            await send(message)

        if scope["method"] == "POST":
            n = dict(scope["headers"]).get(b"content-length", b"").decode()
            if not n.isdigit() or int(n) > MAX_BODY:
                response = _error(
                    Request(scope),
                    413 if n.isdigit() else 411,
                    f"a post needs a Content-Length up to {MAX_BODY} bytes",
                    self.a,
                )
                return await response(scope, receive, send_with_headers)
        await self.app(scope, receive, send_with_headers)


def _error(request: Request, status: int, message: str, a: App) -> Response:
    path = request.url.path
    shown = "/r/..." if path.startswith("/r/") else "/owner/..." if path.startswith("/owner/") else path
    log.warning("%d %s %s from %s: %s", status, request.method, shown, a.ip(request), message)
    headers = {"Retry-After": "60"} if status == 429 else None
    if path.startswith("/api/") or "application/json" in request.headers.get("accept", ""):
        return JSONResponse({"error": message}, status_code=status, headers=headers)
    back = "/label" if status in (400, 403, 409) else None
    r = a.page("message.html", status, heading=f"{status}: not done", text=message, back=back)
    if headers:
        r.headers.update(headers)
    return r
