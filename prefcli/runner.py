"""Recipe -> runtime -> task -> engine -> run folder. Shared by every training command.

Order matters for the bad-input contract: the recipe is validated, the output folder checked, the
data loaded and the model built *before* anything is written, so a bad recipe, bad data or a
folder holding another run exits 2 with nothing trained and nothing overwritten.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import TrainingError, UsageError
from .recipe import dump_recipe, load_recipe

# The command table: `prefcli <command>` builds its Task with `<module>.build(ctx)`.
# tests/test_command_table.py keeps it in sync with the recipe schemas and the CLI.
TASKS: dict[str, str] = {
    "sft": "prefcli.algos.sft",
    "rlhf": "prefcli.algos.rlhf",
    "gan": "prefcli.algos.gan",
    "reward": "prefcli.algos.reward_model",
    "contrastive": "prefcli.algos.contrastive",
}

# Recipe commands that train nothing (no Task, no engine): `prefcli <command>` calls `<module>.run(recipe, opts)`.
# Together with TASKS it covers every recipe schema (tests/test_command_table.py).
RECIPE_TOOLS: dict[str, str] = {
    "eval": "prefcli.evaluate.eval",
}

# What a run folder holds; --overwrite removes exactly these, nothing else.
RUN_ARTIFACTS = (
    "recipe.yaml",
    "metrics.jsonl",
    "summary.json",
    "checkpoints",
    "final",
    "curves.png",
    "samples.jsonl",
    "best",  # train.keep_best
    "tensorboard",  # log.report_to: [tensorboard]
)


@dataclass
class RunOptions:
    overrides: list[str] = field(default_factory=list)
    output_dir: str | None = None
    resume: bool = False
    overwrite: bool = False
    quiet: bool = False
    smoke: bool = False


@dataclass
class RunContext:
    """What an algorithm's `build` receives."""

    recipe: Any
    rt: Any  # engine.dist.Runtime
    run_dir: Path
    smoke: bool = False
    progress: Any = None  # set once the run starts (engine.progress.Progress)

    def warn(self, text: str) -> None:
        if self.progress is not None:
            self.progress.warn(text)
        elif self.rt is None or self.rt.is_main:
            import sys

            print(f"warning: {text}", file=sys.stderr)


def default_run_dir(command: str, recipe_path: Path) -> Path:
    return Path.cwd() / "runs" / f"{command}-{recipe_path.stem}"


def describe_run_dir(run_dir: Path) -> str | None:
    present = [a for a in RUN_ARTIFACTS if (run_dir / a).exists()]
    return ", ".join(present) if present else None


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    from .engine.checkpoint import latest_checkpoint

    if resume and overwrite:
        raise UsageError("--resume and --overwrite contradict each other; pick one")
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"output dir {run_dir} exists and is not a folder")
    if resume:
        if latest_checkpoint(run_dir) is None:
            raise UsageError(
                f"--resume: no checkpoint in {run_dir}/checkpoints (set train.save_every_steps to write them)"
            )
        return
    held = describe_run_dir(run_dir) if run_dir.is_dir() else None
    if held and not overwrite:
        raise UsageError(
            f"output dir {run_dir} holds another run ({held}). Use --resume to continue it, "
            "--overwrite to replace it, or --output-dir for a new folder."
        )


def clear_artifacts(run_dir: Path, names: tuple[str, ...]) -> None:
    """--overwrite: remove exactly these files/folders of a previous run, nothing else."""
    for a in names:
        p = run_dir / a
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def prepare_run_dir(run_dir: Path, overwrite: bool, resume_step: int | None) -> None:
    if overwrite:
        clear_artifacts(run_dir, RUN_ARTIFACTS)
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics = run_dir / "metrics.jsonl"
    if resume_step is not None and metrics.exists():  # drop lines of steps after the checkpoint
        keep = []
        for line in metrics.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= resume_step:
                    keep.append(line)
            except json.JSONDecodeError:
                pass
        metrics.write_text("".join(x + "\n" for x in keep))


