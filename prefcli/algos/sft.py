"""`prefcli sft`: supervised fine-tuning, pretraining from scratch, and pretraining with human preferences.

Objectives (registry `OBJECTIVES`, chosen by `sft.objective`). x_t is a target token, N the number of
target tokens in the whole accumulated global batch (the loop divides by it):

- `mle`: next-token cross-entropy (Radford et al. 2018; Bengio et al. 2003)
      L = -(1/N) sum_t log p(x_t | x_<t)
- `filter`, `conditional`, `unlikelihood`, `rwr`, `awr`: the objectives of Korbak et al. 2023,
  "Pretraining Language Models with Human Preferences", with their equations in prefcli/algos/phf/__init__.py.

Held-out perplexity: PPL = exp(sum of target-token NLL / number of target tokens), accumulated as
sums over the whole held-out set (not a mean of batch means). A conditional run conditions every
held-out row on <|aligned|> and scores the same target tokens as an mle run would.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import torch
from torch import nn

from ..engine.data import (
    FORMAT_COLUMNS,
    StepSchedule,
    blank_rows,
    check_values,
    detect_format,
    iterate_eval,
    load_rows,
    move,
    pack_rows,
    packed_batch,
    pad_batch,
    split_eval,
    tokenize_sft,
    unpad_if_full,
)
from ..engine.debias import apply_debias
from ..engine.formats import convert_rows, outside_format
from ..engine.logprobs import IGNORE
from ..engine.models import PolicyLM, build_trained_model, save_hf, trainable_parameters, unwrap_lm
from ..engine.run import RunContext
from ..engine.task import Group, Micro, Plan
from ..engine.tokenizer import load_tokenizer
from ..errors import DataError
from .common import Scheduled
from .phf import (
    PHF_OBJECTIVES,
    PHFData,
    RowLRScale,
    SFTObjective,
    ValuePolicy,
    add_control_tokens,
    control_gap,
    init_control_embeddings,
    prepare,
    prepare_segments,
    score_rows,
)


def mle_loss(model, batch) -> tuple[torch.Tensor, dict]:
    """Summed next-token cross-entropy over positions with a target (see module docstring)."""
    loss_sum = model(batch["input_ids"], batch["targets"], batch["attention_mask"], batch["position_ids"], mode="ce")
    return loss_sum, {}


OBJECTIVES: dict[str, SFTObjective] = {"mle": SFTObjective(mle_loss), **PHF_OBJECTIVES}


def count_targets(batch: dict) -> int:
    return int((batch["targets"] != IGNORE).sum())


class SFTTask(Scheduled):
    def __init__(self, ctx: RunContext):
        r = ctx.recipe
        self.ctx, self.rt, self.cfg = ctx, ctx.rt, r
        s = r.sft
        self.objective = obj = OBJECTIVES[s.objective]
        self.tok = tok = load_tokenizer(r.model)
        self.control_ids: tuple[int, int] | None = None
        if obj.control_tokens:  # before the model is built, so that its embeddings are resized to the tokenizer
            self.control_ids = add_control_tokens(tok, s.aligned_token, s.misaligned_token)
        train_rows, eval_rows = self._read_rows()
        phf = self._examples(train_rows, eval_rows)
        self.phf_stats: dict | None = None
        if phf is not None:
            self.phf_stats = phf.stats
            self.ex_scores, self.ex_aligned, self.ex_conditioned = phf.scores, phf.aligned, phf.conditioned
        self.gap_contexts = phf.gap_contexts if phf is not None else None
        self.gap_samples = s.gap_samples() if self.gap_contexts else 0
        self._gap_scorer = None
        trained = self._build_model()
        knobs = {arg: getattr(s, field) for arg, field in (obj.knobs or {}).items()}
        self.loss_fn = partial(obj.loss, **knobs) if knobs else obj.loss

        t, d = r.train, r.data
        if d.packing:
            order = StepSchedule(len(self.train_set), 1, t.seed, d.shuffle).order(0)
            self.rows = pack_rows(order, self.train_set, d.max_length)
        else:
            self.rows = None
        self.setup_schedule(
            len(self.rows) if self.rows is not None else len(self.train_set), t, d.shuffle, self.rt.world_size
        )
        self.groups = {"policy": Group("policy", trained, self.rt, t, self._total)}
        if self.control_ids is not None and s.control_lr_scale != 1.0:
            self._scale_control_rows()

    # ---------------------------------------------------------------- construction, in the order it runs

    def _read_rows(self):
        """The training and held-out rows, read as one format (self.format, self.read_as) and debiased."""
        ctx, r = self.ctx, self.cfg
        d = r.data
        train_rows = load_rows(d.train, what="data.train")
        # ShareGPT and Alpaca rows are read as chat messages (engine/formats.py); OpenAI's are prefcli's messages
        self.read_as = outside_format(train_rows.column_names, d.format, "sft")
        if self.read_as is not None:
            train_rows = convert_rows(train_rows, self.read_as, "sft", d.train.path, "data.train")
        own = "messages" if self.read_as is not None or d.format == "openai" else d.format
        self.format = fmt = detect_format(train_rows.column_names, own)
        missing = [c for c in FORMAT_COLUMNS[fmt] if c not in train_rows.column_names]
        if missing:
            raise DataError(
                f"data.train: {d.train.path}: format '{fmt}' needs column(s) {', '.join(missing)} "
                f"(columns: {', '.join(train_rows.column_names)})"
            )
        eval_rows = None
        if d.eval is not None:
            eval_rows = load_rows(d.eval, what="data.eval")
            eval_as = outside_format(eval_rows.column_names, d.format, "sft")
            if eval_as is not None:
                eval_rows = convert_rows(eval_rows, eval_as, "sft", d.eval.path, "data.eval")
            missing = [c for c in FORMAT_COLUMNS[fmt] if c not in eval_rows.column_names]
            if missing:
                raise DataError(
                    f"data.eval: {d.eval.path}: missing column(s) {', '.join(missing)} (columns: "
                    f"{', '.join(eval_rows.column_names)}); the training rows are '{fmt}' rows, and so must these be"
                )
        elif d.eval_fraction > 0:
            train_rows, eval_rows = split_eval(train_rows, d.eval_fraction, r.train.seed)
        train_rows, eval_rows, self.debias = apply_debias(train_rows, eval_rows, d.debias, warn=ctx.warn)
        return train_rows, eval_rows

    def _examples(self, train_rows, eval_rows) -> PHFData | None:
        """The tokenized train and held-out sets and, for a PHF objective, their scores, labels and control tokens."""
        ctx, rt, tok, obj, fmt = self.ctx, self.rt, self.tok, self.objective, self.format
        d, s, seed = self.cfg.data, self.cfg.sft, self.cfg.train.seed
        src = d.train.path
        row_scores = None
        per_segment = obj.control_tokens and s.control_position == "per_segment"
        if obj.scored and not per_segment:
            check_values(train_rows, FORMAT_COLUMNS[fmt], src)
            row_scores = self._main_first(lambda: score_rows(train_rows, fmt, s, tok, rt.device, src))
        # a control token takes one position: tokenize to max_length - 1 so that the prefixed example fits
        reserve = 1 if obj.control_tokens and not per_segment else 0
        enc = dict(
            fmt=fmt, max_length=d.max_length - reserve, mask_prompt=d.mask_prompt and fmt != "text", add_eos=d.add_eos
        )
        self._warn_blank_rows(train_rows, eval_rows)
        phf = None
        if per_segment:  # scored and tokenized per segment, control tokens in place (algos/phf/prepare.py)
            check_values(train_rows, FORMAT_COLUMNS[fmt], src)
            ids = self.control_ids
            phf = self._main_first(
                lambda: prepare_segments(s, train_rows, eval_rows, fmt, tok, enc, ids, seed, rt.device, src, ctx.warn)
            )
            self.train_set, self.eval_set = phf.train_set, phf.eval_set
        else:
            self.train_set = tokenize_sft(train_rows, tok, source=src, what="data.train", **enc)
            self.eval_set = (
                tokenize_sft(eval_rows, tok, source=(d.eval.path if d.eval else src), what="data.eval", **enc)
                if eval_rows is not None
                else None
            )
        self._check_tokenized(reserve)
        if obj.scored and phf is None:
            ts, es = self.train_set, self.eval_set
            phf = prepare(obj, s, ts, es, row_scores, self.control_ids, tok.bos_token_id, seed, src, ctx.warn)
        if phf is not None:
            self.train_set, self.eval_set = phf.train_set, phf.eval_set
        return phf

    def _main_first(self, make):
        """make() on the main process first, which fills the datasets cache, then on the others, which read it."""
        rt = self.rt
        if not rt.is_main:
            rt.barrier()
        out = make()
        if rt.is_main:
            rt.barrier()
        return out

    def _warn_blank_rows(self, train_rows, eval_rows) -> None:
        """A warning for each split with rows that hold only whitespace."""
        d, fmt = self.cfg.data, self.format
        for name, rows, source in (("data.train", train_rows, d.train.path), ("data.eval", eval_rows, None)):
            source = source or (d.eval.path if d.eval else d.train.path)
            n_blank, first, col = blank_rows(rows, FORMAT_COLUMNS[fmt]) if rows is not None else (0, None, None)
            if n_blank:
                self.ctx.warn(
                    f"{name}: {source}: {n_blank} rows hold only whitespace (first: row {first}, '{col}'); remove them"
                )

    def _check_tokenized(self, reserve: int) -> None:
        """A DataError when no training example is left; a warning for truncated and dropped examples."""
        d = self.cfg.data
        if len(self.train_set) == 0:
            raise DataError(
                f"data.train: {d.train.path}: no example has a token to train on after masking and "
                f"truncation to max_length={d.max_length} (prompts longer than max_length?)"
            )
        for name, st in (("data.train", self.train_set), ("data.eval", self.eval_set)):
            if st is not None and st.n_truncated:
                room = " less one for the control token" if reserve else ""
                self.ctx.warn(
                    f"{name}: {st.n_truncated} of {st.n_rows} examples were longer than max_length={d.max_length} "
                    f"tokens{room} and were truncated"
                )
            if st is not None and st.n_dropped:
                self.ctx.warn(
                    f"{name}: {st.n_dropped} of {st.n_rows} examples had no trainable token left and were dropped"
                )

    def _build_model(self) -> nn.Module:
        """The model (self.lm, self.policy) and the module the optimizer trains (with a value head for awr)."""
        r, rt, tok, s = self.cfg, self.rt, self.tok, self.cfg.sft
        # SFT keeps the model's dropout (a regulariser here: no two log-probs of the same text are compared)
        self.lm = lm = build_trained_model(
            r.model, tok, rt, r.train.gradient_checkpointing, r.train.seed, self.ctx.smoke, dropout=True
        )
        if self.control_ids is not None:
            init_control_embeddings(unwrap_lm(lm), self.control_ids, s.control_init, len(tok), r.train.seed)
        self.policy = PolicyLM(lm, rt)
        if not self.objective.value_head:
            return self.policy
        hidden = unwrap_lm(lm).get_output_embeddings().weight.shape[1]
        return ValuePolicy(self.policy, hidden).to(rt.device)

    def _scale_control_rows(self) -> None:
        """The control tokens' embedding rows learn at sft.control_lr_scale times the learning rate."""
        inner = unwrap_lm(self.lm)
        weights = [inner.get_input_embeddings().weight]
        out = inner.get_output_embeddings()
        if out is not None and out.weight is not weights[0]:
            weights.append(out.weight)
        RowLRScale(self.groups["policy"].optimizer, weights, list(self.control_ids), self.cfg.sft.control_lr_scale)

    # ---------------------------------------------------------------- Task protocol

    def startup_check(self) -> None:
        self.check_kernels(self.policy, lambda part: self._collate(part)[0])

    def describe(self) -> dict:
        s = self.train_set
        data = {
            "format": self.format,
            **({"read_as": self.read_as} if self.read_as else {}),
            "train_rows": s.n_rows,
            "train_examples": len(s),
            "train_tokens": s.n_tokens(),
            "truncated": s.n_truncated,
            "dropped": s.n_dropped,
            "packed_rows": len(self.rows) if self.rows is not None else None,
            "eval_examples": len(self.eval_set) if self.eval_set is not None else 0,
            "debias": self.debias,
        }
        if self.phf_stats is not None:
            data["phf"] = self.phf_stats
        return {
            "data": data,
            "model": {
                "parameters": sum(p.numel() for p in self.groups["policy"].raw.parameters()),
                "trainable_parameters": trainable_parameters(self.groups["policy"].raw),
            },
        }

    def _collate(self, items: list[int]) -> tuple[dict, int, int]:
        """A device batch and, counted on the host (no GPU sync), its target and token counts."""
        pad = self.tok.pad_token_id
        if self.rows is not None:
            members = [self.rows[i] for i in items]
            batch = packed_batch(members, self.train_set, pad, self.cfg.data.max_length)
            tokens = sum(len(self.train_set.input_ids[i]) for m in members for i in m)
        else:
            members = [[i] for i in items]
            batch = pad_batch(
                [self.train_set.input_ids[i] for i in items], [self.train_set.labels[i] for i in items], pad
            )
            tokens = int(batch["attention_mask"].sum())
        if self.objective.scored:  # before unpadding: examples are found where position ids restart
            batch.update(self._example_fields(batch, members))
        if self.rows is None:
            batch = unpad_if_full(batch)
        return move(batch, self.rt.device), count_targets(batch), tokens

    def _example_fields(self, batch: dict, members: list[list[int]]) -> dict:
        """Per-example scores and labels of a batch, and the example of every target position
        (example_index, -1 where there is none). Examples start where position_ids restart at 0, both
        in padded rows (one example each) and in packed rows (several)."""
        pos = batch["position_ids"]
        seg = (pos == 0).long().cumsum(-1) - 1
        flat = [i for m in members for i in m]
        offsets = torch.tensor([0] + [len(m) for m in members[:-1]]).cumsum(0).unsqueeze(1)
        counts = torch.tensor([len(m) for m in members]).unsqueeze(1)
        idx = torch.where((seg < counts) & (batch["targets"] != IGNORE), offsets + seg, torch.full_like(seg, -1))
        sel = torch.tensor(flat, dtype=torch.long)
        return {
            "example_index": idx,
            "scores": self.ex_scores[sel],
            "aligned": self.ex_aligned[sel],
            "conditioned": self.ex_conditioned[sel],
        }

    def _lengths(self, items: list[int]) -> list[int] | None:
        if self.rows is not None:
            return None
        return [len(self.train_set.input_ids[i]) for i in items]

    def plan_for(self, items: list[int]) -> Plan:
        micro = []
        for part in self.micro_parts(items, self._lengths):
            b, n, tokens = self._collate(part)
            micro.append(Micro(batch=b, n=n, tokens=tokens))
        return Plan(group="policy", micro=micro, loss_fn=self.loss_fn, name="sft")

    def plans(self, start_step: int) -> Iterator[Plan]:
        for items in self.step_items():
            yield self.plan_for(items)

    def evaluate(self) -> dict:
        rt, s = self.rt, self.eval_set
        tot = torch.zeros(2, dtype=torch.float64, device=rt.device)
        bs = self.cfg.train.batch_size
        for items in iterate_eval(len(s), bs, rt.rank, rt.world_size, self.cfg.train.eval_max_batches):
            if not items:
                continue
            cpu = unpad_if_full(
                pad_batch([s.input_ids[i] for i in items], [s.labels[i] for i in items], self.tok.pad_token_id)
            )
            b = move(cpu, rt.device)
            loss_sum = self.policy(b["input_ids"], b["targets"], b["attention_mask"], b["position_ids"], mode="ce")
            tot[0] += loss_sum.double()
            tot[1] += float(count_targets(cpu))
        rt.all_reduce(tot)
        nll, n = tot.tolist()
        out = {} if n == 0 else {"eval/loss": nll / n, "eval/ppl": math.exp(min(nll / n, 700.0)), "eval/tokens": n}
        if self.gap_samples:
            out.update(self._control_gap())
        return out

    def _control_gap(self) -> dict:
        """eval/control_gap: has the model learned what the control tokens mean (`phf.control_gap`)? Every
        process samples the same completions (a fixed seed), so no gather is needed."""
        s = self.cfg.sft
        if self._gap_scorer is None:
            from ..reward_sources import build_rewards

            self._gap_scorer = build_rewards(s.rewards, tokenizer=self.tok, device=self.rt.device)
        return control_gap(
            unwrap_lm(self.lm),
            self.tok,
            self.gap_contexts,
            self.control_ids,
            self.gap_samples,
            s.control_gap_max_new_tokens,
            self._gap_scorer,
            self.phf_stats["threshold"],
            self.cfg.train.seed,
            self.rt.device,
            s.segment_separator if s.control_position == "per_segment" else None,
        )

    def save_final(self, out_dir: Path) -> None:
        if self.control_ids is not None:  # sampling never emits a control token (Korbak et al.: bad_words_ids)
            from transformers import GenerationConfig

            inner = unwrap_lm(self.lm)
            if inner.generation_config is None:
                inner.generation_config = GenerationConfig.from_model_config(inner.config)
            inner.generation_config.bad_words_ids = [[i] for i in self.control_ids]
        save_hf(self.lm, self.tok, out_dir, self.rt)


def build(ctx: RunContext) -> SFTTask:
    return SFTTask(ctx)
