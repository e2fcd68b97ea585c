"""`prefcli contrastive` with `objective: infonce`: a preference encoder trained with in-batch negatives.

A different family from the DPO losses: it trains an encoder (the transformer body, no LM head)
whose embeddings place a prompt close to the answer people preferred. For a batch of B rows,
anchors a_i = the prompts, candidates = every chosen answer p_j of the batch (the other rows'
answers are the "random pairs" negatives) plus every rejected answer n_j (hard negatives):

    L_i = -log  exp(s(a_i, p_i)/τ) / [ Σ_j exp(s(a_i, p_j)/τ) + Σ_j exp(s(a_i, n_j)/τ) ]

s = cosine similarity, τ = 0.05 (scale 20) by default: InfoNCE (Oord et al. 2018, arXiv
1807.03748, Eq. 4) in the supervised SimCSE form with hard negatives (Gao et al. 2021, arXiv
2104.08821, Eq. 5); sentence-transformers' MultipleNegativesRankingLoss is the same loss.

Negatives come from the micro-batch on each device, so raising grad_accum_steps does not add
negatives (unlike the paired losses, this loss is not additive over examples). Afterwards the
encoder scores preferences: score(x, y) = cos(e(x), e(y)) (`EncoderScorer`); `final/` holds the
body (`AutoModel.from_pretrained` loads it), the tokenizer and `prefcli_encoder.json` (pooling).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.data import iterate_eval, move
from ..engine.debias import apply_debias
from ..engine.models import build_trained_model, save_hf, unwrap_lm
from ..engine.pairs import (
    check_format,
    detect_pair_format,
    is_empty,
    kept_rows,
    map_cached,
    pair_correct,
    text_batch,
)
from ..engine.run import RunContext
from ..engine.task import Group, Micro, Plan
from ..engine.tokenizer import chat_ids, load_tokenizer
from .common import Scheduled, load_splits, make_plan, report

ENCODER_FILE = "prefcli_encoder.json"


def infonce_loss(
    anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor | None, temperature: float
) -> tuple[torch.Tensor, dict]:
    """InfoNCE with in-batch and hard negatives (module docstring; Oord et al. 2018 Eq. 4, Gao et
    al. 2021 Eq. 5). anchor, positive, negative: (B, d) embeddings (negative may be None). Returns
    the loss per anchor and per-anchor metrics: cosine to its positive and its hard negative, and
    whether its own positive ranks first among all candidates."""
    a = F.normalize(anchor.float(), dim=-1)
    cands = positive if negative is None else torch.cat([positive, negative], 0)
    c = F.normalize(cands.float(), dim=-1)
    sim = a @ c.t()
    target = torch.arange(a.shape[0], device=a.device)
    losses = F.cross_entropy(sim / temperature, target, reduction="none")
    m = {"reward/chosen": sim[target, target].detach(), "retrieval/top1": (sim.argmax(-1) == target).float().detach()}
    if negative is not None:
        m["reward/rejected"] = sim[target, target + a.shape[0]].detach()
    return losses, m


class Encoder(nn.Module):
    """The transformer body with mean or last-token pooling: texts -> embeddings (float32)."""

    def __init__(self, body: nn.Module, pooling: str, rt):
        super().__init__()
        self.body = body
        self.pooling = pooling
        self.autocast = rt.autocast

    def forward(self, input_ids, attention_mask):
        with self.autocast():
            h = self.body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return pool(h.float(), attention_mask, self.pooling)


def pool(h: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Mean of the hidden states over real tokens, or the last real token's (right padding)."""
    if pooling == "last":
        last = mask.sum(-1) - 1
        return h[torch.arange(h.shape[0], device=h.device), last]
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp_min(1.0)


def encode_text(tok, value, fmt: str, max_length: int) -> list[int]:
    """Encoder tokens of one text: the tokenizer's special tokens, then EOS (chat: the template)."""
    if fmt == "chat":
        ids = chat_ids(tok, list(value))
    else:
        ids = tok(value, add_special_tokens=True)["input_ids"] + [tok.eos_token_id]
    return list(ids[:max_length])


class TripleSet:
    def __init__(self, anchor, positive, negative, n_rows, bad, n_truncated):
        self.anchor, self.positive, self.negative = anchor, positive, negative
        self.n_rows, self.bad, self.n_truncated = n_rows, bad, n_truncated

    def __len__(self) -> int:
        return len(self.anchor)


