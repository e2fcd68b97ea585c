"""A tool-use task the model cannot solve without its tool: the environment holds a secret number (from the
episode's seed) that appears nowhere in the conversation until the model calls `read_secret`. Answering the
number (a turn with no tool call) ends the episode: reward 1 if it is the secret, else 0. Without the tool a
guess is right one time in `high - low + 1`."""

from __future__ import annotations

import random
import re

from ..base import Environment, Observation

_NUMBER = re.compile(r"-?\d+")


class SecretNumber(Environment):
    def __init__(self, low: int = 1, high: int = 9):
        if not low < high:
            raise ValueError(f"low ({low}) must be below high ({high})")
        self.low, self.high = low, high
        self.secret, self.reads = low, 0

    def reset(self, seed: int | None = None) -> Observation:
        self.secret = random.Random(seed).randint(self.low, self.high)
        self.reads = 0
        return Observation(text="What is the secret number?")

    def read_secret(self) -> str:
        """Read the secret number.

        Returns:
            The secret number, as text.
        """
        self.reads += 1
        return str(self.secret)

    def step(self, action: str) -> Observation:
        m = _NUMBER.search(action)
        ok = m is not None and int(m.group()) == self.secret
        return Observation(
            text="Right." if ok else "Wrong.",
            done=True,
            reward=float(ok),
            metadata={"success": ok, "read_secret_calls": self.reads},
        )
