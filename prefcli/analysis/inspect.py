"""`prefcli data inspect DATA_OR_RECIPE`: what a preference data set teaches besides the preference.

    prefcli data inspect data/quickstart/preferences.jsonl --eval data/quickstart/preferences_eval.jsonl
    prefcli data inspect recipes/quickstart/reward.yaml --plots runs/inspect | jq .baselines

Given a recipe, the data is read exactly as the training command reads it (column mapping, held-out
split, the recipe's tokenizer and max_length); given a data file, the row kind is told from its
columns. Reported (docs/commands/data.md):

- hygiene: counts, exact and near duplicates (`engine.debias.normalize_text`), chosen == rejected,
  empty answers, conflicting labels, rows truncated under max_length and the tokens cut;
- length bias: how often the chosen answer is longer, mean token lengths, and the held-out accuracy
  of a length-only baseline ("pick the longer answer", its direction fitted on the training rows);
- other shallow predictors: position (when rows record where the chosen answer was shown), a
  bag-of-words baseline (binarized naive Bayes log-count ratios, Wang & Manning 2012), the words
  most associated with chosen and rejected answers;
- leakage: prompts shared by the training and held-out rows;
- raters (a `rater` column): per-rater label balance, Cohen's kappa and Krippendorff's alpha on
  items several raters labelled, and agreement with a reward source (`--reward`).

Baselines are held out: fitted on the training rows and scored on the held-out rows when there are
some, else by k-fold cross-validation. A baseline at or above `LOUD` accuracy is reported as a
warning: a model can reach that accuracy without learning the preference.

Output: the report on stderr (rich tables), the figures as one JSON object on stdout, PNG plots
with `--plots DIR`.
"""

from __future__ import annotations

import math
import os
import random
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..engine.debias import (
    apply_debias,
    as_text,
    completion_lengths,
    content_columns,
    duplicate_rows,
    leaked_rows,
    length_weights,
    normalize_text,
    prompt_key,
    prompt_of,
)
from ..errors import DataError, UsageError
from .agreement import krippendorff_alpha, pairwise_kappas

LOUD = 0.6  # a shallow baseline at or above this held-out accuracy is reported as a warning
KINDS = ("pairs", "unpaired", "scores", "rankings", "sft", "prompts")
ASSET_TOKENIZER = Path(__file__).resolve().parents[1] / "assets" / "kjv-base"
POSITION_COLUMNS = ("chosen_position", "position")
_WORD = re.compile(r"\w+", re.UNICODE)


@dataclass
class InspectOptions:
    source: str
    eval: str | None = None
    kind: str = "auto"
    columns: dict[str, str] = field(default_factory=dict)
    tokenizer: str | None = None
    max_length: int | None = None
    reward: str | None = None
    plots: str | None = None
    max_rows: int | None = None
    seed: int = 0
    folds: int = 5
    top_words: int = 10
    min_word_count: int = 5
    quiet: bool = False


@dataclass
class Source:
    """The rows to inspect and how the training command would read them."""

    train: Any  # datasets.Dataset
    held_out: Any  # datasets.Dataset or None
    kind: str
    fmt: str  # pairs/unpaired/scores/rankings: 'plain' | 'chat'; sft: 'text' | 'prompt_completion' | 'messages'
    tok: Any
    tokenizer: str
    max_length: int | None
    convention: str  # 'policy' (prompt + completion + EOS), 'scored' (reward models: the text prompt + completion)
    held_out_from: str | None
    name: str
    recipe: str | None = None
    command: str | None = None
    debias: Any = None
    add_eos: bool = True


# ------------------------------------------------------------------------------ resolving


def detect_kind(columns: list[str]) -> tuple[str, str | None]:
    """(kind, sft format) from a data set's columns."""
    c = set(columns)
    if {"chosen", "rejected"} <= c:
        return "pairs", None
    if "completions" in c:
        return "rankings", None
    if {"completion", "label"} <= c:
        return "unpaired", None
    if "score" in c and ("text" in c or "completion" in c):
        return "scores", None
    if "messages" in c:
        return "sft", "messages"
    if {"prompt", "completion"} <= c:
        return "sft", "prompt_completion"
    if "text" in c:
        return "sft", "text"
    if "prompt" in c:
        return "prompts", None
    raise DataError(
        f"none of the expected columns (columns: {', '.join(columns)}); expected chosen + rejected (pairs), "
        "completions (rankings), completion + label (unpaired, KTO), score + text (scores), text, prompt + "
        "completion or messages (SFT), or prompt (prompts). Map yours with --columns, e.g. --columns chosen=good"
    )


def _tokenizer(path: str | None):
    from ..engine.models import load_tokenizer
    from ..recipe.sections import ModelSection

    src = path or str(ASSET_TOKENIZER)
    if path is not None and not os.path.exists(path) and (path.startswith((".", "/", "~")) or "/" not in path):
        raise UsageError(f"--tokenizer: no such file or folder: {path}")
    try:
        m = ModelSection(path=src) if not src.endswith(".json") else ModelSection(path=src, tokenizer=src)
    except Exception as e:  # pydantic: a bad path
        raise UsageError(f"--tokenizer {src}: {e}") from None
    shown = os.path.relpath(src) if os.path.abspath(src).startswith(os.getcwd() + os.sep) else src
    return load_tokenizer(m), shown


def _data_source(path: str, columns: dict, max_rows: int | None, what: str):
    from ..recipe.sections import DataSource

    if not os.path.exists(path) and (path.endswith((".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt", ".gz"))):
        raise DataError(f"{what}: no such file: {path}")
    try:
        return DataSource(path=path, columns=columns, max_rows=max_rows)
    except Exception as e:
        raise DataError(f"{what}: {path}: {str(e).splitlines()[-1]}") from None


