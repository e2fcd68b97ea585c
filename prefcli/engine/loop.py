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
- a NaN/inf guard that stops before the optimizer step (exit 1, naming the step);
- eval and checkpoint cadence; exact resume; SIGINT/SIGTERM -> checkpoint -> exit 130;
- metrics reduced across ranks, progress on rank 0.
"""

from __future__ import annotations

import contextlib
import math
import signal
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from ..errors import Interrupted, TrainingError
from ..recipe.sections import TrainSection
from . import checkpoint as ckpt
from .dist import Runtime
from .monitor import Monitors
from .progress import Progress

# bf16 dense matmul rate measured on the device (docs/performance.md) or the vendor's dense figure,
# used as the MFU denominator. Unknown devices report no MFU.
PEAK_FLOPS = {"H200": 790e12, "H100": 790e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12}


@dataclass
class Micro:
    batch: Any
    n: float  # loss units: tokens with a target, pairs, sequences ... the normaliser
    tokens: int = 0  # tokens pushed through the model (throughput)


@dataclass
class Plan:
    group: str
    micro: list[Micro]
    loss_fn: Callable[[nn.Module, Any], tuple[torch.Tensor, dict]]
    name: str | None = None  # metric name: loss/<name>; defaults to the group
    metrics: dict[str, float] = field(default_factory=dict)  # already-reduced step metrics (rollout stats ...)


class Task(Protocol):
    groups: dict[str, Group]

    def total_steps(self) -> int: ...
    def plans(self, start_step: int) -> Iterator[Plan]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict, extra: dict[str, torch.Tensor]) -> None: ...
    def extra_tensors(self) -> dict[str, torch.Tensor]: ...
    def evaluate(self) -> dict[str, float]: ...
    def has_eval(self) -> bool: ...
    def save_final(self, out_dir: Path) -> None: ...


def lr_factor(step: int, total: int, warmup: int, kind: str, min_ratio: float) -> float:
    """Multiplier of the peak LR for optimizer step `step` (1-based)."""
    i = step - 1
    if warmup > 0 and i < warmup:
        return (i + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (i - warmup) / max(1, total - warmup))
    if kind == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class Group:
    """A trained module with its AdamW optimizer and schedule (DDP-wrapped under torchrun)."""

    def __init__(
        self,
        name: str,
        module: nn.Module,
        rt: Runtime,
        train: TrainSection,
        total_steps: int,
        lr: float | None = None,
        param_groups: list[dict] | None = None,
    ):
        self.name = name
        self.raw = module
        self.train_cfg = train
        self.total_steps = total_steps  # of this group's own updates (its schedule's length)
        self.updates = 0  # optimizer steps taken by this group; saved in checkpoints
        self.peak_lr = lr if lr is not None else train.lr
        params = [p for p in module.parameters() if p.requires_grad]
        if not params:
            raise TrainingError(f"'{name}' has no trainable parameters")
        if param_groups is None:
            decay = [p for p in params if p.ndim >= 2]
            no_decay = [p for p in params if p.ndim < 2]
            param_groups = [
                {"params": decay, "weight_decay": train.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ]
            param_groups = [g for g in param_groups if g["params"]]
        for g in param_groups:
            g.setdefault("lr_scale", 1.0)
            g["lr"] = self.peak_lr * g["lr_scale"]
        on_cuda = rt.device.type == "cuda"
        kw = dict(lr=self.peak_lr, betas=tuple(train.adam_betas), eps=train.adam_eps)
        try:  # fused AdamW (CUDA and CPU): one kernel, and it honours found_inf (see the loop)
            self.optimizer = torch.optim.AdamW(param_groups, fused=True, **kw)
            self.fused = True
        except (RuntimeError, ValueError):  # a device or dtype without the fused kernel
            self.optimizer = torch.optim.AdamW(param_groups, foreach=True, **kw)
            self.fused = False
        self.params = params
        self.warmup = train.warmup_steps if train.warmup_steps is not None else int(train.warmup_ratio * total_steps)
        self.module: nn.Module = module
        if rt.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.module = DDP(module, device_ids=[rt.device.index] if on_cuda else None)

    def set_lr(self) -> float:
        """Set the LR of this group's next update from its own update count: in a task with several groups
        (the GAN's generator and discriminator alternate), each schedule runs on its own clock, not the loop's."""
        step = self.updates + 1
        f = lr_factor(step, self.total_steps, self.warmup, self.train_cfg.lr_schedule, self.train_cfg.min_lr_ratio)
        for g in self.optimizer.param_groups:
            g["lr"] = self.peak_lr * g.get("lr_scale", 1.0) * f
        return self.peak_lr * f

    def no_sync(self):
        return self.module.no_sync() if hasattr(self.module, "no_sync") else contextlib.nullcontext()


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


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


class Engine:
    def __init__(self, task: Task, rt: Runtime, train: TrainSection, progress: Progress, run_dir: Path):
        self.task = task
        self.rt = rt
        self.train = train
        self.progress = progress
        self.run_dir = Path(run_dir)
        self.last_checkpoint: Path | None = None
        self.monitors = Monitors(train, run_dir)  # keep_best, early_stopping: decided at each evaluation
        self.stop_early = False
        self.peak_flops = None
        if rt.device.type == "cuda":
            name = torch.cuda.get_device_name(rt.device)
            self.peak_flops = next((v for k, v in PEAK_FLOPS.items() if k in name), None)

    def _checkpoint(self, step: int) -> None:
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
        )
        self.progress.log(f"checkpoint: {self.last_checkpoint}")

    def _evaluate(self, step: int, history: dict) -> dict:
        for g in self.task.groups.values():
            g.raw.eval()
        with torch.no_grad():
            ev = self.task.evaluate()
        for g in self.task.groups.values():
            g.raw.train()
        if ev:
            self.progress.eval(step, ev)
            history.setdefault("eval", []).append({"step": step, **ev})
            if self.monitors.active:
                save_best, self.stop_early = self.monitors.after_eval(step, ev)
                if save_best:
                    ckpt.save_checkpoint(
                        self.monitors.best_root, step, self.task.groups, self.task.state_dict(),
                        self.task.extra_tensors(), self.rt.rank, self.rt.world_size, 1, self.rt.barrier,
                    )  # fmt: skip
                if self.stop_early:
                    self.progress.log(f"early stopping at step {step}: {self.monitors.describe()['stopped_early']}")
        return ev

    def run(self, resume_from: Path | None = None) -> dict:
        rt, task, train = self.rt, self.task, self.train
        total = task.total_steps()
        start = 0
        if resume_from is not None:
            start, state, extra = ckpt.load_checkpoint(resume_from, task.groups, rt.rank)
            task.load_state_dict(state, extra)
            self.last_checkpoint = resume_from
            self.monitors.replay(self.run_dir / "metrics.jsonl", start)
            self.progress.log(f"resumed from {resume_from} (step {start})")
        plans = task.plans(start)
        if resume_from is not None:
            ckpt.restore_rng(resume_from, rt.rank)
        for g in task.groups.values():
            g.raw.train()
        history: dict[str, list] = {}
        last: dict[str, float] = {}
        step_times: list[float] = []
        tok_rates: list[float] = []
        step = start
        n_params = {n: sum(p.numel() for p in g.raw.parameters()) for n, g in task.groups.items()}
        t_run = time.perf_counter()
        with _Signals() as sig:
            if train.eval_on_start and start == 0 and task.has_eval():
                last.update(self._evaluate(0, history))
            while step < total:
                t0 = time.perf_counter()
                try:
                    plan = next(plans)
                except StopIteration:
                    break
                step += 1
                group = task.groups[plan.group]
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
                if group.train_cfg.max_grad_norm is not None:
                    gnorm = torch.nn.utils.clip_grad_norm_(group.params, group.train_cfg.max_grad_norm)
                else:
                    gnorm = torch.nn.utils.get_total_norm([p.grad for p in group.params if p.grad is not None])
                if group.fused:
                    # The fused AdamW kernel skips the update when found_inf is set, so the step can be
                    # launched before the host reads the norm: a non-finite gradient never reaches the
                    # weights, and the GPU need not drain first. (The norm is the same on every rank.)
                    group.optimizer.found_inf = (~torch.isfinite(gnorm)).float().reshape(())  # 0-d, as GradScaler
                    group.optimizer.step()
                reduced, (loss_sum_g, tokens_g, stop_flag, gn) = metrics.reduce(
                    rt, [loss_local, float(tokens_local), float(sig.requested), gnorm.detach().double() / rt.world_size]
                )
                loss = loss_sum_g / n_global
                if not math.isfinite(loss) or not math.isfinite(gn):
                    what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {gn}"
                    where = (
                        f"; last good checkpoint: {self.last_checkpoint}"
                        if self.last_checkpoint
                        else " (no checkpoint was written before it)"
                    )
                    group.optimizer.zero_grad(set_to_none=True)
                    raise TrainingError(
                        f"step {step}: {what}; stopped before the optimizer step{where}. "
                        "Lower train.lr, set train.max_grad_norm, or check the data."
                    )
                if not group.fused:
                    group.optimizer.step()
                group.optimizer.zero_grad(set_to_none=True)
                group.updates += 1
                dt = time.perf_counter() - t0
                name = plan.name or plan.group
                multi = len(task.groups) > 1
                record: dict[str, Any] = {f"loss/{name}": loss}
                record.update(reduced)
                record.update(plan.metrics)
                record[f"lr/{plan.group}" if multi else "lr"] = lr
                record[f"grad_norm/{plan.group}" if multi else "grad_norm"] = gn
                record["perf/step_s"] = dt
                if tokens_g:
                    record["perf/tokens_per_s"] = tokens_g / dt
                    if step > start + 2:  # skip warm-up steps in the summary medians
                        tok_rates.append(tokens_g / dt)
                        step_times.append(dt)
                    if self.peak_flops:
                        record["perf/mfu"] = (
                            6 * n_params[plan.group] * (tokens_g / dt) / (self.peak_flops * rt.world_size)
                        )
                mem = rt.peak_memory_gib()
                if mem is not None:
                    record["perf/mem_gib"] = mem
                record["time_s"] = time.perf_counter() - t_run
                last.update(record)
                self.progress.step(step, record)
                if train.eval_every_steps and step % train.eval_every_steps == 0 and step < total and task.has_eval():
                    last.update(self._evaluate(step, history))
                interrupted = stop_flag > 0 and not self.stop_early
                if (train.save_every_steps and step % train.save_every_steps == 0) or interrupted:
                    self._checkpoint(step)
                if interrupted:
                    self.progress.close()
                    raise Interrupted(
                        f"interrupted at step {step}; checkpoint written to {self.last_checkpoint}. "
                        "Continue with the same command and --resume."
                    )
                if self.stop_early:
                    break
            if (step > start or resume_from is None) and not self.stop_early:
                if task.has_eval():
                    last.update(self._evaluate(step, history))
            if (
                train.save_every_steps
                and step > start
                and (self.last_checkpoint is None or not str(self.last_checkpoint).endswith(f"step-{step}"))
            ):
                self._checkpoint(step)
        perf = {"tokens_per_s": _median(tok_rates), "step_s": _median(step_times), "peak_mem_gib": rt.peak_memory_gib()}
        return {
            "status": "completed",
            "steps": step,
            "total_steps": total,
            "final": last,
            "perf": perf,
            "wall_s": time.perf_counter() - t_run,
            "history": history,
            **self.monitors.describe(),
        }
