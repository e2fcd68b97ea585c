"""Environments from other packages behind prefcli's environment interface, each an optional extra (pyproject):

  openenv        an OpenEnv server (openenv-core's client)                   pip install 'prefcli[openenv]'
  reasoning_gym  a reasoning-gym dataset, its verifier as the reward          pip install 'prefcli[reasoning-gym]'
  textarena      a single-player TextArena game                               pip install 'prefcli[textarena]'

`ADAPTERS[kind](spec, field) -> EnvFactory`; a missing package or a name the package does not know is a
UsageError naming the recipe field.
"""

from __future__ import annotations

from collections.abc import Callable

from ...errors import UsageError
from .openenv import openenv_factory
from .reasoning_gym import reasoning_gym_factory
from .textarena import textarena_factory


def require(module: str, extra: str, field: str):
    """Import an adapter's package, or say which extra installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise UsageError(
            f"{field}: this kind needs the package {extra} ({type(e).__name__}: {e}); install it with pip install "
            f"'prefcli[{extra}]'"
        ) from None


ADAPTERS: dict[str, Callable] = {
    "openenv": openenv_factory,
    "reasoning_gym": reasoning_gym_factory,
    "textarena": textarena_factory,
}
