"""From a recipe's `env:` section to a factory of environment instances, checked before anything runs: the class
imports, has `reset` and `step`, accepts `env.args`, and every tool has a docstring and JSON-schema types.
Each problem is a UsageError (exit 2) naming the recipe field (`field`, e.g. 'env.path')."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .tools import ToolSpecError, tool_names, tool_schemas


@dataclass
class EnvFactory:
    """Makes one environment instance per concurrent episode."""

    name: str  # how messages name the environment: the class path, the server URL, the dataset
    make: Callable[[], Any]
    tools: list[dict] = field(default_factory=list)  # JSON schemas, the chat template's `tools=`
    tool_names: list[str] = field(default_factory=list)


def import_class(spec: str, field_name: str) -> type:
    """'pkg.module:Class' or '/abs/file.py:Class' -> the class; a UsageError naming `field_name` otherwise."""
    mod_name, _, attr = spec.rpartition(":")
    try:
        if mod_name.endswith(".py"):
            path = Path(mod_name)
            unique = f"prefcli_env_{abs(hash(str(path.resolve())))}"
            module = sys.modules.get(unique)
            if module is None:
                s = importlib.util.spec_from_file_location(unique, path)
                module = importlib.util.module_from_spec(s)
                sys.modules[unique] = module
                try:
                    s.loader.exec_module(module)
                except BaseException:
                    del sys.modules[unique]
                    raise
        else:
            module = importlib.import_module(mod_name)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        run = f"python {mod_name}" if mod_name.endswith(".py") else f"python -c 'import {mod_name}'"
        raise UsageError(
            f"{field_name}: '{spec}': importing {mod_name} failed: {type(e).__name__}: {first}; fix it (`{run}` "
            "shows the traceback)"
        ) from None
    cls = getattr(module, attr, None)
    if cls is None:
        raise UsageError(f"{field_name}: '{spec}': {mod_name} has no '{attr}'; check the name after the colon")
    if not inspect.isclass(cls):
        raise UsageError(f"{field_name}: '{spec}' is a {type(cls).__name__}, not a class")
    return cls


def check_class(cls: type, args: dict, path_field: str, args_field: str) -> tuple[list[dict], list[str]]:
    """`cls` as an environment: reset and step present, `args` accepted by its constructor, its tools
    documented. Returns (tool schemas, tool names)."""
    missing = [m for m in ("reset", "step") if not callable(getattr(cls, m, None))]
    if missing:
        raise UsageError(
            f"{path_field}: {cls.__name__} has no {' or '.join(missing)} method; an environment needs "
            "reset(seed) -> Observation and step(action) -> Observation"
        )
    try:
        inspect.signature(cls).bind(**args)
    except TypeError as e:
        try:
            sig = str(inspect.signature(cls, eval_str=True))
        except Exception:  # noqa: BLE001 - an annotation that does not evaluate: show it as written
            sig = str(inspect.signature(cls))
        raise UsageError(f"{args_field}: {cls.__name__}{sig} does not accept {dict(args)!r}: {e}") from None
    except ValueError:  # no signature to read (a builtin): the constructor call below judges
        pass
    try:
        return tool_schemas(cls), tool_names(cls)
    except ToolSpecError as e:
        raise UsageError(f"{path_field}: {e}") from None


def build_factory(spec, field_name: str = "env") -> EnvFactory:
    """The factory of the recipe's environment (`spec`: a recipe.envs section). Makes one instance to check that
    the constructor runs (and closes it)."""
    from .adapters import ADAPTERS

    if spec.kind == "python":
        cls = import_class(spec.path, f"{field_name}.path")
        args = dict(spec.args)
        tools, names = check_class(cls, args, f"{field_name}.path", f"{field_name}.args")
        factory = EnvFactory(spec.path, lambda: cls(**args), tools, names)
        probe_instance(factory, f"{field_name}.args")  # the constructor judges the values of the arguments
        return factory
    factory = ADAPTERS[spec.kind](spec, field_name)
    probe_instance(factory, field_name)
    return factory


def probe_instance(factory: EnvFactory, field_name: str) -> None:
    """Make (and close) one instance: a constructor that fails is a bad recipe, found before training."""
    try:
        inst = factory.make()
    except UsageError:
        raise
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UsageError(
            f"{field_name}: making the environment {factory.name} failed: {type(e).__name__}: {first}"
        ) from None
    close_quietly(inst)


def close_quietly(inst: Any) -> None:
    close = getattr(inst, "close", None)
    if callable(close):
        try:
            close()
        except Exception:  # noqa: BLE001 - closing a broken instance must not end the run
            pass
