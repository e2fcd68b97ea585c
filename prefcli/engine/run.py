"""One training run, for every training command: the run folder checked, the runtime set up, the command's
task built (by the `build` the caller hands over: engine/ never imports prefcli.algos), a resumed
checkpoint loaded, the folder taken, the loop run, final/, summary.json and curves.png written.

Order matters for the bad-input contract: the output folder is checked (a folder, writable, not in use,
and for --resume a checkpoint that verifies), the data loaded, the model built and a resumed checkpoint
loaded into it *before* anything is written, so a bad recipe, bad data, a folder holding another run or a
checkpoint that does not fit exits 2 with nothing trained and nothing written. Only then is the run folder
locked (`runfolder.take_run_folder`) and written.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import Interrupted, PrefcliError, UsageError
from ..recipe import dump_recipe
from ..recipe.commands import RecipeBase
from . import checkpoint as ckpt
from . import runfolder
from .dist import Runtime, setup_runtime, teardown
from .loop import Engine
from .models import position_limit
from .progress import Progress
from .task import Task
from .trackers import check_installed, start_trackers


@dataclass
class RunOptions:
    """The command line's part of a run (the recipe is the rest)."""

    overrides: list[str] = field(default_factory=list)
    output_dir: str | None = None
    resume: bool = False
    overwrite: bool = False
    quiet: bool = False
    smoke: bool = False


@dataclass
class RunContext:
    """What a command's `build(ctx)` receives to make its Task."""

    recipe: RecipeBase
    rt: Runtime | None
    run_dir: Path
    smoke: bool = False
    progress: Progress | None = None  # set once the run starts
    warnings: list[str] = field(default_factory=list)  # warnings given before the run started (for the summary)

    def warn(self, text: str) -> None:
        if self.progress is not None:
            self.progress.warn(text)
            return
        self.warnings.append(text)
        if self.rt is None or self.rt.is_main:
            print(f"warning: {text}", file=sys.stderr)


@dataclass
class Cards:
    """The model cards (README.md) of final/ and of best/ (engine/modelcard.py): what the folder holds, the base
    model, data, command, metrics and prefcli version, and the base model's licence."""

    command: str
    recipe: RecipeBase
    recipe_path: Path
    opts: RunOptions
    run_dir: Path
    result: dict
    best_checkpoint: Path | None  # output.final: best, when an evaluation was kept: final/ holds its weights

    def _card(self, shown: Path, metrics: dict, what: str, best: dict | None, model_dir: Path | None) -> str:
        from .modelcard import command_line, model_card

        cmdline = command_line(self.command, str(self.recipe_path), self.opts.overrides, self.opts.smoke)
        config = self.recipe.model_dump(mode="json")
        return model_card(
            shown, config, dump_recipe(self.recipe), self.command, cmdline, self.result["steps"], metrics, what,
            best, model_dir,
        )  # fmt: skip

    def _best_metrics(self) -> tuple[dict, dict] | None:
        """(the best evaluation's summary entry, its metrics): from this run's history, else metrics.jsonl (a
        resumed run evaluated it before the resume)."""
        best = self.result.get("best")
        if not best or best.get("step") is None:
            return None
        for rec in self.result.get("history", {}).get("eval", []):
            if rec.get("step") == best["step"]:
                return best, rec
        path = self.run_dir / "metrics.jsonl"
        found: dict = {}
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if rec.get("step") == best["step"] and any(k.startswith("eval/") for k in rec):
                    found = rec
        return best, found or {"step": best["step"], best["metric"]: best["value"]}

    def save_final(self, task, folder: Path, main: bool) -> None:
        from .modelcard import write_card

        task.save_final(folder)
        if not main:
            return
        steps = self.result["steps"]
        got = self._best_metrics() if self.best_checkpoint is not None else None
        if got is not None:
            best, metrics = got
            what = (
                f"The weights of the run's best evaluation (step {best['step']}, `{best['metric']}` = "
                f"{best['value']:.6g}; `output.final: best`) in Hugging Face format"
                + (f"; the run went on to step {steps}." if steps != best["step"] else ", its last step.")
            )
        else:
            best, metrics = None, self.result["final"]
            what = f"The model at the end of the run (step {steps}) in Hugging Face format."
        from .runfolder import FINAL

        write_card(folder, self._card(self.run_dir / FINAL, metrics, what, best, Path(folder)))

    def write_best(self, final_dir: Path | None) -> None:
        """best/README.md beside best/checkpoints/step-N (train.keep_best), when an evaluation was kept."""
        from .modelcard import write_card
        from .monitor import BEST_DIR

        got = self._best_metrics()
        folder = self.run_dir / BEST_DIR
        if got is None or not folder.is_dir():
            return
        best, metrics = got
        what = (
            f"The checkpoint of the run's best evaluation (`train.keep_best`: step {best['step']}, `{best['metric']}` "
            f"= {best['value']:.6g}), `checkpoints/step-{best['step']}/` here, in prefcli's checkpoint format (not a "
            "Hugging Face model folder). `output.final: best` writes these weights to final/ in Hugging Face format."
        )
        try:
            write_card(folder, self._card(folder, metrics, what, best, final_dir))  # final/: the same model
        except OSError:
            pass  # the card is a description; the checkpoint beside it is whole without it


