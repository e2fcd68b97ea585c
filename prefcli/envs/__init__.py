"""Environments for `prefcli rlhf` and `prefcli eval`: multi-turn episodes, tool calls and verifiable tasks
(docs/environments.md).

- base.py      the interface (OpenEnv's shape): `Observation`, the optional `Environment` base class;
- tools.py     a class's public documented methods as tools: JSON schemas (transformers' get_json_schema),
               calls checked against the signature (pydantic's validate_call);
- parsing.py   tool calls in a model's turn (`TOOL_FORMATS`: hermes, pythonic), malformed calls as errors;
- guard.py     timeouts and error containment of every environment and tool call, concurrent calls;
- loading.py   the recipe's `env:` to a checked factory of instances (bad input: exit 2 naming the field);
- episode.py   token-in/token-out episodes: the trajectory, the loss mask, replies encoded through the chat
               template, `play_episodes` driving a batch of them turn by turn;
- adapters/    OpenEnv servers, reasoning-gym datasets, TextArena games (optional extras);
- bundled/     tiny CPU-learnable environments (guess the number, a secret behind a tool, a simulated user).
"""

from .base import Environment, Observation

__all__ = ["Environment", "Observation"]
