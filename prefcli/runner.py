"""Recipe -> runtime -> task -> engine -> run folder. Shared by every training command.

Order matters for the bad-input contract: the recipe is validated, the output folder checked (a folder,
writable, not in use, and for --resume a checkpoint that verifies), the data loaded, the model built and
a resumed checkpoint loaded into it *before* anything is written, so a bad recipe, bad data, a folder
holding another run or a checkpoint that does not fit exits 2 with nothing trained and nothing
written. Only then is the run folder locked (`take_run_folder`) and written.
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

from .errors import Interrupted, PrefcliError, UsageError
from .recipe import dump_recipe, load_recipe
from .recipe.paths import output_problem

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
    "label": "prefcli.label.serve",
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
    warnings: list[str] = field(default_factory=list)  # warnings given before the run started (for the summary)

    def warn(self, text: str) -> None:
        if self.progress is not None:
            self.progress.warn(text)
            return
        self.warnings.append(text)
        if self.rt is None or self.rt.is_main:
            import sys

            print(f"warning: {text}", file=sys.stderr)


def default_run_dir(command: str, recipe_path: Path) -> Path:
    return Path.cwd() / "runs" / f"{command}-{recipe_path.stem}"


def describe_run_dir(run_dir: Path) -> str | None:
    present = [a for a in RUN_ARTIFACTS if (run_dir / a).exists()]
    return ", ".join(present) if present else None


def _unwritable(run_dir: Path) -> str | None:
    """Why the run folder could not be written (checked before anything is loaded), else None."""
    p = run_dir
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        return f"{p} is not a folder"
    if not os.access(p, os.W_OK | os.X_OK):
        return f"{p} is not writable"
    if p == run_dir:
        for name in ("checkpoints", "metrics.jsonl", "recipe.yaml", "final"):
            q = run_dir / name
            if q.exists() and not os.access(q, os.W_OK | (os.X_OK if q.is_dir() else 0)):
                return f"{q} is not writable"
    return None


def _recorded_command(run_dir: Path) -> str | None:
    """The command of the run in `run_dir`, from its recipe.yaml."""
    import yaml

    try:
        data = yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return data.get("command") if isinstance(data, dict) else None


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool, command: str | None = None) -> None:
    """Everything about the run folder that can be known before loading data and models (exit 2)."""
    from .engine.runfolder import RunLock

    if resume and overwrite:
        raise UsageError("--resume and --overwrite contradict each other; pick one")
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"output dir {run_dir} exists and is not a folder; give a folder with --output-dir")
    why = _unwritable(run_dir)
    if why:
        raise UsageError(f"output dir {run_dir}: {why}; fix its permissions or choose another --output-dir")
    holder = RunLock.probe(run_dir) if run_dir.is_dir() else None
    if holder:
        raise UsageError(
            f"output dir {run_dir} is in use by another prefcli run ({holder}); wait for it to end, "
            "or use --output-dir for a new folder"
        )
    if resume:
        recorded = _recorded_command(run_dir)
        if command is not None and recorded is not None and recorded != command:
            raise UsageError(
                f"--resume: {run_dir} holds a `prefcli {recorded}` run (its recipe.yaml), not a `prefcli {command}` "
                f"run; continue it with `prefcli {recorded} --resume`, or use --output-dir for a new folder"
            )
        pick_resume(run_dir)
        return
    held = describe_run_dir(run_dir) if run_dir.is_dir() else None
    if held and not overwrite:
        raise UsageError(
            f"output dir {run_dir} holds another run ({held}). Use --resume to continue it, "
            "--overwrite to replace it, or --output-dir for a new folder."
        )


def pick_resume(run_dir: Path) -> tuple[Path, list[tuple[Path, str]]]:
    """The newest checkpoint that verifies, and the newer ones skipped (with why); UsageError if none."""
    from .engine.runfolder import resumable_checkpoint

    path, skipped = resumable_checkpoint(run_dir)
    if path is None:
        from .engine.checkpoint import earlier_layout

        for p, _ in skipped:  # before 0.2.0 a checkpoint had no completion marker: say so, not "incomplete"
            if earlier_layout(p):
                raise UsageError(earlier_layout(p))
        if skipped:
            why = "; ".join(f"{p.name}: {reason}" for p, reason in skipped)
            raise UsageError(
                f"--resume: no complete checkpoint in {run_dir}/checkpoints ({why}); start again with --overwrite"
            )
        raise UsageError(
            f"--resume: no checkpoint in {run_dir}/checkpoints (set train.save_every_steps to write them); "
            "start again with --overwrite"
        )
    return path, skipped


def clear_artifacts(run_dir: Path, names: tuple[str, ...]) -> None:
    """--overwrite: remove exactly these files/folders of a previous run, nothing else."""
    for a in names:
        p = run_dir / a
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def prepare_run_dir(run_dir: Path, overwrite: bool, resume_from: Path | None) -> None:
    """Under the run lock: clear a replaced run, or cut metrics.jsonl back to the resumed checkpoint."""
    from .engine.runfolder import checkpoint_info

    if overwrite:
        clear_artifacts(run_dir, RUN_ARTIFACTS)
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics = run_dir / "metrics.jsonl"
    if resume_from is not None and metrics.exists():  # drop what was logged after the checkpoint
        lines = metrics.read_text(encoding="utf-8", errors="replace").splitlines()
        n = checkpoint_info(resume_from).get("metrics_lines")
        if isinstance(n, int):
            keep = lines[:n]
        else:  # a checkpoint that did not record it: by step
            step = int(resume_from.name.split("-")[1])
            keep = [x for x in lines if _step_of(x) is not None and _step_of(x) <= step]
        _replace_text(metrics, "".join(x + "\n" for x in keep))


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        return None


def _replace_text(path: Path, text: str) -> None:
    """Write a file whole or not at all (a temporary file renamed over it)."""
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def take_run_folder(run_dir: Path, lock, command: str, recipe, opts: RunOptions, resume_from: Path | None) -> None:
    """Every check has passed: lock the run folder, check it again under the lock (another run may have
    written it meanwhile), remove what cut-off writes left, and write recipe.yaml. Rank 0 only."""
    from .engine.runfolder import RunFolderBusy, clean_temporaries, verify_checkpoint

    try:
        lock.acquire()
    except RunFolderBusy as e:
        raise UsageError(
            f"output dir {run_dir} is in use by another prefcli run ({e.holder}); wait for it to end, "
            "or use --output-dir for a new folder"
        ) from None
    except OSError as e:
        raise UsageError(
            f"output dir {run_dir}: cannot create it ({e.strerror or e}); choose another --output-dir"
        ) from None
    held = describe_run_dir(run_dir)
    if held and not opts.resume and not opts.overwrite:
        raise UsageError(
            f"output dir {run_dir} now holds another run ({held}), written while this one was starting; "
            "use --output-dir for a new folder"
        )
    if resume_from is not None and verify_checkpoint(resume_from) is not None:
        raise UsageError(f"--resume: {resume_from} changed while this run was starting; run the command again")
    clean_temporaries(run_dir)
    prepare_run_dir(run_dir, opts.overwrite, resume_from)
    _replace_text(run_dir / "recipe.yaml", dump_recipe(recipe))


def _sequence_length(recipe) -> tuple[int, str] | None:
    """The longest sequence the recipe trains on, and the field(s) that set it."""
    d = getattr(recipe, "data", None)
    if getattr(d, "max_length", None):
        return d.max_length, "data.max_length"
    gen = getattr(recipe, "generation", None)
    if getattr(d, "max_prompt_length", None) and gen is not None:
        return d.max_prompt_length + gen.max_new_tokens, "data.max_prompt_length + generation.max_new_tokens"
    return None


def check_position_limit(task, recipe) -> None:
    """A model with a learned position table (GPT-2's n_positions) cannot take longer sequences: it fails
    with an IndexError mid-step. Refuse before training (exit 2)."""
    from .engine.models import position_limit

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


@dataclass
class Cards:
    """The model cards (README.md) of final/ and of best/ (engine/modelcard.py): what the folder holds, the base
    model, data, command, metrics and prefcli version, and the base model's licence."""

    command: str
    recipe: Any
    recipe_path: Path
    opts: RunOptions
    run_dir: Path
    result: dict
    best_checkpoint: Path | None  # output.final: best, when an evaluation was kept: final/ holds its weights

    def _card(self, shown: Path, metrics: dict, what: str, best: dict | None, model_dir: Path | None) -> str:
        from .engine.modelcard import command_line, model_card

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
        from .engine.modelcard import write_card

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
        from .engine.runfolder import FINAL

        write_card(folder, self._card(self.run_dir / FINAL, metrics, what, best, Path(folder)))

    def write_best(self, final_dir: Path | None) -> None:
        """best/README.md beside best/checkpoints/step-N (train.keep_best), when an evaluation was kept."""
        from .engine.modelcard import write_card
        from .engine.monitor import BEST_DIR

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


def run_training(command: str, recipe_path: str | os.PathLike, opts: RunOptions) -> dict:
    """Run one training command end to end; returns the summary (also written to summary.json)."""
    t_start = time.perf_counter()
    recipe_path = Path(recipe_path)
    loaded = load_recipe(recipe_path, command, opts.overrides)
    recipe = loaded.recipe
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
    check_run_dir(run_dir, opts.resume, opts.overwrite, command)
    from .engine.trackers import check_installed, start_trackers

    check_installed(recipe.log.report_to)  # a tracker named but not installed: exit 2 before anything runs
    resume_from, skipped = pick_resume(run_dir) if opts.resume else (None, [])

    import torch

    from .engine import checkpoint as ckpt
    from .engine.dist import setup_runtime, teardown
    from .engine.loop import Engine
    from .engine.progress import Progress
    from .engine.runfolder import RunLock

    rc = recipe.runtime
    rt = setup_runtime(
        rc.device if not opts.smoke or torch.cuda.is_available() else "cpu",
        rc.precision,
        rc.dist_backend,
        rc.loss_chunk_tokens,
        rc.compile,
        parallel=rc.parallel,
        reshard_after_forward=rc.fsdp.reshard_after_forward,
        cpu_offload=rc.fsdp.cpu_offload,
        timeout_s=rc.timeout_s,
    )
    lock = RunLock(run_dir)
    engine = None
    try:
        torch.manual_seed(recipe.train.seed)
        ctx = RunContext(recipe=recipe, rt=rt, run_dir=run_dir, smoke=opts.smoke, warnings=list(early.warnings))
        for path, why in skipped:
            ctx.warn(f"--resume: skipped {path} ({why}); resuming from {resume_from.name}")
        task = importlib.import_module(TASKS[command]).build(ctx)
        check_position_limit(task, recipe)
        if hasattr(task, "startup_check"):  # the start-up guard (engine/guard.py): exit 2 before anything is written
            task.startup_check()
        engine = Engine(task, rt, recipe.train, None, run_dir)
        if resume_from is not None:  # a checkpoint this run cannot continue: exit 2, before anything is written
            ckpt.check_resume(resume_from, task.groups, task.state_dict(), rt.world_size)
            engine.restore(resume_from)
        # every check has passed: from here on the run folder is written
        failed: PrefcliError | None = None
        if rt.is_main:
            try:
                take_run_folder(run_dir, lock, command, recipe, opts, resume_from)
            except PrefcliError as e:
                failed = e
        if rt.distributed:  # every rank stops when rank 0 could not take the folder
            ok = rt.all_reduce(torch.tensor([0.0 if failed else 1.0], device=rt.device)).item()
            if failed is None and ok < rt.world_size:
                raise UsageError(f"output dir {run_dir}: rank 0 could not take the run folder")
        if failed is not None:
            raise failed
        progress = Progress(
            rt.is_main,
            task.total_steps(),
            f"prefcli {command}",
            run_dir if rt.is_main else None,
            quiet=opts.quiet,
            every_steps=recipe.log.every_steps,
            metrics_every=recipe.log.metrics_every_steps,
            start_step=engine.start,
        )
        ctx.progress = progress
        engine.progress = progress
        if rt.is_main:
            progress.trackers = start_trackers(
                recipe.log, command, run_dir, recipe.model_dump(mode="json"), dump_recipe(recipe), progress.warn,
                engine.start,
            )  # fmt: skip
        try:
            result = engine.run(resume_from)  # out of memory: a TrainingError with what to lower (Engine.out_of_memory)
        finally:
            progress.close()
        described = task.describe() if hasattr(task, "describe") else {}
        best = engine.monitors.best_checkpoint() if recipe.output.final == "best" else None
        if best is not None:  # output.final: best
            ckpt.load_checkpoint(best, task.groups, rt.rank, rt.world_size)
        elif recipe.output.final == "best":
            progress.warn("output.final is 'best' but no evaluation was kept as best; final/ holds the last step")
        cards = Cards(command, recipe, recipe_path, opts, run_dir, result, best)
        final_dir = None
        if recipe.output.save_final:  # every rank: a sharded model is gathered tensor by tensor; rank 0 writes
            final_dir = engine.save_final(lambda folder: cards.save_final(task, folder, rt.is_main))
        if rt.is_main:
            cards.write_best(final_dir)
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
                "parallel": rt.parallel,
                "memory": result["memory"],
                "smoke": opts.smoke,
                "resumed_from": str(resume_from) if resume_from else None,
                "warnings": ctx.warnings + progress.warnings,
                "wall_s": round(time.perf_counter() - t_start, 3),
            }
        )
        if rt.is_main:
            try:
                _replace_text(run_dir / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
            except OSError as e:
                raise engine._failure(
                    f"could not write summary.json: {e.strerror or e}", "final/ is complete."
                ) from None
            if recipe.output.plot and (run_dir / "metrics.jsonl").exists():
                from .engine.plots import plot_runs, read_metrics

                try:
                    plot_runs(
                        {run_dir.name: read_metrics(run_dir / "metrics.jsonl")},
                        run_dir / "curves.png",
                        title=f"prefcli {command}: {recipe_path.name}",
                    )
                except (ValueError, OSError):
                    pass  # nothing numeric to plot (zero steps), or no room for the picture: the run is done
            progress.finish(summary)  # the trackers get the summary, then close
        return summary
    except KeyboardInterrupt:  # outside the loop's own handling (loading, or a second Ctrl-C)
        if lock.fd is None:
            raise Interrupted("interrupted before training started; nothing was written") from None
        last = engine.last_checkpoint if engine is not None else None
        err = Interrupted(
            "interrupted; "
            + (f"last checkpoint: {last}; continue with --resume" if last else "no checkpoint was written")
        )
        err.checkpoint = str(last) if last else None
        raise err from None
    finally:
        lock.release()
        teardown(rt)
