"""`prefcli contrastive`: a policy trained directly from preferences, and InfoNCE encoders.

Every objective is one pure function below (per-sequence log-probs in, a loss per example and
its metrics out), chosen through the registry `OBJECTIVES` by `contrastive.objective`. With
logπ(y|x) the log-prob of a completion (summed, or averaged over its tokens, per `reduce`) and

    h = [logπ(y_w|x) - logπ_ref(y_w|x)] - [logπ(y_l|x) - logπ_ref(y_l|x)]

- dpo     -log σ(βh)                                                    Rafailov et al. 2023, Eq. 7
          -log σ(βh + α(|y_w| - |y_l|)) with length_alpha α (R-DPO)       Park et al. 2024
- cdpo    -(1-ε) log σ(βh) - ε log σ(-βh)                                Mitchell 2023 (cDPO note)
- robust  [-(1-ε) log σ(βh) + ε log σ(-βh)] / (1-2ε)                     Chowdhury et al. 2024, Eq. 6
- ipo     (h - 1/(2β))², log-probs averaged over tokens                  Azar et al. 2023, Eq. 17
- hinge   max(0, 1 - βh)                                                 Zhao et al. 2023 (SLiC-HF)
- simpo   -log σ(β(avg logπ(y_w) - avg logπ(y_l)) - γ), no reference     Meng et al. 2024, Eq. 6
- cpo     -log σ(β(logπ(y_w) - logπ(y_l))) + α NLL(y_w), no reference    Xu et al. 2024, Eq. 3, 5
- orpo    NLL(y_w) - λ log σ(log odds(y_w) - log odds(y_l)), no reference Hong et al. 2024, Eq. 6-7
- kto     λ_D(1-σ(β(r-z))) | λ_U(1-σ(β(z-r))), unpaired rows             Ethayarajh et al. 2024, Eq. 7
- infonce in-batch negatives for an encoder (prefcli/algos/infonce.py)  Oord et al. 2018

The reference is the initial policy: its log-probs are computed once, before the first step, in
eval mode without gradients (with LoRA: the same weights with the adapters off), kept on the task
and saved in every checkpoint (`extra_tensors`), so `--resume` recomputes nothing and no
trainable copy of the model exists. Objectives without a reference compute none.

Loss units: pairs (kto: rows). The loop divides the summed loss by the pairs of the whole
accumulated global batch, so `batch_size: 8` equals `batch_size: 2, grad_accum_steps: 4`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..engine.data import iterate_eval, move, shard_for_rank
from ..engine.debias import apply_debias, pair_weights
from ..engine.models import PolicyLM, build_trained_model, reference_mode, save_hf
from ..engine.pairs import (
    PAIR_REQUIRED,
    UNPAIRED_REQUIRED,
    completion_batch,
    detect_pair_format,
    pair_batch,
    pair_correct,
    sequence_logps,
    tokenize_pairs,
    tokenize_unpaired,
)
from ..engine.personal import add_user_tokens, save_policy_users, with_user
from ..engine.run import RunContext
from ..engine.task import Group, Micro, Plan
from ..engine.tokenizer import load_tokenizer
from ..engine.users import find_user_column, missing_user_column, read_users
from ..errors import DataError, UsageError
from .common import Scheduled, load_splits, make_plan, report, sharded_fill
from .infonce import InfoNCETask, infonce_loss
from .reward_users import per_user_accuracy, user_index

# ----------------------------------------------------------------------------------- inputs


@dataclass
class Hyper:
    beta: float
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    cpo_alpha: float = 1.0
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    length_alpha: float = 0.0


@dataclass
class PairLogps:
    """Per-pair sequence log-probs (shape [B]) of the policy, and of the reference when needed.
    `chosen_nll` is the chosen completion's mean token negative log-likelihood; `chosen_len` and
    `rejected_len` the completions' token counts (R-DPO's length term)."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None
    chosen_nll: torch.Tensor | None = None
    chosen_len: torch.Tensor | None = None
    rejected_len: torch.Tensor | None = None


@dataclass
class UnpairedLogps:
    """Per-row log-probs (shape [B]) of unpaired rows, their labels (True = desirable) and the
    detached KL estimate z (a scalar, already clamped at 0)."""

    logps: torch.Tensor
    ref: torch.Tensor
    label: torch.Tensor
    kl: torch.Tensor


