"""Where `prefcli data inspect` reads its rows: a data file or a recipe (its columns, split, tokenizer and max_length), one view of them whatever the row kind, and their token counts."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...engine.debias import (
    as_text,
    completion_lengths,
    prompt_of,
)
from ...engine.pairs import is_empty, parse_label
from ...errors import DataError, UsageError

LOUD = 0.6  # a shallow baseline at or above this held-out accuracy is reported as a warning
KINDS = ("pairs", "unpaired", "scores", "rankings", "sft", "prompts")
ASSET_TOKENIZER = Path(__file__).resolve().parents[2] / "assets" / "kjv-base"
POSITION_COLUMNS = ("chosen_position", "position")
WORD_RE = re.compile(r"\w+", re.UNICODE)


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


FILE_LENGTH_FIXES = (
    "data.debias.length_balance in a reward (bradley_terry) or contrastive recipe, or contrastive.length_alpha "
    "(R-DPO) with contrastive.objective dpo"
)


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
    read_as: str | None = None  # the outside format the rows were read from (sharegpt, alpaca, openai)
    # what a recipe can do when length alone predicts the label: the fields of this recipe's command (and
    # objective) that break the link, or, for a data file, where each of them lives
    length_fixes: str = FILE_LENGTH_FIXES
    user_column: str | None = None  # a recipe's data.user_column (None: 'rater', else 'user_id')


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


def read_outside(rows, requested: str, kinds: tuple[str, ...], source: str, what: str):
    """(rows, format read or None): rows in a format people already have read as prefcli's own, as the training
    command reads them (engine/formats.py). Pair formats are tried first: their columns include the sft ones'."""
    from ...engine.formats import convert_rows, outside_format

    for kind in kinds:
        fmt = outside_format(rows.column_names, requested, kind)
        if fmt is not None:
            return convert_rows(rows, fmt, kind, source, what), fmt
    return rows, None


def _tokenizer(path: str | None):
    from ...engine.tokenizer import load_tokenizer
    from ...recipe.sections import ModelSection

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
    from ...recipe.sections import DataSource

    if not os.path.exists(path) and (path.endswith((".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt", ".gz"))):
        raise DataError(f"{what}: no such file: {path}")
    try:
        return DataSource(path=path, columns=columns, max_rows=max_rows)
    except Exception as e:
        raise DataError(f"{what}: {path}: {str(e).splitlines()[-1]}") from None


def _recipe_source(opts: InspectOptions) -> Source:
    """The data a recipe trains on, read as its command reads it: the same files, the same outside formats,
    the same held-out split (data.eval, or data.eval_fraction split with the recipe's seed)."""
    from ...engine.data import load_rows, split_eval
    from ...engine.tokenizer import load_tokenizer
    from ...recipe import load_recipe

    loaded = load_recipe(opts.source)
    r, cmd = loaded.recipe, loaded.command
    name = str(opts.source)
    if cmd == "eval":
        return _eval_recipe_source(r, name)
    d = r.data
    tok = load_tokenizer(r.model)
    tname = r.model.tokenizer or r.model.path or "model.tokenizer"
    seed = r.train.seed
    kind, max_length, convention = _recipe_kind(r, cmd)
    train = load_rows(d.train, what="data.train")
    outside = {"sft": ("sft",), "pairs": ("pairs",)}.get(kind, ()) if cmd != "gan" else ()
    if kind == "pairs" and cmd == "contrastive" and r.contrastive.objective == "infonce":
        outside = ()
    requested = getattr(d, "format", "auto")
    train, read_as = read_outside(train, requested, outside, d.train.path, "data.train")
    if kind == "pairs" and "rejected" not in train.column_names:  # infonce without hard negatives
        kind = "sft"
    held_out, how = None, None
    if getattr(d, "eval", None) is not None:
        held_out, how = load_rows(d.eval, what="data.eval"), "data.eval"
        held_out, _ = read_outside(held_out, requested, outside, d.eval.path, "data.eval")
    elif getattr(d, "eval_fraction", 0) > 0:
        train, held_out = split_eval(train, d.eval_fraction, seed)
        how = f"data.eval_fraction {d.eval_fraction} (split as training splits it, seed {seed})"
    if read_as is not None:
        requested = "messages" if kind == "sft" else "chat"
    fmt = _recipe_format(train, kind, cmd, requested)
    src = Source(train, held_out, kind, fmt, tok, tname, max_length, convention, how, d.train.path, name, cmd)
    src.read_as = read_as
    src.length_fixes = length_fixes(r, cmd)
    src.debias = getattr(d, "debias", None)
    src.add_eos = getattr(d, "add_eos", True)
    src.user_column = getattr(d, "user_column", None)
    return src


def _eval_recipe_source(r, name: str) -> Source:
    """An eval recipe's data: its pairs, else its prompts, else its text, with the first model's tokenizer
    (the default tokenizer where that cannot be loaded)."""
    from ...engine.data import detect_format, load_rows
    from ...engine.tokenizer import load_tokenizer
    from ...evaluate.loading import model_section

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
    return Source(rows, None, kind, fmt, tok, tname, None, "policy", None, name, name, "eval")


def _recipe_kind(r, cmd: str) -> tuple[str, int | None, str]:
    """(the kind of rows, the max_length that applies, the tokenization convention) a training command reads."""
    max_length = getattr(r.data, "max_length", None)
    if cmd == "reward":
        kind = {"bradley_terry": "pairs", "regression": "scores", "ranking": "rankings"}[r.reward.objective]
        return kind, max_length, "scored"
    if cmd == "contrastive":
        return ("unpaired" if r.contrastive.objective == "kto" else "pairs"), max_length, "policy"
    if cmd == "rlhf":
        return "prompts", r.data.max_prompt_length, "prompt"
    if cmd == "gan":
        return "sft", max_length, "scored"
    return "sft", max_length, "policy"


