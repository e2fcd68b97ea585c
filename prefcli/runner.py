"""`prefcli <training command> RECIPE`: resolve the recipe, pick the command's task from the command table,
and hand both to the engine (prefcli/engine/run.py runs it: checks, runtime, loop, run folder, summary).
"""

from __future__ import annotations

import importlib
import os
import time
from pathlib import Path

from .engine.run import RunContext, RunOptions, train
from .engine.runfolder import default_run_dir
from .errors import UsageError
from .recipe import COMMANDS, load_recipe
from .recipe.paths import output_problem

__all__ = ["RunContext", "RunOptions", "run_training"]


def run_training(command: str, recipe_path: str | os.PathLike, opts: RunOptions) -> dict:
    """Run one training command end to end; returns the summary (also written to summary.json)."""
    t_start = time.perf_counter()
    recipe_path = Path(recipe_path)
    recipe = load_recipe(recipe_path, command, opts.overrides).recipe
    early = RunContext(recipe, None, Path())  # warnings before the run's context exists (printed now, summarised)
    if opts.smoke:
        from .engine.smoke import prepare_smoke

        recipe = prepare_smoke(recipe.smoke(), early.warn)  # hub files: there, or exit 2
    if opts.output_dir:
        why = output_problem(Path(opts.output_dir).absolute())
        if why:
            raise UsageError(f"--output-dir {opts.output_dir}: {why}")
        run_dir = Path(opts.output_dir).resolve()
    elif recipe.output.dir:
        run_dir = Path(recipe.output.dir)
    else:
        run_dir = default_run_dir(command, recipe_path)
    # the one module loaded by name: the table names it, so that a run imports only its own algorithm
    build = importlib.import_module(COMMANDS[command].task).build
    return train(command, recipe, recipe_path, run_dir, build, opts, t_start, early.warnings)