def _recipe_source(opts: InspectOptions) -> Source:
    from ..engine.data import detect_format, load_rows, split_eval
    from ..engine.models import load_tokenizer
    from ..engine.pairs import detect_pair_format
    from ..recipe import load_recipe

    loaded = load_recipe(opts.source)
    r, cmd = loaded.recipe, loaded.command
    name = str(opts.source)
    if cmd == "eval":
        from ..evaluate.loading import model_section

        d = r.data
        src = d.pairs or d.prompts or d.text
        kind = "pairs" if d.pairs else "prompts" if d.prompts else "sft"
        try:
            tok = load_tokenizer(model_section(r.models[0], "models[0]"))
            tname = r.models[0].tokenizer or r.models[0].path or "models[0]"
        except UsageError:
            tok, tname = _tokenizer(None)
        rows = load_rows(src, what="data")
        fmt = detect_format(rows.column_names, r.data.text_format) if kind == "sft" else "plain"
        return Source(rows, None, kind, fmt, tok, tname, None, "policy", None, name, name, cmd)
    d = r.data
    tok = load_tokenizer(r.model)
    tname = r.model.tokenizer or r.model.path or "model.tokenizer"
    seed = r.train.seed
    max_length = getattr(d, "max_length", None)
    convention = "policy"
    if cmd == "reward":
        kind = {"bradley_terry": "pairs", "regression": "scores", "ranking": "rankings"}[r.reward.objective]
        convention = "scored"
    elif cmd == "contrastive":
        kind = "unpaired" if r.contrastive.objective == "kto" else "pairs"
    elif cmd == "rlhf":
        kind, max_length, convention = "prompts", d.max_prompt_length, "prompt"
    elif cmd == "gan":
        kind, convention = "sft", "scored"
    else:
        kind = "sft"
    train = load_rows(d.train, what="data.train")
    if kind == "pairs" and "rejected" not in train.column_names:  # infonce without hard negatives
        kind = "sft"
    held_out, how = None, None
    if getattr(d, "eval", None) is not None:
        held_out, how = load_rows(d.eval, what="data.eval"), "data.eval"
    elif getattr(d, "eval_fraction", 0) > 0:
        train, held_out = split_eval(train, d.eval_fraction, seed)
        how = f"data.eval_fraction {d.eval_fraction} (split as training splits it, seed {seed})"
    if kind == "sft":
        if cmd == "gan":
            fmt = "prompt_completion"
        else:
            fmt = detect_format(train.column_names, getattr(d, "format", "auto"))
    elif kind == "prompts":
        fmt = "messages" if "messages" in train.column_names else "plain"
    else:
        probe = {"pairs": "chosen", "unpaired": "completion", "scores": "text", "rankings": "completions"}[kind]
        if probe not in train.column_names:
            probe = "completion" if "completion" in train.column_names else train.column_names[0]
        fmt = detect_pair_format(train, probe, d.format) if probe != "completions" else "plain"
    src = Source(train, held_out, kind, fmt, tok, tname, max_length, convention, how, d.train.path, name, cmd)
    src.debias = getattr(d, "debias", None)
    src.add_eos = getattr(d, "add_eos", True)
    return src


def resolve(opts: InspectOptions) -> Source:
    from ..engine.data import load_rows
    from ..engine.pairs import detect_pair_format

    if opts.kind not in ("auto",) + KINDS:
        raise UsageError(f"--kind must be one of auto, {', '.join(KINDS)}; got {opts.kind!r}")
    if opts.source.endswith((".yaml", ".yml")):
        if opts.eval or opts.columns or opts.tokenizer or opts.max_rows:
            raise UsageError(
                "--eval, --columns, --tokenizer and --max-rows apply to a data file; a recipe brings its own "
                "(change them in the recipe, or inspect the data file directly)"
            )
        src = _recipe_source(opts)
        if opts.max_length:
            src.max_length = opts.max_length
        return src
    if not os.path.exists(opts.source) and opts.source.endswith((".jsonl", ".json", ".csv", ".tsv", ".parquet")):
        raise DataError(f"no such file: {opts.source}")
    train = load_rows(_data_source(opts.source, opts.columns, opts.max_rows, "data"), what="data")
    held_out = None
    if opts.eval:
        held_out = load_rows(_data_source(opts.eval, opts.columns, opts.max_rows, "--eval"), what="--eval")
    kind, sft_fmt = detect_kind(train.column_names) if opts.kind == "auto" else (opts.kind, None)
    if opts.kind != "auto":
        need = {
            "pairs": ["chosen", "rejected"],
            "unpaired": ["completion", "label"],
            "scores": ["score"],
            "rankings": ["completions"],
            "prompts": ["prompt"],
        }.get(kind, [])
        missing = [c for c in need if c not in train.column_names]
        if missing:
            raise DataError(
                f"data: {opts.source}: --kind {kind} needs column(s) {', '.join(missing)} "
                f"(columns: {', '.join(train.column_names)}); map yours with --columns"
            )
        if kind == "sft":
            from ..engine.data import detect_format

            sft_fmt = detect_format(train.column_names, "auto")
    if held_out is not None:
        need = [
            c for c in ("chosen", "rejected", "completion", "completions", "text", "prompt") if c in train.column_names
        ]
        missing = [c for c in need if c not in held_out.column_names]
        if missing:
            raise DataError(
                f"--eval {opts.eval}: missing column(s) {', '.join(missing)} that the training rows have "
                f"(columns: {', '.join(held_out.column_names)})"
            )
    tok, tname = _tokenizer(opts.tokenizer)
    if kind == "sft":
        fmt = sft_fmt
    elif kind == "prompts":
        fmt = "messages" if "messages" in train.column_names else "plain"
    else:
        probe = {"pairs": "chosen", "unpaired": "completion", "scores": "text", "rankings": "completions"}[kind]
        if probe not in train.column_names:
            probe = "completion"
        fmt = detect_pair_format(train, probe, "auto") if kind != "rankings" else "plain"
    return Source(
        train,
        held_out,
        kind,
        fmt,
        tok,
        tname,
        opts.max_length,
        "policy",
        "--eval" if held_out is not None else None,
        opts.source,
    )


# ---------------------------------------------------------------------------------- views


@dataclass
class View:
    """One split's rows in a shape every analysis reads: per row the prompt and the completions
    (pairs: [chosen, rejected]; rankings: best first), a label or score, the rater and position."""

    rows: list[dict]
    prompts: list[Any]
    comps: list[list[Any]]
    labels: list[Any]
    raters: list[str | None]
    positions: list[str | None]


def _bool_label(v) -> bool | None:
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in ("true", "false", "1", "0"):
        return v.strip().lower() in ("true", "1")
    return None


def _position(v) -> str | None:
    if v is None:
        return None
    s = str(v).strip().lower()
    if s in ("a", "0", "first", "left"):
        return "A"
    if s in ("b", "1", "second", "right"):
        return "B"
    return None