def run_training(command: str, recipe_path: str | os.PathLike, opts: RunOptions) -> dict:
    """Run one training command end to end; returns the summary (also written to summary.json)."""
    t_start = time.perf_counter()
    recipe_path = Path(recipe_path)
    loaded = load_recipe(recipe_path, command, opts.overrides)
    recipe = loaded.recipe
    if opts.smoke:
        from .engine.smoke import prepare_smoke

        recipe = prepare_smoke(recipe.smoke(), RunContext(recipe, None, Path()).warn)  # hub files: there, or exit 2
    if opts.output_dir:
        run_dir = Path(opts.output_dir).resolve()
    elif recipe.output.dir:
        run_dir = Path(recipe.output.dir)
    else:
        run_dir = default_run_dir(command, recipe_path)
    check_run_dir(run_dir, opts.resume, opts.overwrite)
    from .engine.trackers import check_installed, start_trackers

    check_installed(recipe.log.report_to)  # a tracker named but not installed: exit 2 before anything runs

    import torch

    from .engine import checkpoint as ckpt
    from .engine.dist import setup_runtime, teardown
    from .engine.loop import Engine
    from .engine.progress import Progress

    rc = recipe.runtime
    rt = setup_runtime(
        rc.device if not opts.smoke or torch.cuda.is_available() else "cpu",
        rc.precision,
        rc.dist_backend,
        rc.loss_chunk_tokens,
        rc.compile,
    )
    try:
        torch.manual_seed(recipe.train.seed)
        ctx = RunContext(recipe=recipe, rt=rt, run_dir=run_dir, smoke=opts.smoke)
        task = importlib.import_module(TASKS[command]).build(ctx)
        resume_from = ckpt.latest_checkpoint(run_dir) if opts.resume else None
        resume_step = int(resume_from.name.split("-")[1]) if resume_from else None
        if rt.is_main:
            prepare_run_dir(run_dir, opts.overwrite, resume_step)
            (run_dir / "recipe.yaml").write_text(dump_recipe(recipe))
        rt.barrier()
        progress = Progress(
            rt.is_main,
            task.total_steps(),
            f"prefcli {command}",
            run_dir if rt.is_main else None,
            quiet=opts.quiet,
            every_steps=recipe.log.every_steps,
            metrics_every=recipe.log.metrics_every_steps,
            start_step=resume_step or 0,
        )
        ctx.progress = progress
        if rt.is_main:
            progress.trackers = start_trackers(
                recipe.log, command, run_dir, recipe.model_dump(mode="json"), dump_recipe(recipe), progress.warn,
                resume_step or 0,
            )  # fmt: skip
        engine = Engine(task, rt, recipe.train, progress, run_dir)
        try:
            result = engine.run(resume_from)
        except torch.OutOfMemoryError:
            raise TrainingError(
                "out of GPU memory. Lower train.batch_size (raising train.grad_accum_steps keeps the "
                "batch), set train.gradient_checkpointing: true, or lower data.max_length."
                + (f" Last good checkpoint: {engine.last_checkpoint}" if engine.last_checkpoint else "")
            ) from None
        finally:
            progress.close()
        described = task.describe() if hasattr(task, "describe") else {}
        best = engine.monitors.best_checkpoint() if recipe.output.final == "best" else None
        if best is not None:  # output.final: best
            ckpt.load_checkpoint(best, task.groups, rt.rank)
        elif recipe.output.final == "best":
            progress.warn("output.final is 'best' but no evaluation was kept as best; final/ holds the last step")
        final_dir = None
        if rt.is_main and recipe.output.save_final:
            final_dir = run_dir / "final"
            task.save_final(final_dir)
        rt.barrier()
        summary: dict[str, Any] = {
            "command": command,
            "status": result["status"],
            "exit_code": 0,
            "recipe": str(recipe_path),
            "output_dir": str(run_dir),
            "final_model": str(final_dir) if final_dir else None,
            "steps": result["steps"],
            "final": result["final"],
            "perf": result["perf"],
        }
        summary.update({k: result[k] for k in ("best", "stopped_early") if k in result})
        summary.update(described)
        summary.update(
            {
                "device": str(rt.device),
                "precision": rt.precision,
                "world_size": rt.world_size,
                "smoke": opts.smoke,
                "resumed_from": str(resume_from) if resume_from else None,
                "wall_s": round(time.perf_counter() - t_start, 3),
            }
        )
        if rt.is_main:
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
            if recipe.output.plot and (run_dir / "metrics.jsonl").exists():
                from .engine.plots import plot_runs, read_metrics

                try:
                    plot_runs(
                        {run_dir.name: read_metrics(run_dir / "metrics.jsonl")},
                        run_dir / "curves.png",
                        title=f"prefcli {command}: {recipe_path.name}",
                    )
                except ValueError:
                    pass  # nothing numeric to plot (zero steps)
            progress.finish(summary)  # the trackers get the summary, then close
        return summary
    finally:
        teardown(rt)
