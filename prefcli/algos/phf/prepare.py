"""The training set of a PHF objective: rows scored, filtered or prefixed with their control token, whole rows or one segment at a time."""

from __future__ import annotations

import hashlib
import statistics
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from ...engine.data import CACHE_VERSION, TokenizedSet
from ...engine.logprobs import IGNORE
from ...errors import DataError
from .control import control_context, encode_segments, prefix_control, split_segments
from .objectives import SFTObjective
from .scoring import pick_threshold, score_rows, unit_hash

# ------------------------------------------------------------------------------------- data preparation


@dataclass
class PHFData:
    """The training set after scoring (filtered, control-token prefixed), one score / label per example."""

    train_set: TokenizedSet
    eval_set: TokenizedSet | None
    scores: torch.Tensor  # [examples] float (per_segment: the mean of the example's segment scores)
    aligned: torch.Tensor  # [examples] bool (per_segment: float, the share of its segments that are aligned)
    conditioned: torch.Tensor  # [examples] bool: carries a control token
    stats: dict
    # conditional: held-out prompts with the aligned token in place, and its index (sampling for eval/control_gap)
    gap_contexts: list[tuple[list[int], int]] | None = None


def subset(s: TokenizedSet, keep: list[int]) -> TokenizedSet:
    return replace(
        s, input_ids=[s.input_ids[i] for i in keep], labels=[s.labels[i] for i in keep], rows=[s.rows[i] for i in keep]
    )


GAP_CONTEXTS = 256  # held-out prompts kept for eval/control_gap (samples cycle through them)


def _scorer_stats(s, scores: list[float], what: str) -> dict:
    return {
        "objective": s.objective,
        "scorer": f"column {s.score_column}"
        if s.score_column is not None
        else " + ".join(f"{x.weight:g}*{x.name or x.kind}" for x in s.rewards),
        f"{what}_scored": len(scores),
        "score_mean": statistics.fmean(scores),
        "score_std": statistics.pstdev(scores),
        "score_min": min(scores),
        "score_max": max(scores),
    }


def _threshold(s, scores: list[float], what: str, stats: dict, warn: Callable[[str], None]) -> float:
    t, rule = pick_threshold(scores, s)
    n_al = sum(x >= t for x in scores)
    stats.update(
        {"threshold": t, "threshold_rule": rule, f"{what}_aligned": n_al, f"{what}_misaligned": len(scores) - n_al}
    )
    if n_al in (0, len(scores)):
        warn(
            f"sft: all {len(scores)} scored {what} are {'aligned' if n_al else 'misaligned'} "
            f"at threshold {t:g} ({rule}); the objective cannot tell good {what} from bad ones"
        )
    return t


def prepare(
    obj: SFTObjective,
    s,
    train_set: TokenizedSet,
    eval_set: TokenizedSet | None,
    row_scores: list[float],
    control_ids: tuple[int, int] | None,
    bos: int | None,
    seed: int,
    source: str,
    warn: Callable[[str], None],
) -> PHFData:
    """Scores per example, the threshold and aligned/misaligned labels, filtering (filter), control-token
    prefixes at `s.control_position` (conditional; the held-out rows are all conditioned on the aligned
    token); stats for the summary. `s` is the recipe's sft section; `row_scores` has one score per data row.
    The 'per_segment' position has its own preparation, `prepare_segments`."""
    n_ex = len(train_set)
    scores = [row_scores[i] for i in train_set.rows]
    stats = _scorer_stats(s, row_scores, "rows")
    aligned = [True] * n_ex
    if obj.thresholded:
        t = _threshold(s, row_scores, "rows", stats, warn)
        aligned = [x >= t for x in scores]
    if obj.keep_aligned_only:
        keep = [i for i in range(n_ex) if aligned[i]]
        if not keep:
            raise DataError(
                f"data.train: {source}: sft.objective filter keeps no row: every score is below "
                f"the threshold {stats['threshold']:g}"
            )
        train_set = subset(train_set, keep)
        scores = [scores[i] for i in keep]
        aligned = [True] * len(keep)
        stats.update({"examples_kept": len(keep), "examples_filtered": n_ex - len(keep)})
    conditioned = [False] * len(scores)
    contexts = None
    if obj.control_tokens:
        a_id, m_id = control_ids
        pos = s.control_position
        ts = train_set
        for i in range(len(ts)):
            if unit_hash(seed, ts.rows[i]) < s.drop_control_fraction:
                continue
            conditioned[i] = True
            ts.input_ids[i], ts.labels[i] = prefix_control(
                ts.input_ids[i], ts.labels[i], a_id if aligned[i] else m_id, bos, mask_next=False, position=pos
            )
        if eval_set is not None:
            es = eval_set
            contexts = [
                control_context(es.input_ids[i], es.labels[i], a_id, bos, pos)
                for i in range(min(len(es), GAP_CONTEXTS))
            ]
            for i in range(len(es)):
                es.input_ids[i], es.labels[i] = prefix_control(
                    es.input_ids[i], es.labels[i], a_id, bos, mask_next=True, position=pos
                )
        n = max(1, len(scores))
        stats.update(
            {
                "aligned_token": s.aligned_token,
                "misaligned_token": s.misaligned_token,
                "control_token_ids": [a_id, m_id],
                "control_position": pos,
                "examples_aligned": sum(c and a for c, a in zip(conditioned, aligned)),
                "examples_misaligned": sum(c and not a for c, a in zip(conditioned, aligned)),
                "examples_unconditioned": len(scores) - sum(conditioned),
            }
        )
        stats["aligned_fraction"] = stats["examples_aligned"] / n
    return PHFData(
        train_set=train_set,
        eval_set=eval_set,
        scores=torch.tensor(scores, dtype=torch.float32),
        aligned=torch.tensor(aligned, dtype=torch.bool),
        conditioned=torch.tensor(conditioned, dtype=torch.bool),
        stats=stats,
        gap_contexts=contexts,
    )