def train(
    command: str,
    recipe: RecipeBase,
    recipe_path: Path,
    run_dir: Path,
    build: Callable[[RunContext], Task],
    opts: RunOptions,
    t_start: float,
    warnings: list[str] = (),
) -> dict:
    """Run one training command end to end; returns the summary (also written to summary.json). `warnings`:
    those given before (while the recipe was resolved), for the summary."""
    runfolder.check_run_dir(run_dir, opts.resume, opts.overwrite, command)
    check_installed(recipe.log.report_to)  # a tracker named but not installed: exit 2 before anything runs
    resume_from, skipped = runfolder.pick_resume(run_dir) if opts.resume else (None, [])
    rt = _runtime(recipe, opts.smoke)
    lock = runfolder.RunLock(run_dir)
    engine = None
    try:
        torch.manual_seed(recipe.train.seed)
        ctx = RunContext(recipe=recipe, rt=rt, run_dir=run_dir, smoke=opts.smoke, warnings=list(warnings))
        for path, why in skipped:
            ctx.warn(f"--resume: skipped {path} ({why}); resuming from {resume_from.name}")
        task = build(ctx)
        check_position_limit(task, recipe)
        task.startup_check()  # the start-up guard (engine/guard.py): exit 2 before anything is written
        engine = Engine(task, rt, recipe.train, None, run_dir)
        if resume_from is not None:  # a checkpoint this run cannot continue: exit 2, before anything is written
            ckpt.check_resume(resume_from, task.groups, task.state_dict(), rt.world_size)
            engine.restore(resume_from)
        # every check has passed: from here on the run folder is written
        _take_folder(rt, run_dir, lock, dump_recipe(recipe), resume_from, opts)
        ctx.progress = progress = _progress(command, recipe, run_dir, rt, task.total_steps(), engine.start, opts)
        try:
            result = engine.run(resume_from, progress)  # out of memory: a TrainingError with what to lower
        finally:
            progress.close()
        described = task.describe()
        best = _load_best(engine, task, recipe, progress)
        final_dir = _final(engine, task, recipe, Cards(command, recipe, recipe_path, opts, run_dir, result, best))
        summary = {
            "command": command,
            "status": result["status"],
            "exit_code": 0,
            "recipe": str(recipe_path),
            "output_dir": str(run_dir),
            "final_model": str(final_dir) if final_dir else None,
            **_results(result, described, rt),
            "smoke": opts.smoke,
            "resumed_from": str(resume_from) if resume_from else None,
            "warnings": ctx.warnings + progress.warnings,
            "wall_s": round(time.perf_counter() - t_start, 3),
        }
        if rt.is_main:
            _write_summary(engine, summary, run_dir, recipe, f"prefcli {command}: {recipe_path.name}")
            progress.finish(summary)  # the trackers get the summary, then close
        return summary
    except KeyboardInterrupt:  # outside the loop's own handling (loading, or a second Ctrl-C)
        raise _interrupted(lock, engine) from None
    finally:
        lock.release()
        teardown(rt)


def _progress(
    command: str, recipe: RecipeBase, run_dir: Path, rt: Runtime, total: int, start: int, opts: RunOptions
) -> Progress:
    """The terminal progress and metrics.jsonl (rank 0), with the recipe's trackers started on first use."""
    return Progress(
        rt.is_main,
        total,
        f"prefcli {command}",
        run_dir if rt.is_main else None,
        quiet=opts.quiet,
        every_steps=recipe.log.every_steps,
        metrics_every=recipe.log.metrics_every_steps,
        start_step=start,
        trackers=lambda warn: start_trackers(
            recipe.log, command, run_dir, recipe.model_dump(mode="json"), dump_recipe(recipe), warn, start
        ),
    )


def _results(result: dict, described: dict, rt: Runtime) -> dict:
    """The summary's part from the finished loop, the task's description and the runtime."""
    return {
        "steps": result["steps"],
        "final": result["final"],
        "perf": result["perf"],
        **{k: result[k] for k in ("best", "stopped_early") if k in result},
        **described,
        "device": str(rt.device),
        "precision": rt.precision,
        "world_size": rt.world_size,
        "parallel": rt.parallel,
        "memory": result["memory"],
    }


