"""Guess the number: the environment picks a number from `low` to `high` (from the episode's seed); the model
guesses, and is told "Higher." or "Lower." until it finds the number or has used `max_guesses`. Reward 1 for
finding it, else 0. Feedback makes the game learnable beyond luck: guessing blindly finds one of 7 numbers in 3
guesses 3 times in 7 at best, while halving the range on each reply (4, then 2 or 6, ...) always finds it."""

from __future__ import annotations

import random
import re

from ..base import Environment, Observation

_NUMBER = re.compile(r"-?\d+")


class GuessNumber(Environment):
    def __init__(self, low: int = 1, high: int = 7, max_guesses: int = 3):
        if not low < high:
            raise ValueError(f"low ({low}) must be below high ({high})")
        if max_guesses < 1:
            raise ValueError(f"max_guesses must be at least 1, got {max_guesses}")
        self.low, self.high, self.max_guesses = low, high, max_guesses
        self.target, self.guesses = low, 0

    def reset(self, seed: int | None = None) -> Observation:
        self.target = random.Random(seed).randint(self.low, self.high)
        self.guesses = 0
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
            return Observation(text=f"Say a number from {self.low} to {self.high}.")
        return Observation(text="Higher." if guess < self.target else "Lower.")