def _h(lp: PairLogps) -> torch.Tensor:
    return (lp.chosen - lp.ref_chosen) - (lp.rejected - lp.ref_rejected)


def _ref_rewards(lp: PairLogps, beta: float) -> dict:
    return {
        "reward/chosen": beta * (lp.chosen - lp.ref_chosen).detach(),
        "reward/rejected": beta * (lp.rejected - lp.ref_rejected).detach(),
    }


def _policy_rewards(lp: PairLogps, beta: float) -> dict:
    return {"reward/chosen": beta * lp.chosen.detach(), "reward/rejected": beta * lp.rejected.detach()}


# ----------------------------------------------------------------------------------- losses


def dpo_loss(lp: PairLogps, hp: Hyper) -> tuple[torch.Tensor, dict]:
    """DPO (Rafailov et al. 2023, "Direct Preference Optimization", arXiv 2305.18290, Eq. 7):
    L = -log σ(β h). With the policy equal to the reference, h = 0 and L = ln 2.

    With length_alpha α > 0, length-regularised DPO (R-DPO; Park et al. 2024, "Disentangling Length
    from Quality in Direct Preference Optimization", arXiv 2403.19159):
    L = -log σ(β h + α (|y_w| - |y_l|)), |y| in completion tokens. It is DPO for the reward
    r(x, y) - α|y| (the RL objective with a length penalty): the optimal policy's implicit reward is
    β log π/π_ref = r - α|y| + const, so r = β log π/π_ref + α|y| inside Bradley-Terry. A longer chosen
    answer already earns α per extra token, so the policy gains less by learning length."""
    z = hp.beta * _h(lp)
    if hp.length_alpha:
        z = z + hp.length_alpha * (lp.chosen_len - lp.rejected_len)
    return -F.logsigmoid(z), _ref_rewards(lp, hp.beta)


def cdpo_loss(lp: PairLogps, hp: Hyper) -> tuple[torch.Tensor, dict]:
    """Conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences and relationship to
    IPO"): the DPO loss of a label flipped with probability ε,
    L = -(1-ε) log σ(β h) - ε log σ(-β h)."""
    z = hp.beta * _h(lp)
    eps = hp.label_smoothing
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z), _ref_rewards(lp, hp.beta)


def robust_loss(lp: PairLogps, hp: Hyper) -> tuple[torch.Tensor, dict]:
    """Robust DPO (Chowdhury et al. 2024, "Provably Robust DPO", arXiv 2403.00409, Eq. 6): an
    unbiased estimate of the clean DPO loss under label noise ε,
    L = [-(1-ε) log σ(β h) + ε log σ(-β h)] / (1 - 2ε)."""
    z = hp.beta * _h(lp)
    eps = hp.label_smoothing
    return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps), _ref_rewards(lp, hp.beta)


def ipo_loss(lp: PairLogps, hp: Hyper) -> tuple[torch.Tensor, dict]:
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences", arXiv 2310.12036, Eq. 17): L = (h - 1/(2β))², on token-averaged log-probs
    (reduce 'mean', as TRL and the authors do)."""
    return (_h(lp) - 1 / (2 * hp.beta)) ** 2, _ref_rewards(lp, hp.beta)


def hinge_loss(lp: PairLogps, hp: Hyper) -> tuple[torch.Tensor, dict]:
    """SLiC-HF calibration loss (Zhao et al. 2023, "SLiC-HF", arXiv 2305.10425, Eq. 1) on the
    reference-normalised margin, as TRL's `hinge`: L = max(0, 1 - β h)."""
    return torch.relu(1 - hp.beta * _h(lp)), _ref_rewards(lp, hp.beta)


def simpo_loss(lp: PairLogps, hp: Hyper) -> tuple[torch.Tensor, dict]:
    """SimPO (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free
    Reward", arXiv 2405.14734, Eq. 6), no reference; log-probs averaged over tokens:
    L = -log σ(β (avg logπ(y_w) - avg logπ(y_l)) - γ)."""
    return -F.logsigmoid(hp.beta * (lp.chosen - lp.rejected) - hp.simpo_gamma), _policy_rewards(lp, hp.beta)


