"""`prefcli explain` from end to end: per-token rows on stdout, the report on stderr, pictures and HTML."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ...errors import UsageError
from .attribution import (
    attention_map,
    baseline_token,
    check_layer_head,
    draw_attention,
    draw_scores,
    ig_attribution,
    implicit_rewards,
    pair_alignment,
    prefix_attribution,
    reward_ids,
)
from .inputs import (
    DEFAULT_BETA,
    METHODS,
    Explained,
    ExplainOptions,
    _check_length,
    load_policy,
    load_reward_model,
    model_kind,
    read_items,
    resolve_device,
    run_defaults,
    token_strings,
)
from .render import colour_scale, render_html, terminal_text

# ------------------------------------------------------------------------------------ driver


# said wherever a rejected answer's token scores are shown: they are its own scores negated
FLIPPED_NOTE = " (token scores sign-flipped: each is the token's contribution to the margin chosen - rejected)"


def _top(e: Explained, k: int = 5) -> list[list]:
    ranked = sorted(((s, t) for t, s in zip(e.tokens, e.scores) if s is not None), key=lambda x: -abs(x[0]))
    return [[t, s] for s, t in ranked[:k]]


def run_explain(opts: ExplainOptions, emit: Callable[[dict], None]) -> dict:
    """Check the options, load the model(s), explain every item (rows to `emit` as each is done), then draw,
    show and write the HTML; returns the summary."""
    t0 = time.perf_counter()
    kind, cfg, method = _choose_method(opts)
    check_layer_head(cfg, opts.layer, opts.head)
    items = read_items(opts)
    device = resolve_device(opts.device)
    summary: dict[str, Any] = {
        "command": "explain",
        "status": "completed",
        "exit_code": 0,
        "model": opts.model,
        "model_kind": kind,
        "method": method,
        "rejected_sign": "on a pair, the rejected side's token scores are negated: each is its contribution to "
        "the margin chosen - rejected",
    }
    import torch

    torch.manual_seed(0)
    build = _reward_explainer if kind == "reward" else _policy_explainer
    explain_side, attn_model = build(opts, cfg, method, device, summary)
    out_items = []
    blocks = []
    plots: list[str] = []
    for k, it in enumerate(items):  # each item's rows go out as soon as it is done (pipelines)
        sides = {side: explain_side(it.prompt, t, f"item {k} ({side})") for side, t in it.sides.items()}
        rec, title, shared = item_record(k, it, sides, kind, emit)
        if opts.plots:
            plots += draw_item(Path(opts.plots), k, sides, title, method, attn_model, opts.layer, opts.head, device)
        out_items.append(rec)
        blocks.append(({"title": title}, [(side, e, shared[side]) for side, e in sides.items()]))
    summary["items"] = out_items
    summary["plots"] = plots
    summary["warnings"] = convergence_warnings(out_items, opts.steps)
    if not opts.quiet:
        show(summary, blocks, f"prefcli explain {opts.model} ({kind}, {method})")
    if opts.html:
        page = render_html(summary, blocks)
        Path(opts.html).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.html).write_text(page, encoding="utf-8")
        summary["html"] = opts.html
    summary["wall_s"] = round(time.perf_counter() - t0, 3)
    return summary


def _choose_method(opts: ExplainOptions) -> tuple[str, dict, str]:
    """Check the option values, read the model's kind and pick the method (auto: ig for a reward model,
    implicit for a policy); a method that does not fit the model's kind is a usage error."""
    if opts.method not in METHODS:
        raise UsageError(f"--method must be one of {', '.join(METHODS)}; got {opts.method!r}")
    if opts.steps < 2:
        raise UsageError("--steps must be at least 2")
    if (opts.layer is not None or opts.head is not None) and not opts.plots:
        raise UsageError("--layer and --head choose the attention map to draw: give --plots DIR too")
    kind, cfg = model_kind(opts.model)
    method = opts.method
    if method == "auto":
        method = "ig" if kind == "reward" else "implicit"
    if kind == "policy" and method in ("ig", "prefix"):
        raise UsageError(
            f"{opts.model} is not a reward model: it is a causal language model ({', '.join(cfg.get('architectures') or [])}). "
            f"--method {method} attributes a reward model's score (a sequence classifier with one output, as "
            "`prefcli reward` writes); for a tuned policy use --method implicit with --reference BASE"
        )
    if kind == "reward" and method == "implicit":
        raise UsageError(
            f"{opts.model} is a reward model; the implicit reward beta log pi/pi_ref needs a policy (a causal LM) "
            "and its reference. For a reward model use --method ig or prefix"
        )
    return kind, cfg, method


