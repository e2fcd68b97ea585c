"""An OpenEnv environment server as a prefcli environment, through openenv-core's own client (GenericEnvClient:
the server's WebSocket session protocol, actions and observations as plain dicts). Each instance holds one
session; `reset(seed)` and `step(text)` map onto the server's reset and step, the text going into the action's
`env.action_field`."""

from __future__ import annotations

from ..base import Observation

TEXT_FIELDS = ("text", "message", "prompt", "echoed_message")


class OpenEnvSession:
    def __init__(self, url: str, action_field: str, observation_field: str | None, timeout_s: float):
        from openenv.core.generic_client import GenericEnvClient

        self.action_field, self.observation_field = action_field, observation_field
        self.client = GenericEnvClient(base_url=url, connect_timeout_s=timeout_s, message_timeout_s=timeout_s).sync()
        self.client.connect()

    def _obs(self, result) -> Observation:
        o = result.observation if isinstance(result.observation, dict) else {}
        if self.observation_field is not None:
            text = o.get(self.observation_field, "")
        else:
            text = next((o[k] for k in TEXT_FIELDS if isinstance(o.get(k), str)), "")
        meta = dict(o.get("metadata") or {})
        return Observation(text=str(text), done=bool(result.done), reward=result.reward, metadata=meta)

    def reset(self, seed: int | None = None) -> Observation:
        return self._obs(self.client.reset(seed=seed))

    def step(self, action: str) -> Observation:
        return self._obs(self.client.step({self.action_field: action}))

    def close(self) -> None:
        self.client.close()


def openenv_factory(spec, field: str):
    from ...errors import UsageError
    from ..loading import EnvFactory
    from . import require

    require("openenv.core.generic_client", "openenv", f"{field}.kind")

    def make():
        try:
            return OpenEnvSession(spec.url, spec.action_field, spec.observation_field, spec.timeout_s)
        except ConnectionError as e:
            raise UsageError(
                f"{field}.url: no OpenEnv server answers at {spec.url} ({e}); start it first (e.g. uvicorn "
                "your_server:app --port 8000)"
            ) from None

    return EnvFactory(f"openenv {spec.url}", make)
