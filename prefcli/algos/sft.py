"""`prefcli sft`: supervised fine-tuning and pretraining from scratch.

Objective (registry `OBJECTIVES`, chosen by `sft.objective`):

- `mle`: next-token cross-entropy, summed over target tokens and divided by the number of target
  tokens in the whole accumulated global batch (the loop does the division):
      L = -(1/N) sum_t log p(x_t | x_<t)     (Radford et al. 2018; Bengio et al. 2003)

Held-out perplexity: PPL = exp(sum of target-token NLL / number of target tokens), accumulated as
sums over the whole held-out set (not a mean of batch means).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..engine.data import (FORMAT_COLUMNS, StepSchedule, detect_format, iterate_eval, load_rows,
                           move, pack_rows, packed_batch, pad_batch, shard_for_rank, split_eval, split_micro,
                           tokenize_sft, unpad_if_full)
from ..engine.loop import Group, Micro, Plan
from ..engine.models import PolicyLM, apply_lora, build_causal_lm, load_tokenizer, save_hf, trainable_parameters
from ..errors import DataError
from ..runner import RunContext


def mle_loss(model, batch) -> tuple[torch.Tensor, dict]:
    """Summed next-token cross-entropy over positions with a target (see module docstring)."""
    loss_sum = model(batch["input_ids"], batch["targets"], batch["attention_mask"], batch["position_ids"], mode="ce")
    return loss_sum, {}


OBJECTIVES: dict[str, Callable] = {
    "mle": mle_loss,
}


def count_targets(batch: dict) -> int:
    return int((batch["targets"] != -100).sum())


class SFTTask:
    def __init__(self, ctx: RunContext):
        r = ctx.recipe
        self.ctx = ctx
        self.rt = rt = ctx.rt
        self.cfg = r
        d = r.data
        self.tok = tok = load_tokenizer(r.model)
        train_rows = load_rows(d.train, what="data.train")
        self.format = fmt = detect_format(train_rows.column_names, d.format)
        missing = [c for c in FORMAT_COLUMNS[fmt] if c not in train_rows.column_names]
        if missing:
            raise DataError(f"data.train: {d.train.path}: format '{fmt}' needs column(s) {', '.join(missing)} "
                            f"(columns: {', '.join(train_rows.column_names)})")
        eval_rows = None
        if d.eval is not None:
            eval_rows = load_rows(d.eval, required=FORMAT_COLUMNS[fmt], what="data.eval")
        elif d.eval_fraction > 0:
            train_rows, eval_rows = split_eval(train_rows, d.eval_fraction, r.train.seed)
        enc = dict(fmt=fmt, max_length=d.max_length, mask_prompt=d.mask_prompt and fmt != "text", add_eos=d.add_eos)
        self.train_set = tokenize_sft(train_rows, tok, source=d.train.path, **enc)
        self.eval_set = tokenize_sft(eval_rows, tok, source=(d.eval.path if d.eval else d.train.path), **enc) \
            if eval_rows is not None else None
        if len(self.train_set) == 0:
            raise DataError(f"data.train: {d.train.path}: no example has a token to train on after masking and "
                            f"truncation to max_length={d.max_length} (prompts longer than max_length?)")
        for name, s in (("data.train", self.train_set), ("data.eval", self.eval_set)):
            if s is not None and s.n_truncated:
                ctx.warn(f"{name}: {s.n_truncated} of {s.n_rows} examples were longer than max_length={d.max_length} "
                         "tokens and were truncated")
            if s is not None and s.n_dropped:
                ctx.warn(f"{name}: {s.n_dropped} of {s.n_rows} examples had no trainable token left and were dropped")

        lm = build_causal_lm(r.model, tok, rt, seed=r.train.seed, smoke=ctx.smoke)
        if r.train.gradient_checkpointing:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            lm.config.use_cache = False
        if r.model.lora is not None:
            lm = apply_lora(lm, r.model.lora)
        self.lm = lm
        self.policy = PolicyLM(lm, rt)
        self.loss_fn = OBJECTIVES[r.sft.objective]

        t = r.train
        self.global_batch = t.batch_size * t.grad_accum_steps * rt.world_size
        if d.packing:
            order = StepSchedule(len(self.train_set), 1, t.seed, d.shuffle).order(0)
            self.rows = pack_rows(order, self.train_set, d.max_length)
        else:
            self.rows = None
        n_units = len(self.rows) if self.rows is not None else len(self.train_set)
        if n_units < rt.world_size:
            raise DataError(f"data.train: {len(self.train_set)} examples cannot feed {rt.world_size} processes")
        self.schedule = StepSchedule(n_units, self.global_batch, t.seed, d.shuffle)
        spe = self.schedule.steps_per_epoch()
        self._total = t.max_steps if t.max_steps is not None else max(1, math.ceil((t.epochs or 1.0) * spe))
        self.groups = {"policy": Group("policy", self.policy, rt, t, self._total)}
        self.epoch = 0
        self.index = 0

    # ---------------------------------------------------------------- Task protocol

    def total_steps(self) -> int:
        return self._total

    def describe(self) -> dict:
        s = self.train_set
        return {"data": {"format": self.format, "train_rows": s.n_rows, "train_examples": len(s),
                         "train_tokens": s.n_tokens(), "truncated": s.n_truncated, "dropped": s.n_dropped,
                         "packed_rows": len(self.rows) if self.rows is not None else None,
                         "eval_examples": len(self.eval_set) if self.eval_set is not None else 0},
                "model": {"parameters": sum(p.numel() for p in self.lm.parameters()),
                          "trainable_parameters": trainable_parameters(self.lm)}}

    def _collate(self, items: list[int]) -> tuple[dict, int, int]:
        """A device batch and, counted on the host (no GPU sync), its target and token counts."""
        pad = self.tok.pad_token_id
        if self.rows is not None:
            batch = packed_batch([self.rows[i] for i in items], self.train_set, pad, self.cfg.data.max_length)
            tokens = sum(len(self.train_set.input_ids[i]) for r in items for i in self.rows[r])
        else:
            batch = pad_batch([self.train_set.input_ids[i] for i in items], [self.train_set.labels[i] for i in items], pad)
            tokens = int(batch["attention_mask"].sum())
            batch = unpad_if_full(batch)
        return move(batch, self.rt.device), count_targets(batch), tokens

    def _lengths(self, items: list[int]) -> list[int] | None:
        if self.rows is not None:
            return None
        return [len(self.train_set.input_ids[i]) for i in items]

    def plan_for(self, items: list[int]) -> Plan:
        rt = self.rt
        mine = shard_for_rank(items, rt.rank, rt.world_size)
        n_micro = max(1, min(self.cfg.train.grad_accum_steps, len(items) // rt.world_size))
        micro = []
        for part in split_micro(mine, n_micro, self._lengths(mine)):
            b, n, tokens = self._collate(part)
            micro.append(Micro(batch=b, n=n, tokens=tokens))
        return Plan(group="policy", micro=micro, loss_fn=self.loss_fn, name="sft")

    def plans(self, start_step: int) -> Iterator[Plan]:
        while True:
            steps = [s for s in self.schedule.steps(self.epoch) if len(s) >= self.rt.world_size]
            while self.index < len(steps):
                items = steps[self.index]
                self.index += 1
                yield self.plan_for(items)
            self.epoch += 1
            self.index = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "n_units": self.schedule.n_examples,
                "global_batch": self.global_batch}

    def load_state_dict(self, state: dict, extra: dict) -> None:
        if state.get("n_units") != self.schedule.n_examples or state.get("global_batch") != self.global_batch:
            self.ctx.warn("the data or batch size changed since the checkpoint; the data order will not match the "
                          "interrupted run exactly")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])

    def extra_tensors(self) -> dict:
        return {}

    def has_eval(self) -> bool:
        return self.eval_set is not None and len(self.eval_set) > 0

    def evaluate(self) -> dict:
        rt, s = self.rt, self.eval_set
        tot = torch.zeros(2, dtype=torch.float64, device=rt.device)
        bs = self.cfg.train.batch_size
        for items in iterate_eval(len(s), bs, rt.rank, rt.world_size, self.cfg.train.eval_max_batches):
            if not items:
                continue
            cpu = unpad_if_full(pad_batch([s.input_ids[i] for i in items], [s.labels[i] for i in items],
                                          self.tok.pad_token_id))
            b = move(cpu, rt.device)
            loss_sum = self.policy(b["input_ids"], b["targets"], b["attention_mask"], b["position_ids"], mode="ce")
            tot[0] += loss_sum.double()
            tot[1] += float(count_targets(cpu))
        rt.all_reduce(tot)
        nll, n = tot.tolist()
        if n == 0:
            return {}
        return {"eval/loss": nll / n, "eval/ppl": math.exp(min(nll / n, 700.0)), "eval/tokens": n}

    def save_final(self, out_dir: Path) -> None:
        save_hf(self.lm, self.tok, out_dir)


def build(ctx: RunContext) -> SFTTask:
    return SFTTask(ctx)
