"""Debiasing transforms on training rows (`data.debias`, prefcli/recipe/debias.py), and the text
helpers `prefcli data inspect` shares with them.

- dedup: drop rows repeating an earlier row (exact, or after `normalize_text`);
- drop_eval_prompts: drop training rows whose prompt is also a held-out prompt;
- length_balance: 'subsample' keeps, in each bin of |len(chosen) - len(rejected)|, as many pairs
  whose chosen is longer as pairs whose chosen is shorter; 'reweight' keeps every pair and gives
  each side of a bin the same total weight (`length_weights`). Both make "pick the longer answer"
  useless as a predictor of the label within every bin, so a model cannot lower its loss by
  learning length alone (the length-only baseline of the kept or weighted set is 0.5).

Every step returns what it removed or reweighted; `apply_debias` collects that into the report the
run summary carries under `data.debias`.
"""

from __future__ import annotations

import json
import random
import re
import unicodedata
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import UsageError

# Columns holding the content of a row (what dedup compares). Metadata (rater, margin, ids, ...) is not.
CONTENT_COLUMNS = ("prompt", "chosen", "rejected", "completion", "label", "text", "score", "completions", "messages")

_PUNCT = re.compile(r"[^\w\s]", re.UNICODE)


def normalize_text(s: str) -> str:
    """Near-duplicate key of a text: Unicode NFKC, case folded, punctuation replaced by spaces,
    whitespace collapsed. "Hello,  World!" and "hello world" have the same key."""
    s = unicodedata.normalize("NFKC", s).casefold()
    return " ".join(_PUNCT.sub(" ", s).split())


def as_text(v: Any) -> str:
    """A value as plain text: strings as they are, chat messages as 'role: content' lines."""
    if v is None:
        return ""
    if isinstance(v, str):
        return v
    if isinstance(v, list):
        return "\n".join(
            f"{m.get('role', '')}: {as_text(m.get('content'))}" if isinstance(m, dict) else as_text(m) for m in v
        )
    return str(v)


def _norm(v: Any, normalized: bool) -> Any:
    if isinstance(v, str):
        return normalize_text(v) if normalized else v
    if isinstance(v, list):
        return [_norm(x, normalized) for x in v]
    if isinstance(v, dict):
        return {k: _norm(x, normalized) for k, x in sorted(v.items())}
    return v


def row_key(row: dict, columns: Sequence[str], normalized: bool) -> str:
    """The dedup key of a row: its content columns, optionally normalized."""
    return json.dumps([_norm(row.get(c), normalized) for c in columns], ensure_ascii=False, default=str)


def content_columns(column_names: Sequence[str]) -> list[str]:
    return [c for c in CONTENT_COLUMNS if c in column_names]


def prompt_of(row: dict) -> Any:
    """The prompt part of a row, or None when the row has none: the `prompt` column; for chat rows
    without one, the messages before the last assistant turn (`messages`) or the messages both
    conversations share (`chosen`/`rejected`)."""
    p = row.get("prompt")
    if p not in (None, "", []):
        return p
    msgs = row.get("messages")
    if isinstance(msgs, list) and msgs:
        turns = [i for i, m in enumerate(msgs) if isinstance(m, dict) and m.get("role") == "assistant"]
        return (msgs[: turns[-1]] if turns else msgs) or None  # no assistant turn: a prompt-only chat
    c, r = row.get("chosen"), row.get("rejected")
    if isinstance(c, list) and isinstance(r, list):
        k = 0
        while k < min(len(c), len(r)) - 1 and c[k] == r[k]:
            k += 1
        return c[:k] or None
    return None


def prompt_key(row: dict, columns: Sequence[str]) -> str:
    """Leakage key: the normalized prompt, or the normalized whole row when there is no prompt."""
    p = prompt_of(row)
    if p is None:
        return "row:" + row_key(row, columns, True)
    return "prompt:" + normalize_text(as_text(p))


# ------------------------------------------------------------------------------ row filters


