"""A reasoning-gym dataset as single-turn episodes: `reset(seed)` draws the procedurally generated question
of that seed (the dataset built with size 1 and that seed), `step(text)` scores the answer with the dataset's
own verifier (`score_answer`, in [0, 1]) and ends the episode; success is a full score."""

from __future__ import annotations

import re

from ..base import Observation


class ReasoningGymTask:
    def __init__(self, dataset: str, args: dict, answer_regex: str | None = None):
        import reasoning_gym

        self.rg, self.dataset, self.args = reasoning_gym, dataset, dict(args)
        self.answer_regex = re.compile(answer_regex) if answer_regex else None
        self.data, self.entry = None, None

    def reset(self, seed: int | None = None) -> Observation:
        self.data = self.rg.create_dataset(self.dataset, seed=int(seed or 0), size=1, **self.args)
        self.entry = self.data[0]
        return Observation(text=self.entry["question"], metadata={"answer": self.entry["answer"]})

    def step(self, action: str) -> Observation:
        answer = action.strip()
        if self.answer_regex is not None:
            m = self.answer_regex.search(action)
            answer = (m.group(1) if m and m.groups() else m.group(0) if m else "").strip()
        score = float(self.data.score_answer(answer, self.entry))
        return Observation(done=True, reward=score, metadata={"success": score >= 1.0, "answer": self.entry["answer"]})


def reasoning_gym_factory(spec, field: str):
    from ...errors import UsageError
    from ..loading import EnvFactory
    from . import require

    rg = require("reasoning_gym", "reasoning-gym", f"{field}.kind")
    try:
        from reasoning_gym.factory import DATASETS

        known = sorted(DATASETS)
    except ImportError:
        known = []
    if known and spec.dataset not in known:
        import difflib

        close = difflib.get_close_matches(spec.dataset, known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UsageError(f"{field}.dataset: reasoning-gym has no dataset '{spec.dataset}'{hint}")
    try:
        rg.create_dataset(spec.dataset, seed=0, size=1, **spec.args)
    except Exception as e:  # the dataset's config rejects the args
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UsageError(
            f"{field}.args: {spec.dataset} does not accept {spec.args!r}: {type(e).__name__}: {first}"
        ) from None
    return EnvFactory(
        f"reasoning_gym {spec.dataset}", lambda: ReasoningGymTask(spec.dataset, spec.args, spec.answer_regex)
    )
