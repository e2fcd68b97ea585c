"""The one training loop. Algorithm-agnostic: it never imports prefcli.algos.

An algorithm is a `Task`. It owns its data and models and hands the loop one `Plan` per
optimizer step: which trainable `Group` to update, the micro-batches of this rank, and a loss
function returning (loss summed over units, metrics). The loop does the rest, identically for
every algorithm:

- gradient accumulation whose loss is weighted over the whole accumulated *global* batch
  (loss = sum over all ranks and micro-batches / total units), so "batch 8" equals
  "batch 1 x 8 accumulation" and "2 ranks x 4" up to float rounding;
- mixed precision (through the task's forward), gradient clipping, AdamW (fused on CUDA),
  warmup + constant/linear/cosine schedule;
- a NaN/inf guard that stops before the optimizer step (exit 1, naming the step), and no checkpoint
  or final/ ever written from non-finite weights;
- eval and checkpoint cadence; exact resume; SIGINT/SIGTERM -> checkpoint -> exit 130, also after the
  last step (the checkpoint of the last step resumes into the final evaluation and final/);
- every failure during training names the last good checkpoint (`Engine.failure`); a collapsed run (zero
  gradient step after step) is reported as a warning;
- metrics reduced across ranks, progress on rank 0.
"""

from __future__ import annotations

import contextlib
import math
import signal
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.distributed.checkpoint.api import CheckpointException

from .. import interrupts
from ..errors import Interrupted, PrefcliError, TrainingError, UsageError, out_of_memory
from ..recipe.sections import TrainSection
from . import checkpoint as ckpt
from . import runfolder
from .dist import Runtime, is_comm_failure, reshard
from .monitor import Monitors
from .progress import Progress
from .task import Task

# bf16 dense matmul rate measured on the device (docs/performance.md) or the vendor's dense figure,
# used as the MFU denominator. Unknown devices report no MFU.
PEAK_FLOPS = {"H200": 790e12, "H100": 790e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12}

# A group whose gradient norm is exactly 0 this many optimizer steps in a row has stopped learning: with a
# far too high LR a language model collapses to a uniform next-token distribution (loss = ln(vocabulary))
# whose gradient is 0, and the run would otherwise report "completed". Reported as a warning.
COLLAPSE_STEPS = 3


class Metrics:
    """Sums and counts of metrics over a step's micro-batches, reduced across ranks in one call."""

    def __init__(self):
        self.sums: dict[str, list] = {}

    def add(self, name: str, value, count=1.0) -> None:
        s = self.sums.setdefault(name, [0.0, 0.0])
        s[0] = s[0] + (value.detach().float() if isinstance(value, torch.Tensor) else float(value))
        s[1] = s[1] + (count.detach().float() if isinstance(count, torch.Tensor) else float(count))

    def merge(self, d: dict) -> None:
        for k, v in d.items():
            if isinstance(v, tuple):
                self.add(k, v[0], v[1])
            else:
                self.add(k, v, 1.0)

    def reduce(self, rt: Runtime, extra: list) -> tuple[dict[str, float], list[float]]:
        names = sorted(self.sums)
        vals = []
        for n in names:
            vals += [self.sums[n][0], self.sums[n][1]]
        flat = (
            torch.stack([torch.as_tensor(v, dtype=torch.float64, device=rt.device).reshape(()) for v in vals + extra])
            if vals or extra
            else torch.zeros(0, dtype=torch.float64, device=rt.device)
        )
        flat = rt.all_reduce(flat).tolist()
        out = {}
        for i, n in enumerate(names):
            s, c = flat[2 * i], flat[2 * i + 1]
            out[n] = s / c if c else float("nan")
        return out, flat[2 * len(names) :]


class _Signals:
    def __init__(self):
        self.requested = False
        self.count = 0
        self._old: dict = {}

    def _handler(self, signum, frame):
        interrupts.note()
        self.count += 1
        self.requested = True
        if self.count > 1:
            raise KeyboardInterrupt

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handler)
            except ValueError:  # not the main thread
                pass
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