def tokenize_triples(ds, tok, fmt: str, max_length: int, source: str, what: str) -> TripleSet:
    check_format(ds, ("prompt", "chosen", "rejected"), fmt, source, what)
    has_neg = "rejected" in ds.column_names

    def encode(row):
        out = {"a": [], "p": [], "n": [], "bad": "", "trunc": False}
        neg = row["rejected"] if has_neg else None
        if is_empty(row["prompt"]) or is_empty(row["chosen"]) or (has_neg and is_empty(neg)):
            out["bad"] = "missing"
            return out
        if has_neg and row["chosen"] == neg:
            out["bad"] = "identical"
            return out
        a = encode_text(tok, row["prompt"], fmt, max_length + 1)
        if len(a) > max_length:
            out["bad"] = "long_prompt"
            return out
        p = encode_text(tok, row["chosen"], fmt, max_length + 1)
        n = encode_text(tok, neg, fmt, max_length + 1) if has_neg else []
        out.update(a=a, p=p[:max_length], n=n[:max_length], trunc=len(p) > max_length or len(n) > max_length)
        return out

    enc = map_cached(ds, tok, encode, ("infonce", fmt, max_length, has_neg), "tokenizing")
    keep, bad = kept_rows(enc)
    A, P, N, T = enc["a"], enc["p"], enc["n"], enc["trunc"]
    return TripleSet(
        [A[i] for i in keep],
        [P[i] for i in keep],
        [N[i] for i in keep] if has_neg else None,
        len(ds),
        bad,
        sum(1 for i in keep if T[i]),
    )


