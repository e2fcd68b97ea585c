"""Plumbing shared by the training tasks: reading the train and held-out splits, reporting skipped rows,
the per-step data cursor (`Scheduled`), reference log-probs computed once across ranks."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch

from ..engine.data import (
    DataCursor,
    load_rows,
    shard_for_rank,
    split_eval,
    split_micro,
)
from ..engine.formats import convert_rows, outside_format
from ..engine.task import Micro, Plan
from ..engine.users import find_user_column, missing_user_column, read_users, split_users
from ..errors import DataError


def load_splits(d, required: Sequence[str], seed: int, pairs: bool = False):
    """(train rows, held-out rows or None, the outside format read or None) of a PreferenceData section. With
    `pairs`, rows in a format people already have (ShareGPT, Alpaca, OpenAI's: engine/formats.py; detected, or
    named by data.format) are read as chat pairs (prompt, chosen, rejected message lists) first. Held-out users
    (data.eval_users, data.eval_user_fraction) leave the training rows and join the held-out rows."""

    def read(src, what: str):
        if not pairs:
            return load_rows(src, required=required, what=what), None
        rows = load_rows(src, what=what)
        outside = outside_format(rows.column_names, d.format, "pairs")
        if outside is not None:
            rows = convert_rows(rows, outside, "pairs", src.path, what)
        missing = [c for c in required if c not in rows.column_names]
        if missing:
            raise DataError(
                f"{what}: {src.path}: missing column(s) {', '.join(missing)} (columns: {', '.join(rows.column_names)});"
                " map yours with data.<split>.columns, e.g. {prompt: question}, or give rows in a format prefcli "
                "reads (sharegpt, alpaca, openai: data.format)"
            )
        return rows, outside

    train, read_as = read(d.train, "data.train")
    held = None
    if getattr(d, "eval_users", None) or getattr(d, "eval_user_fraction", 0) > 0:
        col = find_user_column(train.column_names, d.user_column)
        if col is None:
            raise missing_user_column(
                "data.train", d.train.path, train.column_names, d.user_column, "holding users out (data.eval_users)"
            )
        users = read_users(train, col, d.train.path, "data.train")
        train, held, _ = split_users(train, users, d.eval_users, d.eval_user_fraction, seed, d.train.path)
    ev = None
    if d.eval is not None:
        ev, _ = read(d.eval, "data.eval")
    elif d.eval_fraction > 0:
        train, ev = split_eval(train, d.eval_fraction, seed)
    if held is not None:
        ev = held if ev is None else join_rows(ev, held)
    return train, ev, read_as


def join_rows(ev, held):
    """The held-out rows followed by the held-out users' rows, on the columns both have."""
    import datasets

    cols = [c for c in ev.column_names if c in held.column_names]
    try:
        a = ev.select_columns(cols)
        return datasets.concatenate_datasets([a, held.select_columns(cols).cast(a.features)])
    except (ValueError, TypeError) as e:
        raise DataError(
            f"data.eval: its rows and the held-out users' training rows hold different value types: "
            f"{str(e).splitlines()[0]}"
        ) from None


def report(ctx, name: str, source: str, s, max_length: int, what: str, expected: str) -> None:
    """Warn about skipped and truncated rows; refuse to start (exit 2) when no row is usable."""
    if s is None:
        return
    if s.bad.total:
        ctx.warn(f"{name}: {source}: skipped {s.bad.total} of {s.n_rows} rows: {s.bad.describe(max_length, what)}")
    if getattr(s, "n_truncated", 0):
        ctx.warn(
            f"{name}: {s.n_truncated} of {len(s)} usable rows were longer than max_length={max_length} tokens and "
            "were truncated"
        )
    if len(s) == 0:
        why = f" ({s.bad.describe(max_length, what)})" if s.bad.total else ""
        raise DataError(f"{name}: {source}: no usable row left of {s.n_rows}{why}; expected {expected}")


