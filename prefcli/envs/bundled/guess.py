"""Guess the number: the environment picks a number from `low` to `high` (from the episode's seed); the model
guesses, and is told whether the number is higher or lower, and the range it is still in ("Higher: from 5 to
7."), until it finds the number or has used `max_guesses`. Reward 1 for finding it, else 0. Feedback makes the
game learnable beyond luck: guessing blindly finds one of 7 numbers in 3 guesses 3 times in 7 at best, staying
inside the range does better, and halving it on each reply (4, then 2 or 6, ...) always wins.

The replies state the range (`hint: range`, the default) because a 4M-parameter model learns in minutes to read
numbers off the last reply, and did not learn to carry "Higher."/"Lower." over to its next guess in 300 RL
steps (measured while building this environment); `hint: direction` gives the bare "Higher."/"Lower."."""

from __future__ import annotations

import random
import re

from ..base import Environment, Observation

_NUMBER = re.compile(r"-?\d+")


class GuessNumber(Environment):
    def __init__(self, low: int = 1, high: int = 7, max_guesses: int = 3, hint: str = "range"):
        if hint not in ("range", "direction"):
            raise ValueError(f"hint must be 'range' or 'direction', got {hint!r}")
        if not low < high:
            raise ValueError(f"low ({low}) must be below high ({high})")
        if max_guesses < 1:
            raise ValueError(f"max_guesses must be at least 1, got {max_guesses}")
        self.low, self.high, self.max_guesses, self.hint = low, high, max_guesses, hint
        self.target, self.guesses = low, 0
        self.lo, self.hi = low, high  # the range the number is still in, as the replies narrowed it

    def reset(self, seed: int | None = None) -> Observation:
        self.target = random.Random(seed).randint(self.low, self.high)
        self.guesses = 0
        self.lo, self.hi = self.low, self.high
        return Observation(text=f"Guess my number from {self.low} to {self.high}.")

    def step(self, action: str) -> Observation:
        self.guesses += 1
        m = _NUMBER.search(action)
        guess = int(m.group()) if m else None
        if guess == self.target:
            return Observation(text="Yes!", done=True, reward=1.0, metadata={"success": True, "guesses": self.guesses})
        if self.guesses >= self.max_guesses:
            return Observation(text=f"No, it was {self.target}.", done=True, reward=0.0, metadata={"success": False})
        if guess is None:
            return Observation(text=f"Say a number from {self.lo} to {self.hi}.")
        if guess < self.target:
            self.lo = max(self.lo, guess + 1)
        else:
            self.hi = min(self.hi, guess - 1)
        word = "Higher" if guess < self.target else "Lower"
        return Observation(text=f"{word}: from {self.lo} to {self.hi}." if self.hint == "range" else f"{word}.")