def cpo_loss(lp: PairLogps, hp: Hyper) -> tuple[torch.Tensor, dict]:
    """CPO (Xu et al. 2024, "Contrastive Preference Optimization", arXiv 2401.08417, Eq. 3 and 5),
    no reference: L = -log σ(β (logπ(y_w) - logπ(y_l))) + α NLL(y_w), NLL = mean token NLL of y_w."""
    pref = -F.logsigmoid(hp.beta * (lp.chosen - lp.rejected))
    m = _policy_rewards(lp, hp.beta)
    m["loss/nll"] = lp.chosen_nll.detach()
    return pref + hp.cpo_alpha * lp.chosen_nll, m


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends (Mächler 2012)."""
    x = x.clamp(max=-1e-7)  # docs/algorithms.md, Pitfalls: ORPO numerics; keep log p < 0
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(lp: PairLogps, hp: Hyper) -> tuple[torch.Tensor, dict]:
    """ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference
    Model", arXiv 2403.07691, Eq. 6-7), no reference; log-probs averaged over tokens (p = exp of
    the mean token log-prob), odds = p / (1 - p), λ = β:
    L = NLL(y_w) - λ log σ(log odds(y_w) - log odds(y_l))."""
    log_odds = (lp.chosen - lp.rejected) - (log1mexp(lp.chosen) - log1mexp(lp.rejected))
    m = _policy_rewards(lp, hp.beta)
    m["loss/nll"] = lp.chosen_nll.detach()
    m["reward/log_odds"] = log_odds.detach()
    return lp.chosen_nll - hp.beta * F.logsigmoid(log_odds), m


def kto_loss(u: UnpairedLogps, hp: Hyper) -> tuple[torch.Tensor, dict]:
    """KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization",
    arXiv 2402.01306, Eq. 7) on unpaired rows, r = logπ(y|x) - logπ_ref(y|x), z = the detached KL
    estimate from mismatched (x, y') pairs clamped at 0:
    desirable L = λ_D (1 - σ(β(r - z))), undesirable L = λ_U (1 - σ(β(z - r)))."""
    r = u.logps - u.ref
    des = hp.desirable_weight * (1 - torch.sigmoid(hp.beta * (r - u.kl)))
    und = hp.undesirable_weight * (1 - torch.sigmoid(hp.beta * (u.kl - r)))
    return torch.where(u.label, des, und), {"reward/row": hp.beta * r.detach()}


@dataclass(frozen=True)
class ContrastiveObjective:
    """An entry of the contrastive registry: its loss and what it reads."""

    loss_fn: Callable
    needs_ref: bool
    reduce: str  # 'sum' | 'mean': how token log-probs make a sequence log-prob
    rows: str  # 'pairs' | 'unpaired' | 'encoder'
    default_beta: float = 0.1
    default_label_smoothing: float = 0.0
    extra_metrics: tuple[str, ...] = ()  # per-example metrics the loss reports beyond the rewards


OBJECTIVES: dict[str, ContrastiveObjective] = {
    "dpo": ContrastiveObjective(dpo_loss, needs_ref=True, reduce="sum", rows="pairs"),
    "cdpo": ContrastiveObjective(cdpo_loss, needs_ref=True, reduce="sum", rows="pairs", default_label_smoothing=0.1),
    "robust": ContrastiveObjective(
        robust_loss, needs_ref=True, reduce="sum", rows="pairs", default_label_smoothing=0.1
    ),
    "ipo": ContrastiveObjective(ipo_loss, needs_ref=True, reduce="mean", rows="pairs"),
    "hinge": ContrastiveObjective(hinge_loss, needs_ref=True, reduce="sum", rows="pairs"),
    "simpo": ContrastiveObjective(simpo_loss, needs_ref=False, reduce="mean", rows="pairs", default_beta=2.0),
    "cpo": ContrastiveObjective(cpo_loss, needs_ref=False, reduce="sum", rows="pairs", extra_metrics=("loss/nll",)),
    "orpo": ContrastiveObjective(
        orpo_loss, needs_ref=False, reduce="mean", rows="pairs", extra_metrics=("loss/nll", "reward/log_odds")
    ),
    "kto": ContrastiveObjective(kto_loss, needs_ref=True, reduce="sum", rows="unpaired"),
    "infonce": ContrastiveObjective(infonce_loss, needs_ref=False, reduce="mean", rows="encoder", default_beta=0.0),
}


def pair_objective(
    obj: ContrastiveObjective,
    hp: Hyper,
    lp: PairLogps,
    sum_c,
    sum_r,
    weight: torch.Tensor | None = None,
    loss_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """A paired objective on a batch of pairs: the summed loss and its metrics as (sum, count) over pairs
    (`prefcli contrastive`, and `prefcli rlhf`'s online_dpo on pairs of sampled completions). `weight`
    [B] (0 or 1) leaves pairs out of the loss and the counts; `loss_scale` [B] multiplies each pair's loss
    only (data.debias length-balance weights; the metrics stay unweighted); sum_c, sum_r: summed
    completion log-probs."""
    losses, m = obj.loss_fn(lp, hp)
    if loss_scale is not None:
        losses = losses * loss_scale
    w = torch.ones_like(losses) if weight is None else weight.to(losses.dtype)
    B = losses.shape[0] if weight is None else w.sum()
    rc, rr = m.pop("reward/chosen"), m.pop("reward/rejected")
    mets = {
        "reward/chosen": ((rc * w).sum(), B),
        "reward/rejected": ((rr * w).sum(), B),
        "reward/margin": (((rc - rr) * w).sum(), B),
        "reward/accuracy": ((pair_correct(rc - rr) * w).sum(), B),
        "logps/chosen": ((sum_c.detach() * w).sum(), B),
        "logps/rejected": ((sum_r.detach() * w).sum(), B),
    }
    for k, v in m.items():
        mets[k] = ((v * w).sum(), B)
    return (losses * w).sum() if weight is not None else losses.sum(), mets


def hyper(c, obj: ContrastiveObjective) -> Hyper:
    """The recipe's knobs with null resolved to the objective's defaults."""
    return Hyper(
        beta=c.beta if c.beta is not None else obj.default_beta,
        label_smoothing=c.label_smoothing if c.label_smoothing is not None else obj.default_label_smoothing,
        simpo_gamma=c.simpo_gamma,
        cpo_alpha=c.cpo_alpha,
        desirable_weight=c.desirable_weight,
        undesirable_weight=c.undesirable_weight,
        length_alpha=c.length_alpha,
    )


# ------------------------------------------------------------------------------------- task


class ContrastiveTask(Scheduled):
    """`prefcli contrastive` with a policy: the paired objectives (dpo ... orpo) and KTO's unpaired rows (the
    encoder objective, infonce, is InfoNCETask in infonce.py)."""

    def __init__(self, ctx: RunContext):
        r = ctx.recipe
        self.ctx, self.rt, self.cfg = ctx, ctx.rt, r
        c, d = r.contrastive, r.data
        self.name = c.objective
        self.obj = OBJECTIVES[c.objective]
        self.hp = hyper(c, self.obj)
        self.reduce = self.obj.reduce if c.reduce == "auto" else c.reduce
        self.paired = self.obj.rows == "pairs"
        self.tok = tok = load_tokenizer(r.model)
        required = PAIR_REQUIRED if self.paired else UNPAIRED_REQUIRED
        train_rows, eval_rows, self.read_as = load_splits(d, required, r.train.seed, pairs=self.paired)
        requested = "chat" if self.read_as else d.format
        self.personal = c.personalisation
        self.user_col = find_user_column(train_rows.column_names, d.user_column)
        if self.user_col is None and (self.personal is not None or d.user_column is not None):
            why = "contrastive.personalisation" if self.personal is not None else "data.user_column"
            raise missing_user_column("data.train", d.train.path, train_rows.column_names, d.user_column, why)
        self.format = fmt = detect_pair_format(train_rows, "chosen" if self.paired else "completion", requested)
        train_rows, eval_rows, self.debias = apply_debias(
            train_rows,
            eval_rows,
            d.debias,
            tok=tok,
            fmt=fmt,
            pairs=self.paired,
            seed=r.train.seed,
            warn=ctx.warn,
            key_columns=(self.user_col,) if self.user_col else (),
        )
        tokenize = tokenize_pairs if self.paired else tokenize_unpaired
        what = "chosen/rejected" if self.paired else "completion or label"
        expected = (
            (
                "rows with a non-empty chosen and rejected that differ, and a prompt shorter than "
                f"data.max_length={d.max_length} tokens"
            )
            if self.paired
            else f"rows with a prompt, a non-empty completion and a label, the prompt shorter than {d.max_length} tokens"
        )
        self.train_set = tokenize(train_rows, tok, fmt, d.max_length, d.train.path, "data.train")
        report(ctx, "data.train", d.train.path, self.train_set, d.max_length, what, expected)
        self.weights = None
        if self.paired:  # length_balance 'reweight': per-pair loss weights from the tokenized lengths
            lens = [len(c) for c in self.train_set.chosen], [len(x) for x in self.train_set.rejected]
            self.weights = pair_weights(d.debias, *lens, self.debias, ctx.warn)
        self.eval_set = None
        if eval_rows is not None:
            src = d.eval.path if d.eval else d.train.path
            self.eval_set = tokenize(eval_rows, tok, fmt, d.max_length, src, "data.eval")
            report(ctx, "data.eval", src, self.eval_set, d.max_length, what, expected)
        if not self.paired:
            self.kl_partner = self._partners(len(self.train_set), r.train.seed)
            self.eval_partner = self._partners(len(self.eval_set), r.train.seed) if self.eval_set else None
        self._read_users(train_rows, eval_rows)

        self.lm = build_trained_model(r.model, tok, self.rt, r.train.gradient_checkpointing, r.train.seed, ctx.smoke)
        self.policy = PolicyLM(self.lm, self.rt)
        self.setup_schedule(len(self.train_set), r.train, d.shuffle, self.rt.world_size)
        self.groups = {"policy": Group("policy", self.policy, self.rt, r.train, self._total)}
        self.ref: dict[str, torch.Tensor] = {}

    def _read_users(self, train_rows, eval_rows) -> None:
        """The users of the pairs (data.user_column); with contrastive.personalisation, one token per user seen in
        training (added to the tokenizer before the model is built) and the rows trained without one."""
        d = self.cfg.data
        self.user_names: list[str] = []
        self.user_ids = {"train": None, "eval": None}
        self.user_tokens: dict[str, int] = {}
        self.generic: set[int] = set()
        if self.user_col is None or not self.paired:
            return
        src = d.eval.path if d.eval else d.train.path
        for split, rows, s, source in (("train", train_rows, self.train_set, d.train.path),
                                       ("eval", eval_rows, self.eval_set, src)):  # fmt: skip
            if s is None:
                continue
            col = self.user_col if self.user_col in rows.column_names else None
            users = read_users(rows, col, source, f"data.{split}")
            self.user_ids[split] = [users[i] for i in s.rows]
        self.user_names = sorted({u for u in self.user_ids["train"] if u is not None})
        vocab = {u: i for i, u in enumerate(self.user_names)}
        for split, s in (("train", self.train_set), ("eval", self.eval_set)):
            if s is not None:
                s.users = user_index(self.user_ids[split], vocab)
        if self.personal is None:
            return
        if not self.user_names:
            raise DataError(
                f"data.train: {d.train.path}: contrastive.personalisation needs users, but every row's "
                f"'{self.user_col}' is empty"
            )
        try:
            self.user_tokens = add_user_tokens(self.tok, self.user_names)
        except ValueError as e:
            raise DataError(f"data.train: {d.train.path}: {e}") from None
        rng = random.Random(self.cfg.train.seed + 11)
        self.generic = {i for i in range(len(self.train_set)) if rng.random() < self.personal.generic_fraction}

    def _prompt(self, s, i: int) -> list[int]:
        """Pair i's prompt ids, with its user's token first when the policy is personalised (not for the rows
        trained as the generic user, nor for users never trained on)."""
        p = s.prompt[i]
        if not self.user_tokens or s.users is None or s.users[i] < 0:
            return p
        if s is self.train_set and i in self.generic:
            return p
        return with_user(p, self.user_tokens[self.user_names[s.users[i]]], self.tok.bos_token_id)

    @staticmethod
    def _partners(n: int, seed: int) -> list[int]:
        """KTO's mismatched pairs: row i's prompt with another row's completion, fixed for the run so
        their reference log-probs can be computed once."""
        order = list(range(n))
        random.Random(seed + 7).shuffle(order)
        partner = [0] * n
        for k, i in enumerate(order):
            partner[i] = order[(k + 1) % n]
        return partner

    # ----------------------------------------------------------------------- batches

    def _batch(self, s, items: list[int], partner: list[int] | None = None) -> dict:
        pad = self.tok.pad_token_id
        if self.paired:
            b = pair_batch(
                [self._prompt(s, i) for i in items],
                [s.chosen[i] for i in items],
                [s.rejected[i] for i in items],
                pad,
            )
        else:
            if partner is not None:  # KTO's mismatched pairs, cut to max_length like every row
                room = self.cfg.data.max_length
                comps = [s.completion[partner[i]][: max(1, room - len(s.prompt[i]))] for i in items]
            else:
                comps = [s.completion[i] for i in items]
            b = completion_batch([s.prompt[i] for i in items], comps, pad)
            b["label"] = torch.tensor([s.label[i] for i in items], dtype=torch.bool)
        b["idx"] = torch.tensor(items, dtype=torch.long)
        if self.weights is not None and s is self.train_set:
            b["weight"] = torch.tensor([self.weights[i] for i in items], dtype=torch.float32)
        return move(b, self.rt.device)

    def _seq(self, module, b) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed completion log-prob, completion token count) per row: PolicyLM's chunked
        token log-probs reduced over the completion mask."""
        tok_lp, _ = module(b["input_ids"], b["targets"], b["attention_mask"], b["position_ids"])
        return sequence_logps(tok_lp, b["targets"], "sum")

    def _reduce(self, s: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        return s / n.clamp_min(1.0) if self.reduce == "mean" else s

    # ------------------------------------------------------------- reference log-probs

    def _ref_table(self, s, partner=None) -> torch.Tensor:
        """Reference sequence log-probs of every example of `s`: (n, 2) [chosen, rejected] for pairs,
        (n, 1) for unpaired rows."""

        def fn(idx):
            b = self._batch(s, idx, partner)  # with the user tokens: the policy starts equal to its reference
            seq = self._reduce(*self._seq(self.policy, b))
            return torch.stack(seq.chunk(2), 1) if self.paired else seq

        # no activations are kept without gradients: twice the training micro-batch fits
        return sharded_fill(len(s), 2 * self.cfg.train.batch_size, self.rt, fn, width=2 if self.paired else 1)

    @torch.no_grad()
    def _ensure_ref(self) -> None:
        """Reference log-probs of every train and held-out example, from the initial weights."""
        if not self.obj.needs_ref or self.ref:
            return
        was = self.policy.training
        self.policy.eval()
        with reference_mode(self.lm):
            self.ref["train"] = self._ref_table(self.train_set)
            if not self.paired:
                self.ref["train_kl"] = self._ref_table(self.train_set, self.kl_partner)
            if self.eval_set is not None:
                self.ref["eval"] = self._ref_table(self.eval_set)
                if not self.paired:
                    self.ref["eval_kl"] = self._ref_table(self.eval_set, self.eval_partner)
        self.policy.train(was)

    # ------------------------------------------------------------------------ losses

    def _pair_inputs(self, module, b, split: str) -> tuple[PairLogps, torch.Tensor, torch.Tensor]:
        s, n = self._seq(module, b)
        B = b["idx"].shape[0]
        seq = self._reduce(s, n)
        lp = PairLogps(
            chosen=seq[:B],
            rejected=seq[B:],
            chosen_nll=-s[:B] / n[:B].clamp_min(1.0),
            chosen_len=n[:B],
            rejected_len=n[B:],
        )
        if self.obj.needs_ref:
            ref = self.ref[split].to(seq.device)[b["idx"]]
            lp.ref_chosen, lp.ref_rejected = ref[:, 0], ref[:, 1]
        return lp, s[:B], s[B:]

    def _pair_loss(self, module, b, split: str = "train") -> tuple[torch.Tensor, dict]:
        lp, sum_c, sum_r = self._pair_inputs(module, b, split)
        # data.debias.length_balance: reweight: each pair's loss scaled by its weight
        return pair_objective(self.obj, self.hp, lp, sum_c, sum_r, loss_scale=b.get("weight"))

    def _kl_estimate(self, s, items: list[int], partner: list[int], ref_key: str) -> torch.Tensor:
        """z = max(0, mean over the step's mismatched pairs of logπ - logπ_ref), detached, over the
        whole global step (all micro-batches, all ranks) so accumulation changes nothing."""
        tot = torch.zeros(2, dtype=torch.float64, device=self.rt.device)
        bs = self.cfg.train.batch_size
        with torch.no_grad():
            for k in range(0, len(items), bs):
                part = items[k : k + bs]
                b = self._batch(s, part, partner)
                ss, n = self._seq(self.policy, b)
                lp = self._reduce(ss, n)
                ref = self.ref[ref_key].to(lp.device)[b["idx"]].squeeze(-1)
                tot += torch.stack(
                    [(lp - ref).sum().double(), torch.tensor(float(len(part)), dtype=torch.float64, device=lp.device)]
                )
        self.rt.all_reduce(tot)
        return (tot[0] / tot[1].clamp_min(1.0)).clamp_min(0.0).float()

    def _unpaired_loss(self, module, b, split: str = "train") -> tuple[torch.Tensor, dict]:
        s, n = self._seq(module, b)
        lp = self._reduce(s, n)
        ref = self.ref[split].to(lp.device)[b["idx"]].squeeze(-1)
        u = UnpairedLogps(logps=lp, ref=ref, label=b["label"], kl=b["kl"])
        losses, m = self.obj.loss_fn(u, self.hp)
        r = m["reward/row"]
        lab = b["label"]
        pos, neg = lab.float(), (~lab).float()
        correct = torch.where(lab, pair_correct(r - self.hp.beta * u.kl), pair_correct(self.hp.beta * u.kl - r))
        mets = {
            "reward/chosen": ((r * pos).sum(), pos.sum()),
            "reward/rejected": ((r * neg).sum(), neg.sum()),
            "reward/accuracy": (correct.sum(), len(r)),
            "logps/chosen": ((s.detach() * pos).sum(), pos.sum()),
            "logps/rejected": ((s.detach() * neg).sum(), neg.sum()),
            "kl/estimate": (u.kl * len(r), len(r)),
        }
        return losses.sum(), mets

    # ----------------------------------------------------------------- Task protocol

    def startup_check(self) -> None:
        self.check_kernels(self.policy, lambda part: self._batch(self.train_set, part))

    def describe(self) -> dict:
        objective = {"name": self.name, "reference": self.obj.needs_ref, "reduce": self.reduce, **vars(self.hp)}
        if self.personal is not None:
            objective["personalisation"] = {**self.personal.model_dump(), "generic_rows": len(self.generic)}
        out = self.describe_data("pairs" if self.paired else "unpaired", self.lm, objective)
        if self.user_names:
            new = sorted({u for u in self.user_ids["eval"] or [] if u is not None} - set(self.user_names))
            out["data"]["users"] = {"column": self.user_col, "train": self.user_names, "new_in_eval": new}
        return out

    def plan_for(self, items: list[int]) -> Plan:
        micro = []
        kl = None
        if not self.paired:
            mine = shard_for_rank(items, self.rt.rank, self.rt.world_size)
            kl = self._kl_estimate(self.train_set, mine, self.kl_partner, "train_kl")
        for part in self.micro_parts(items):
            b = self._batch(self.train_set, part)
            if kl is not None:
                b["kl"] = kl
            micro.append(Micro(batch=b, n=len(part), tokens=int(b["attention_mask"].sum())))
        fn = self._pair_loss if self.paired else self._unpaired_loss
        return make_plan("policy", self.name, micro, fn)

    def plans(self, start_step: int) -> Iterator[Plan]:
        self._ensure_ref()
        for items in self.step_items():
            yield self.plan_for(items)

    def load_state_dict(self, state: dict, extra: dict) -> None:
        self.cursor.load(state, self.ctx.warn)
        if self.obj.needs_ref:
            want = {"train": len(self.train_set)}
            if self.eval_set is not None:
                want["eval"] = len(self.eval_set)
            for key, n in want.items():
                if key not in extra or extra[key].shape[0] != n:
                    raise UsageError(
                        f"the checkpoint's reference log-probs do not match the data ({key}: expected "
                        f"{n} rows); the data changed since the run started. Start a new run."
                    )
            self.ref = {k: v for k, v in extra.items()}

    def extra_tensors(self) -> dict:
        return dict(self.ref)

    @torch.no_grad()
    def evaluate(self) -> dict:
        rt, s = self.rt, self.eval_set
        self._ensure_ref()
        bs = self.cfg.train.batch_size
        kl = None
        if not self.paired:
            kl = self._kl_estimate(
                s, shard_for_rank(list(range(len(s))), rt.rank, rt.world_size), self.eval_partner, "eval_kl"
            )
            names = [
                "loss",
                "reward/chosen",
                "reward/rejected",
                "reward/accuracy",
                "logps/chosen",
                "logps/rejected",
                "kl/estimate",
            ]
        else:
            names = [
                "loss",
                "reward/chosen",
                "reward/rejected",
                "reward/margin",
                "reward/accuracy",
                "logps/chosen",
                "logps/rejected",
                *self.obj.extra_metrics,
            ]
        # the same names on every process (one all-reduce), whatever its share of the held-out set
        tot = torch.zeros(2 * len(names), dtype=torch.float64, device=rt.device)
        per_row = torch.zeros(len(s), 2, dtype=torch.float64, device=rt.device)  # (scored, implicit reward margin)
        for items in iterate_eval(len(s), bs, rt.rank, rt.world_size, self.cfg.train.eval_max_batches):
            if not items:
                continue
            b = self._batch(s, items)
            if self.paired:
                lp, sum_c, sum_r = self._pair_inputs(self.policy, b, "eval")
                loss, m = pair_objective(self.obj, self.hp, lp, sum_c, sum_r, loss_scale=b.get("weight"))
                if s.users is not None:  # each pair's implicit reward margin, what reward/accuracy counts
                    _, r = self.obj.loss_fn(lp, self.hp)
                    margin = r["reward/chosen"] - r["reward/rejected"]
                    per_row[torch.tensor(items, device=rt.device)] = torch.stack(
                        [torch.ones(len(items), device=rt.device), margin], 1
                    ).double()
            else:
                b["kl"] = kl
                loss, m = self._unpaired_loss(self.policy, b, "eval")
            m["loss"] = (loss, len(items))
            for i, k in enumerate(names):
                tot[2 * i] += float(m[k][0])
                tot[2 * i + 1] += float(m[k][1])
        rt.all_reduce(tot)
        out = {}
        rename = {"reward/accuracy": "eval/accuracy", "reward/margin": "eval/margin", "loss": "eval/loss"}
        for i, k in enumerate(names):
            if tot[2 * i + 1] > 0:
                out[rename.get(k, "eval/" + k.replace("/", "_"))] = (tot[2 * i] / tot[2 * i + 1]).item()
        if self.paired and s.users is not None:
            out.update(self._per_user(per_row))
        return out

    def _per_user(self, per_row: torch.Tensor) -> dict:
        """eval/accuracy/<user> and the worst user: every user of the held-out pairs for a pooled policy, the users
        seen in training for a personalised one (whose other users, served without a token, give
        eval/new_user/accuracy@0)."""
        self.rt.all_reduce(per_row)
        s = self.eval_set
        done = [j for j in range(len(s)) if per_row[j, 0] > 0]
        ids = self.user_ids["eval"]
        if self.personal is None:
            names = sorted({ids[j] for j in done if ids[j] is not None})
            vocab = {u: k for k, u in enumerate(names)}
            out = per_user_accuracy(per_row[done, 1], [vocab.get(ids[j], -1) if ids[j] else -1 for j in done], names)
        else:
            out = per_user_accuracy(per_row[done, 1], [s.users[j] for j in done], self.user_names)
        new = [j for j in done if ids[j] is not None and s.users[j] < 0]
        if new:
            out["eval/new_user/accuracy@0"] = float(pair_correct(per_row[new, 1]).mean())
        return out

    def save_final(self, out_dir: Path) -> None:
        save_hf(self.lm, self.tok, out_dir, self.rt)
        if self.user_tokens and self.rt.is_main:
            save_policy_users(out_dir, self.user_tokens, self.tok, {"user_column": self.user_col})


def build(ctx: RunContext) -> ContrastiveTask | InfoNCETask:
    obj = OBJECTIVES[ctx.recipe.contrastive.objective]
    if obj.rows == "encoder":
        return InfoNCETask(ctx)
    return ContrastiveTask(ctx)