def _recipe_format(train, kind: str, cmd: str, requested: str) -> str:
    """The row format the command detects in `train` for this kind (the gan reads prompt_completion rows)."""
    from ...engine.data import detect_format
    from ...engine.pairs import detect_pair_format

    if kind == "sft":
        if cmd == "gan":
            return "prompt_completion"
        return detect_format(train.column_names, "messages" if requested == "openai" else requested)
    if kind == "prompts":
        return "messages" if "messages" in train.column_names else "plain"
    probe = {"pairs": "chosen", "unpaired": "completion", "scores": "text", "rankings": "completions"}[kind]
    if probe not in train.column_names:
        probe = "completion" if "completion" in train.column_names else train.column_names[0]
    return detect_pair_format(train, probe, requested) if probe != "completions" else "plain"


def length_fixes(r, cmd: str) -> str:
    """The recipe fields that break a length-label link under this command: data.debias.length_balance (pair rows of
    reward bradley_terry and of the paired contrastive objectives), contrastive.length_alpha (R-DPO: dpo only)."""
    fixes = []
    paired = (cmd == "reward" and r.reward.objective == "bradley_terry") or (
        cmd == "contrastive" and r.contrastive.objective != "kto"
    )
    if paired:
        fixes.append(f"data.debias.length_balance (subsample or reweight) in this {cmd} recipe")
    if cmd == "contrastive" and r.contrastive.objective == "dpo":
        fixes.append("contrastive.length_alpha (R-DPO)")
    if not fixes:
        return f"no field of this {cmd} recipe balances lengths; balance the data before training"
    return ", or ".join(fixes)


def resolve(opts: InspectOptions) -> Source:
    """What to inspect: a recipe's data read as its command reads it, or a data file (and --eval) with the
    kind detected or given by --kind."""
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
    return _file_source(opts)


def _file_source(opts: InspectOptions) -> Source:
    """A data file (and --eval) read as training reads one, with the kind detected or given by --kind."""
    from ...engine.data import load_rows
    from ...engine.pairs import detect_pair_format

    if not os.path.exists(opts.source) and opts.source.endswith((".jsonl", ".json", ".csv", ".tsv", ".parquet")):
        raise DataError(f"no such file: {opts.source}")
    train = load_rows(_data_source(opts.source, opts.columns, opts.max_rows, "data"), what="data")
    train, read_as = read_outside(train, "auto", ("pairs", "sft"), opts.source, "data")
    held_out = None
    if opts.eval:
        held_out = load_rows(_data_source(opts.eval, opts.columns, opts.max_rows, "--eval"), what="--eval")
        held_out, _ = read_outside(held_out, "auto", ("pairs", "sft"), opts.eval, "--eval")
    kind, sft_fmt = detect_kind(train.column_names) if opts.kind == "auto" else (opts.kind, None)
    if opts.kind != "auto":
        sft_fmt = _check_kind_columns(train, kind, opts.source)
    if held_out is not None:
        _check_held_out_columns(train, held_out, opts.eval)
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
        read_as=read_as,
    )


def _check_kind_columns(train, kind: str, source: str) -> str | None:
    """--kind given: the columns that kind needs must be there; returns the sft format (None for other kinds)."""
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
            f"data: {source}: --kind {kind} needs column(s) {', '.join(missing)} "
            f"(columns: {', '.join(train.column_names)}); map yours with --columns"
        )
    if kind == "sft":
        from ...engine.data import detect_format

        return detect_format(train.column_names, "auto")
    return None


def _check_held_out_columns(train, held_out, eval_path: str) -> None:
    """--eval must have the completion and prompt columns the training rows have."""
    need = [c for c in ("chosen", "rejected", "completion", "completions", "text", "prompt") if c in train.column_names]
    missing = [c for c in need if c not in held_out.column_names]
    if missing:
        raise DataError(
            f"--eval {eval_path}: missing column(s) {', '.join(missing)} that the training rows have "
            f"(columns: {', '.join(held_out.column_names)})"
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
            labels.append(parse_label(row.get("label")))  # as training reads it
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
    from ...engine.users import find_user_column

    ucol = find_user_column(cols, src.user_column)
    raters = [None if ucol is None or row.get(ucol) in (None, "") else str(row.get(ucol)) for row in rows]
    pcol = next((c for c in POSITION_COLUMNS if c in cols), None)
    positions = [_position(row.get(pcol)) for row in rows] if pcol else [None] * len(rows)
    return View(rows, prompts, comps, labels, raters, positions)


# ------------------------------------------------------------------------------ token counts


def _prompt_lengths(tok, prompts: list[Any], fmt: str) -> list[int]:
    from ...engine.tokenizer import chat_ids

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
            out.append(len(chat_ids(tok, p, add_generation_prompt=True)) if p else 0)
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
    from ...engine.tokenizer import chat_ids

    tok = src.tok
    chat = src.fmt in ("chat", "messages")
    plen = _prompt_lengths(tok, v.prompts, src.fmt)
    comp: list[list[int]] = [[0] * len(c) for c in v.comps]
    full: list[list[int]] = [[0] * len(c) for c in v.comps]
    width = max((len(c) for c in v.comps), default=0)
    for j in range(width):
        idx = [i for i, c in enumerate(v.comps) if len(c) > j and not is_empty(c[j])]
        if not idx:
            continue
        if src.kind == "sft" and src.fmt == "text":
            lens = [n + int(src.add_eos) for n in _batch_lengths(tok, [v.comps[i][j] for i in idx], True)]
            fl = lens
        elif src.kind == "sft" and src.fmt == "messages":
            fl = [len(chat_ids(tok, v.rows[i]["messages"])) for i in idx]
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
