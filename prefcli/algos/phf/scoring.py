"""Scoring rows for the PHF objectives: the scorer fingerprint of the score cache, the scores of a dataset, the threshold, and the seeded per-row hash."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
from pathlib import Path

import torch

from ...engine.data import CACHE_VERSION, tokenizer_fingerprint
from ...errors import DataError

# ------------------------------------------------------------------------------------- scoring rows

SCORE_COLUMN = "__prefcli_score__"
SCORE_VERSION = "1"  # bump when the scoring of the same rows by the same scorer changes


def row_texts(batch: dict, fmt: str) -> tuple[list[str], list[str]]:
    """(prompts, completions) that the scorer sees for a batch of rows: a 'text' row is a completion with an
    empty prompt; a 'messages' row is its last assistant turn, after the earlier turns joined by newlines."""
    if fmt == "text":
        return [""] * len(batch["text"]), list(batch["text"])
    if fmt == "prompt_completion":
        return list(batch["prompt"]), list(batch["completion"])
    prompts, completions = [], []
    for msgs in batch["messages"]:
        last = max((i for i, m in enumerate(msgs) if m.get("role") == "assistant"), default=None)
        if last is None:
            prompts.append("")
            completions.append("\n".join(str(m.get("content", "")) for m in msgs))
        else:
            prompts.append("\n".join(str(m.get("content", "")) for m in msgs[:last]))
            completions.append(str(msgs[last].get("content", "")))
    return prompts, completions


def _file_digest(path: str, content: bool) -> str:
    try:
        if content:
            return hashlib.sha256(Path(path).read_bytes()).hexdigest()
        st = os.stat(path)
        return f"{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        return "missing"


def scorer_fingerprint(specs) -> str:
    """What the cached scores depend on: the reward specs, and the files behind them (a function's source,
    a reward model's or a judge's folder, a human-score file, an ensemble's members), so that editing one
    rescores the data."""
    h = hashlib.sha256()
    for spec in specs:
        h.update(spec.model_dump_json().encode())
        _hash_sources(h, spec)
    return h.hexdigest()[:16]


def _hash_sources(h, spec) -> None:
    kind = spec.kind
    if kind == "function":
        mod = spec.function.rpartition(":")[0]
        path = mod
        if not mod.endswith(".py"):
            try:
                found = importlib.util.find_spec(mod)
                path = found.origin if found is not None and found.origin else ""
            except (ImportError, ValueError):
                path = ""
        h.update(_file_digest(path, content=True).encode() if path else b"")
    elif kind in ("model", "judge") and os.path.isdir(spec.path):
        for f in sorted(os.listdir(spec.path)):
            h.update(f"{f}={_file_digest(os.path.join(spec.path, f), content=False)}".encode())
    elif kind == "ensemble":
        for member in spec.members:
            _hash_sources(h, member)
    elif kind == "human_scores":
        h.update(_file_digest(spec.path, content=False).encode())
    elif kind == "sentiment":
        from importlib.metadata import PackageNotFoundError, version

        try:
            h.update(version("vaderSentiment").encode())
        except PackageNotFoundError:
            pass


def score_rows(ds, fmt: str, cfg, tok, device, source: str) -> list[float]:
    """One score per row of `ds`: from cfg.score_column, or from the reward sources cfg.rewards. Reward
    scores are computed by a `datasets` map whose fingerprint covers the rows, the format and the scorer,
    so a second run on the same data reads them from the datasets cache without calling the scorer."""
    if cfg.score_column is not None:
        col = cfg.score_column
        if col not in ds.column_names:
            raise DataError(
                f"data.train: {source}: sft.score_column '{col}' is not a column of the data "
                f"(columns: {', '.join(ds.column_names)})"
            )
        out = []
        for i, v in enumerate(ds[col]):
            try:
                f = float(v)
            except (TypeError, ValueError):
                f = float("nan")
            if not math.isfinite(f):
                raise DataError(
                    f"data.train: {source}: row {i + 1}: score column '{col}' holds {v!r}, not a finite number"
                )
            out.append(f)
        return out

    from ...reward_sources import build_rewards

    specs = cfg.rewards
    uses_tokens = any(getattr(s, "unit", None) == "tokens" for s in specs)
    h = hashlib.sha256(f"{CACHE_VERSION}/{SCORE_VERSION}".encode())
    h.update(str(ds._fingerprint).encode())
    h.update(json.dumps([fmt, scorer_fingerprint(specs), tokenizer_fingerprint(tok) if uses_tokens else None]).encode())
    holder: dict = {}

    def score(batch):
        if "rs" not in holder:  # built on the first uncached batch only: a cache hit loads no reward model
            holder["rs"] = build_rewards(specs, tokenizer=tok, device=device)
        prompts, completions = row_texts(batch, fmt)
        total, _ = holder["rs"].score(prompts, completions)
        return {SCORE_COLUMN: [float(x) for x in total]}

    scored = ds.map(
        score, batched=True, batch_size=cfg.score_batch_size, new_fingerprint=h.hexdigest()[:32], desc="scoring"
    )
    return list(scored[SCORE_COLUMN])


def pick_threshold(scores: list[float], cfg) -> tuple[float, str]:
    """The threshold (aligned = score >= it) and how it was chosen."""
    if cfg.threshold is not None:
        return float(cfg.threshold), "fixed"
    q = cfg.threshold_quantile
    t = torch.quantile(torch.tensor(scores, dtype=torch.float64), q).item()
    return float(t), f"quantile {q}"


def unit_hash(seed: int, row: int, segment: int | None = None) -> float:
    """A uniform number in [0, 1) fixed by (seed, row) or (seed, row, segment): which rows (segments) lose
    their control token."""
    key = f"prefcli-phf-drop/{seed}/{row}" + ("" if segment is None else f"/{segment}")
    d = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(d[:8], "big") / 2.0**64