def _length_limit(cfg: dict) -> int | None:
    """The model's longest input in tokens, from its config (None where it names none)."""
    return cfg.get("max_position_embeddings") or cfg.get("n_positions")


def _reward_explainer(opts: ExplainOptions, cfg: dict, method: str, device, summary: dict):
    """Load the reward model; return the function that attributes one side's score (ig or prefix) and the
    model whose attention is drawn. Notes the baseline token and what the scores mean in `summary`."""
    import torch

    limit = _length_limit(cfg)
    model, tok = load_reward_model(opts.model, device, opts.plots is not None)
    base_id = baseline_token(model, tok) if method == "ig" else None
    if base_id is not None:
        summary["baseline_token"] = tok.convert_ids_to_tokens(base_id)
    summary["what"] = {
        "ig": "integrated gradients of the reward model's score over the input embeddings (captum), from a "
        "baseline of one neutral token repeated; the token scores sum to score - baseline_score",
        "prefix": "prefix-score differences r(x_<=t) - r(x_<t); the token scores sum to the score",
    }[method]

    def explain_side(prompt: str, text: str, what: str) -> Explained:
        ids, n_prompt = reward_ids(tok, prompt, text)
        _check_length(ids, limit, what)
        x = torch.tensor([ids], device=device)
        if method == "ig":
            a, info = ig_attribution(model, x, base_id, opts.steps)
        else:
            a, info = prefix_attribution(model, x)
        info["tokens"] = len(ids)
        info["headline"] = f"score {info['score']:+.4f}"
        return Explained(ids, token_strings(tok, ids), a, n_prompt, info)

    return explain_side, model


def _reference_and_beta(opts: ExplainOptions, defaults: dict) -> tuple[str, float]:
    """The reference model folder and beta for the implicit reward: the options first, else the run's recipe;
    a usage error that says what to give where neither names one."""
    ref_path = opts.reference or defaults.get("reference")
    if not ref_path and defaults.get("init"):
        raise UsageError(
            f"the implicit reward beta log pi/pi_ref of {opts.model} needs its reference (the model it was tuned "
            f"from), and the run's recipe ({defaults['recipe']}) started it from a random initialisation "
            f"(model.init: {defaults['init']}), which was never saved, so there is no reference to read: give "
            "--reference MODEL_FOLDER to compare with a saved model"
        )
    if not ref_path:
        where = (
            f"the run's recipe ({defaults['recipe']}) names no model.path"
            if defaults.get("recipe")
            else "no run recipe.yaml next to the model names one"
        )
        raise UsageError(
            f"the implicit reward beta log pi/pi_ref of {opts.model} needs its reference (the model it was tuned "
            f"from): give --reference BASE_MODEL ({where})"
        )
    if not os.path.isdir(ref_path):
        raise UsageError(f"--reference {ref_path}: no such model folder")
    beta = opts.beta if opts.beta is not None else defaults.get("beta") or DEFAULT_BETA
    if beta <= 0:
        raise UsageError("--beta must be positive")
    return ref_path, beta


def _policy_explainer(opts: ExplainOptions, cfg: dict, method: str, device, summary: dict):
    """Load the policy and its reference; return the function that gives one side's per-token implicit reward
    and the model whose attention is drawn. Notes the reference, beta and the run's defaults in `summary`."""
    limit = _length_limit(cfg)
    defaults = run_defaults(opts.model)
    ref_path, beta = _reference_and_beta(opts, defaults)
    lm, tok, rt = load_policy(opts.model, device, opts.plots is not None)
    ref_lm, ref_tok, _ = load_policy(ref_path, device, False)
    if ref_tok.get_vocab() != tok.get_vocab():
        raise UsageError(f"the reference {ref_path} has a different tokenizer from {opts.model}: no per-token ratio")
    summary.update({"reference": ref_path, "beta": beta, "run": defaults or None})
    if defaults.get("needs_ref") is False:
        summary["note"] = (
            f"objective {defaults.get('objective')} trains without a reference; the ratio to the base model is "
            "shown all the same"
        )
    summary["what"] = (
        f"per-token implicit reward beta (log pi - log pi_ref), beta {beta:g}; the token scores sum to the "
        "sequence implicit reward beta log pi(y|x)/pi_ref(y|x)"
    )

    def explain_side(prompt: str, text: str, what: str) -> Explained:
        from ...engine.pairs import encode_completion

        p, c = encode_completion(tok, "plain", prompt, text)
        _check_length(p + c, limit, what)
        e = implicit_rewards(lm, ref_lm, rt, tok, prompt, text, beta)
        if e.info["tokens_scored"] == 0:
            raise UsageError(f"{what}: no completion token can be scored (give a prompt)")
        e.info["tokens"] = len(e.ids)
        e.info["headline"] = f"implicit reward {e.info['implicit_reward']:+.4f}"
        return e

    return explain_side, lm