class Scheduled:
    """A task whose optimizer steps each take `global_batch` examples of one training set: its data
    cursor (exact resume), the split of a step into this rank's micro-batches, and the Task protocol's
    defaults for a task whose only state is that cursor and whose held-out set is `self.eval_set`."""

    def setup_schedule(self, n: int, train, data_shuffle: bool, world: int) -> None:
        self.global_batch = train.batch_size * train.grad_accum_steps * world
        if n < world:
            raise DataError(f"data.train: {n} usable rows cannot feed {world} processes")
        if self.global_batch > n:
            procs = f" x {world} processes" if world > 1 else ""
            self.ctx.warn(
                f"train.batch_size x train.grad_accum_steps{procs} = {self.global_batch} is more than the {n} "
                f"training examples: every step takes all {n}. Lower train.batch_size to at most {n}"
            )
        self.cursor = DataCursor(n, self.global_batch, train.seed, data_shuffle, min_items=world)
        spe = self.cursor.steps_per_epoch()
        self._total = train.max_steps if train.max_steps is not None else max(1, math.ceil((train.epochs or 1.0) * spe))

    def total_steps(self) -> int:
        return self._total

    def micro_parts(self, items: list[int], lengths: Callable[[list[int]], list[int]] | None = None) -> list[list[int]]:
        """This rank's share of a step's items in up to grad_accum_steps micro-batches (sorted by length
        first when `lengths` gives each item's length, so that micro-batches pad less)."""
        rt = self.rt
        mine = shard_for_rank(items, rt.rank, rt.world_size)
        n_micro = max(1, min(self.cfg.train.grad_accum_steps, len(items) // rt.world_size))
        return split_micro(mine, n_micro, lengths(mine) if lengths is not None else None)

    def check_kernels(self, policy, collate: Callable[[list[int]], dict]) -> None:
        """The start-up guard (engine.guard): prefcli's log-prob kernel against the model's own forward on the first
        step's first micro-batch, collated as training collates it (packed rows, padding). Exit 2 on a difference
        beyond the tolerance, or the model's own forward with model.on_mismatch: fallback. A task's
        `startup_check()` calls it; engine.run.train calls that once the recipe's limits are checked."""
        from ..engine.guard import check_logprobs

        batch = collate(self.micro_parts(self.cursor.peek())[0])
        check_logprobs(policy, batch, self.cfg.model.on_mismatch, self.ctx.warn, rt=self.rt, what="the first batch")

    def startup_check(self) -> None:
        """The Task protocol's start-up guard: nothing to compare for a task whose loss reads no causal LM's
        log-probs (a reward model's scores, an encoder's embeddings); the tasks that do call `check_kernels`."""

    def step_items(self) -> Iterator[list[int]]:
        while True:
            yield self.cursor.next()

    def state_dict(self) -> dict:
        return self.cursor.state()

    def load_state_dict(self, state: dict, extra: dict) -> None:
        self.cursor.load(state, self.ctx.warn)

    def extra_tensors(self) -> dict:
        return {}

    def has_eval(self) -> bool:
        eval_set = getattr(self, "eval_set", None)
        return eval_set is not None and len(eval_set) > 0

    def describe_data(self, rows: str, model, objective: dict) -> dict:
        """The summary's data/model/objective blocks of a preference task: row counts of its train set
        (`self.train_set`, with bad-row and truncation counts) and held-out set, parameter counts."""
        s = self.train_set
        data = {"format": self.format, "rows": rows, "train_rows": s.n_rows, "train_examples": len(s),
                "skipped": s.bad.as_dict(), "truncated": s.n_truncated}  # fmt: skip
        if hasattr(s, "n_tokens"):
            data["train_tokens"] = s.n_tokens()
        data["eval_examples"] = len(self.eval_set) if self.eval_set is not None else 0
        data["debias"] = getattr(self, "debias", None)  # what data.debias removed or reweighted
        if getattr(self, "read_as", None):  # rows of another tool's format (sharegpt, alpaca, openai)
            data["read_as"] = self.read_as
        return {
            "data": data,
            "model": {
                "parameters": sum(p.numel() for p in model.parameters()),
                "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            },
            "objective": objective,
        }


def sharded_fill(n: int, batch_size: int, rt, fn: Callable[[list[int]], torch.Tensor], width: int = 1) -> torch.Tensor:
    """Compute fn(indices) -> (len(indices), width) for all n examples, split across ranks, gathered
    by an all-reduce (every rank ends with the whole table). Used for reference log-probs."""
    out = torch.zeros(n, width, dtype=torch.float64, device=rt.device)
    mine = shard_for_rank(list(range(n)), rt.rank, rt.world_size)
    for s in range(0, len(mine), batch_size):
        idx = mine[s : s + batch_size]
        out[idx] = fn(idx).double().reshape(len(idx), width)
    rt.all_reduce(out)
    return out.float().cpu()


def make_plan(group: str, name: str, micro: list[Micro], loss_fn, metrics: dict | None = None) -> Plan:
    return Plan(group=group, micro=micro, loss_fn=loss_fn, name=name, metrics=metrics or {})
