"""A single-player TextArena game as a prefcli environment. The game is made in its raw form (`<id>-raw`,
no observation wrapper), so each observation is only what the game said since the model's last move, not the
whole history again (the conversation already holds it). The reward is the game's final reward for player 0."""

from __future__ import annotations

from ..base import Observation


class TextArenaGame:
    def __init__(self, env_id: str, args: dict):
        import textarena as ta

        raw = f"{env_id}-raw" if f"{env_id}-raw" in ta.envs.registration.ENV_REGISTRY else env_id
        self.env = ta.make(raw, **args)

    def _text(self) -> str:
        _, messages = self.env.get_observation()
        return "\n".join(m[1] for m in messages if m[0] != 0).strip()  # the game's messages, not our own move

    def reset(self, seed: int | None = None) -> Observation:
        self.env.reset(num_players=1, seed=seed)
        return Observation(text=self._text())

    def step(self, action: str) -> Observation:
        done, info = self.env.step(action)
        if not done:
            return Observation(text=self._text())
        rewards, game_info = self.env.close()
        r = float((rewards or {}).get(0, 0.0))
        reason = str(((game_info or {}).get(0) or {}).get("reason", ""))
        return Observation(text=reason, done=True, reward=r, metadata={"success": r > 0})


def textarena_factory(spec, field: str):
    from ...errors import UsageError
    from ..loading import EnvFactory
    from . import require

    ta = require("textarena", "textarena", f"{field}.kind")
    known = sorted(ta.envs.registration.ENV_REGISTRY)
    if spec.id not in known:
        import difflib

        close = difflib.get_close_matches(spec.id, known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UsageError(f"{field}.id: TextArena has no game '{spec.id}'{hint}")
    return EnvFactory(f"textarena {spec.id}", lambda: TextArenaGame(spec.id, spec.args))