def duplicate_rows(rows: Sequence[dict], columns: Sequence[str], normalized: bool) -> list[int]:
    """Indices of the rows that repeat an earlier row (the first occurrence is not listed)."""
    seen: set[str] = set()
    out = []
    for i, row in enumerate(rows):
        k = row_key(row, columns, normalized)
        if k in seen:
            out.append(i)
        else:
            seen.add(k)
    return out


def leaked_rows(train: Sequence[dict], held_out: Sequence[dict], columns: Sequence[str]) -> list[int]:
    """Indices of training rows whose prompt (or, without a prompt, whole row) is in the held-out set."""
    keys = {prompt_key(r, columns) for r in held_out}
    return [i for i, r in enumerate(train) if prompt_key(r, columns) in keys]


# ---------------------------------------------------------------------------- length balance


def length_bins(diffs: Sequence[int], n_bins: int) -> list[int]:
    """Bin index of every pair by |diff| (equal-count bins over the pairs with diff != 0, ties of
    |diff| kept in one bin); -1 for pairs of equal length."""
    mags = sorted(abs(d) for d in diffs if d != 0)
    if not mags:
        return [-1] * len(diffs)
    m = len(mags)
    # upper edges at the k/n quantiles of |diff|; a magnitude goes to the first bin whose edge is >= it
    edges = [mags[max(0, -(-k * m // n_bins) - 1)] for k in range(1, n_bins + 1)]
    out = []
    for d in diffs:
        if d == 0:
            out.append(-1)
            continue
        a = abs(d)
        out.append(next(k for k, e in enumerate(edges) if a <= e))
    return out


def balance_subsample(len_c: Sequence[int], len_r: Sequence[int], n_bins: int, seed: int) -> tuple[list[int], dict]:
    """Indices kept by length-balanced subsampling, and per-bin counts. In each bin the larger of
    {chosen longer, chosen shorter} is cut (seeded random subset) to the size of the smaller."""
    diffs = [c - r for c, r in zip(len_c, len_r)]
    bins = length_bins(diffs, n_bins)
    rng = random.Random(seed)
    keep = [i for i, b in enumerate(bins) if b == -1]
    table = []
    for b in sorted({b for b in bins if b >= 0}):
        longer = [i for i, (bb, d) in enumerate(zip(bins, diffs)) if bb == b and d > 0]
        shorter = [i for i, (bb, d) in enumerate(zip(bins, diffs)) if bb == b and d < 0]
        n = min(len(longer), len(shorter))
        kl = sorted(rng.sample(longer, n)) if len(longer) > n else longer
        ks = sorted(rng.sample(shorter, n)) if len(shorter) > n else shorter
        keep += kl + ks
        mags = [abs(diffs[i]) for i in longer + shorter]
        table.append(
            {
                "bin": b,
                "length_diff": [min(mags), max(mags)],
                "chosen_longer": len(longer),
                "chosen_shorter": len(shorter),
                "kept": 2 * n,
            }
        )
    return sorted(keep), {"bins": table, "equal_length_kept": sum(1 for b in bins if b == -1)}


def length_weights(len_c: Sequence[int], len_r: Sequence[int], n_bins: int) -> tuple[list[float], dict]:
    """Per-pair weights of length-balanced reweighting: in each bin, pairs whose chosen is longer and
    pairs whose chosen is shorter get weights (n+ + n-)/(2 n+) and (n+ + n-)/(2 n-), so both sides
    carry the same total weight; a bin with an empty side gets weight 0 (it cannot be balanced);
    equal-length pairs get 1. The weights are then scaled to average 1 over all pairs."""
    diffs = [c - r for c, r in zip(len_c, len_r)]
    bins = length_bins(diffs, n_bins)
    w = [1.0] * len(diffs)
    table = []
    for b in sorted({b for b in bins if b >= 0}):
        pos = [i for i, (bb, d) in enumerate(zip(bins, diffs)) if bb == b and d > 0]
        neg = [i for i, (bb, d) in enumerate(zip(bins, diffs)) if bb == b and d < 0]
        tot = len(pos) + len(neg)
        wp = tot / (2 * len(pos)) if pos and neg else 0.0
        wn = tot / (2 * len(neg)) if pos and neg else 0.0
        for i in pos:
            w[i] = wp
        for i in neg:
            w[i] = wn
        mags = [abs(diffs[i]) for i in pos + neg]
        table.append(
            {
                "bin": b,
                "length_diff": [min(mags), max(mags)],
                "chosen_longer": len(pos),
                "chosen_shorter": len(neg),
                "weight_longer": wp,
                "weight_shorter": wn,
            }
        )
    s = sum(w)
    if s <= 0:
        raise UsageError(
            "data.debias.length_balance 'reweight': every length bin has pairs on one side only (chosen always "
            "longer, or always shorter), so no weighting can balance them; the data has no pair against the bias"
        )
    scale = len(w) / s
    w = [x * scale for x in w]
    return w, {
        "bins": table,
        "zero_weight": sum(1 for x in w if x == 0),
        "weight_min": min(w),
        "weight_max": max(w),
        "effective_pairs": (sum(w) ** 2) / sum(x * x for x in w),  # Kish's effective sample size
    }


# ----------------------------------------------------------------------------- token lengths


def completion_lengths(tok, prompts: Sequence[Any], completions: Sequence[Any], fmt: str) -> list[int]:
    """Completion tokens of each (prompt, completion) as the policy encoders count them
    (prefcli.engine.pairs.encode_completion: EOS included for plain rows). Plain rows are
    tokenized in batches."""
    from .pairs import encode_completion

    if fmt == "chat":
        return [len(encode_completion(tok, "chat", p, c)[1]) for p, c in zip(prompts, completions)]
    out: list[int] = []
    eos = tok.eos_token_id
    texts = [c if isinstance(c, str) else as_text(c) for c in completions]
    for s in range(0, len(texts), 1024):
        for ids in tok(texts[s : s + 1024], add_special_tokens=False)["input_ids"]:
            out.append(len(ids) + (0 if ids and ids[-1] == eos else 1))
    return out


# --------------------------------------------------------------------------------- the step


def _select(ds, drop: Sequence[int]):
    if not drop:
        return ds
    gone = set(drop)
    return ds.select([i for i in range(len(ds)) if i not in gone])


def apply_debias(
    train,
    held_out,
    cfg,
    *,
    tok=None,
    fmt: str = "plain",
    pairs: bool = False,
    seed: int = 0,
    warn: Callable[[str], None] | None = None,
    key_columns: Sequence[str] = (),
) -> tuple[Any, Any, dict | None]:
    """(train, held_out, report) after the steps `cfg` (a DebiasSection or SFTDebiasSection) switches
    on; (train, held_out, None) when none is on. `pairs`: the rows are chosen/rejected pairs (needed
    by length_balance 'subsample'). `key_columns`: metadata that makes two rows different for dedup (the user
    column: the same pair labelled by two users is two labels, not a duplicate). Rows are `datasets.Dataset`s;
    nothing is rewritten, only selected."""
    if cfg is None:
        return train, held_out, None
    balance = getattr(cfg, "length_balance", "off")
    if cfg.dedup == "off" and not cfg.drop_eval_prompts and balance == "off":
        return train, held_out, None
    say = warn or (lambda _t: None)
    report: dict[str, Any] = {"train_rows_before": len(train)}
    cols = content_columns(train.column_names)
    if cfg.dedup != "off":
        train, held_out = _dedup_step(train, held_out, cfg.dedup, cols, key_columns, report, say)
    if cfg.drop_eval_prompts:
        if held_out is None:
            raise UsageError("data.debias.drop_eval_prompts needs a held-out set: set data.eval or data.eval_fraction")
        drop = leaked_rows(train.to_list(), held_out.to_list(), cols)
        train = _select(train, drop)
        report["drop_eval_prompts"] = {"train_removed": len(drop)}
        say(f"data.debias.drop_eval_prompts: removed {len(drop)} training rows whose prompt is a held-out prompt")
    if balance in ("subsample", "reweight") and not pairs:
        raise UsageError(
            "data.debias.length_balance needs chosen/rejected pair rows (reward objective bradley_terry or a "
            "paired contrastive objective); these rows are not pairs. Set it to 'off'"
        )
    if balance == "subsample":
        train = _subsample_step(train, cfg.length_bins, tok, fmt, seed, report, say)
    report["train_rows_after"] = len(train)
    if len(train) == 0:
        raise UsageError("data.debias removed every training row; relax data.debias")
    return train, held_out, report


def _dedup_step(train, held_out, mode: str, cols: list[str], key_columns: Sequence[str], report: dict, say):
    """data.debias.dedup: drop the training (and held-out) rows that repeat an earlier row of their own split."""
    norm = mode == "normalized"
    keys = [c for c in key_columns if c in train.column_names]
    drop = duplicate_rows(train.to_list(), cols + keys, norm)
    train = _select(train, drop)
    report["dedup"] = {"mode": mode, "train_removed": len(drop)}
    msg = f"data.debias.dedup ({mode}): removed {len(drop)} duplicate training rows"
    if held_out is not None:
        ekeys = [c for c in key_columns if c in held_out.column_names]
        drop_e = duplicate_rows(held_out.to_list(), content_columns(held_out.column_names) + ekeys, norm)
        held_out = _select(held_out, drop_e)
        report["dedup"]["eval_removed"] = len(drop_e)
        msg += f" and {len(drop_e)} duplicate held-out rows"
    say(msg)
    return train, held_out


def _subsample_step(train, length_bins: int, tok, fmt: str, seed: int, report: dict, say):
    """data.debias.length_balance 'subsample': keep, in every length bin, as many pairs with chosen longer as
    with chosen shorter."""
    if len(train) == 0:
        raise UsageError("data.debias: no training row is left before length balancing")
    prompts = train["prompt"] if "prompt" in train.column_names else [None] * len(train)
    lc = completion_lengths(tok, prompts, train["chosen"], fmt)
    lr = completion_lengths(tok, prompts, train["rejected"], fmt)
    keep, table = balance_subsample(lc, lr, length_bins, seed)
    removed = len(train) - len(keep)
    if not keep:
        raise UsageError(
            "data.debias.length_balance 'subsample' keeps no pair: chosen is longer in every pair (or shorter "
            "in every pair) in every length bin; the data has no pair against the bias"
        )
    train = train.select(keep)
    report["length_balance"] = {"mode": "subsample", "length_bins": length_bins, "train_removed": removed}
    report["length_balance"].update(table)
    say(
        f"data.debias.length_balance (subsample, {length_bins} bins): kept {len(keep)} of "
        f"{len(keep) + removed} pairs, chosen longer in as many as chosen shorter in every bin"
    )
    return train


def pair_weights(cfg, len_c: Sequence[int], len_r: Sequence[int], report: dict | None, warn=None):
    """The per-pair loss weights of length_balance 'reweight' (None otherwise), from the tokenized
    pairs' completion lengths; the weighting is added to `report` (the run summary's data.debias)."""
    if cfg is None or getattr(cfg, "length_balance", "off") != "reweight":
        return None
    w, table = length_weights(len_c, len_r, cfg.length_bins)
    if report is not None:
        report["length_balance"] = {"mode": "reweight", "length_bins": cfg.length_bins, **table}
    if warn is not None:
        warn(
            f"data.debias.length_balance (reweight, {cfg.length_bins} bins): pair weights {table['weight_min']:.3g}"
            f"..{table['weight_max']:.3g}, {table['zero_weight']} pairs at weight 0, effective pairs "
            f"{table['effective_pairs']:.1f} of {len(w)}"
        )
    return w