def make_view(ds, src: Source) -> View:
    rows = ds.to_list()
    cols = ds.column_names
    kind = src.kind
    prompts, comps, labels = [], [], []
    for row in rows:
        p = prompt_of(row)
        if kind == "pairs":
            c, r = row.get("chosen"), row.get("rejected")
            if src.fmt == "chat" and isinstance(c, list) and isinstance(r, list) and row.get("prompt") in (None, []):
                k = len(p or [])
                c, r = c[k:], r[k:]
            comps.append([c, r])
            labels.append(None)
        elif kind == "unpaired":
            comps.append([row.get("completion")])
            labels.append(_bool_label(row.get("label")))
        elif kind == "scores":
            comps.append([row.get("text") if "text" in cols else row.get("completion")])
            v = row.get("score")
            labels.append(float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None)
        elif kind == "rankings":
            comps.append(list(row.get("completions") or []))
            labels.append(None)
        elif kind == "sft":
            if src.fmt == "text":
                comps.append([row.get("text")])
                p = None
            elif src.fmt == "messages":
                msgs = row.get("messages") or []
                comps.append([msgs[len(p or []) :]])
            else:
                comps.append([row.get("completion")])
            labels.append(None)
        else:
            comps.append([])
            labels.append(None)
        prompts.append(p)
    raters = [None if row.get("rater") is None else str(row.get("rater")) for row in rows]
    pcol = next((c for c in POSITION_COLUMNS if c in cols), None)
    positions = [_position(row.get(pcol)) for row in rows] if pcol else [None] * len(rows)
    return View(rows, prompts, comps, labels, raters, positions)


def _empty(v) -> bool:
    if v is None:
        return True
    if isinstance(v, str):
        return not v.strip()
    if isinstance(v, list):
        return not v or all(_empty(m.get("content") if isinstance(m, dict) else m) for m in v)
    return False


# ------------------------------------------------------------------------------ token counts


def _prompt_lengths(tok, prompts: list[Any], fmt: str) -> list[int]:
    from ..engine.data import _chat_ids

    out = []
    plain = [i for i, p in enumerate(prompts) if not isinstance(p, list)]
    texts = [as_text(prompts[i]) for i in plain]
    lens = {}
    for s in range(0, len(texts), 1024):
        for k, ids in enumerate(tok(texts[s : s + 1024], add_special_tokens=True)["input_ids"]):
            lens[plain[s + k]] = len(ids)
    for i, p in enumerate(prompts):
        if i in lens:
            out.append(lens[i])
        else:
            out.append(len(_chat_ids(tok, p, add_generation_prompt=True)) if p else 0)
    return out


@dataclass
class Tokens:
    prompt: list[int]
    comp: list[list[int]]  # completion tokens per completion (policy convention, EOS included)
    full: list[list[int]]  # the length the training command truncates, per completion


def _batch_lengths(tok, texts: list[str], special: bool) -> list[int]:
    out: list[int] = []
    for s in range(0, len(texts), 1024):
        out += [len(ids) for ids in tok(texts[s : s + 1024], add_special_tokens=special)["input_ids"]]
    return out


def count_tokens(v: View, src: Source) -> Tokens:
    """Token counts as the training command sees them: completion tokens (EOS included, as the
    policy encoders add it) for the length statistics, and the sequence length the command
    truncates (policy: prompt + completion + EOS; reward models: the text prompt + completion;
    rlhf: the prompt) for the truncation count."""
    from ..engine.data import _chat_ids

    tok = src.tok
    chat = src.fmt in ("chat", "messages")
    plen = _prompt_lengths(tok, v.prompts, src.fmt)
    comp: list[list[int]] = [[0] * len(c) for c in v.comps]
    full: list[list[int]] = [[0] * len(c) for c in v.comps]
    width = max((len(c) for c in v.comps), default=0)
    for j in range(width):
        idx = [i for i, c in enumerate(v.comps) if len(c) > j and not _empty(c[j])]
        if not idx:
            continue
        if src.kind == "sft" and src.fmt == "text":
            lens = [n + int(src.add_eos) for n in _batch_lengths(tok, [v.comps[i][j] for i in idx], True)]
            fl = lens
        elif src.kind == "sft" and src.fmt == "messages":
            fl = [len(_chat_ids(tok, v.rows[i]["messages"])) for i in idx]
            lens = [f - plen[i] for f, i in zip(fl, idx)]
        else:
            lens = completion_lengths(
                tok, [v.prompts[i] for i in idx], [v.comps[i][j] for i in idx], "chat" if chat else "plain"
            )
            if src.convention == "scored" and not chat:  # exactly the string prompt + completion, nothing added
                fl = _batch_lengths(tok, [as_text(v.prompts[i]) + as_text(v.comps[i][j]) for i in idx], True)
            else:
                fl = [plen[i] + n for i, n in zip(idx, lens)]
        for i, n, f in zip(idx, lens, fl):
            comp[i][j] = n
            full[i][j] = f
    return Tokens(plen, comp, full)


# -------------------------------------------------------------------------------- hygiene


def hygiene(v: View, t: Tokens, src: Source) -> dict:
    n = len(v.rows)
    cols = content_columns(list(v.rows[0].keys())) if v.rows else []
    exact = duplicate_rows(v.rows, cols, False)
    near = duplicate_rows(v.rows, cols, True)
    out: dict[str, Any] = {
        "rows": n,
        "prompts": len({normalize_text(as_text(p)) for p in v.prompts if p is not None}),
        "duplicates_exact": len(exact),
        "duplicates_near": len(near) - len(exact),
        "empty": sum(1 for c in v.comps if any(_empty(x) for x in c))
        if src.kind != "prompts"
        else sum(1 for p in v.prompts if _empty(p)),
    }
    if src.kind == "pairs":
        out["identical_exact"] = sum(1 for c in v.comps if c[0] == c[1] and not _empty(c[0]))
        out["identical_near"] = (
            sum(
                1
                for c in v.comps
                if normalize_text(as_text(c[0])) == normalize_text(as_text(c[1])) and not _empty(c[0])
            )
            - out["identical_exact"]
        )
        fwd = Counter()
        for p, (c, r) in zip(v.prompts, v.comps):
            fwd[(normalize_text(as_text(p)), normalize_text(as_text(c)), normalize_text(as_text(r)))] += 1
        out["conflicting"] = sum(
            1
            for p, (c, r) in zip(v.prompts, v.comps)
            if normalize_text(as_text(c)) != normalize_text(as_text(r))
            and fwd[(normalize_text(as_text(p)), normalize_text(as_text(r)), normalize_text(as_text(c)))] > 0
        )
    elif src.kind in ("unpaired", "scores"):
        seen: dict[tuple, set] = {}
        for p, c, lab in zip(v.prompts, v.comps, v.labels):
            seen.setdefault((normalize_text(as_text(p)), normalize_text(as_text(c[0]))), set()).add(lab)
        out["conflicting"] = sum(
            1
            for p, c in zip(v.prompts, v.comps)
            if len(seen[(normalize_text(as_text(p)), normalize_text(as_text(c[0])))]) > 1
        )
    elif src.kind == "rankings":
        out["identical_exact"] = sum(1 for c in v.comps if len({str(x) for x in c}) < len(c))
        out["too_few"] = sum(1 for c in v.comps if len(c) < 2)
    if src.max_length:
        ml = src.max_length
        trunc_rows = removed = fills = 0
        for p, fs in zip(t.prompt, t.full):
            if src.kind == "prompts":
                if p > ml:
                    trunc_rows += 1
                    removed += p - ml
                continue
            if src.kind != "sft" and p >= ml:
                fills += 1
                continue
            cut = [max(0, f - ml) for f in fs]
            if any(cut):
                trunc_rows += 1
                removed += sum(cut)
        out["truncated"] = {
            "max_length": ml,
            "rows": trunc_rows,
            "tokens_removed": removed,
            "prompt_fills_max_length": fills,
        }
    return out


