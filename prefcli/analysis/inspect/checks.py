"""The figures of `prefcli data inspect`: hygiene, lengths, shallow baselines (length rule, bag of words), position, leakage, raters and agreement with a reward source."""

from __future__ import annotations

import math
import os
import random
from collections import Counter
from typing import Any

from ...engine.debias import (
    as_text,
    content_columns,
    duplicate_rows,
    leaked_rows,
    normalize_text,
    prompt_key,
)
from ...errors import UsageError
from .. import agreement
from ..agreement import krippendorff_alpha, pairwise_kappas
from .sources import WORD_RE, Source, Tokens, View, is_empty

# -------------------------------------------------------------------------------- hygiene


def hygiene(v: View, t: Tokens, src: Source) -> dict:
    """Counts of duplicates, empty and identical answers, conflicting labels and truncation. With a user column, a
    row repeats or contradicts only rows of the same user: two users labelling one pair differently is
    disagreement (the raters section), not a conflict."""
    n = len(v.rows)
    rows = [{**row, "_user": u} for row, u in zip(v.rows, v.raters)]
    cols = content_columns(list(v.rows[0].keys())) + ["_user"] if v.rows else []
    exact = duplicate_rows(rows, cols, False)
    near = duplicate_rows(rows, cols, True)
    out: dict[str, Any] = {
        "rows": n,
        "prompts": len({normalize_text(as_text(p)) for p in v.prompts if p is not None}),
        "duplicates_exact": len(exact),
        "duplicates_near": len(near) - len(exact),
        "empty": sum(1 for c in v.comps if any(is_empty(x) for x in c))
        if src.kind != "prompts"
        else sum(1 for p in v.prompts if is_empty(p)),
    }
    if src.kind == "pairs":
        out["identical_exact"] = sum(1 for c in v.comps if c[0] == c[1] and not is_empty(c[0]))
        out["identical_near"] = (
            sum(
                1
                for c in v.comps
                if normalize_text(as_text(c[0])) == normalize_text(as_text(c[1])) and not is_empty(c[0])
            )
            - out["identical_exact"]
        )
        fwd = Counter()
        for p, (c, r), u in zip(v.prompts, v.comps, v.raters):
            fwd[(normalize_text(as_text(p)), normalize_text(as_text(c)), normalize_text(as_text(r)), u)] += 1
        out["conflicting"] = sum(
            1
            for p, (c, r), u in zip(v.prompts, v.comps, v.raters)
            if normalize_text(as_text(c)) != normalize_text(as_text(r))
            and fwd[(normalize_text(as_text(p)), normalize_text(as_text(r)), normalize_text(as_text(c)), u)] > 0
        )
    elif src.kind in ("unpaired", "scores"):
        seen: dict[tuple, set] = {}
        for p, c, lab, u in zip(v.prompts, v.comps, v.labels, v.raters):
            seen.setdefault((normalize_text(as_text(p)), normalize_text(as_text(c[0])), u), set()).add(lab)
        out["conflicting"] = sum(
            1
            for p, c, u in zip(v.prompts, v.comps, v.raters)
            if len(seen[(normalize_text(as_text(p)), normalize_text(as_text(c[0])), u)]) > 1
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
    from ...evaluate.metrics import pearson, spearman

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
    return set(WORD_RE.findall(as_text(text).casefold()))


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
    against ½ (normal approximation; analysis.agreement.position_bias)."""
    return agreement.position_bias(v.positions)


# ----------------------------------------------------------------------------------- leakage


def leakage(train: View, held: View) -> dict:
    cols = content_columns(list(train.rows[0].keys())) if train.rows else []
    tkeys = {prompt_key(r, cols) for r in train.rows}
    ekeys = [prompt_key(r, cols) for r in held.rows]
    from ...engine.debias import row_key

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


def majority_disagreement(mine: dict, units: dict) -> tuple[int, float | None]:
    """How much one rater disagrees with the pooled majority: over the items they labelled that others labelled
    too, the share where their label differs from the most common label of the *other* raters (leave-one-out, so
    their own vote does not make the majority; items where the others tie are left out). Returns (items shared
    with others, that share or None)."""
    from collections import Counter

    shared = n = differ = 0
    for item, lab in mine.items():
        others = list(units.get(item, []))
        others.remove(lab)  # their own vote
        if not others:
            continue
        shared += 1
        top = Counter(others).most_common(2)
        if len(top) > 1 and top[0][1] == top[1][1]:
            continue
        n += 1
        differ += top[0][0] != lab
    return shared, (differ / n if n else None)


def raters(v: View, t: Tokens, kind: str, reward_ok: list[float] | None) -> dict | None:
    """Per-rater label balance, how much each rater disagrees with the majority of the others, and agreement on
    items labelled by several raters."""
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
    units: dict = {}
    for items in labels.values():
        for item, lab in items.items():
            units.setdefault(item, []).append(lab)
    table = []
    for r, s in sorted(per.items()):
        row: dict[str, Any] = {"rater": r, "rows": s["rows"]}
        shared, against = majority_disagreement(labels.get(r, {}), units)
        row["shared_items"] = shared
        if shared:
            row["disagrees_with_majority"] = against
        if kind == "pairs":
            row["chosen_longer"] = s["_longer"] / s["rows"]
            if s["_pos_n"]:
                row["chosen_shown_first"] = s["_pos"] / s["_pos_n"]
        elif s["_lab"]:
            row["desirable_share" if kind == "unpaired" else "score_mean"] = _mean(s["_lab"])
        if s["_rw"]:
            row["reward_agreement"] = _mean(s["_rw"])
        table.append(row)
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

    from ...evaluate.metrics import pearson
    from ...recipe import bounded
    from ...recipe.reward_specs import RewardSpec
    from ...reward_sources import build_rewards

    if kind not in ("pairs", "scores"):
        raise UsageError(f"--reward compares a reward with pair or score labels; these rows are {kind}")
    obj: Any
    if os.path.isdir(spec):
        obj = {"kind": "model", "path": spec}
    else:
        try:
            obj = bounded.load_value(spec)  # a recipe value, under a recipe's limits
        except bounded.LimitExceeded as e:
            raise UsageError(f"--reward: {e}") from None
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
