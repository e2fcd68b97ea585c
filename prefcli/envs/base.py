"""What an environment is to prefcli: OpenEnv's shape (`reset(seed) -> Observation`, `step(action) -> Observation`,
the observation carrying `done`, `reward` and `metadata`), with text actions and text observations.

    class Echo(Environment):
        def reset(self, seed=None):
            return Observation(text="Say hello.")
        def step(self, action):
            return Observation(done=True, reward=float("hello" in action.lower()))

Any class with `reset` and `step` of these shapes works (subclassing `Environment` is optional). Its other
public methods, documented, become tools the model can call (tools.py); `close()` is called when an episode's
instance is dropped, if the class has one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Observation:
    """What the environment says after a reset or a step.

    text      what the model reads next (the task after `reset`, the reply after `step`); empty: nothing to say
    done      the episode is over (the model gets no further turn)
    reward    this step's reward (None: 0); the episode's environment reward is the sum over its steps
    metadata  anything else; `metadata["success"]` (a bool), when given, is what env/success_rate counts
              (otherwise an episode succeeds when its environment reward is > 0)
    role      the chat role `text` is rendered with ("user"; "tool" for a tool's reply)
    """

    text: str = ""
    done: bool = False
    reward: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    role: str = "user"


class Environment:
    """Optional base class of an environment (any class with `reset` and `step` will do). One instance plays one
    episode at a time; prefcli makes one instance per concurrent episode, from the recipe's `env.args`."""

    def reset(self, seed: int | None = None) -> Observation:
        raise NotImplementedError

    def step(self, action: str) -> Observation:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the instance holds (a connection, a process); called once when it is dropped."""


# The methods of the protocol: never tools, whatever their docstrings say.
PROTOCOL = frozenset({"reset", "step", "close", "state"})


def as_observation(value: Any, what: str) -> Observation:
    """An environment's return value as an Observation: an Observation, a string (its text), or an object with
    OpenEnv's fields (done, reward, metadata, and a text in `text`, `message` or `prompt`). Raises TypeError naming
    `what` otherwise."""
    if isinstance(value, Observation):
        return value
    if isinstance(value, str):
        return Observation(text=value)
    if value is None:
        return Observation()
    if all(hasattr(value, k) for k in ("done", "reward")):
        text = next(
            (getattr(value, k) for k in ("text", "message", "prompt") if isinstance(getattr(value, k, None), str)), ""
        )
        return Observation(
            text=text, done=bool(value.done), reward=value.reward, metadata=dict(getattr(value, "metadata", {}) or {})
        )
    raise TypeError(f"{what} returned a {type(value).__name__}; return an Observation (or a string)")