def segment_rows(ds, fmt: str, separator: str):
    """One row per segment of every row of `ds` (columns prompt, completion, row, segment), through a
    `datasets` map with a fingerprint of its own so that the segment scores are cached like row scores."""
    if fmt == "messages":
        raise DataError(
            "sft.control_position per_segment splits 'text' rows and the completions of 'prompt_completion' rows; "
            "'messages' rows are not supported: use control_position start or after_prompt"
        )
    h = hashlib.sha256(f"{CACHE_VERSION}/segments/{fmt}/{separator!r}".encode())
    h.update(str(ds._fingerprint).encode())

    def split(batch, indices):
        out: dict[str, list] = {"prompt": [], "completion": [], "row": [], "segment": []}
        texts = batch["text"] if fmt == "text" else batch["completion"]
        prompts = [""] * len(texts) if fmt == "text" else batch["prompt"]
        for r, p, t in zip(indices, prompts, texts):
            for j, seg in enumerate(split_segments(t, separator)):
                out["prompt"].append(p)
                out["completion"].append(seg)
                out["row"].append(r)
                out["segment"].append(j)
        return out

    return ds.map(
        split,
        batched=True,
        with_indices=True,
        remove_columns=ds.column_names,
        new_fingerprint=h.hexdigest()[:32],
        desc="segmenting",
    )


def _segment_set(seg_ds, n_rows: int, tok, enc: dict, controls, source: str) -> tuple[TokenizedSet, list[list[int]]]:
    """The examples of the per_segment variant from a segment table: `controls(row, segment)` gives each
    segment's control token (None: none). Returns the set and, per example, its segments' indices."""
    by_row: dict[int, list[int]] = {}
    for k, r in enumerate(seg_ds["row"]):
        by_row.setdefault(r, []).append(k)
    seg_ids = tok(list(seg_ds["completion"]), add_special_tokens=False)["input_ids"]
    prompts = seg_ds["prompt"]
    segs_of = seg_ds["segment"]
    eos = tok.eos_token_id if enc["add_eos"] else None
    ids_out, labels_out, rows, members = [], [], [], []
    n_trunc = 0
    for r in range(n_rows):
        ks = by_row.get(r)
        if not ks:
            continue
        p_ids = tok(prompts[ks[0]], add_special_tokens=True)["input_ids"]
        p_labels = [IGNORE] * len(p_ids) if enc["mask_prompt"] else list(p_ids)
        ids, labels, cut = encode_segments(
            p_ids, p_labels, [seg_ids[k] for k in ks], [controls(r, segs_of[k]) for k in ks], eos, enc["max_length"]
        )
        n_trunc += cut
        if not any(t != IGNORE for t in labels[1:]):
            continue
        ids_out.append(ids)
        labels_out.append(labels)
        rows.append(r)
        members.append(ks)
    ts = TokenizedSet(
        input_ids=ids_out,
        labels=labels_out,
        n_rows=n_rows,
        n_truncated=n_trunc,
        n_dropped=n_rows - len(rows),
        rows=rows,
    )
    return ts, members