def _mean(x):
    return sum(x) / len(x) if x else math.nan


def _median(x):
    s = sorted(x)
    if not s:
        return math.nan
    m = len(s) // 2
    return float(s[m]) if len(s) % 2 else (s[m - 1] + s[m]) / 2


def lengths(v: View, t: Tokens, src: Source) -> dict:
    from ..evaluate.metrics import pearson, spearman

    if src.kind == "pairs":
        d = [c[0] - c[1] for c in t.comp]
        n = max(1, len(d))
        return {
            "unit": "tokens",
            "chosen_mean": _mean([c[0] for c in t.comp]),
            "rejected_mean": _mean([c[1] for c in t.comp]),
            "diff_mean": _mean(d),
            "diff_median": _median(d),
            "chosen_longer": sum(1 for x in d if x > 0) / n,
            "chosen_shorter": sum(1 for x in d if x < 0) / n,
            "equal": sum(1 for x in d if x == 0) / n,
        }
    if src.kind == "unpaired":
        pos = [c[0] for c, lab in zip(t.comp, v.labels) if lab is True]
        neg = [c[0] for c, lab in zip(t.comp, v.labels) if lab is False]
        return {
            "unit": "tokens",
            "desirable_share": len(pos) / max(1, len(pos) + len(neg)),
            "desirable_mean": _mean(pos),
            "undesirable_mean": _mean(neg),
        }
    if src.kind == "scores":
        xs = [(c[0], lab) for c, lab in zip(t.comp, v.labels) if lab is not None]
        return {
            "unit": "tokens",
            "mean": _mean([a for a, _ in xs]),
            "score_mean": _mean([b for _, b in xs]),
            "pearson_length_score": pearson([a for a, _ in xs], [b for _, b in xs]),
            "spearman_length_score": spearman([a for a, _ in xs], [b for _, b in xs]),
        }
    if src.kind == "rankings":
        best_longest = [1.0 if c and c[0] == max(c) and c.count(max(c)) == 1 else 0.0 for c in t.comp if len(c) >= 2]
        rhos = [spearman([-k for k in range(len(c))], c) for c in t.comp if len(c) >= 2]
        rhos = [r for r in rhos if not math.isnan(r)]
        return {
            "unit": "tokens",
            "mean": _mean([x for c in t.comp for x in c]),
            "best_is_longest": _mean(best_longest),
            "spearman_rank_length": _mean(rhos),
        }
    lens = [c[0] for c in t.comp if c] if src.kind == "sft" else t.prompt
    return {"unit": "tokens", "mean": _mean(lens), "median": _median(lens), "max": max(lens) if lens else 0}


# ------------------------------------------------------------------------------ baselines


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def length_rule(train_diffs: list[float], test_diffs: list[float]) -> float:
    """Held-out accuracy of "the chosen answer is the longer one" (or the shorter one, whichever
    the training pairs favour): 1 per test pair the rule gets right, ½ for equal lengths."""
    direction = _sign(sum(_sign(d) for d in train_diffs))
    if not test_diffs:
        return math.nan
    return sum(0.5 if d == 0 or direction == 0 else float(_sign(d) == direction) for d in test_diffs) / len(test_diffs)


def words(text: Any) -> set[str]:
    return set(_WORD.findall(as_text(text).casefold()))


def nb_weights(pos_docs: list[set[str]], neg_docs: list[set[str]], alpha: float = 1.0) -> dict[str, float]:
    """Binarized naive Bayes log-count ratios (Wang & Manning 2012, "Baselines and Bigrams"):
    r_w = log((α + #pos docs with w) / ‖p‖₁) - log((α + #neg docs with w) / ‖q‖₁)."""
    cp, cn = Counter(), Counter()
    for d in pos_docs:
        cp.update(d)
    for d in neg_docs:
        cn.update(d)
    vocab = set(cp) | set(cn)
    sp = sum(cp.values()) + alpha * len(vocab)
    sn = sum(cn.values()) + alpha * len(vocab)
    return {w: math.log((alpha + cp[w]) / sp) - math.log((alpha + cn[w]) / sn) for w in vocab}


def _nb_score(doc: set[str], r: dict[str, float]) -> float:
    return sum(r.get(w, 0.0) for w in doc)


def _folds(n: int, k: int, seed: int) -> list[tuple[list[int], list[int]]]:
    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    k = max(2, min(k, n))
    parts = [idx[i::k] for i in range(k)]
    return [([j for p in parts[:i] + parts[i + 1 :] for j in p], parts[i]) for i in range(k)]


def _held_out(n_train: int, n_eval: int, folds: int, seed: int):
    """(method, [(train indices, test indices, test from held-out?)])."""
    if n_eval:
        return "held-out rows", [(list(range(n_train)), list(range(n_eval)), True)]
    if n_train < 4:
        return None, []
    return f"{min(folds, n_train)}-fold cross-validation", [(a, b, False) for a, b in _folds(n_train, folds, seed)]


def pair_baselines(train: list[tuple], test: list[tuple] | None, folds: int, seed: int) -> dict:
    """Length-only and bag-of-words accuracy on pairs given as (chosen words, rejected words, length diff)."""
    method, plan = _held_out(len(train), len(test or []), folds, seed)
    if method is None:
        return {}
    hits_len, hits_bow, n = 0.0, 0.0, 0
    for tr, te, from_eval in plan:
        src = test if from_eval else train
        trp = [train[i] for i in tr]
        tep = [src[i] for i in te]
        acc = length_rule([p[2] for p in trp], [p[2] for p in tep])
        hits_len += acc * len(tep)
        r = nb_weights([p[0] for p in trp], [p[1] for p in trp])
        for c, rj, _ in tep:
            m = _nb_score(c, r) - _nb_score(rj, r)
            hits_bow += 1.0 if m > 0 else 0.5 if m == 0 else 0.0
        n += len(tep)
    return {
        "method": method,
        "pairs": n,
        "length_only": hits_len / n,
        "length_direction": "longer" if sum(_sign(p[2]) for p in train) >= 0 else "shorter",
        "bag_of_words": hits_bow / n,
    }