def convergence_warnings(out_items: list[dict], steps: int) -> list[str]:
    """Integrated gradients that miss score - baseline by more than 5%: more --steps."""
    warnings = []
    for rec in out_items:
        for side in ("text", "chosen", "rejected"):
            info = rec.get(side) or {}
            if "convergence_delta" in info:
                gap = abs(info["score"] - info["baseline_score"])
                if abs(info["convergence_delta"]) > 0.05 * max(gap, 1e-6):
                    warnings.append(
                        f"item {rec['item']} ({side}): the attributions miss score - baseline by "
                        f"{info['convergence_delta']:+.3g} of {gap:.3g}; raise --steps (now {steps})"
                    )
    return warnings


def show(summary: dict, blocks: list, heading: str) -> None:
    """The coloured tokens of every item on stderr, one colour scale for all, then the warnings."""
    from rich.console import Console

    scale_all = colour_scale([e for _, sides_ in blocks for _, e, _ in sides_])
    con = Console(stderr=True, highlight=False)
    con.print(heading, style="bold", markup=False)
    con.print(summary["what"], markup=False, style="dim")
    for info, sides_ in blocks:
        con.print(info["title"], style="bold", markup=False)
        for side, e, _ in sides_:
            con.print(f"  {side}: {e.info['headline']}{FLIPPED_NOTE if e.flipped else ''}", markup=False)
            con.print(terminal_text(e, scale_all), soft_wrap=True)
    for w in summary["warnings"]:
        con.print(f"warning: {w}", style="yellow", markup=False)


def item_record(k: int, it, sides: dict[str, Explained], kind: str, emit: Callable[[dict], None]):
    """One item's summary record (for a pair: the margin and the share of attribution on the tokens that
    differ, the rejected side's scores negated), its title and each side's shared tokens; its per-token rows go
    to `emit`."""
    rec: dict[str, Any] = {"item": k, "kind": it.kind}
    if it.row is not None:
        rec["row"] = it.row
    shared: dict[str, set[int] | None] = {s: None for s in sides}
    if it.kind == "pair":
        c, r = sides["chosen"], sides["rejected"]
        sa, sb, mass = pair_alignment(c, r)
        # shown as contributions to the margin (chosen - rejected): the rejected side's scores change sign
        r.scores = [None if s is None else -s for s in r.scores]
        r.flipped = True
        shared = {"chosen": sa, "rejected": sb}
        key = "score" if kind == "reward" else "implicit_reward"
        rec["margin"] = c.info[key] - r.info[key]
        rec["differing_mass"] = mass
        title = f"pair {k}" + (f" (row {it.row})" if it.row else "") + f": margin {rec['margin']:+.4f}"
    else:
        title = f"text {k}"
    for side, e in sides.items():
        rec[side] = {x: v for x, v in e.info.items() if x != "headline"} | {"top": _top(e)}
        for t, (tid, ts, s) in enumerate(zip(e.ids, e.tokens, e.scores)):
            row = {
                "item": k,
                "side": side,
                "position": t,
                "token_id": tid,
                "token": ts,
                "prompt": t < e.prompt_len,
                "score": s,
            }
            if shared[side] is not None:
                row["shared"] = t in shared[side]
            emit(row)
    return rec, title, shared


def draw_item(d: Path, k: int, sides: dict, title: str, method: str, model, layer, head, device) -> list[str]:
    """--plots: each side's token scores and its attention map (--layer/--head, else the mean)."""
    import torch

    d.mkdir(parents=True, exist_ok=True)
    drawn = []
    for side, e in sides.items():
        stem = f"item{k}-{side}"
        draw_scores(d / f"tokens-{stem}.png", e, f"{title} / {side}: {e.info['headline']} ({method})")
        att = attention_map(model, torch.tensor([e.ids], device=device), layer, head)
        which = f"layer {layer if layer is not None else 'mean'}, head {head if head is not None else 'mean'}"
        draw_attention(d / f"attention-{stem}.png", att, e.tokens, f"{title} / {side}: attention ({which})")
        drawn += [str(d / f"tokens-{stem}.png"), str(d / f"attention-{stem}.png")]
    return drawn
