"""Calls into an environment that cannot hang or crash a run: each call runs in its own daemon thread and is
waited for at most its timeout; what it raises, a timeout, a reward that is not a finite number and a return
value of the wrong type become an `EnvFailure` naming the environment and the call. The episode driver ends
the episode with reward 0 and counts the failure (or, with env.on_error: fatal, stops the run with exit 1).

Many episodes' calls start together and are waited for together (`run_concurrently`): environments that wait
on I/O (a server, a subprocess, a sleep) overlap; pure-Python ones still take turns on the interpreter lock.
A call that times out cannot be stopped from outside its thread: the thread is left to finish in the
background (a daemon: it never holds the process open) and its instance is never used again. An environment
that must be stopped for sure belongs in its own process (an OpenEnv server).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import Any

from .base import Observation, as_observation
from .parsing import ToolCall
from .tools import ToolCallError, run_tool

FAILURE_KINDS = ("raised", "timeout", "nonfinite", "bad_return")


class EnvFailure(Exception):
    """An environment call that failed: `kind` is one of FAILURE_KINDS; the message names the environment."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class _Pending:
    def __init__(self, fn: Callable[[], Any]):
        self.box: dict[str, Any] = {}

        def run():
            try:
                self.box["value"] = fn()
            except BaseException as e:  # noqa: BLE001 - everything the environment raises is contained
                self.box["error"] = e

        self.thread = threading.Thread(target=run, daemon=True, name="prefcli-env-call")
        self.thread.start()


def run_concurrently(calls: list[Callable[[], Any]], timeout_s: float, limit: int | None = None) -> list[Any]:
    """Run the calls in threads, at most `limit` at once (None: all), each for at most `timeout_s` from its start.
    Returns, per call, its value, or the exception it raised, or a TimeoutError."""
    out: list[Any] = [None] * len(calls)
    step = limit or max(1, len(calls))
    for s in range(0, len(calls), step):
        batch = [(i, _Pending(calls[i])) for i in range(s, min(len(calls), s + step))]
        deadline = time.monotonic() + timeout_s
        for i, p in batch:
            p.thread.join(max(0.0, deadline - time.monotonic()))
            if p.thread.is_alive():
                out[i] = TimeoutError(f"no answer within {timeout_s:g} s")
            elif "error" in p.box:
                out[i] = p.box["error"]
            else:
                out[i] = p.box.get("value")
    return out


def describe_exception(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def checked_observation(value: Any, env_name: str, call: str) -> Observation:
    """The value a reset/step returned (or the exception it raised) as an Observation; raises EnvFailure."""
    if isinstance(value, TimeoutError):
        raise EnvFailure("timeout", f"environment {env_name}: {call} timed out ({value})")
    if isinstance(value, BaseException):
        raise EnvFailure("raised", f"environment {env_name}: {call} raised {describe_exception(value)}")
    try:
        obs = as_observation(value, f"{call}")
    except TypeError as e:
        raise EnvFailure("bad_return", f"environment {env_name}: {e}") from None
    if obs.reward is not None:
        try:
            r = float(obs.reward)
        except (TypeError, ValueError):
            raise EnvFailure(
                "bad_return", f"environment {env_name}: {call} returned the reward {obs.reward!r}, not a number"
            ) from None
        if not math.isfinite(r):
            raise EnvFailure("nonfinite", f"environment {env_name}: {call} returned the reward {r}")
        obs.reward = r
    if not isinstance(obs.text, str):
        raise EnvFailure("bad_return", f"environment {env_name}: {call} returned a {type(obs.text).__name__} as text")
    return obs


def tool_reply(instance: Any, call: ToolCall, names: list[str], timeout_s: float) -> tuple[str, str | None]:
    """Run one parsed tool call: (the text the model is shown, the error kind or None). A tool that raises,
    hangs or is called wrongly is a message to the model, never a failure of the run."""
    got = run_concurrently([lambda: run_tool(instance, call.name, call.arguments, names)], timeout_s)[0]
    if isinstance(got, ToolCallError):
        return f"error: {got}", got.kind
    if isinstance(got, TimeoutError):
        return f"error: the tool {call.name} did not answer within {timeout_s:g} s", "timeout"
    if isinstance(got, BaseException):
        return f"error: the tool {call.name} raised {describe_exception(got)}", "raised"
    return got, None