def _stump(train: list[tuple[float, bool]]) -> tuple[float, bool]:
    """The threshold t and direction of "desirable iff length >= t" (or < t) with the best training accuracy."""
    xs = sorted(train)
    n = len(xs)
    pos_total = sum(1 for _, y in xs if y)
    best = (-1.0, 0.0, True)
    pos_below = neg_below = 0
    i = 0
    cands = sorted({x for x, _ in xs}) + [math.inf]
    for t in cands:
        while i < n and xs[i][0] < t:
            pos_below += xs[i][1]
            neg_below += not xs[i][1]
            i += 1
        acc_ge = (neg_below + (pos_total - pos_below)) / n  # desirable iff x >= t
        acc_lt = (pos_below + (n - i - (pos_total - pos_below))) / n
        for acc, up in ((acc_ge, True), (acc_lt, False)):
            if acc > best[0]:
                best = (acc, t, up)
    return best[1], best[2]


def unpaired_baselines(train: list[tuple], test: list[tuple] | None, folds: int, seed: int) -> dict:
    """Majority-class, length-threshold and bag-of-words accuracy on (words, length, label) rows."""
    method, plan = _held_out(len(train), len(test or []), folds, seed)
    if method is None:
        return {}
    hits = {"majority": 0.0, "length_only": 0.0, "bag_of_words": 0.0}
    n = 0
    for tr, te, from_eval in plan:
        src = test if from_eval else train
        trr = [train[i] for i in tr]
        ter = [src[i] for i in te]
        n_pos = sum(1 for r in trr if r[2])
        major = n_pos * 2 >= len(trr)
        t, up = _stump([(r[1], r[2]) for r in trr])
        r = nb_weights([x[0] for x in trr if x[2]], [x[0] for x in trr if not x[2]])
        prior = math.log(max(n_pos, 1) / max(len(trr) - n_pos, 1))
        for w, length, y in ter:
            hits["majority"] += float(major == y)
            hits["length_only"] += float(((length >= t) if up else (length < t)) == y)
            hits["bag_of_words"] += float((prior + _nb_score(w, r) > 0) == y)
        n += len(ter)
    return {"method": method, "rows": n, **{k: v / n for k, v in hits.items()}}


def top_words(pos_docs: list[set[str]], neg_docs: list[set[str]], k: int, min_count: int) -> dict:
    """The k words most associated with each side (naive Bayes log-count ratio), among words in at
    least `min_count` texts."""
    cp, cn = Counter(), Counter()
    for d in pos_docs:
        cp.update(d)
    for d in neg_docs:
        cn.update(d)
    r = nb_weights(pos_docs, neg_docs)
    ok = [w for w in r if cp[w] + cn[w] >= min_count]
    ok.sort(key=lambda w: (-r[w], w))
    row = lambda w: {"word": w, "log_ratio": r[w], "chosen": cp[w], "rejected": cn[w]}  # noqa: E731
    return {"chosen": [row(w) for w in ok[:k]], "rejected": [row(w) for w in reversed(ok[-k:])] if ok else []}


# ---------------------------------------------------------------------------------- position


def position_bias(v: View) -> dict | None:
    """Share of pairs whose chosen answer was shown first (A), with a two-sided binomial z-test
    against ½ (normal approximation)."""
    pos = [p for p in v.positions if p is not None]
    if not pos:
        return None
    n = len(pos)
    a = sum(1 for p in pos if p == "A") / n
    z = (a - 0.5) / math.sqrt(0.25 / n)
    return {"pairs": n, "chosen_shown_first": a, "z": z, "p_value": math.erfc(abs(z) / math.sqrt(2))}


# ----------------------------------------------------------------------------------- leakage


def leakage(train: View, held: View) -> dict:
    cols = content_columns(list(train.rows[0].keys())) if train.rows else []
    tkeys = {prompt_key(r, cols) for r in train.rows}
    ekeys = [prompt_key(r, cols) for r in held.rows]
    from ..engine.debias import row_key

    trow = {row_key(r, cols, True) for r in train.rows}
    return {
        "eval_rows": len(held.rows),
        "eval_rows_with_train_prompt": sum(1 for k in ekeys if k in tkeys),
        "shared_prompts": len(set(ekeys) & tkeys),
        "eval_rows_in_train": sum(1 for r in held.rows if row_key(r, cols, True) in trow),
        "train_rows_with_eval_prompt": len(leaked_rows(train.rows, held.rows, cols)),
    }


# ------------------------------------------------------------------------------------ raters


def _item_and_label(v: View, i: int, kind: str):
    p = normalize_text(as_text(v.prompts[i]))
    c = v.comps[i]
    # an item is the prompt with its completions in a canonical (sorted) order; a pair's label is which of
    # the two canonical positions was chosen, a ranking's the canonical positions in ranked order
    if kind == "pairs":
        a, b = normalize_text(as_text(c[0])), normalize_text(as_text(c[1]))
        return (p, tuple(sorted((a, b)))), int(a > b)
    if kind == "rankings":
        norm = [normalize_text(as_text(x)) for x in c]
        canon = sorted(norm)
        return (p, tuple(canon)), tuple(canon.index(x) for x in norm)
    return (p, normalize_text(as_text(c[0]))), v.labels[i]


def raters(v: View, t: Tokens, kind: str, reward_ok: list[float] | None) -> dict | None:
    """Per-rater label balance, and agreement on items labelled by several raters."""
    if not any(r is not None for r in v.raters):
        return None
    per: dict[str, dict] = {}
    labels: dict[str, dict] = {}
    for i, r in enumerate(v.raters):
        if r is None:
            continue
        s = per.setdefault(r, {"rows": 0, "_longer": 0, "_pos": 0, "_pos_n": 0, "_lab": [], "_rw": []})
        s["rows"] += 1
        if kind == "pairs":
            s["_longer"] += t.comp[i][0] > t.comp[i][1]
            if v.positions[i] is not None:
                s["_pos"] += v.positions[i] == "A"
                s["_pos_n"] += 1
        elif v.labels[i] is not None:
            s["_lab"].append(float(v.labels[i]))
        if reward_ok is not None:
            s["_rw"].append(reward_ok[i])
        item, lab = _item_and_label(v, i, kind)
        if lab is not None:
            labels.setdefault(r, {})[item] = lab
    table = []
    for r, s in sorted(per.items()):
        row: dict[str, Any] = {"rater": r, "rows": s["rows"]}
        if kind == "pairs":
            row["chosen_longer"] = s["_longer"] / s["rows"]
            if s["_pos_n"]:
                row["chosen_shown_first"] = s["_pos"] / s["_pos_n"]
        elif s["_lab"]:
            row["desirable_share" if kind == "unpaired" else "score_mean"] = _mean(s["_lab"])
        if s["_rw"]:
            row["reward_agreement"] = _mean(s["_rw"])
        table.append(row)
    units: dict = {}
    for items in labels.values():
        for item, lab in items.items():
            units.setdefault(item, []).append(lab)
    shared = {u: vals for u, vals in units.items() if len(vals) >= 2}
    out: dict[str, Any] = {"raters": len(per), "per_rater": table, "shared_items": len(shared)}
    if shared:
        out["krippendorff_alpha"] = krippendorff_alpha(list(shared.values()), "nominal")
        if kind == "scores":
            out["krippendorff_alpha_interval"] = krippendorff_alpha(list(shared.values()), "interval")
        pk = pairwise_kappas(labels)
        out["cohen_kappa"] = pk
        if len(per) == 2 and pk:
            out["kappa"] = pk[0]["kappa"]
    return out