class _Step(NamedTuple):
    """What one optimizer step gives the loop: reduced across ranks."""

    loss: float
    grad_norm: float
    lr: float
    tokens: float
    stop: bool  # SIGINT/SIGTERM reached some rank
    metrics: dict[str, float]


class Engine:
    def __init__(self, task: Task, rt: Runtime, train: TrainSection, progress: Progress, run_dir: Path):
        self.task = task
        self.rt = rt
        self.train = train
        self.progress = progress
        self.run_dir = Path(run_dir)
        self.last_checkpoint: Path | None = None
        self.memory: dict[str, dict[str, int]] = {}  # per group, measured at its first step of this run
        self.start = 0  # the step training starts after (a resumed checkpoint's)
        self.resumed_from: Path | None = None
        self.step = 0  # the step being prepared or trained (named in failure messages)
        self._zero_grad: dict[str, int] = {}  # group -> first step of its current run of zero gradients
        self.monitors = Monitors(train, run_dir)  # keep_best, early_stopping: decided at each evaluation
        self.stop_early = False
        self.peak_flops = None
        if rt.device.type == "cuda":
            name = torch.cuda.get_device_name(rt.device)
            self.peak_flops = next((v for k, v in PEAK_FLOPS.items() if k in name), None)

    def _memory_summary(self) -> dict:
        """Per group and per rank: bytes of parameters, gradients and optimizer state, as measured at the
        group's first optimizer step of this run (before it, what they will be). One all-reduce."""
        rt, names = self.rt, sorted(self.task.groups)
        table = torch.zeros(len(names), rt.world_size, 3, dtype=torch.float64, device=rt.device)
        for i, n in enumerate(names):
            m = self.memory.get(n) or self.task.groups[n].memory()
            table[i, rt.rank] = torch.tensor([m["params"], m["grads"], m["optim"]], dtype=torch.float64)
        table = rt.all_reduce(table).cpu().long().tolist()
        return {
            n: {f"{k}_bytes": [row[j] for row in table[i]] for j, k in enumerate(("params", "grads", "optim"))}
            for i, n in enumerate(names)
        }

    def _checkpoint(self, step: int) -> None:
        self._check_finite(f"step {step}", "no checkpoint was written")
        try:
            self.last_checkpoint = ckpt.save_checkpoint(
                self.run_dir,
                step,
                self.task.groups,
                self.task.state_dict(),
                self.task.extra_tensors(),
                self.rt.rank,
                self.rt.world_size,
                self.train.keep_checkpoints,
                self.rt.barrier,
                parallel=self.rt.parallel,
                info={"metrics_lines": self.progress.lines},
            )
        except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
            why = runfolder.disk_error(e)
            if why is None:
                raise
            raise self.failure(
                f"step {step}: could not write the checkpoint: {why} ({runfolder.error_text(e)}); its temporary folder "
                "was removed",
                runfolder.disk_fix(e),
            ) from None
        self.progress.log(f"checkpoint: {self.last_checkpoint}")

    def failure(self, what: str, todo: str) -> TrainingError:
        """A TrainingError that names the last good checkpoint (or says there is none)."""
        if self.last_checkpoint is not None:
            where = f"Last good checkpoint: {self.last_checkpoint}."
        else:
            where = "No checkpoint was written before it (set train.save_every_steps to keep them)."
        err = TrainingError(f"{what}. {where} {todo}".strip())
        err.checkpoint = str(self.last_checkpoint) if self.last_checkpoint else None
        return err

    def _check_finite(self, when: str, consequence: str) -> None:
        """Refuse to save non-finite weights (they would be named as a good checkpoint, or shipped as final/)."""
        flags = [
            torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()
            for g in self.task.groups.values()
            for p in g.params
        ]
        bad = (~torch.stack(flags)).sum().double().reshape(1) if flags else torch.zeros(1, dtype=torch.float64)
        if self.rt.all_reduce(bad.to(self.rt.device)).item() > 0:
            raise self.failure(
                f"{when}: the weights are no longer finite (inf or NaN) after the optimizer step; {consequence}",
                "Lower train.lr (and keep train.max_grad_norm set).",
            )

    def _watch_collapse(self, step: int, group: str, grad_norm: float, loss: float) -> None:
        if grad_norm != 0.0:
            self._zero_grad.pop(group, None)
            return
        first = self._zero_grad.setdefault(group, step)
        if step - first + 1 == COLLAPSE_STEPS:
            self.progress.warn(
                f"steps {first}-{step}: the gradient norm of '{group}' was exactly 0 at every step (loss {loss:.6g}): "
                "the model has stopped learning. A loss pinned at ln(vocabulary size) means it collapsed to a uniform "
                "next-token distribution, usually from a far too high train.lr; lower it and start again."
            )

    def restore(self, path: Path) -> int:
        """Load a checkpoint into the task (modules, optimizers, data position). engine.run.train calls this
        before anything is written: a checkpoint that does not fit the recipe is a UsageError (exit 2)."""
        try:
            start, state, extra = ckpt.load_checkpoint(path, self.task.groups, self.rt.rank, self.rt.world_size)
            self.task.load_state_dict(state, extra)
        except PrefcliError:
            raise
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError, CheckpointException) as e:
            first = runfolder.error_text(e)
            raise UsageError(
                f"--resume: {path} does not fit this recipe ({first}). Resume with the recipe the run was started "
                "with (the run folder's recipe.yaml), or start a new run (--overwrite, or another --output-dir)."
            ) from None
        self.start, self.resumed_from, self.last_checkpoint = start, Path(path), Path(path)
        return start

    def save_final(self, save: Callable[[Path], None]) -> Path:
        """final/ through `save(folder)`: only from finite weights, into a temporary folder renamed when whole.
        A first SIGINT/SIGTERM while it is written lets it finish; a second one, a full disk or any other
        failure removes the partial folder and names the checkpoint to resume (which writes final/ again)."""
        self._check_finite("final/", "final/ was not written")
        todo = "Continue with the same command and --resume: it runs the final evaluation and writes final/."
        with _Signals():
            try:
                return runfolder.write_final(self.run_dir, save, self.rt.is_main)
            except KeyboardInterrupt:
                raise self._interrupted(
                    "interrupted while writing final/; the partial folder was removed", todo
                ) from None
            except (Exception, CheckpointException) as e:
                why = runfolder.disk_error(e)
                if why is None:
                    raise
                raise self.failure(
                    f"could not write final/: {why} ({runfolder.error_text(e)}); the partial folder was removed",
                    runfolder.disk_fix(
                        e,
                        "then continue with the same command and --resume: it runs the final "
                        "evaluation and writes final/.",
                    ),
                ) from None

    def _interrupted(self, what: str, todo: str) -> Interrupted:
        err = Interrupted(
            f"{what}. "
            + (
                f"Checkpoint: {self.last_checkpoint}. {todo}"
                if self.last_checkpoint
                else "No checkpoint was written (set train.save_every_steps to keep them)."
            )
        )
        err.checkpoint = str(self.last_checkpoint) if self.last_checkpoint else None
        return err

    def _evaluate(self, step: int, history: dict) -> dict:
        for g in self.task.groups.values():
            g.raw.eval()
        with torch.no_grad():
            ev = self.task.evaluate()
        for g in self.task.groups.values():
            g.raw.train()
            reshard(g.raw)  # free what the evaluation forwards gathered (fsdp)
        if ev:
            self.progress.eval(step, ev)
            history.setdefault("eval", []).append({"step": step, **ev})
            if self.monitors.active:
                save_best, self.stop_early = self.monitors.after_eval(step, ev)
                if save_best:
                    ckpt.save_checkpoint(
                        self.monitors.best_root, step, self.task.groups, self.task.state_dict(),
                        self.task.extra_tensors(), self.rt.rank, self.rt.world_size, 1, self.rt.barrier,
                        parallel=self.rt.parallel,
                    )  # fmt: skip
                if self.stop_early:
                    self.progress.log(f"early stopping at step {step}: {self.monitors.describe()['stopped_early']}")
        return ev

    def run(self, resume_from: Path | None = None, progress: Progress | None = None) -> dict:
        """Train to the end, reporting to `progress` (else the one given at construction); every failure is a
        PrefcliError naming the last good checkpoint. A collective that fails because another process died or
        stalled past runtime.timeout_s stops this one with exit 1 instead of waiting."""
        if progress is not None:
            self.progress = progress
        try:
            return self._run(resume_from)
        except (Interrupted, UsageError):
            raise
        except torch.OutOfMemoryError as e:
            raise self.out_of_memory(e) from None
        except TrainingError as e:
            if getattr(e, "checkpoint", None) is not None or "checkpoint" in str(e):
                raise
            what = str(e).rstrip(".")
            raise self.failure(what if what.startswith("step ") else f"step {self.step}: {what}", "") from None
        except KeyboardInterrupt:  # a second Ctrl-C: stop at once
            raise self._interrupted(f"interrupted at step {self.step}", "Continue with --resume.") from None
        except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
            if self.rt.distributed and isinstance(e, (RuntimeError, CheckpointException)) and is_comm_failure(e):
                raise self._collective_failure(e) from None
            why = runfolder.disk_error(e)
            if why is not None:
                raise self.failure(
                    f"step {self.step}: could not write to the run folder: {why} ({runfolder.error_text(e)})",
                    runfolder.disk_fix(e),
                ) from None
            if out_of_memory(runfolder.unwrap(e)):
                raise self.out_of_memory(runfolder.unwrap(e)) from None
            raise self.failure(
                f"step {self.step}: unexpected {runfolder.error_text(e)}",
                "This is a bug in prefcli or a library it uses: please report it with the recipe.",
            ) from None

    def out_of_memory(self, e: BaseException) -> TrainingError:
        """Out of memory during training: not a bug, a model or batch too large for the device (exit 1)."""
        where = "GPU memory" if self.rt.device.type == "cuda" else f"memory ({self.rt.device.type})"
        return self.failure(
            f"step {self.step}: out of {where} ({runfolder.error_text(e)[:200]})",
            "Lower train.batch_size (raising train.grad_accum_steps keeps the batch), set "
            "train.gradient_checkpointing: true, lower data.max_length, or shard the model over the GPUs "
            "with runtime.parallel: fsdp (docs/scaling.md).",
        )

    def _collective_failure(self, e: Exception) -> TrainingError:
        """A failed collective (another process died, lost its network or stalled past runtime.timeout_s)."""
        if isinstance(e, CheckpointException):  # DCP reports a peer's failure so; take the first rank's own error
            e = next(exc for exc, _trace in e.failures.values() if is_comm_failure(exc))
        cause = str(e).strip().splitlines()[0].split(". This is typically")[0][:300]  # gloo appends advice
        return self.failure(
            f"step {self.step}: a collective operation across the {self.rt.world_size} processes failed: {cause}. "
            "Another process died, lost its network or stalled for longer than "
            f"runtime.timeout_s={self.rt.timeout_s:g} s; this one stops instead of waiting",
            "Once every node is up again, continue with the same command and --resume.",
        )

    def _run(self, resume_from: Path | None = None) -> dict:
        """Start (or resume), train step after step until the task's last one, then checkpoint and evaluate the
        last step. The steps of one iteration: take the task's next Plan, `_optimizer_step` it, `_record` it,
        then the evaluation and checkpoint cadence and the signals."""
        task, train = self.task, self.train
        total = task.total_steps()
        plans = self._start(resume_from)
        start = step = self.start
        self.step = start + 1
        history: dict[str, list] = {}
        last: dict[str, float] = {}
        step_times: list[float] = []
        tok_rates: list[float] = []
        t_run = time.perf_counter()
        with _Signals() as sig:
            if train.eval_on_start and start == 0 and task.has_eval():
                last.update(self._evaluate(0, history))
            while step < total:
                t0 = time.perf_counter()
                self.step = step + 1  # a failure while the task prepares the step belongs to it
                try:
                    plan = next(plans)
                except StopIteration:
                    break
                step += 1
                done = self._optimizer_step(step, plan, sig)
                dt = time.perf_counter() - t0
                record = self._record(plan, done, dt)
                if done.tokens and step > start + 2:  # skip warm-up steps in the summary medians
                    tok_rates.append(done.tokens / dt)
                    step_times.append(dt)
                record["time_s"] = time.perf_counter() - t_run
                last.update(record)
                self.progress.step(step, record)
                if train.eval_every_steps and step % train.eval_every_steps == 0 and step < total and task.has_eval():
                    last.update(self._evaluate(step, history))
                interrupted = done.stop and not self.stop_early
                if (train.save_every_steps and step % train.save_every_steps == 0) or interrupted:
                    self._checkpoint(step)
                if interrupted:
                    self.progress.close()
                    raise self._interrupted(
                        f"interrupted at step {step}", "Continue with the same command and --resume."
                    )
                if self.stop_early:
                    break
            self.step = step  # the final evaluation and checkpoint belong to the last step
            self._finish(step, history, last, sig)
        perf = {
            "tokens_per_s": _median(tok_rates),
            "step_s": _median(step_times),
            "peak_mem_gib": self.rt.peak_memory_gib(),
        }
        return {
            "status": "completed",
            "steps": step,
            "total_steps": total,
            "final": last,
            "perf": perf,
            "wall_s": time.perf_counter() - t_run,
            "history": history,
            "memory": self._memory_summary(),
            **self.monitors.describe(),
        }

    def _start(self, resume_from: Path | None):
        """Restore a resumed checkpoint (weights, optimizer, monitors, random state), put the groups in training
        mode, log their memory; returns the task's iterator of Plans from the step training starts after."""
        rt, task = self.rt, self.task
        if resume_from is not None and self.resumed_from != Path(resume_from):
            self.restore(resume_from)
        if resume_from is not None:
            self.monitors.replay(self.run_dir / "metrics.jsonl", self.start)
            self.progress.log(f"resumed from {resume_from} (step {self.start})")
        plans = task.plans(self.start)
        if resume_from is not None:
            ckpt.restore_rng(resume_from, rt.rank)
        self.n_params = {n: sum(p.numel() for p in g.raw.parameters()) for n, g in task.groups.items()}
        for name, g in task.groups.items():
            g.raw.train()
            m = g.memory()
            self.progress.log(
                f"memory of '{name}' on each of {rt.world_size} process(es) ({rt.parallel}): parameters "
                f"{_mib(m['params'])}, gradients {_mib(m['grads'])}, optimizer state {_mib(m['optim'])} (rank 0)"
            )
        return plans

    def _optimizer_step(self, step: int, plan, sig: _Signals) -> _Step:
        """One optimizer step of `plan`: the loss of every micro-batch weighted over the global batch, backward
        (gradients synchronised on the last micro-batch), the gradient norm (clipped), the NaN/inf guard before
        the update, the update; the loss, norm, token count, metrics and any stop request reduced across ranks
        in one call."""
        rt = self.rt
        group = self.task.groups[plan.group]
        lr = group.set_lr()
        n_local = float(sum(float(m.n) for m in plan.micro))
        tokens_local = sum(m.tokens for m in plan.micro)
        if rt.distributed:
            head = rt.all_reduce(torch.tensor([n_local], dtype=torch.float64, device=rt.device))
            n_global = float(head.item())
        else:
            n_global = n_local  # no device round trip
        if n_global <= 0:
            raise TrainingError(f"step {step}: the batch has no units to train on (e.g. no completion tokens)")
        scale = rt.world_size / n_global  # DDP averages gradients over ranks
        metrics = Metrics()
        loss_local = torch.zeros((), dtype=torch.float64, device=rt.device)
        for i, m in enumerate(plan.micro):
            sync = i == len(plan.micro) - 1
            with contextlib.nullcontext() if sync else group.no_sync():
                loss_sum, mets = plan.loss_fn(group.module, m.batch)
                (loss_sum * scale).backward()
            loss_local += loss_sum.detach().double()
            metrics.merge(mets)
        gnorm = group.grad_norm()
        if group.fused:
            # The fused AdamW kernel skips the update when found_inf is set, so the step can be
            # launched before the host reads the norm: a non-finite gradient never reaches the
            # weights, and the GPU need not drain first. (The norm is the same on every rank.)
            group.optimizer.found_inf = (~torch.isfinite(gnorm)).float().reshape(())  # 0-d, as GradScaler
            group.optimizer.step()
        reduced, (loss_sum_g, tokens_g, stop_flag, gn) = metrics.reduce(
            rt,
            [loss_local, float(tokens_local), float(sig.requested), gnorm.detach().double() / rt.world_size],
        )
        loss = loss_sum_g / n_global
        if not math.isfinite(loss) or not math.isfinite(gn):
            what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {gn}"
            group.optimizer.zero_grad(set_to_none=True)
            raise self.failure(
                f"step {step}: {what}; stopped before the optimizer step",
                "Lower train.lr, set train.max_grad_norm, or check the data.",
            )
        if not group.fused:
            group.optimizer.step()
        if plan.group not in self.memory:  # gradients and optimizer state exist now: measure them
            self.memory[plan.group] = group.memory()
        group.optimizer.zero_grad(set_to_none=True)
        group.updates += 1
        self._watch_collapse(step, plan.group, gn, loss)
        return _Step(loss=loss, grad_norm=gn, lr=lr, tokens=tokens_g, stop=stop_flag > 0, metrics=reduced)

    def _record(self, plan, done: _Step, dt: float) -> dict[str, Any]:
        """The step's line of metrics.jsonl (less time_s): the loss, the reduced metrics, the plan's own, the
        learning rate and gradient norm (per group when there are several), throughput and memory."""
        rt, multi = self.rt, len(self.task.groups) > 1
        record: dict[str, Any] = {f"loss/{plan.name or plan.group}": done.loss}
        record.update(done.metrics)
        record.update(plan.metrics)
        record[f"lr/{plan.group}" if multi else "lr"] = done.lr
        record[f"grad_norm/{plan.group}" if multi else "grad_norm"] = done.grad_norm
        record["perf/step_s"] = dt
        if done.tokens:
            record["perf/tokens_per_s"] = done.tokens / dt
            if self.peak_flops:
                record["perf/mfu"] = (
                    6 * self.n_params[plan.group] * (done.tokens / dt) / (self.peak_flops * rt.world_size)
                )
        mem = rt.peak_memory_gib()
        if mem is not None:
            record["perf/mem_gib"] = mem
        return record

    def _finish(self, step: int, history: dict, last: dict, sig: _Signals) -> None:
        """After the last step: its checkpoint, then the final evaluation; a signal that came during them
        checkpoints (if not yet) and stops with exit 130."""

        def saved() -> bool:
            return self.last_checkpoint is not None and self.last_checkpoint.name == f"step-{step}"

        # The last step's checkpoint is written before the final evaluation: a run stopped from here on
        # (signal, kill, full disk while writing final/) resumes at the last step, and such a resume trains
        # nothing but still runs the final evaluation and writes final/. A run stopped early was evaluated
        # at the step it stopped.
        if self.train.save_every_steps and step > self.start and not saved():
            self._checkpoint(step)
        if self.task.has_eval() and not self.stop_early:
            last.update(self._evaluate(step, history))
        rt = self.rt
        stop = rt.all_reduce(torch.tensor([float(sig.requested)], dtype=torch.float64, device=rt.device))
        if stop.item() > 0:  # SIGINT/SIGTERM during the final evaluation
            if not saved():
                self._checkpoint(step)
            self.progress.close()
            raise self._interrupted(
                f"interrupted after the last step ({step})",
                "Continue with the same command and --resume: it runs the final evaluation and writes final/.",
            )
