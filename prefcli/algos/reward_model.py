"""`prefcli reward`: a reward model, a scalar head on a causal LM or encoder, trained on human preferences.

The model is `AutoModelForSequenceClassification` with one label: the score r(x, y) is the head's
output at the last real token of `prompt + completion` (right padding; the config's pad_token_id
tells transformers where the padding starts). The text is exactly the string `prompt + completion`
tokenized with the tokenizer's own special tokens and nothing added, as `prefcli.reward_sources.ModelSource`
scores it at RL time. A new head is initialised with std 1/sqrt(d+1) (Huang et al. 2023).

Objectives (registry `OBJECTIVES`, chosen by `reward.objective`), each a pure function:

- bradley_terry: L = -log σ(r_w - r_l - m) + η (r_w + r_l)²                per pair
  (Bradley & Terry 1952; Ouyang et al. 2022 Eq. 1; margin m: Touvron et al. 2023 Eq. 2;
  centering η: Eisenstein et al. 2023, TRL's center_rewards_coefficient)
- regression: L = (r - s)² on rows of text and human score s               per row
- ranking: Bradley-Terry on every ordered pair of a K-way ranking          per ordered pair
  (Ouyang et al. 2022 Eq. 1, which averages the K(K-1)/2 comparisons of a prompt)

Held-out metrics: pairwise accuracy (fraction of pairs with r_w > r_l, ties ½), mean margin, and
the calibration of P(y_w ≻ y_l) = σ(r_w - r_l): expected and maximum calibration error over
equal-width confidence bins (Guo et al. 2017; logged as APO does).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..engine.data import iterate_eval, move
from ..engine.debias import apply_debias, pair_weights
from ..engine.models import build_trained_model, save_hf, whole_state
from ..engine.pairs import (
    check_format,
    detect_pair_format,
    encode_scored,
    is_empty,
    kept_rows,
    map_cached,
    pair_correct,
    scored_text,
    text_batch,
)
from ..engine.personal import PersonalReward, make_conditioner, score_head
from ..engine.personal import save as save_personal
from ..engine.run import RunContext
from ..engine.task import Group, Micro, Plan
from ..engine.tokenizer import load_tokenizer
from ..engine.users import find_user_column, missing_user_column, read_users
from ..errors import DataError
from .common import Scheduled, load_splits, make_plan, report
from .reward_users import fixed_context, latent_context, new_user_curve, per_user_accuracy, user_index

# ----------------------------------------------------------------------------------- losses


def bradley_terry_loss(
    r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | None = None, center: float = 0.0
) -> torch.Tensor:
    """Pairwise Bradley-Terry loss per pair (Bradley & Terry 1952; InstructGPT, Ouyang et al. 2022,
    Eq. 1), with the Llama 2 margin (Touvron et al. 2023, Eq. 2) and reward centering
    (Eisenstein et al. 2023, arXiv 2312.09244): -log σ(r_w - r_l - m) + η (r_w + r_l)²."""
    d = r_chosen - r_rejected
    if margin is not None:
        d = d - margin
    loss = -F.logsigmoid(d)
    if center:
        loss = loss + center * (r_chosen + r_rejected) ** 2
    return loss


def regression_loss(r: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """Squared error to a human score per row: (r - s)²."""
    return (r - score) ** 2


def ranking_pairs(k_per_row: list[int]) -> tuple[list[int], list[int]]:
    """Indices (better, worse) of every ordered pair of K-way rankings laid out row after row,
    each row best first."""
    better, worse = [], []
    off = 0
    for k in k_per_row:
        for i in range(k):
            for j in range(i + 1, k):
                better.append(off + i)
                worse.append(off + j)
        off += k
    return better, worse


def ranking_loss(rewards: torch.Tensor, better: torch.Tensor, worse: torch.Tensor, center: float = 0.0) -> torch.Tensor:
    """K-way rankings: the Bradley-Terry loss of every ordered pair (Ouyang et al. 2022, Eq. 1;
    APO's ranking_loss), one loss per pair."""
    return bradley_terry_loss(rewards[better], rewards[worse], None, center)


def calibration(margins: torch.Tensor, bins: int) -> torch.Tensor:
    """Per-bin (count, summed confidence, summed correctness) of the predicted preference
    P(y_w ≻ y_l) = σ(margin): confidence max(p, 1-p) in equal-width bins over [0.5, 1], correct
    when the prediction picks the human choice (ties ½). Sums, so they add across batches and
    processes; `calibration_errors` turns them into ECE and MCE (Guo et al. 2017)."""
    p = torch.sigmoid(margins.double())
    conf = torch.maximum(p, 1 - p)
    correct = pair_correct(margins).double()
    idx = ((conf - 0.5) / (0.5 / bins)).floor().clamp(0, bins - 1).long()
    out = torch.zeros(bins, 3, dtype=torch.float64, device=margins.device)
    out[:, 0].index_add_(0, idx, torch.ones_like(conf))
    out[:, 1].index_add_(0, idx, conf)
    out[:, 2].index_add_(0, idx, correct)
    return out


def calibration_errors(table: torch.Tensor) -> tuple[float, float]:
    """ECE = Σ_b (n_b/N) |acc_b - conf_b|, MCE = max_b |acc_b - conf_b| over non-empty bins."""
    n = table[:, 0]
    used = n > 0
    if not bool(used.any()):
        return float("nan"), float("nan")
    gap = (table[used, 2] / n[used] - table[used, 1] / n[used]).abs()
    return float((n[used] / n.sum() * gap).sum()), float(gap.max())


@dataclass(frozen=True)
class RewardObjective:
    """An entry of the reward-model registry: its loss, the rows it reads and their required columns."""

    loss_fn: Callable
    rows: str  # 'pairs' | 'scores' | 'rankings'
    required: tuple[str, ...]


OBJECTIVES: dict[str, RewardObjective] = {
    "bradley_terry": RewardObjective(bradley_terry_loss, "pairs", ("chosen", "rejected")),
    "regression": RewardObjective(regression_loss, "scores", ("score",)),
    "ranking": RewardObjective(ranking_loss, "rankings", ("completions",)),
}


# ------------------------------------------------------------------------------------- data


class ScoredSet:
    """Reward-model token rows. pairs: seqs = [chosen, rejected] per example (+ margin);
    scores: seqs = [text] (+ score); rankings: seqs = K texts, best first."""

    def __init__(self, seqs, values, n_rows, bad, n_truncated, rows=None):
        self.seqs, self.values, self.n_rows, self.bad, self.n_truncated = seqs, values, n_rows, bad, n_truncated
        self.rows = rows if rows is not None else list(range(len(seqs)))  # source row of each example
        self.users: list[int] | None = None  # per example: index of its user among those seen in training, -1 none
        self.user_ids: list[str | None] | None = None  # per example: its user id as in the data

    def __len__(self) -> int:
        return len(self.seqs)

    def n_tokens(self) -> int:
        return sum(len(x) for s in self.seqs for x in s)


def tokenize_scored(
    ds, tok, rows: str, fmt: str, max_length: int, use_margin: bool, source: str, what: str
) -> ScoredSet:
    cols = ds.column_names
    has_prompt = "prompt" in cols
    if rows == "scores" and "text" not in cols and "completion" not in cols:
        raise DataError(
            f"{what}: {source}: human-score rows need a 'text' column (or 'prompt' and 'completion') "
            f"beside 'score' (columns: {', '.join(cols)})"
        )
    check_format(ds, ("prompt", "chosen", "rejected", "completion"), fmt, source, what)
    has_margin = rows == "pairs" and use_margin and "margin" in cols
    for i, v in enumerate(ds["score"] if rows == "scores" else ds["margin"] if has_margin else []):
        if v is not None and not isinstance(v, (int, float)):
            raise DataError(
                f"{what}: {source}: row {i + 1}: {'score' if rows == 'scores' else 'margin'} {v!r} is not a number"
            )

    def encode(row):
        out = {"seqs": [], "value": 0.0, "bad": "", "trunc": False}
        prompt = row["prompt"] if has_prompt else None
        if rows == "pairs":
            comps = [row["chosen"], row["rejected"]]
            if any(is_empty(c) for c in comps):
                out["bad"] = "missing"
                return out
            if comps[0] == comps[1]:
                out["bad"] = "identical"
                return out
            out["value"] = float(row["margin"]) if has_margin and row["margin"] is not None else 0.0
        elif rows == "scores":
            comps = [row["text"] if "text" in row else row["completion"]]
            if is_empty(comps[0]) or row["score"] is None:
                out["bad"] = "missing"
                return out
            out["value"] = float(row["score"])
        else:
            comps = row["completions"] or []
            if len(comps) < 2 or any(is_empty(c) for c in comps):
                out["bad"] = "missing"
                return out
            if len({str(c) for c in comps}) < len(comps):
                out["bad"] = "identical"
                return out
        if prompt is not None:
            p_text = scored_text(tok, fmt, prompt, comps[0])[0]
            if len(tok(p_text, add_special_tokens=True)["input_ids"]) >= max_length:
                out["bad"] = "long_prompt"
                return out
        seqs, trunc = [], False
        for c in comps:
            p, cs = scored_text(tok, fmt, prompt, c)
            ids, t = encode_scored(tok, p + cs, max_length)
            seqs.append(ids)
            trunc = trunc or t
        out.update(seqs=seqs, trunc=trunc)
        return out

    enc = map_cached(ds, tok, encode, ("reward", rows, fmt, max_length, has_margin, has_prompt), "tokenizing")
    keep, bad = kept_rows(enc)
    S, V, T = enc["seqs"], enc["value"], enc["trunc"]
    return ScoredSet(
        [S[i] for i in keep],
        [V[i] for i in keep] if (rows != "pairs" or has_margin) else None,
        len(ds),
        bad,
        sum(1 for i in keep if T[i]),
        keep,
    )


# ------------------------------------------------------------------------------------- task


class RewardTask(Scheduled):
    def __init__(self, ctx: RunContext):
        r = ctx.recipe
        self.ctx, self.rt, self.cfg = ctx, ctx.rt, r
        rc, d = r.reward, r.data
        self.name = rc.objective
        self.obj = OBJECTIVES[rc.objective]
        self.rows = self.obj.rows
        self.center = rc.center_rewards_coefficient
        self.bins = rc.calibration_bins
        self.personal = rc.personalisation
        self.tok = load_tokenizer(r.model)
        train_rows, eval_rows, train_users = self._read_rows()
        self._examples(train_rows, eval_rows)
        self._index_users(eval_rows, train_users)
        self._build_model()
        self.setup_schedule(len(self.train_set), r.train, d.shuffle, self.rt.world_size)
        self.groups = {"reward": Group("reward", self.module, self.rt, r.train, self._total)}

    # ---------------------------------------------------------------- construction, in the order it runs

    def _read_rows(self):
        """The training and held-out rows (format, user column) after debiasing, and each training row's user."""
        ctx, r = self.ctx, self.cfg
        d = r.data
        train_rows, eval_rows, self.read_as = load_splits(d, self.obj.required, r.train.seed, self.rows == "pairs")
        requested = "chat" if self.read_as else d.format
        self.user_col = find_user_column(train_rows.column_names, d.user_column)
        if self.user_col is None and (self.personal is not None or d.user_column is not None):
            why = "reward.personalisation" if self.personal is not None else "data.user_column"
            raise missing_user_column("data.train", d.train.path, train_rows.column_names, d.user_column, why)
        probe = {
            "pairs": "chosen",
            "scores": "text" if "text" in train_rows.column_names else "completion",
            "rankings": "prompt" if "prompt" in train_rows.column_names else "completions",
        }[self.rows]
        self.format = fmt = (
            detect_pair_format(train_rows, probe, requested)
            if probe != "completions"
            else ("plain" if requested == "auto" else requested)
        )
        train_rows, eval_rows, self.debias = apply_debias(
            train_rows,
            eval_rows,
            d.debias,
            tok=self.tok,
            fmt=fmt,
            pairs=self.rows == "pairs",
            seed=r.train.seed,
            warn=ctx.warn,
            key_columns=(self.user_col,) if self.user_col else (),
        )
        return train_rows, eval_rows, read_users(train_rows, self.user_col, d.train.path, "data.train")

    def _examples(self, train_rows, eval_rows) -> None:
        """The tokenized training and held-out sets, reported, and the pairs' length-balancing weights."""
        ctx, d = self.ctx, self.cfg.data
        what = {"pairs": "chosen/rejected", "scores": "text or score", "rankings": "completions (at least 2)"}[
            self.rows
        ]
        expected = {
            "pairs": "rows with a non-empty chosen and rejected that differ",
            "scores": "rows with a non-empty text and a numeric score",
            "rankings": "rows with a list of at least 2 different completions, best first",
        }[self.rows] + f", the prompt shorter than data.max_length={d.max_length} tokens"
        enc = dict(rows=self.rows, fmt=self.format, max_length=d.max_length, use_margin=self.cfg.reward.use_margin)
        self.train_set = tokenize_scored(train_rows, self.tok, source=d.train.path, what="data.train", **enc)
        report(ctx, "data.train", d.train.path, self.train_set, d.max_length, what, expected)
        self.weights = None
        if self.rows == "pairs":  # length_balance 'reweight': the prompt is shared, the lengths differ by completion
            lens = [len(x[0]) for x in self.train_set.seqs], [len(x[1]) for x in self.train_set.seqs]
            self.weights = pair_weights(d.debias, *lens, self.debias, ctx.warn)
        self.eval_set = None
        if eval_rows is not None:
            src = d.eval.path if d.eval else d.train.path
            self.eval_set = tokenize_scored(eval_rows, self.tok, source=src, what="data.eval", **enc)
            report(ctx, "data.eval", src, self.eval_set, d.max_length, what, expected)

    def _index_users(self, eval_rows, train_users: list[str | None]) -> None:
        """The model's users (those with training rows; any other is new), each example's user, each user's rows."""
        d = self.cfg.data
        self.user_names: list[str] = []
        if self.user_col is not None:
            self._set_users(self.train_set, train_users)
            self.user_names = sorted({u for u in self.train_set.user_ids if u is not None})
            vocab = {u: i for i, u in enumerate(self.user_names)}
            self.train_set.users = user_index(self.train_set.user_ids, vocab)
            if self.eval_set is not None:
                src = d.eval.path if d.eval else d.train.path
                ev_col = self.user_col if self.user_col in eval_rows.column_names else None
                self._set_users(self.eval_set, read_users(eval_rows, ev_col, src, "data.eval"))
                self.eval_set.users = user_index(self.eval_set.user_ids, vocab)
        if self.personal is not None and not self.user_names:
            raise DataError(
                f"data.train: {d.train.path}: reward.personalisation needs users, but every row's "
                f"'{self.user_col}' is empty"
            )
        self.user_rows: dict[int, list[int]] = {}
        if self.train_set.users is not None:
            for i, u in enumerate(self.train_set.users):
                if u >= 0:
                    self.user_rows.setdefault(u, []).append(i)

    def _build_model(self) -> None:
        """The reward model and the module the optimizer trains (with the users' conditioner if personalised)."""
        r = self.cfg
        self.model = build_trained_model(
            r.model, self.tok, self.rt, r.train.gradient_checkpointing, r.train.seed, smoke=self.ctx.smoke, head="score"
        )
        self.module = self.model
        self.cond = None
        if self.personal is not None:
            hidden = score_head(self.model).weight.shape[-1]
            torch.manual_seed(r.train.seed + 2)
            spec = self.personal.model_dump(exclude={"kind", "new_user_labels", "new_user_draws"})
            self.cond = make_conditioner(self.personal.kind, self.user_names, hidden, spec).to(self.rt.device)
            self.module = PersonalReward(self.model, self.cond, self.rt.autocast)

    @staticmethod
    def _set_users(s: ScoredSet, users: list[str | None]) -> None:
        s.user_ids = [users[i] for i in s.rows]

    # ------------------------------------------------------------------------ scoring

    def _scores(self, module, b) -> torch.Tensor:
        if self.cond is not None:
            return module(b)["personal"]
        with self.rt.autocast():
            out = module(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
        return out.logits[:, 0].float()

    def score_texts(self, prompts: list[str], completions: list[str], max_length: int | None = None) -> list[float]:
        """Scores of (prompt, completion) pairs as training computes them (the text prompt + completion); for a
        personalised model, by its shared part (an unknown user)."""
        ml = max_length or self.cfg.data.max_length
        seqs = [encode_scored(self.tok, p + c, ml)[0] for p, c in zip(prompts, completions)]
        was = self.module.training
        self.module.eval()
        b = move(text_batch(seqs, self.tok.pad_token_id), self.rt.device)
        if self.cond is not None:
            b["user"] = torch.full((len(seqs),), -1, device=self.rt.device)
        with torch.no_grad():
            s = self._scores(self.module, b)
        self.module.train(was)
        return s.tolist()

    def _batch(self, s: ScoredSet, items: list[int], context_key: str | None = None) -> dict:
        if self.rows == "pairs":  # chosen rows then rejected rows: one forward
            seqs = [s.seqs[i][0] for i in items] + [s.seqs[i][1] for i in items]
        else:
            seqs = [x for i in items for x in s.seqs[i]]
        b = text_batch(seqs, self.tok.pad_token_id)
        b["B"] = len(items)
        if s.values is not None:
            b["value"] = torch.tensor([s.values[i] for i in items], dtype=torch.float32)
        if self.rows == "rankings":
            better, worse = ranking_pairs([len(s.seqs[i]) for i in items])
            b["better"], b["worse"] = torch.tensor(better), torch.tensor(worse)
        if self.weights is not None and s is self.train_set:
            b["weight"] = torch.tensor([self.weights[i] for i in items], dtype=torch.float32)
        if self.cond is not None:
            if context_key is not None and self.personal.kind == "latent":
                p = self.personal
                b.update(
                    latent_context(
                        s,
                        items,
                        self.user_rows,
                        p.min_context_pairs,
                        p.context_pairs,
                        context_key,
                        self.tok.pad_token_id,
                        p.latent_dim,
                    )  # fmt: skip
                )
            else:
                u = [s.users[i] for i in items]
                b["user"] = torch.tensor(u + u)
        return move(b, self.rt.device)

    def units(self, s: ScoredSet, items: list[int]) -> int:
        if self.rows == "rankings":
            return sum(len(s.seqs[i]) * (len(s.seqs[i]) - 1) // 2 for i in items)
        return len(items)

    def _loss(self, module, b) -> tuple[torch.Tensor, dict]:
        if self.cond is not None:
            return self._personal_loss(module, b)
        r = self._scores(module, b)
        B = b["B"]
        if self.rows == "scores":
            losses = self.obj.loss_fn(r, b["value"])
            return losses.sum(), {
                "reward/mean": (r.detach().sum(), B),
                "reward/abs_error": ((r.detach() - b["value"]).abs().sum(), B),
            }
        if self.rows == "pairs":
            rc, rr = r[:B], r[B:]
            losses = self.obj.loss_fn(rc, rr, b.get("value"), self.center)
            if "weight" in b:  # data.debias.length_balance: reweight
                losses = losses * b["weight"]
        else:
            rc, rr = r[b["better"]], r[b["worse"]]
            losses = self.obj.loss_fn(r, b["better"], b["worse"], self.center)
        return losses.sum(), pair_metrics(rc, rr)

    def _personal_loss(self, module, b) -> tuple[torch.Tensor, dict]:
        """Each row's Bradley-Terry loss on its user's reward, mixed with alpha x the loss of the shared part alone
        (P-RLHF's generic user; rows without a user train the shared part only), plus beta x the KL of the latent
        contexts (VPL's evidence lower bound)."""
        out = module(b)
        B = b["B"]
        pc, pr = out["personal"][:B], out["personal"][B:]
        sc, sr = out["shared"][:B], out["shared"][B:]
        lp = self.obj.loss_fn(pc, pr, b.get("value"), self.center)
        ls = self.obj.loss_fn(sc, sr, b.get("value"), self.center)
        known = (b["row_group"] if "row_group" in b else b["user"])[:B] >= 0
        a = self.personal.generic_weight
        losses = torch.where(known, (1 - a) * lp + a * ls, ls)
        if "weight" in b:
            losses = losses * b["weight"]
        total = losses.sum()
        m = pair_metrics(pc, pr)
        m["reward/accuracy_shared"] = (pair_correct((sc - sr).detach()).sum(), B)
        if self.personal.kind == "latent":
            total = total + self.personal.kl_weight * out["kl"]
            m["reward/kl"] = (out["kl"].detach(), b.get("n_groups", 1))
        return total, m

    # ----------------------------------------------------------------- Task protocol

    def describe(self) -> dict:
        objective = {
            "name": self.name,
            "center_rewards_coefficient": self.center,
            "margin_column": self.rows == "pairs" and self.train_set.values is not None,
        }
        if self.personal is not None:
            objective["personalisation"] = self.personal.model_dump()
        out = self.describe_data(self.rows, self.model, objective)
        if self.user_col is not None:
            new = sorted({u for u in (self.eval_set.user_ids if self.eval_set else []) or [] if u is not None}
                         - set(self.user_names))  # fmt: skip
            out["data"]["users"] = {"column": self.user_col, "train": self.user_names, "new_in_eval": new}
        if self.cond is not None:
            out["model"]["user_parameters"] = sum(p.numel() for p in self.cond.parameters())
        return out

    def plans(self, start_step: int) -> Iterator[Plan]:
        for items in self.step_items():
            key = f"{self.cfg.train.seed}|{self.cursor.epoch}|{self.cursor.index}|{self.rt.rank}"
            micro = []
            for k, part in enumerate(self.micro_parts(items)):
                b = self._batch(self.train_set, part, context_key=f"{key}|{k}")
                micro.append(Micro(batch=b, n=self.units(self.train_set, part), tokens=int(b["attention_mask"].sum())))
            yield make_plan("reward", self.name, micro, self._loss)

    @torch.no_grad()
    def evaluate(self) -> dict:
        if self.rows == "pairs" and (self.user_col is not None or self.cond is not None):
            with self.groups["reward"].gathered(hold=True):
                return self._evaluate_users()
        rt, s = self.rt, self.eval_set
        dev = rt.device
        items_all = []
        preds, values = [], []
        # sums: loss, units, correct, margin, chosen, rejected ; + calibration table
        tot = torch.zeros(6, dtype=torch.float64, device=dev)
        cal = torch.zeros(self.bins, 3, dtype=torch.float64, device=dev)
        for items in iterate_eval(
            len(s), self.cfg.train.batch_size, rt.rank, rt.world_size, self.cfg.train.eval_max_batches
        ):
            if not items:
                continue
            b = self._batch(s, items)
            loss, m = self._loss(self.model, b)
            if self.rows == "scores":
                preds.append(self._scores(self.model, b).double())
                values.append(b["value"].double())
                items_all += items
                tot[0] += loss.double()
                tot[1] += len(items)
                continue
            n = m["reward/accuracy"][1]
            tot += torch.stack(
                [
                    loss.double(),
                    torch.tensor(float(n), dtype=torch.float64, device=dev),
                    m["reward/accuracy"][0].double(),
                    m["reward/margin"][0].double(),
                    m["reward/chosen"][0].double(),
                    m["reward/rejected"][0].double(),
                ]
            )
            r = self._scores(self.model, b)
            if self.rows == "pairs":
                diff = r[: b["B"]] - r[b["B"] :]
            else:
                diff = r[b["better"]] - r[b["worse"]]
            cal += calibration(diff, self.bins)
        if self.rows == "scores":
            return self._eval_scores(tot, preds, values)
        rt.all_reduce(tot)
        rt.all_reduce(cal)
        n = tot[1].item()
        if n == 0:
            return {}
        ece, mce = calibration_errors(cal)
        return {
            "eval/loss": tot[0].item() / n,
            "eval/accuracy": tot[2].item() / n,
            "eval/margin": tot[3].item() / n,
            "eval/reward_chosen": tot[4].item() / n,
            "eval/reward_rejected": tot[5].item() / n,
            "eval/ece": ece,
            "eval/mce": mce,
            "eval/pairs": n,
        }

    def _refresh_latent_users(self) -> None:
        """The latent kind: each seen user's state, the encoder's mean on a fixed context of their training pairs
        (`fixed_context`), with the current weights."""
        p, s = self.personal, self.train_set
        for u, name in enumerate(self.user_names):
            ctx = fixed_context(self.user_rows.get(u, []), p.context_pairs, self.cfg.train.seed, name)
            if not ctx:
                continue
            hc, hr = self._pair_features(s, ctx)
            self.cond.user_z[u] = self.cond.fit(hc, hr, hc.new_zeros(len(ctx))).to(self.cond.user_z.dtype)

    def _pair_features(self, s: ScoredSet, items: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states [n, d] of the chosen and the rejected completions of these pairs (this process only)."""
        hc, hr = [], []
        bs = self.cfg.train.batch_size
        for k in range(0, len(items), bs):
            part = items[k : k + bs]
            seqs = [s.seqs[i][0] for i in part] + [s.seqs[i][1] for i in part]
            b = move(text_batch(seqs, self.tok.pad_token_id), self.rt.device)
            h = self.module.hidden(b["input_ids"], b["attention_mask"])
            hc.append(h[: len(part)])
            hr.append(h[len(part) :])
        return torch.cat(hc), torch.cat(hr)

    def _evaluate_users(self) -> dict:
        """Held-out pairs with a user column: the overall figures, per-user accuracy and the worst user (users seen
        in training for a personalised model; every user for a pooled one), and for a personalised model the
        shared part's accuracy and the new-user curve."""
        was = self.module.training
        self.module.eval()
        if self.cond is not None and self.personal.kind == "latent":
            self._refresh_latent_users()
        s = self.eval_set
        users = s.users or [-1] * len(s)
        ids = s.user_ids or [None] * len(s)
        # a personalised model's new users: rows of a user never trained on (scored in the new-user curve)
        new = {}
        if self.cond is not None:
            new = {j: k for k, j in enumerate(j for j in range(len(s)) if users[j] < 0 and ids[j] is not None)}
        rows, feats = self._score_rows(new)
        done = [j for j in range(len(s)) if rows[j, 0] > 0]
        out = self._overall([j for j in done if j not in new], rows)
        if self.cond is None:  # pooled: every user of the held-out rows, seen in training or not
            names = sorted({ids[j] for j in done if ids[j] is not None})
            vocab = {u: k for k, u in enumerate(names)}
            out.update(per_user_accuracy(rows[done, 1], [vocab.get(ids[j], -1) for j in done], names))
            unseen = [j for j in done if ids[j] is not None and users[j] < 0]
            if unseen:
                out["eval/new_user/accuracy@0"] = float(pair_correct(rows[unseen, 1]).mean())
        else:
            out.update(per_user_accuracy(rows[done, 1], [users[j] for j in done], self.user_names))
            out.update(self._new_user_curve(new, [j for j in done if j in new], rows, feats))
        self.module.train(was)
        return out

    def _score_rows(self, new: dict[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Every held-out pair scored, each process its share, summed across processes (so every process ends
        with the same table): per row (scored, personal margin, shared margin, loss, reward chosen, reward
        rejected), and the hidden states [n_new, 2, d] of the chosen and rejected texts of the new users' rows."""
        rt, s, dev = self.rt, self.eval_set, self.rt.device
        rows = torch.zeros(len(s), 6, dtype=torch.float64, device=dev)
        feats = torch.zeros(len(new), 2, score_head(self.model).weight.shape[-1], dtype=torch.float64, device=dev)
        bs, cap = self.cfg.train.batch_size, self.cfg.train.eval_max_batches
        for items in iterate_eval(len(s), bs, rt.rank, rt.world_size, cap):
            if not items:
                continue
            b = self._batch(s, items)
            B = b["B"]
            if self.cond is not None:
                out = self.module(b)
                pers, shared, h = out["personal"], out["shared"], out["hidden"]
                for k, i in enumerate(items):
                    if i in new:
                        feats[new[i]] = torch.stack([h[k], h[B + k]]).double()
            else:
                pers = shared = self._scores(self.model, b)
            loss = self.obj.loss_fn(pers[:B], pers[B:], b.get("value"), self.center)
            rows[torch.tensor(items, device=dev)] = torch.stack(
                [torch.ones(B, device=dev), pers[:B] - pers[B:], shared[:B] - shared[B:], loss, pers[:B], pers[B:]], 1
            ).double()
        rt.all_reduce(rows)
        rt.all_reduce(feats)
        return rows, feats

    def _overall(self, sel: list[int], rows: torch.Tensor) -> dict:
        """The usual held-out figures over the rows `sel` (the model's own users and rows without a user)."""
        if not sel:
            return {}
        r = rows[sel]
        ece, mce = calibration_errors(calibration(r[:, 1], self.bins))
        out = {
            "eval/loss": float(r[:, 3].mean()),
            "eval/accuracy": float(pair_correct(r[:, 1]).mean()),
            "eval/margin": float(r[:, 1].mean()),
            "eval/reward_chosen": float(r[:, 4].mean()),
            "eval/reward_rejected": float(r[:, 5].mean()),
            "eval/ece": ece,
            "eval/mce": mce,
            "eval/pairs": len(sel),
        }
        if self.cond is not None:
            out["eval/accuracy_shared"] = float(pair_correct(r[:, 2]).mean())
        return out

    def _new_user_curve(self, new: dict[int, int], done: list[int], rows, feats) -> dict:
        """eval/new_user/accuracy@k: each new user's state fitted from k of their rows (Conditioner.fit on the
        hidden states), their other rows scored with it (reward_users.new_user_curve draws the rows)."""
        if not done:
            return {}
        by_user: dict[str, list[int]] = {}
        for j in done:
            by_user.setdefault(self.eval_set.user_ids[j], []).append(new[j])
        f = feats.float().cpu()
        ms = torch.zeros(len(new))
        for j, k in new.items():
            ms[k] = float(rows[j, 2])  # the shared part's margin
        cond = self.cond

        def fit(ctx: list[int]) -> torch.Tensor:
            return cond.fit(f[ctx, 0], f[ctx, 1], ms[ctx])

        def margin_of(state: torch.Tensor, scored: list[int]) -> torch.Tensor:
            v = cond.offsets(state.to(cond.offsets_device())[None].float())[0].cpu()
            return ms[scored] + (f[scored, 0] - f[scored, 1]) @ v

        p = self.personal
        return new_user_curve(fit, margin_of, by_user, p.new_user_labels, p.new_user_draws, self.cfg.train.seed)

    def _eval_scores(self, tot, preds, values) -> dict:
        """Human scores: mean squared error, Pearson correlation, and the pairwise accuracy over every
        held-out pair of rows whose human scores differ (on this process's rows)."""
        rt = self.rt
        p = torch.cat(preds) if preds else torch.zeros(0, dtype=torch.float64, device=rt.device)
        v = torch.cat(values) if values else torch.zeros(0, dtype=torch.float64, device=rt.device)
        dp = p[:, None] - p[None, :]
        dv = v[:, None] - v[None, :]
        upper = dv > 0
        pair_acc = (
            pair_correct(dp[upper]).double().sum()
            if bool(upper.any())
            else torch.zeros((), dtype=torch.float64, device=rt.device)
        )
        moments = torch.stack(
            [p.sum(), v.sum(), (p * p).sum(), (v * v).sum(), (p * v).sum(), pair_acc, upper.sum().double()]
        )
        allv = rt.all_reduce(torch.cat([tot[:2], moments]))
        loss, n, sp, sv, spp, svv, spv, acc, npairs = allv.tolist()
        if n == 0:
            return {}
        cov = spv / n - sp * sv / n**2
        var_p, var_v = spp / n - (sp / n) ** 2, svv / n - (sv / n) ** 2
        out = {
            "eval/loss": loss / n,
            "eval/mse": loss / n,
            "eval/reward_mean": sp / n,
            "eval/pearson": cov / math.sqrt(var_p * var_v) if var_p > 0 and var_v > 0 else float("nan"),
        }
        if npairs:
            out["eval/accuracy"] = acc / npairs
        return out

    def save_final(self, out_dir: Path) -> None:
        save_hf(self.model, self.tok, out_dir, self.rt)
        if self.cond is None:
            return
        with self.groups["reward"].gathered(hold=True):
            if self.personal.kind == "latent":
                was = self.module.training
                self.module.eval()
                with torch.no_grad():
                    self._refresh_latent_users()
                self.module.train(was)
            state = whole_state(self.cond, self.rt)
        if not self.rt.is_main:
            return
        cpu = make_conditioner(self.personal.kind, self.user_names, self.cond.hidden, self.cond.spec)
        cpu.load_state_dict(state)
        with torch.no_grad():
            states = cpu.known_states()
        save_personal(out_dir, cpu, states, {"user_column": self.user_col})


def pair_metrics(rc: torch.Tensor, rr: torch.Tensor) -> dict:
    n = rc.shape[0]
    diff = (rc - rr).detach()
    return {
        "reward/chosen": (rc.detach().sum(), n),
        "reward/rejected": (rr.detach().sum(), n),
        "reward/margin": (diff.sum(), n),
        "reward/accuracy": (pair_correct(diff).sum(), n),
    }


def build(ctx: RunContext) -> RewardTask:
    return RewardTask(ctx)