# ------------------------------------------------------------------------------------ reward


def reward_scores(spec: str, v: View, kind: str) -> dict:
    """Agreement of the labels with a reward source: for pairs, the share of pairs it ranks as the
    raters did (ties ½); for scores, Pearson's r with the human scores."""
    import json as _json

    import yaml
    from pydantic import TypeAdapter, ValidationError

    from ..evaluate.metrics import pearson
    from ..recipe.rewards import RewardSpec
    from ..rewards import build_rewards

    if kind not in ("pairs", "scores"):
        raise UsageError(f"--reward compares a reward with pair or score labels; these rows are {kind}")
    obj: Any
    if os.path.isdir(spec):
        obj = {"kind": "model", "path": spec}
    else:
        try:
            obj = yaml.safe_load(spec)
        except yaml.YAMLError as e:
            raise UsageError(f"--reward: not YAML: {e}") from None
        if isinstance(obj, str):
            obj = {"kind": obj}
    try:
        cfg = TypeAdapter(RewardSpec).validate_python(obj, context={"base_dir": os.getcwd()})
    except ValidationError as e:
        raise UsageError(f"--reward {_json.dumps(obj)}: {e.errors()[0]['msg']}") from None
    if any(isinstance(p, list) for p in v.prompts) or any(isinstance(x, list) for c in v.comps for x in c):
        raise UsageError("--reward scores plain-text rows; these rows hold chat messages")
    rs = build_rewards([cfg], base_dir=os.getcwd())
    prompts = [as_text(p) for p in v.prompts]
    if kind == "pairs":
        sc, _ = rs.score(prompts, [as_text(c[0]) for c in v.comps])
        sr, _ = rs.score(prompts, [as_text(c[1]) for c in v.comps])
        ok = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(sc, sr)]
        return {"source": obj, "agreement": _mean(ok), "ties": sum(1 for a, b in zip(sc, sr) if a == b), "_ok": ok}
    s, _ = rs.score(prompts, [as_text(c[0]) for c in v.comps])
    xs = [(a, b) for a, b in zip(s, v.labels) if b is not None]
    return {"source": obj, "pearson": pearson([a for a, _ in xs], [b for _, b in xs]), "_ok": None}


# ------------------------------------------------------------------------------------- plots


def draw_plots(out_dir: Path, v: View, t: Tokens, kind: str, rater_info: dict | None) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    fig, ax = plt.subplots(figsize=(7, 4))
    if kind == "pairs":
        ax.hist([c[0] for c in t.comp], bins=40, alpha=0.6, label="chosen")
        ax.hist([c[1] for c in t.comp], bins=40, alpha=0.6, label="rejected")
        ax.legend()
    elif kind == "unpaired":
        ax.hist([c[0] for c, y in zip(t.comp, v.labels) if y], bins=40, alpha=0.6, label="desirable")
        ax.hist([c[0] for c, y in zip(t.comp, v.labels) if y is False], bins=40, alpha=0.6, label="undesirable")
        ax.legend()
    else:
        ax.hist([x for c in t.comp for x in c] or t.prompt, bins=40)
    ax.set_xlabel("tokens")
    ax.set_ylabel("rows")
    ax.set_title("completion lengths" if kind != "prompts" else "prompt lengths")
    fig.tight_layout()
    fig.savefig(out_dir / "lengths.png", dpi=110)
    plt.close(fig)
    written.append(str(out_dir / "lengths.png"))
    if kind == "pairs":
        d = [c[0] - c[1] for c in t.comp]
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.hist(d, bins=41)
        ax.axvline(0, color="black", lw=1)
        longer = sum(1 for x in d if x > 0) / max(1, len(d))
        ax.set_title(f"len(chosen) - len(rejected): chosen longer in {longer:.1%} of pairs")
        ax.set_xlabel("tokens")
        ax.set_ylabel("pairs")
        fig.tight_layout()
        fig.savefig(out_dir / "length_diff.png", dpi=110)
        plt.close(fig)
        written.append(str(out_dir / "length_diff.png"))
    if rater_info and rater_info["per_rater"]:
        rows = rater_info["per_rater"]
        key = next((k for k in ("chosen_longer", "desirable_share", "score_mean") if k in rows[0]), None)
        if key:
            fig, ax = plt.subplots(figsize=(7, 4))
            ax.bar([r["rater"] for r in rows], [r.get(key, 0) for r in rows])
            ax.set_ylabel(key.replace("_", " "))
            ax.set_title("per rater")
            fig.tight_layout()
            fig.savefig(out_dir / "raters.png", dpi=110)
            plt.close(fig)
            written.append(str(out_dir / "raters.png"))
    return written


# ------------------------------------------------------------------------------------ driver


def _pairs_for_baselines(v: View, t: Tokens, kind: str) -> list[tuple]:
    """(better words, worse words, length difference) for every comparison: the pair itself, or
    every ordered pair of a ranking."""
    out = []
    for c, n in zip(v.comps, t.comp):
        if kind == "pairs":
            if not (_empty(c[0]) or _empty(c[1])):
                out.append((words(c[0]), words(c[1]), n[0] - n[1]))
        else:
            for i in range(len(c)):
                for j in range(i + 1, len(c)):
                    out.append((words(c[i]), words(c[j]), n[i] - n[j]))
    return out


def _debias_effect(src: Source, seed: int) -> dict | None:
    """What the recipe's data.debias would keep, and the length bias left after it."""
    cfg = src.debias
    if cfg is None:
        return None
    balance = getattr(cfg, "length_balance", "off")
    if cfg.dedup == "off" and not cfg.drop_eval_prompts and balance == "off":
        return None
    train, held, report = apply_debias(
        src.train,
        src.held_out,
        cfg,
        tok=src.tok,
        fmt="chat" if src.fmt == "chat" else "plain",
        pairs=src.kind == "pairs",
        seed=seed,
    )
    out = dict(report or {})
    if src.kind == "pairs":
        v = make_view(train, src)
        t = count_tokens(v, src)
        lc, lr = [c[0] for c in t.comp], [c[1] for c in t.comp]
        if balance == "reweight":
            w, table = length_weights(lc, lr, cfg.length_bins)
            out["length_balance"] = {"mode": "reweight", **table}
        else:
            w = [1.0] * len(lc)
        tot = sum(wi for wi, a, b in zip(w, lc, lr) if a != b)
        out["chosen_longer_after"] = sum(wi for wi, a, b in zip(w, lc, lr) if a > b) / tot if tot else math.nan
        if balance != "reweight":
            cv = pair_baselines(_pairs_for_baselines(v, t, "pairs"), None, 5, seed)
            out["length_only_after"] = cv.get("length_only")
    return out


