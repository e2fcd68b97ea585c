"""`prefcli data inspect` from end to end: the driver, its loud findings, the stderr report and the PNG plots."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from ...engine.debias import (
    apply_debias,
    length_weights,
)
from ...errors import UsageError
from .checks import (
    hygiene,
    leakage,
    lengths,
    pair_baselines,
    position_bias,
    raters,
    reward_scores,
    top_words,
    unpaired_baselines,
    words,
)
from .sources import (
    FILE_LENGTH_FIXES,
    LOUD,
    InspectOptions,
    Source,
    Tokens,
    View,
    count_tokens,
    is_empty,
    make_view,
    resolve,
)

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
            if not (is_empty(c[0]) or is_empty(c[1])):
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
        "read_as": src.read_as,
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
            ok = [(c, r) for c, r in tv.comps if not (is_empty(c) or is_empty(r))]
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
    summary["warnings"] = loud_findings({**summary, "length_fixes": src.length_fixes})
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
                f"Consider {s.get('length_fixes') or FILE_LENGTH_FIXES}"
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
    """The summary as tables and lines on `console`, one section per part of the summary, then the warnings
    and the plots written."""
    from rich.text import Text

    console.print(
        f"[bold]prefcli data inspect[/] {s['source']}  ({s['kind']}, {s['format']}"
        + (f" read from {s['read_as']}" if s.get("read_as") else "")
        + f"; tokens of {s['tokenizer']})",
        highlight=False,
    )
    splits = [k for k in ("train", "eval") if s.get(k)]
    console.print(_rows_table(s, splits))
    console.print(_lengths_table(s, splits))
    if s.get("baselines"):
        console.print(_baselines_table(s["baselines"]))
    w = s.get("words")
    if w and (w["chosen"] or w["rejected"]):
        console.print(_words_table(w))
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
    if s.get("raters"):
        _print_raters(s["raters"], console)
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
    for wmsg in s["warnings"]:
        console.print(Text.assemble(("warning: ", "bold red"), (wmsg, "red")), soft_wrap=True)
    for p in s.get("plots") or []:
        console.print(f"wrote {p}", highlight=False)


def _split_table(title: str, splits: list[str]):
    """A table with a label column and one right-aligned column per split (train, eval)."""
    from rich.table import Table

    t = Table(title=title)
    t.add_column("")
    for k in splits:
        t.add_column(k, justify="right")
    return t


def _rows_table(s: dict, splits: list[str]):
    """Row counts per split: duplicates, identical answers, empty answers, conflicts, truncation."""
    t = _split_table("rows", splits)
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
    return t


def _lengths_table(s: dict, splits: list[str]):
    """Token-length statistics per split, the shares as percentages."""
    t = _split_table("lengths (tokens)", splits)
    pct_keys = {"chosen_longer", "chosen_shorter", "equal", "desirable_share", "best_is_longest"}
    for key in s["train"]["lengths"]:
        if key == "unit":
            continue
        t.add_row(key.replace("_", " "), *[_f(s[k]["lengths"].get(key), key in pct_keys) for k in splits])
    return t


def _baselines_table(b: dict):
    """The shallow baselines' accuracy; one at or above LOUD (other than majority) in red."""
    from rich.table import Table

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
    return t


def _words_table(w: dict):
    """The words most associated with each side, side by side with their counts and log-count ratio."""
    from rich.table import Table

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
    return t


def _print_raters(ra: dict, console) -> None:
    """Per-rater table, then Krippendorff's alpha and each pair's Cohen's kappa where items are shared."""
    from rich.table import Table

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
