"""A conversation with a simulated user whose replies come from rules: the user opens with the beginning of a
verse and asks the model to go on; after each reply the user answers by rule (a short reply is asked for more,
a reply naming the LORD is asked what He did next, anything else gets "And then?"), for `turns` model replies.
The environment gives no reward itself: the recipe's `rewards:` judge the final transcript, e.g. a reward model
trained by `prefcli reward` on preferences between replies (RLHF over a dialogue, recipes/tiny/rlhf-env-dialogue.yaml)."""

from __future__ import annotations

import random

from ..base import Environment, Observation

OPENINGS = (
    "And the LORD said",
    "Blessed is the man",
    "In the beginning",
    "Now these are the words",
    "Behold, I will send",
    "Hear, O Israel",
    "Then said Jesus",
    "The earth is the LORD's",
    "Praise ye the LORD",
    "And it came to pass",
    "Wisdom hath builded",
    "My son, hear the instruction",
)


class SimulatedUser(Environment):
    def __init__(self, turns: int = 2, openings: list[str] | None = None):
        if turns < 1:
            raise ValueError(f"turns must be at least 1, got {turns}")
        self.turns = turns
        self.openings = tuple(openings) if openings else OPENINGS
        self.replies = 0

    def reset(self, seed: int | None = None) -> Observation:
        self.replies = 0
        opening = random.Random(seed).choice(self.openings)
        return Observation(text=f"Continue the verse: {opening}")

    def step(self, action: str) -> Observation:
        self.replies += 1
        if self.replies >= self.turns:
            return Observation(done=True)
        words = action.split()
        if len(words) < 4:
            return Observation(text="Say more than that.")
        if "LORD" in action:
            return Observation(text="What did the LORD do then?")
        return Observation(text="And then?")