def run_inspect(opts: InspectOptions) -> dict:
    t0 = time.perf_counter()
    if opts.folds < 2:
        raise UsageError("--folds must be at least 2")
    src = resolve(opts)
    tv = make_view(src.train, src)
    tt = count_tokens(tv, src)
    summary: dict[str, Any] = {
        "command": "data inspect",
        "status": "completed",
        "exit_code": 0,
        "source": src.name,
        "recipe": src.recipe,
        "kind": src.kind,
        "format": src.fmt,
        "tokenizer": src.tokenizer,
        "max_length": src.max_length,
        "held_out": src.held_out_from,
    }
    summary["train"] = {**hygiene(tv, tt, src), "lengths": lengths(tv, tt, src)}
    ev = et = None
    if src.held_out is not None:
        ev = make_view(src.held_out, src)
        et = count_tokens(ev, src)
        summary["eval"] = {**hygiene(ev, et, src), "lengths": lengths(ev, et, src)}
        summary["leakage"] = leakage(tv, ev)
    base: dict = {}
    if src.kind in ("pairs", "rankings"):
        base = pair_baselines(
            _pairs_for_baselines(tv, tt, src.kind),
            _pairs_for_baselines(ev, et, src.kind) if ev is not None else None,
            opts.folds,
            opts.seed,
        )
        if src.kind == "rankings":
            base.pop("bag_of_words", None)
        if src.kind == "pairs":
            ok = [(c, r) for c, r in tv.comps if not (_empty(c) or _empty(r))]
            summary["words"] = top_words(
                [words(c) for c, _ in ok], [words(r) for _, r in ok], opts.top_words, opts.min_word_count
            )
    elif src.kind == "unpaired":

        def rows_of(v, t):
            return [(words(c[0]), n[0], y) for c, n, y in zip(v.comps, t.comp, v.labels) if y is not None]

        base = unpaired_baselines(rows_of(tv, tt), rows_of(ev, et) if ev is not None else None, opts.folds, opts.seed)
        summary["words"] = top_words(
            [words(c[0]) for c, y in zip(tv.comps, tv.labels) if y is True],
            [words(c[0]) for c, y in zip(tv.comps, tv.labels) if y is False],
            opts.top_words,
            opts.min_word_count,
        )
    summary["baselines"] = base or None
    summary["position"] = position_bias(tv) if src.kind == "pairs" else None
    rw = None
    if opts.reward:
        rw = reward_scores(opts.reward, tv, src.kind)
    summary["raters"] = raters(tv, tt, src.kind, rw["_ok"] if rw else None)
    if rw is not None:
        rw.pop("_ok")
        summary["reward_agreement"] = rw
    summary["debias"] = _debias_effect(src, opts.seed) if src.recipe else None
    summary["warnings"] = loud_findings(summary)
    summary["plots"] = draw_plots(Path(opts.plots), tv, tt, src.kind, summary["raters"]) if opts.plots else []
    summary["wall_s"] = round(time.perf_counter() - t0, 3)
    return summary


def loud_findings(s: dict) -> list[str]:
    """The findings a user must not miss, worded as advice."""
    out = []
    b = s.get("baselines") or {}
    # the bar: LOUD, and for unpaired rows also 10 points above always answering the majority label
    bar = max(LOUD, b["majority"] + 0.1) if "majority" in b else LOUD
    if b.get("length_only") is not None and b["length_only"] >= bar:
        if s["kind"] == "unpaired":
            out.append(
                f"length alone predicts desirable vs undesirable on {b['length_only']:.1%} of held-out rows "
                f"({b['method']}; the majority label: {b['majority']:.1%}): a model can learn length instead"
            )
        else:
            side = "longer" if b.get("length_direction", "longer") == "longer" else "shorter"
            out.append(
                f"length alone predicts the label: picking the {side} answer is right on {b['length_only']:.1%} "
                f"of held-out pairs ({b['method']}); a model can reach that without learning the preference. "
                "Consider data.debias.length_balance, or contrastive.length_alpha (R-DPO)"
            )
    if b.get("bag_of_words") is not None and b["bag_of_words"] >= bar:
        out.append(
            f"a bag-of-words baseline predicts the label on {b['bag_of_words']:.1%} of held-out rows: single words "
            "give the answer away (see the word lists)"
        )
    pos = s.get("position")
    if pos and pos["pairs"] >= 20 and pos["p_value"] < 0.01:
        out.append(
            f"position bias: the chosen answer was shown first in {pos['chosen_shown_first']:.1%} of {pos['pairs']} "
            f"pairs (p = {pos['p_value']:.2g}); raters favour a position"
        )
    for split in ("train", "eval"):
        h = s.get(split)
        if not h:
            continue
        if h["duplicates_exact"] or h["duplicates_near"]:
            out.append(
                f"{split}: {h['duplicates_exact']} exact and {h['duplicates_near']} near-duplicate rows "
                "(data.debias.dedup removes them)"
            )
        if h.get("identical_exact") or h.get("identical_near"):
            out.append(
                f"{split}: {h.get('identical_exact', 0) + h.get('identical_near', 0)} pairs whose answers are identical"
            )
        if h["empty"]:
            out.append(f"{split}: {h['empty']} rows with an empty answer")
        if h.get("conflicting"):
            out.append(f"{split}: {h['conflicting']} rows contradicted by another row (same texts, other label)")
        t = h.get("truncated")
        if t and (t["rows"] or t["prompt_fills_max_length"]):
            out.append(
                f"{split}: {t['rows']} rows longer than max_length={t['max_length']} lose {t['tokens_removed']} "
                f"tokens to truncation; {t['prompt_fills_max_length']} rows have a prompt that fills max_length"
            )
    lk = s.get("leakage")
    if lk and (lk["eval_rows_with_train_prompt"] or lk["eval_rows_in_train"]):
        out.append(
            f"leakage: {lk['eval_rows_with_train_prompt']} of {lk['eval_rows']} held-out rows have a training prompt "
            f"({lk['shared_prompts']} prompts shared) and {lk['eval_rows_in_train']} are copies of training rows; "
            "held-out metrics then partly measure memory (data.debias.drop_eval_prompts drops those rows from training)"
        )
    ra = s.get("raters")
    if ra and ra.get("krippendorff_alpha") is not None and ra["krippendorff_alpha"] < 0.4:
        out.append(
            f"raters agree little: Krippendorff's alpha {ra['krippendorff_alpha']:.2f} on {ra['shared_items']} "
            "items labelled by several raters"
        )
    return out