def _interrupted(lock: runfolder.RunLock, engine: Engine | None) -> Interrupted:
    """Ctrl-C outside the loop's own handling (while loading, or a second one): what was written, if anything."""
    if lock.fd is None:
        return Interrupted("interrupted before training started; nothing was written")
    last = engine.last_checkpoint if engine is not None else None
    err = Interrupted(
        "interrupted; " + (f"last checkpoint: {last}; continue with --resume" if last else "no checkpoint was written")
    )
    err.checkpoint = str(last) if last else None
    return err


def _runtime(recipe: RecipeBase, smoke: bool) -> Runtime:
    rc = recipe.runtime
    return setup_runtime(
        rc.device if not smoke or torch.cuda.is_available() else "cpu",
        rc.precision,
        rc.dist_backend,
        rc.loss_chunk_tokens,
        rc.compile,
        parallel=rc.parallel,
        reshard_after_forward=rc.fsdp.reshard_after_forward,
        cpu_offload=rc.fsdp.cpu_offload,
        timeout_s=rc.timeout_s,
    )


def _take_folder(
    rt: Runtime, run_dir: Path, lock: runfolder.RunLock, recipe_yaml: str, resume_from: Path | None, opts: RunOptions
) -> None:
    """Rank 0 takes the run folder; every rank stops when it could not."""
    failed: PrefcliError | None = None
    if rt.is_main:
        try:
            runfolder.take_run_folder(run_dir, lock, recipe_yaml, resume_from, opts.resume, opts.overwrite)
        except PrefcliError as e:
            failed = e
    if rt.distributed:
        ok = rt.all_reduce(torch.tensor([0.0 if failed else 1.0], device=rt.device)).item()
        if failed is None and ok < rt.world_size:
            raise UsageError(f"output dir {run_dir}: rank 0 could not take the run folder")
    if failed is not None:
        raise failed


def _load_best(engine: Engine, task: Task, recipe: RecipeBase, progress: Progress) -> Path | None:
    """output.final: best: the best evaluation's checkpoint loaded into the task's modules (None: the last step)."""
    rt = engine.rt
    best = engine.monitors.best_checkpoint() if recipe.output.final == "best" else None
    if best is not None:
        ckpt.load_checkpoint(best, task.groups, rt.rank, rt.world_size)
    elif recipe.output.final == "best":
        progress.warn("output.final is 'best' but no evaluation was kept as best; final/ holds the last step")
    return best


def _final(engine: Engine, task: Task, recipe: RecipeBase, cards: Cards) -> Path | None:
    """final/ with its model card, and best/'s card (train.keep_best)."""
    rt = engine.rt
    final_dir = None
    if recipe.output.save_final:  # every rank: a sharded model is gathered tensor by tensor; rank 0 writes
        final_dir = engine.save_final(lambda folder: cards.save_final(task, folder, rt.is_main))
    if rt.is_main:
        cards.write_best(final_dir)
    rt.barrier()
    return final_dir


def _write_summary(engine: Engine, summary: dict[str, Any], run_dir: Path, recipe: RecipeBase, title: str) -> None:
    """summary.json, and curves.png when output.plot asks for it (rank 0)."""
    try:
        runfolder.replace_text(run_dir / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    except OSError as e:
        raise engine.failure(f"could not write summary.json: {e.strerror or e}", "final/ is complete.") from None
    if recipe.output.plot and (run_dir / "metrics.jsonl").exists():
        from .plots import plot_runs, read_metrics

        try:
            plot_runs({run_dir.name: read_metrics(run_dir / "metrics.jsonl")}, run_dir / "curves.png", title=title)
        except (ValueError, OSError):
            pass  # nothing numeric to plot (zero steps), or no room for the picture: the run is done


def _sequence_length(recipe: RecipeBase) -> tuple[int, str] | None:
    """The longest sequence the recipe trains on, and the field(s) that set it."""
    d = getattr(recipe, "data", None)
    if getattr(d, "max_length", None):
        return d.max_length, "data.max_length"
    gen = getattr(recipe, "generation", None)
    if getattr(d, "max_prompt_length", None) and gen is not None:
        return d.max_prompt_length + gen.max_new_tokens, "data.max_prompt_length + generation.max_new_tokens"
    return None


def check_position_limit(task: Task, recipe: RecipeBase) -> None:
    """A model with a learned position table (GPT-2's n_positions) cannot take longer sequences: it fails
    with an IndexError mid-step. Refuse before training (exit 2)."""
    need = _sequence_length(recipe)
    if need is None:
        return
    for name, g in task.groups.items():
        limit = position_limit(g.raw)
        if limit is not None and need[0] > limit:
            raise UsageError(
                f"{need[1]} ({need[0]}) exceeds the {limit} positions of the '{name}' model's learned position "
                f"table (n_positions / max_position_embeddings): lower {need[1].split(' +')[0]} to at most {limit}, "
                "or use a model with more positions"
            )