class InfoNCETask(Scheduled):
    def __init__(self, ctx: RunContext):
        r = ctx.recipe
        self.ctx, self.rt, self.cfg = ctx, ctx.rt, r
        c, d = r.contrastive, r.data
        self.temperature, self.pooling = c.temperature, c.pooling
        self.tok = tok = load_tokenizer(r.model)
        train_rows, eval_rows, _ = load_splits(d, ("prompt", "chosen"), r.train.seed)
        if not c.hard_negatives and "rejected" in train_rows.column_names:
            train_rows = train_rows.remove_columns("rejected")
            if eval_rows is not None and "rejected" in eval_rows.column_names:
                eval_rows = eval_rows.remove_columns("rejected")
        self.format = fmt = detect_pair_format(train_rows, "chosen", d.format)
        train_rows, eval_rows, self.debias = apply_debias(
            train_rows, eval_rows, d.debias, tok=tok, fmt=fmt, pairs=False, seed=r.train.seed, warn=ctx.warn
        )
        expected = (
            f"rows with a non-empty prompt and chosen (and rejected, differing from chosen), the prompt "
            f"shorter than data.max_length={d.max_length} tokens"
        )
        self.train_set = tokenize_triples(train_rows, tok, fmt, d.max_length, d.train.path, "data.train")
        report(ctx, "data.train", d.train.path, self.train_set, d.max_length, "prompt/chosen/rejected", expected)
        self.eval_set = None
        if eval_rows is not None:
            src = d.eval.path if d.eval else d.train.path
            self.eval_set = tokenize_triples(eval_rows, tok, fmt, d.max_length, src, "data.eval")
            report(ctx, "data.eval", src, self.eval_set, d.max_length, "prompt/chosen/rejected", expected)

        self.lm = lm = build_trained_model(
            r.model, tok, self.rt, r.train.gradient_checkpointing, r.train.seed, ctx.smoke
        )
        # the encoder is the transformer body: the LM head plays no part (and is not trained)
        self.encoder = Encoder(unwrap_lm(lm).base_model, self.pooling, self.rt)
        self.setup_schedule(len(self.train_set), r.train, d.shuffle, self.rt.world_size)
        self.groups = {"encoder": Group("encoder", self.encoder, self.rt, r.train, self._total)}

    def _batch(self, s: TripleSet, items: list[int]) -> dict:
        seqs = [s.anchor[i] for i in items] + [s.positive[i] for i in items]
        if s.negative is not None:
            seqs += [s.negative[i] for i in items]
        b = text_batch(seqs, self.tok.pad_token_id)
        b["B"] = len(items)
        return move(b, self.rt.device)

    def _loss(self, module, b) -> tuple[torch.Tensor, dict]:
        e = module(b["input_ids"], b["attention_mask"])  # anchors, positives, negatives: one forward
        B = b["B"]
        neg = e[2 * B :] if e.shape[0] > 2 * B else None
        losses, m = infonce_loss(e[:B], e[B : 2 * B], neg, self.temperature)
        mets = {"reward/chosen": (m["reward/chosen"].sum(), B), "retrieval/top1": (m["retrieval/top1"].sum(), B)}
        if neg is not None:
            diff = m["reward/chosen"] - m["reward/rejected"]
            mets.update(
                {
                    "reward/rejected": (m["reward/rejected"].sum(), B),
                    "reward/margin": (diff.sum(), B),
                    "reward/accuracy": (pair_correct(diff).sum(), B),
                }
            )
        return losses.sum(), mets

    def describe(self) -> dict:
        s = self.train_set
        objective = {
            "name": "infonce",
            "reference": False,
            "temperature": self.temperature,
            "pooling": self.pooling,
            "hard_negatives": s.negative is not None,
        }
        return self.describe_data("triples" if s.negative is not None else "pairs", self.encoder, objective)

    def plans(self, start_step: int) -> Iterator[Plan]:
        for items in self.step_items():
            micro = []
            for part in self.micro_parts(items):
                b = self._batch(self.train_set, part)
                micro.append(Micro(batch=b, n=len(part), tokens=int(b["attention_mask"].sum())))
            yield make_plan("encoder", "infonce", micro, self._loss)

    @torch.no_grad()
    def evaluate(self) -> dict:
        rt, s = self.rt, self.eval_set
        names = ["loss", "reward/chosen", "retrieval/top1"] + (
            ["reward/rejected", "reward/margin", "reward/accuracy"] if s.negative is not None else []
        )
        tot = torch.zeros(2 * len(names), dtype=torch.float64, device=rt.device)
        for items in iterate_eval(
            len(s), self.cfg.train.batch_size, rt.rank, rt.world_size, self.cfg.train.eval_max_batches
        ):
            if not items:
                continue
            loss, m = self._loss(self.encoder, self._batch(s, items))
            m["loss"] = (loss, len(items))
            for i, k in enumerate(names):
                tot[2 * i] += float(m[k][0])
                tot[2 * i + 1] += float(m[k][1])
        rt.all_reduce(tot)
        out = {}
        rename = {
            "loss": "eval/loss",
            "reward/accuracy": "eval/accuracy",
            "reward/margin": "eval/margin",
            "reward/chosen": "eval/cos_chosen",
            "reward/rejected": "eval/cos_rejected",
            "retrieval/top1": "eval/top1",
        }
        for i, k in enumerate(names):
            if tot[2 * i + 1] > 0:
                out[rename[k]] = (tot[2 * i] / tot[2 * i + 1]).item()
        return out

    def save_final(self, out_dir: Path) -> None:
        out_dir = Path(out_dir)
        save_hf(self.lm, self.tok, out_dir, self.rt, select=lambda m: m.base_model)  # the body: an encoder
        if not self.rt.is_main:
            return
        (out_dir / ENCODER_FILE).write_text(
            json.dumps(
                {"pooling": self.pooling, "temperature": self.temperature, "format": self.format, "add_eos": True},
                indent=2,
            )
            + "\n"
        )


class EncoderScorer:
    """A trained InfoNCE encoder as a preference scorer: score(x, y) = cos(e(x), e(y))."""

    def __init__(self, path, device=None):
        from transformers import AutoModel

        from ..engine.tokenizer import open_tokenizer

        self.tok = open_tokenizer(str(path))
        self.model = AutoModel.from_pretrained(path, use_safetensors=True).eval()
        self.meta = json.loads((Path(path) / ENCODER_FILE).read_text())
        self.device = device or torch.device("cpu")
        self.model.to(self.device)

    @torch.no_grad()
    def embed(self, texts: list[str], max_length: int = 1024) -> torch.Tensor:
        b = text_batch([encode_text(self.tok, t, "plain", max_length) for t in texts], self.tok.pad_token_id)
        b = {k: v.to(self.device) for k, v in b.items()}
        h = self.model(**b).last_hidden_state.float()
        return F.normalize(pool(h, b["attention_mask"], self.meta["pooling"]), dim=-1)

    def __call__(self, prompts: list[str], completions: list[str]) -> list[float]:
        return (self.embed(list(prompts)) * self.embed(list(completions))).sum(-1).tolist()
