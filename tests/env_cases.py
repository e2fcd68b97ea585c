"""Environments the environment tests play: ones that misbehave on purpose (raise, hang, return a reward that is
not finite), a tool class, and classes that are bad recipes (no step, an undocumented tool, an unsupported
annotation)."""

from __future__ import annotations

import time

from prefcli.envs import Environment, Observation


class Counter(Environment):
    """Says 'go'; each step replies with the step count; done after `n` steps with reward = steps."""

    def __init__(self, n: int = 2):
        self.n, self.k = n, 0

    def reset(self, seed=None):
        self.k = 0
        return Observation(text=f"go {seed}")

    def step(self, action):
        self.k += 1
        if self.k >= self.n:
            return Observation(text="end", done=True, reward=float(self.k), metadata={"success": True})
        return Observation(text=f"step {self.k}")


class Raises(Counter):
    def step(self, action):
        raise RuntimeError("the environment broke")


class Hangs(Counter):
    def step(self, action):
        time.sleep(30)


class NonFinite(Counter):
    def step(self, action):
        return Observation(done=True, reward=float("nan"))


class RaisesOnReset(Counter):
    def reset(self, seed=None):
        raise ValueError("no task for you")


class Calc(Environment):
    """Answer the sum; tools add and crash."""

    def reset(self, seed=None):
        self.total = None
        return Observation(text="What is 2 + 3?")

    def add(self, a: int, b: int) -> int:
        """Add two integers.

        Args:
            a: The first.
            b: The second.
        """
        return a + b

    def crash(self) -> str:
        """A tool that raises."""
        raise KeyError("inside the tool")

    def slow(self) -> str:
        """A tool that hangs."""
        time.sleep(30)
        return "late"

    def step(self, action):
        ok = "5" in action
        return Observation(text="ok" if ok else "no", done=True, reward=float(ok))


class NoStep:
    def reset(self, seed=None):
        return Observation(text="x")


class UndocumentedTool(Counter):
    def helper(self, x: int) -> int:
        return x


class BadAnnotation(Counter):
    def tool(self, x: Counter) -> int:
        """A tool taking an object.

        Args:
            x: Something.
        """
        return 0


class NeedsArg(Counter):
    def __init__(self, size: int):
        super().__init__()
        self.size = size