# ------------------------------------------------------------------------------------ report


def _f(x, pct: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if pct:
        return f"{x:.1%}"
    if isinstance(x, float):
        return f"{x:.3f}" if abs(x) < 1000 else f"{x:.0f}"
    return str(x)


def print_report(s: dict, console) -> None:
    from rich.table import Table

    console.print(
        f"[bold]prefcli data inspect[/] {s['source']}  ({s['kind']}, {s['format']}; tokens of {s['tokenizer']})",
        highlight=False,
    )
    splits = [k for k in ("train", "eval") if s.get(k)]
    t = Table(title="rows")
    t.add_column("")
    for k in splits:
        t.add_column(k, justify="right")
    keys = [
        ("rows", "rows"),
        ("prompts", "distinct prompts"),
        ("duplicates_exact", "exact duplicates"),
        ("duplicates_near", "near duplicates"),
        ("identical_exact", "chosen == rejected"),
        ("identical_near", "chosen ≈ rejected"),
        ("empty", "empty answers"),
        ("conflicting", "conflicting labels"),
    ]
    for key, label in keys:
        if any(key in s[k] for k in splits):
            t.add_row(label, *[_f(s[k].get(key)) for k in splits])
    if any("truncated" in s[k] for k in splits):
        ml = s[splits[0]]["truncated"]["max_length"]
        t.add_row(f"truncated at {ml}", *[_f(s[k]["truncated"]["rows"]) for k in splits])
        t.add_row("tokens cut", *[_f(s[k]["truncated"]["tokens_removed"]) for k in splits])
        t.add_row("prompt fills max_length", *[_f(s[k]["truncated"]["prompt_fills_max_length"]) for k in splits])
    console.print(t)
    t = Table(title="lengths (tokens)")
    t.add_column("")
    for k in splits:
        t.add_column(k, justify="right")
    pct_keys = {"chosen_longer", "chosen_shorter", "equal", "desirable_share", "best_is_longest"}
    for key in s["train"]["lengths"]:
        if key == "unit":
            continue
        t.add_row(key.replace("_", " "), *[_f(s[k]["lengths"].get(key), key in pct_keys) for k in splits])
    console.print(t)
    b = s.get("baselines")
    if b:
        t = Table(title=f"shallow baselines, accuracy ({b['method']})")
        t.add_column("baseline")
        t.add_column("accuracy", justify="right")
        for key in ("majority", "length_only", "bag_of_words"):
            if key in b:
                label = key.replace("_", " ")
                if key == "length_only" and "length_direction" in b:
                    label += f" (pick the {b['length_direction']})"
                style = "bold red" if b[key] >= LOUD and key != "majority" else None
                t.add_row(label, _f(b[key], True), style=style)
        console.print(t)
    w = s.get("words")
    if w and (w["chosen"] or w["rejected"]):
        t = Table(title="words most associated with each side (naive Bayes log-count ratio)")
        t.add_column("chosen side")
        t.add_column("ratio", justify="right")
        t.add_column("rejected side")
        t.add_column("ratio", justify="right")
        for i in range(max(len(w["chosen"]), len(w["rejected"]))):
            a = w["chosen"][i] if i < len(w["chosen"]) else None
            r = w["rejected"][i] if i < len(w["rejected"]) else None
            t.add_row(
                f"{a['word']} ({a['chosen']}/{a['rejected']})" if a else "",
                f"{a['log_ratio']:+.2f}" if a else "",
                f"{r['word']} ({r['chosen']}/{r['rejected']})" if r else "",
                f"{r['log_ratio']:+.2f}" if r else "",
            )
        console.print(t)
    pos = s.get("position")
    if pos:
        console.print(
            f"position: chosen shown first in {pos['chosen_shown_first']:.1%} of {pos['pairs']} pairs "
            f"(z = {pos['z']:.2f}, p = {pos['p_value']:.3g})",
            highlight=False,
        )
    lk = s.get("leakage")
    if lk:
        console.print(
            f"leakage: {lk['eval_rows_with_train_prompt']} of {lk['eval_rows']} held-out rows share a prompt with "
            f"training ({lk['shared_prompts']} distinct prompts); {lk['eval_rows_in_train']} held-out rows are "
            f"training rows; {lk['train_rows_with_eval_prompt']} training rows have a held-out prompt",
            highlight=False,
        )
    ra = s.get("raters")
    if ra:
        t = Table(title=f"raters ({ra['raters']}; {ra['shared_items']} items labelled by several)")
        cols = list(ra["per_rater"][0].keys()) if ra["per_rater"] else []
        for c in cols:
            t.add_column(c.replace("_", " "), justify="right" if c != "rater" else "left")
        for row in ra["per_rater"]:
            t.add_row(*[_f(row.get(c), c not in ("rater", "rows")) for c in cols])
        console.print(t)
        if "krippendorff_alpha" in ra:
            console.print(f"Krippendorff's alpha (nominal): {_f(ra['krippendorff_alpha'])}", highlight=False)
            for k in ra["cohen_kappa"]:
                console.print(
                    f"Cohen's kappa {k['raters'][0]} vs {k['raters'][1]}: {_f(k['kappa'])} on {k['shared_items']} "
                    f"shared items (raw agreement {k['agreement']:.1%})",
                    highlight=False,
                )
    rw = s.get("reward_agreement")
    if rw:
        if "agreement" in rw:
            console.print(
                f"reward {rw['source']}: agrees with the labels on {rw['agreement']:.1%} of pairs", highlight=False
            )
        else:
            console.print(f"reward {rw['source']}: Pearson r with the scores {_f(rw['pearson'])}", highlight=False)
    db = s.get("debias")
    if db:
        parts = [f"training rows {db.get('train_rows_before')} -> {db.get('train_rows_after')}"]
        if db.get("chosen_longer_after") is not None:
            parts.append(f"chosen longer after: {_f(db['chosen_longer_after'], True)}")
        if db.get("length_only_after") is not None:
            parts.append(f"length-only baseline after: {_f(db['length_only_after'], True)}")
        console.print("the recipe's data.debias: " + "; ".join(parts), highlight=False)
    from rich.text import Text

    for wmsg in s["warnings"]:
        console.print(Text.assemble(("warning: ", "bold red"), (wmsg, "red")), soft_wrap=True)
    for p in s.get("plots") or []:
        console.print(f"wrote {p}", highlight=False)