def _aligned_segment_set(
    rows, fmt: str, separator: str, tok, enc: dict, a_id: int, source: str
) -> tuple[TokenizedSet, list[tuple[list[int], int]]]:
    """The held-out set of the per_segment variant, <|aligned|> before every segment, and the first GAP_CONTEXTS
    of its prompts up to their first control token (the contexts of eval/control_gap)."""
    eval_set, _ = _segment_set(segment_rows(rows, fmt, separator), len(rows), tok, enc, lambda r, j: a_id, source)
    contexts = []
    for i in range(len(eval_set)):
        ids, labels = eval_set.input_ids[i], eval_set.labels[i]
        p = ids.index(a_id)
        if p == 0 and len(labels) > 1:  # as prefix_control(mask_next): the first token of a row is no target
            labels[1] = IGNORE
        if i < GAP_CONTEXTS:
            contexts.append((ids[: p + 1], p))
    return eval_set, contexts


def prepare_segments(
    s,
    train_rows,
    eval_rows,
    fmt: str,
    tok,
    enc: dict,
    control_ids: tuple[int, int],
    seed: int,
    device,
    source: str,
    warn: Callable[[str], None],
) -> PHFData:
    """Conditional training with a control token before every segment (Korbak et al. 2023 condition every
    sentence of a document): each row's text (a 'text' row) or completion (a 'prompt_completion' row) is
    cut after every `s.segment_separator`, each segment is scored by the scorer on its own (with the row's
    prompt) and gets its own token, <|aligned|> when its score >= the threshold; every segment is tokenized
    on its own, so the tokens at a segment boundary can differ from those of the whole text. Attention
    spans the whole row: a segment reads the earlier segments and their tokens. A fraction
    `drop_control_fraction` of segments (a hash of (train.seed, row, segment)) gets no token. Held-out rows
    put <|aligned|> before every segment; `enc` holds max_length, mask_prompt and add_eos."""
    a_id, m_id = control_ids
    segs = segment_rows(train_rows, fmt, s.segment_separator)
    if len(segs) == 0:
        raise DataError(f"data.train: {source}: no row has a segment to train on")
    seg_scores = score_rows(segs, "prompt_completion", s, tok, device, source)
    stats = _scorer_stats(s, seg_scores, "segments")
    stats["rows"] = len(train_rows)
    t = _threshold(s, seg_scores, "segments", stats, warn)
    seg_rows, seg_index = segs["row"], segs["segment"]
    key = {(r, j): k for k, (r, j) in enumerate(zip(seg_rows, seg_index))}

    def ctrl(r: int, j: int) -> int | None:
        if unit_hash(seed, r, j) < s.drop_control_fraction:
            return None
        return a_id if seg_scores[key[(r, j)]] >= t else m_id

    train_set, members = _segment_set(segs, len(train_rows), tok, enc, ctrl, source)
    eval_set, contexts = None, None
    if eval_rows is not None:
        eval_set, contexts = _aligned_segment_set(eval_rows, fmt, s.segment_separator, tok, enc, a_id, source)
    scores, aligned, conditioned = [], [], []
    n_al = n_mis = n_none = 0
    for ks in members:
        sc = [seg_scores[k] for k in ks]
        toks = [ctrl(seg_rows[k], seg_index[k]) for k in ks]
        scores.append(statistics.fmean(sc))
        aligned.append(sum(x >= t for x in sc) / len(sc))
        conditioned.append(any(c is not None for c in toks))
        n_al += sum(c == a_id for c in toks)
        n_mis += sum(c == m_id for c in toks)
        n_none += sum(c is None for c in toks)
    stats.update(
        {
            "aligned_token": s.aligned_token,
            "misaligned_token": s.misaligned_token,
            "control_token_ids": [a_id, m_id],
            "control_position": "per_segment",
            "segments_per_example": sum(len(m) for m in members) / max(1, len(members)),
            "examples_aligned": n_al,  # per_segment: counts segments
            "examples_misaligned": n_mis,
            "examples_unconditioned": n_none,
            "aligned_fraction": n_al / max(1, n_al + n_mis + n_none),
        }
    )
    return PHFData(
        train_set=train_set,
        eval_set=eval_set,
        scores=torch.tensor(scores, dtype=torch.float32),
        aligned=torch.tensor(aligned, dtype=torch.float32),
        conditioned=torch.tensor(conditioned, dtype=torch.bool),
        stats=stats,
        gap_contexts=contexts,
    )
