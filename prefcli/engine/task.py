"""What a Task hands the loop (engine/loop.py): a `Plan` per optimizer step, made of `Micro`-batches, for
one trained `Group` (a module with its AdamW optimizer and learning-rate schedule, `lr_factor`)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from ..errors import TrainingError
from ..recipe.sections import TrainSection
from .dist import Runtime, gathered, local_bytes, reshard


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
    """What the loop runs (docs/engine.md, "The Task protocol"); a command's `build(ctx)` makes one."""

    groups: dict[str, Group]  # the trained modules, by name

    def total_steps(self) -> int: ...  # optimizer steps of the run
    def plans(self, start_step: int) -> Iterator[Plan]: ...  # one Plan per optimizer step
    def state_dict(self) -> dict: ...  # its JSON-able position (data cursor, rollouts, ...)
    def load_state_dict(self, state: dict, extra: dict[str, torch.Tensor]) -> None: ...
    def extra_tensors(self) -> dict[str, torch.Tensor]: ...  # tensors a checkpoint keeps besides the modules
    def has_eval(self) -> bool: ...
    def evaluate(self) -> dict[str, float]: ...  # held-out metrics, reduced across processes
    def describe(self) -> dict: ...  # data and model counts for the summary
    def startup_check(self) -> None: ...  # the start-up guard on the first batch, before anything is written
    def save_final(self, out_dir: Path) -> None: ...  # Hugging Face format


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
    """A trained module with its AdamW optimizer and schedule. `rt.wrap` gives it its strategy first
    (DDP-wrapped, or FSDP2-sharded in place under runtime.parallel fsdp), then the optimizer is made over
    the parameters as they are after wrapping."""

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
        self.rt = rt
        self.raw = module
        self.train_cfg = train
        self.total_steps = total_steps  # of this group's own updates (its schedule's length)
        self.updates = 0  # optimizer steps taken by this group; saved in checkpoints
        self.peak_lr = lr if lr is not None else train.lr
        if not any(p.requires_grad for p in module.parameters()):
            raise TrainingError(f"'{name}' has no trainable parameters")
        # Sharding replaces every parameter by a new one (a DTensor holding this process's shard): keep the
        # caller's parameter groups by name and find them again afterwards.
        names = {id(p): n for n, p in module.named_parameters()}
        named_groups = (
            None
            if param_groups is None
            else [{**g, "params": [names[id(p)] for p in g["params"]]} for g in param_groups]
        )
        self.module: nn.Module = rt.wrap(module)
        by_name = dict(module.named_parameters())
        params = [p for p in module.parameters() if p.requires_grad]
        if named_groups is None:
            decay = [p for p in params if p.ndim >= 2]
            no_decay = [p for p in params if p.ndim < 2]
            param_groups = [
                {"params": decay, "weight_decay": train.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ]
            param_groups = [g for g in param_groups if g["params"]]
        else:
            param_groups = [{**g, "params": [by_name[n] for n in g["params"]]} for g in named_groups]
        for g in param_groups:
            g.setdefault("lr_scale", 1.0)
            g["lr"] = self.peak_lr * g["lr_scale"]
        kw = dict(lr=self.peak_lr, betas=tuple(train.adam_betas), eps=train.adam_eps)
        try:  # fused AdamW (CUDA and CPU, plain and DTensor parameters): one kernel, and it honours found_inf
            self.optimizer = torch.optim.AdamW(param_groups, fused=True, **kw)
            self.fused = True
        except (RuntimeError, ValueError):  # a device or dtype without the fused kernel
            self.optimizer = torch.optim.AdamW(param_groups, foreach=True, **kw)
            self.fused = False
        self.params = params
        self.warmup = train.warmup_steps if train.warmup_steps is not None else int(train.warmup_ratio * total_steps)

    def set_lr(self) -> float:
        """Set the LR of this group's next update from its own update count: in a task with several groups
        (the GAN's generator and discriminator alternate), each schedule runs on its own clock, not the loop's."""
        step = self.updates + 1
        f = lr_factor(step, self.total_steps, self.warmup, self.train_cfg.lr_schedule, self.train_cfg.min_lr_ratio)
        for g in self.optimizer.param_groups:
            g["lr"] = self.peak_lr * g.get("lr_scale", 1.0) * f
        return self.peak_lr * f

    def no_sync(self):
        """Accumulate gradients without communication (DDP). FSDP reduce-scatters every micro-batch instead:
        skipping it would keep whole, unsharded gradients between micro-batches, the memory sharding saves."""
        return self.module.no_sync() if hasattr(self.module, "no_sync") else contextlib.nullcontext()

    def gathered(self, modules=None, hold: bool = False):
        """Whole weights for code that reads them outside the module's forward (the samplers), see
        engine.dist.gathered; a no-op unless sharded."""
        return gathered(self.raw, self.rt, modules, hold)

    def grad_norm(self) -> torch.Tensor:
        """The global gradient norm (over all processes' shards under FSDP), clipped to max_grad_norm when set."""
        norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        if isinstance(norm, DTensor):  # sharded gradients: a partial norm per process, reduced here
            norm = norm.full_tensor()
        if self.train_cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(self.params, self.train_cfg.max_grad_norm, norm)
        return norm

    def memory(self) -> dict[str, int]:
        """Bytes this process holds for this group: all parameters (frozen ones too), the gradients of the
        trainable ones and the optimizer state (measured once they exist, until then what AdamW will hold:
        two moments per trainable parameter, in its dtype)."""
        reshard(self.raw)
        params = sum(local_bytes(p) for p in self.raw.parameters())
        trainable = sum(local_bytes(p) for p in self.params)
        grads = sum(local_bytes(p.grad) for p in self.params if p.grad is not None)
        state = [t for st in self.optimizer.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
        optim = sum(local_bytes(t) for t in state) if state else 2 * trainable
        return {"params": params, "grads": grads or trainable, "optim": optim}
