"""`prefcli explain MODEL --text ... | --pairs FILE`: which tokens earn a reward, where a tuned policy
departs from its base, and what the model attends to.

    prefcli explain runs/quickstart/reward/final --prompt "And the LORD said" --text " blessed be thy name"
    prefcli explain runs/quickstart/dpo/final --pairs data/quickstart/preferences_eval.jsonl --html dpo.html

A reward model (AutoModelForSequenceClassification, one label, as `prefcli reward` writes it) scores
the string prompt + completion at its last token, exactly as training and `prefcli.rewards` do.
Per-token attribution of that score:

- `ig`: integrated gradients (Sundararajan et al. 2017, "Axiomatic Attribution for Deep Networks"),
  captum's `LayerIntegratedGradients` over the input embeddings, from a baseline that puts one
  neutral token at every position: the pad token, or EOS when the pad token's embedding is zero (as
  in models trained with a padding_idx, e.g. every reward model prefcli trains from scratch). A zero
  baseline would break integrated gradients on RMSNorm/LayerNorm models: they see only the direction
  of an embedding, so the score jumps at the very start of the path from zero, where the integral
  cannot see it. Completeness: the attributions sum to r(x) - r(baseline) up to the integration
  error (reported as `convergence_delta`; a warning asks for more --steps when it is over 5%).
- `prefix`: the score of each prefix minus the score of the one before, a_t = r(x_≤t) - r(x_<t)
  (a_1 = r(x_1)); they sum to r(x). One forward pass gives every prefix score: the head is applied
  to the hidden state of every position (causal attention: position t sees only x_≤t).

A policy with a reference (a DPO or PPO output and its base): the per-token implicit reward
β (log π(y_t | x, y_<t) - log π_ref(y_t | x, y_<t)) over the completion tokens (EOS included, as
training encodes them); its sum is the sequence implicit reward β log π(y|x)/π_ref(y|x) that
`prefcli contrastive` logs as reward/chosen and reward/rejected.

For a pair, both completions are explained and aligned (difflib on token ids): tokens the two share
in the same order are "shared"; `differing_mass` is the share of the absolute attribution that sits
on the tokens that differ (for shared tokens, the difference of their two attributions counts).

Attention maps (`--plots DIR`): the model reloaded with eager attention, one heatmap per text, for
`--layer`/`--head` or averaged. Output: coloured tokens on stderr (rich), one JSON row per token on
stdout and the summary as the last line, a self-contained HTML page with `--html`.
"""

from __future__ import annotations

import difflib
import html as _html
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError, UsageError

METHODS = ("auto", "ig", "prefix", "implicit")
DEFAULT_BETA = 0.1


@dataclass
class ExplainOptions:
    model: str
    texts: list[str] = field(default_factory=list)
    prompt: str = ""
    pairs: str | None = None
    max_rows: int = 20
    method: str = "auto"
    reference: str | None = None
    beta: float | None = None
    steps: int = 64
    plots: str | None = None
    layer: int | None = None
    head: int | None = None
    html: str | None = None
    device: str = "auto"
    quiet: bool = False


@dataclass
class Explained:
    """One text's per-token scores."""

    ids: list[int]
    tokens: list[str]
    scores: list[float | None]  # None: not scored (prompt tokens of a policy, the first token without context)
    prompt_len: int  # tokens of the prompt at the start of ids
    info: dict


# ------------------------------------------------------------------------------------ models


def model_kind(path: str) -> tuple[str, dict]:
    """'reward' (a sequence classifier with one label) or 'policy' (a causal LM), from config.json."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise UsageError(
            f"{path}: not a model folder (no config.json); give the final/ folder of a prefcli run or any Hugging "
            "Face model folder"
        )
    cfg = json.loads(cfg_file.read_text())
    archs = cfg.get("architectures") or []
    if any(a.endswith("ForSequenceClassification") for a in archs):
        n = cfg.get("num_labels", len(cfg.get("id2label") or {}) or 2)
        if n != 1:
            raise UsageError(
                f"{path} is a sequence classifier with {n} labels, not a reward model (one score); reward "
                "attribution needs a model with a single output, as `prefcli reward` writes"
            )
        return "reward", cfg
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "policy", cfg
    raise UsageError(f"{path}: architecture {archs or 'unknown'} is neither a reward model nor a causal LM")


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is visible")
    if name not in ("cpu", "cuda"):
        raise UsageError(f"--device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def load_reward_model(path: str, device, eager: bool):
    from ..engine.models import _quiet_transformers

    _quiet_transformers()
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
        kw = {"attn_implementation": "eager"} if eager else {}
        model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=torch.float32, use_safetensors=True, **kw
        )
    except (OSError, ValueError) as e:
        raise UsageError(f"could not load the reward model {path}: {str(e).strip().splitlines()[0]}") from None
    if tok.pad_token_id is None:
        raise UsageError(f"the reward model's tokenizer at {path} has no pad token")
    model.config.pad_token_id = tok.pad_token_id
    return model.to(device).eval(), tok


def load_policy(path: str, device, eager: bool):
    from ..engine.models import build_causal_lm, load_tokenizer
    from ..evaluate.loading import make_runtime
    from ..recipe.sections import ModelSection

    rt = make_runtime(str(device.type), "fp32")
    m = ModelSection(path=path, attn_implementation="eager" if eager else "sdpa")
    tok = load_tokenizer(m)
    lm = build_causal_lm(m, tok, rt, seed=0)
    return lm.eval(), tok, rt


def run_defaults(model: str) -> dict:
    """beta and reference from the recipe.yaml of the run whose final/ folder `model` is."""
    import yaml

    p = Path(model).resolve()
    recipe = p.parent / "recipe.yaml" if p.name == "final" else p / "recipe.yaml"
    if not recipe.is_file():
        return {}
    try:
        r = yaml.safe_load(recipe.read_text()) or {}
    except yaml.YAMLError:
        return {}
    out: dict[str, Any] = {"recipe": str(recipe), "command": r.get("command")}
    ref = (r.get("model") or {}).get("path")
    if ref:
        out["reference"] = ref
    if r.get("command") == "contrastive":
        c = r.get("contrastive") or {}
        from ..algos.contrastive import OBJECTIVES

        obj = c.get("objective", "dpo")
        out["objective"] = obj
        out["beta"] = c.get("beta") if c.get("beta") is not None else OBJECTIVES[obj].default_beta
        out["needs_ref"] = OBJECTIVES[obj].needs_ref
    elif r.get("command") == "rlhf":
        out["beta"] = (r.get("rlhf") or {}).get("kl_coef")
    return out


# ------------------------------------------------------------------------------------ inputs


@dataclass
class Item:
    kind: str  # 'text' | 'pair'
    prompt: str
    sides: dict[str, str]  # {'text': ...} or {'chosen': ..., 'rejected': ...}
    row: int | None = None


def read_items(opts: ExplainOptions) -> list[Item]:
    items = [Item("text", opts.prompt, {"text": t}) for t in opts.texts]
    if opts.pairs:
        from ..engine.data import load_rows
        from ..recipe.sections import DataSource

        if not os.path.exists(opts.pairs):
            raise DataError(f"--pairs: no such file: {opts.pairs}")
        if opts.max_rows <= 0:
            raise UsageError("--max-rows must be positive")
        ds = load_rows(
            DataSource(path=opts.pairs, max_rows=opts.max_rows), required=("chosen", "rejected"), what="--pairs"
        )
        for i, row in enumerate(ds.to_list()):
            p, c, r = row.get("prompt") or "", row.get("chosen"), row.get("rejected")
            if not all(isinstance(x, str) for x in (p, c, r)):
                raise DataError(
                    f"--pairs {opts.pairs}: row {i + 1}: prompt/chosen/rejected must be text, not chat messages"
                )
            items.append(Item("pair", p, {"chosen": c, "rejected": r}, row=i + 1))
    if not items:
        raise UsageError("nothing to explain: give --text TEXT (with --prompt) or --pairs FILE")
    for it in items:
        for side, t in it.sides.items():
            if not t:
                raise UsageError(f"item {it.row or ''} {side}: an empty text has no token to explain")
    return items


def token_strings(tok, ids: list[int]) -> list[str]:
    return [tok.decode([i]) for i in ids]


def _check_length(ids: list[int], limit: int | None, what: str) -> None:
    if limit is not None and len(ids) > limit:
        raise UsageError(
            f"{what} is {len(ids)} tokens, longer than the model's context of {limit} tokens "
            "(max_position_embeddings); shorten the text"
        )


# -------------------------------------------------------------------------------- reward model


def _backbone_and_head(model):
    head = getattr(model, "score", None) or getattr(model, "classifier", None)
    if head is None:
        raise UsageError(f"{type(model).__name__} has no 'score' head; cannot read per-position scores")
    return model.base_model, head


def position_scores(model, ids) -> list[float]:
    """r(x_≤t) for every t: the score head on every position's last hidden state."""
    import torch

    body, head = _backbone_and_head(model)
    with torch.no_grad():
        h = body(input_ids=ids, use_cache=False).last_hidden_state
        return head(h)[0, :, 0].float().tolist()


def prefix_attribution(model, ids) -> tuple[list[float], dict]:
    r = position_scores(model, ids)
    a = [r[0]] + [r[t] - r[t - 1] for t in range(1, len(r))]
    return a, {"score": r[-1], "attribution_sum": sum(a)}


def baseline_token(model, tok) -> int:
    """The token the integrated-gradients baseline repeats: pad, or EOS when pad's embedding is zero."""
    import torch

    w = model.get_input_embeddings().weight
    with torch.no_grad():
        typical = float(w.norm(dim=-1).mean())
        for tid in (tok.pad_token_id, tok.eos_token_id):
            if tid is not None and float(w[tid].norm()) > 1e-3 * typical:
                return int(tid)
    raise UsageError(
        "the reward model's pad and EOS tokens both have zero embeddings: no neutral baseline for integrated "
        "gradients; use --method prefix"
    )


def ig_attribution(model, ids, baseline_id: int, steps: int) -> tuple[list[float], dict]:
    """Integrated gradients of the score over the input embeddings (captum), from a baseline that
    repeats one neutral token (`baseline_token`)."""
    import torch

    try:
        from captum.attr import LayerIntegratedGradients
    except ImportError:
        raise UsageError(
            "integrated gradients need captum, an optional extra: pip install 'prefcli[explain]' (or pip install "
            "captum); --method prefix needs no extra"
        ) from None
    body, head = _backbone_and_head(model)

    def score_last(input_ids):  # the score read at the last position, as the model reads a right-unpadded text
        h = body(input_ids=input_ids, use_cache=False).last_hidden_state
        return head(h[:, -1]).squeeze(-1).float()

    baseline = torch.full_like(ids, baseline_id)
    lig = LayerIntegratedGradients(score_last, model.get_input_embeddings())
    attr, delta = lig.attribute(
        inputs=ids, baselines=baseline, n_steps=steps, internal_batch_size=min(steps, 32), return_convergence_delta=True
    )
    a = attr.sum(-1)[0].detach().float().tolist()
    with torch.no_grad():
        r, r0 = float(score_last(ids)[0]), float(score_last(baseline)[0])
    return a, {
        "score": r,
        "baseline_score": r0,
        "attribution_sum": sum(a),
        "convergence_delta": float(delta.reshape(-1)[0]),
        "steps": steps,
        "baseline_token": baseline_id,
    }


def reward_ids(tok, prompt: str, text: str) -> tuple[list[int], int]:
    """The tokens a reward model scores: the string prompt + completion with the tokenizer's own
    special tokens (prefcli.engine.pairs.encode_scored), and how many of them are the prompt's."""
    ids = tok(prompt + text, add_special_tokens=True)["input_ids"]
    if not prompt:
        return list(ids), 0
    enc = tok(prompt + text, add_special_tokens=True, return_offsets_mapping=True)
    n = 0
    for _s, e in enc["offset_mapping"]:  # the leading tokens that end inside the prompt
        if e > len(prompt):
            break
        n += 1
    return list(ids), n


# ----------------------------------------------------------------------------------- policy


def implicit_rewards(policy_lm, ref_lm, rt, tok, prompt: str, text: str, beta: float) -> Explained:
    """β (log π(y_t|·) - log π_ref(y_t|·)) for every completion token, with the log-probs computed by
    the training path (PolicyLM's chunked log-probs on the batch `completion_batch` builds)."""
    import torch

    from ..engine.data import move
    from ..engine.models import PolicyLM
    from ..engine.pairs import completion_batch, encode_completion

    p, c = encode_completion(tok, "plain", prompt, text)
    b = move(completion_batch([p], [c], tok.pad_token_id), rt.device)
    with torch.no_grad():
        lp, _ = PolicyLM(policy_lm, rt)(b["input_ids"], b["targets"], b["attention_mask"], b["position_ids"])
        lr, _ = PolicyLM(ref_lm, rt)(b["input_ids"], b["targets"], b["attention_mask"], b["position_ids"])
    mask = (b["targets"][0] != -100).tolist()
    ids = p + c
    scores: list[float | None] = [None] * len(ids)
    logp = ref = 0.0
    for t, on in enumerate(mask):
        if on:  # position t predicts token t + 1
            a, r = float(lp[0, t]), float(lr[0, t])
            scores[t + 1] = beta * (a - r)
            logp += a
            ref += r
    scored = [s for s in scores if s is not None]
    info = {
        "implicit_reward": beta * (logp - ref),
        "sum_of_tokens": sum(scored),
        "logp": logp,
        "ref_logp": ref,
        "tokens_scored": len(scored),
        "beta": beta,
    }
    return Explained(ids, token_strings(tok, ids), scores, len(p), info)


# -------------------------------------------------------------------------------- attention


def attention_map(model, ids, layer: int | None, head: int | None):
    """(T, T) attention weights of one layer/head, or averaged over layers and/or heads."""
    import torch

    with torch.no_grad():
        out = model(input_ids=ids, output_attentions=True, use_cache=False)
    att = out.attentions
    if not att or att[0] is None:
        raise UsageError("the model returned no attention weights (load it with eager attention)")
    a = torch.stack([x[0].float() for x in att])  # (L, H, T, T)
    a = a[layer] if layer is not None else a.mean(0)
    a = a[head] if head is not None else a.mean(0)
    return a.cpu().numpy()


def check_layer_head(cfg: dict, layer: int | None, head: int | None) -> None:
    n_layers = cfg.get("num_hidden_layers") or cfg.get("n_layer")
    n_heads = cfg.get("num_attention_heads") or cfg.get("n_head")
    if layer is not None and n_layers is not None and not 0 <= layer < n_layers:
        raise UsageError(f"--layer {layer} is out of range: the model has {n_layers} layers (0 to {n_layers - 1})")
    if head is not None and n_heads is not None and not 0 <= head < n_heads:
        raise UsageError(f"--head {head} is out of range: the model has {n_heads} attention heads (0 to {n_heads - 1})")


def draw_attention(path: Path, att, tokens: list[str], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(tokens)
    size = min(14, max(4, 0.32 * n + 2))
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(att, cmap="viridis", vmin=0)
    labels = [_display(t) for t in tokens]
    ax.set_xticks(range(n), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(n), labels, fontsize=7)
    ax.set_xlabel("attended token")
    ax.set_ylabel("query token")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw_scores(path: Path, e: Explained, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(e.tokens)
    vals = [s if s is not None else 0.0 for s in e.scores]
    fig, ax = plt.subplots(figsize=(min(16, max(5, 0.3 * n + 2)), 3.5))
    ax.bar(range(n), vals, color=["#2a9d3a" if v >= 0 else "#d03030" for v in vals])
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(n), [_display(t) for t in e.tokens], rotation=90, fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------- pairs


def pair_alignment(a: Explained, b: Explained) -> tuple[set[int], set[int], float]:
    """Token positions of a and b that the two texts share (in order, difflib on token ids), and the
    share of the absolute per-token contribution to the margin that sits on the differing tokens."""
    sm = difflib.SequenceMatcher(None, a.ids, b.ids, autojunk=False)
    sa, sb = set(), set()
    shared_mass = 0.0
    for blk in sm.get_matching_blocks():
        for k in range(blk.size):
            i, j = blk.a + k, blk.b + k
            sa.add(i)
            sb.add(j)
            x, y = a.scores[i], b.scores[j]
            if x is not None or y is not None:
                shared_mass += abs((x or 0.0) - (y or 0.0))
    diff_mass = sum(abs(s) for i, s in enumerate(a.scores) if s is not None and i not in sa)
    diff_mass += sum(abs(s) for j, s in enumerate(b.scores) if s is not None and j not in sb)
    total = diff_mass + shared_mass
    return sa, sb, diff_mass / total if total > 0 else math.nan


# ------------------------------------------------------------------------------------ render


def _display(t: str) -> str:
    return t.replace("\n", "⏎").replace("\t", "⇥")


def _colour(s: float | None, scale: float) -> tuple[int, int, int, float] | None:
    if s is None or scale <= 0:
        return None
    a = min(1.0, abs(s) / scale)
    return (40, 160, 60, 0.1 + 0.75 * a) if s >= 0 else (210, 40, 40, 0.1 + 0.75 * a)


def _scale(es: list[Explained]) -> float:
    vals = [abs(s) for e in es for s in e.scores if s is not None]
    return max(vals) if vals else 0.0


def terminal_text(e: Explained, scale: float):
    from rich.text import Text

    out = Text()
    for i, (t, s) in enumerate(zip(e.tokens, e.scores)):
        c = _colour(s, scale)
        style = "dim" if i < e.prompt_len else ""
        if c is not None:
            r, g, b, a = c
            # blend with white by the alpha: rich has no transparency
            rgb = tuple(int(255 - a * (255 - x)) for x in (r, g, b))
            style = f"{style} black on rgb({rgb[0]},{rgb[1]},{rgb[2]})".strip()
        out.append(_display(t), style=style or None)
    return out


def html_tokens(e: Explained, scale: float, shared: set[int] | None = None) -> str:
    spans = []
    for i, (t, s) in enumerate(zip(e.tokens, e.scores)):
        c = _colour(s, scale)
        cls = ["tok"]
        if i < e.prompt_len:
            cls.append("prompt")
        if shared is not None and i not in shared:
            cls.append("diff")
        style = f' style="background: rgba({c[0]},{c[1]},{c[2]},{c[3]:.3f})"' if c else ""
        score = "" if s is None else f"{s:.6g}"
        title = f"{t!r}: {score or 'not scored'}"
        spans.append(
            f'<span class="{" ".join(cls)}" data-score="{score}" title="{_html.escape(title)}"{style}>'
            f"{_html.escape(t)}</span>"
        )
    return "".join(spans)


CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1000px;
       color: #222; line-height: 1.5; padding: 0 1em; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; }
h2 { font-size: 1.15em; margin: 1.6em 0 0.4em; border-bottom: 1px solid #ddd; }
h3 { font-size: 0.95em; margin: 0.8em 0 0.3em; color: #444; }
.meta { color: #666; font-size: 0.9em; }
.tokens { font-family: 'DejaVu Sans Mono', Menlo, Consolas, monospace; font-size: 15px; white-space: pre-wrap;
          word-break: break-word; background: #fafafa; border: 1px solid #e4e4e4; padding: 0.6em; border-radius: 4px; }
.tok { border-radius: 2px; }
.tok.prompt { color: #888; }
.tok.diff { box-shadow: inset 0 -2px 0 #333; }
.legend span { display: inline-block; padding: 0 0.5em; margin-right: 0.4em; border-radius: 2px; }
table.top { border-collapse: collapse; font-size: 0.85em; margin-top: 0.4em; }
table.top td, table.top th { border: 1px solid #ddd; padding: 2px 8px; text-align: left; }
"""


def render_html(summary: dict, blocks: list[tuple[dict, list[tuple[str, Explained, set[int] | None]]]]) -> str:
    """A self-contained page (inline CSS, no script, no external asset)."""
    head = summary
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>prefcli explain</title>',
        f"<style>{CSS}</style></head><body>",
        "<h1>prefcli explain</h1>",
        f'<p class="meta">model <code>{_html.escape(head["model"])}</code> ({head["model_kind"]}), method '
        f"<b>{head['method']}</b>: {_html.escape(head['what'])}</p>",
        '<p class="legend"><span style="background: rgba(40,160,60,0.7)">raises the score (a pair: favours chosen)'
        '</span><span style="background: rgba(210,40,40,0.7)">lowers it (a pair: favours rejected)</span>'
        '<span style="color:#888">grey: prompt</span>'
        '<span style="box-shadow: inset 0 -2px 0 #333">underlined: differs between chosen and rejected</span>'
        " Hover over a token for its value.</p>",
    ]
    for info, sides in blocks:
        parts.append(f"<h2>{_html.escape(info['title'])}</h2>")
        scale = _scale([e for _, e, _ in sides])
        for side, e, shared in sides:
            parts.append(f"<h3>{_html.escape(side)}: {_html.escape(e.info.get('headline', ''))}</h3>")
            parts.append(f'<p class="tokens">{html_tokens(e, scale, shared)}</p>')
            ranked = sorted(((s, t) for t, s in zip(e.tokens, e.scores) if s is not None), key=lambda x: -abs(x[0]))
            if ranked:
                rows = "".join(
                    f"<tr><td><code>{_html.escape(repr(t))}</code></td><td>{s:+.4f}</td></tr>" for s, t in ranked[:5]
                )
                parts.append(f'<table class="top"><tr><th>token</th><th>score</th></tr>{rows}</table>')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# ------------------------------------------------------------------------------------ driver


def _top(e: Explained, k: int = 5) -> list[list]:
    ranked = sorted(((s, t) for t, s in zip(e.tokens, e.scores) if s is not None), key=lambda x: -abs(x[0]))
    return [[t, s] for s, t in ranked[:k]]


def run_explain(opts: ExplainOptions, emit: Callable[[dict], None]) -> dict:
    t0 = time.perf_counter()
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
    check_layer_head(cfg, opts.layer, opts.head)
    items = read_items(opts)
    device = _device(opts.device)
    eager = opts.plots is not None
    limit = cfg.get("max_position_embeddings") or cfg.get("n_positions")
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
    if kind == "reward":
        model, tok = load_reward_model(opts.model, device, eager)
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

        attn_model = model
    else:
        defaults = run_defaults(opts.model)
        ref_path = opts.reference or defaults.get("reference")
        if not ref_path:
            raise UsageError(
                f"the implicit reward beta log pi/pi_ref of {opts.model} needs its reference (the model it was tuned "
                "from): give --reference BASE_MODEL (no run recipe.yaml next to the model names one)"
            )
        if not os.path.isdir(ref_path):
            raise UsageError(f"--reference {ref_path}: no such model folder")
        beta = opts.beta if opts.beta is not None else defaults.get("beta") or DEFAULT_BETA
        if beta <= 0:
            raise UsageError("--beta must be positive")
        lm, tok, rt = load_policy(opts.model, device, eager)
        ref_lm, ref_tok, _ = load_policy(ref_path, device, False)
        if ref_tok.get_vocab() != tok.get_vocab():
            raise UsageError(
                f"the reference {ref_path} has a different tokenizer from {opts.model}: no per-token ratio"
            )
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
            from ..engine.pairs import encode_completion

            p, c = encode_completion(tok, "plain", prompt, text)
            _check_length(p + c, limit, what)
            e = implicit_rewards(lm, ref_lm, rt, tok, prompt, text, beta)
            if e.info["tokens_scored"] == 0:
                raise UsageError(f"{what}: no completion token can be scored (give a prompt)")
            e.info["tokens"] = len(e.ids)
            e.info["headline"] = f"implicit reward {e.info['implicit_reward']:+.4f}"
            return e

        attn_model = lm
    out_items = []
    blocks = []
    plots: list[str] = []
    for k, it in enumerate(items):  # each item's rows go out as soon as it is done (pipelines)
        sides = {side: explain_side(it.prompt, t, f"item {k} ({side})") for side, t in it.sides.items()}
        rec: dict[str, Any] = {"item": k, "kind": it.kind}
        if it.row is not None:
            rec["row"] = it.row
        shared: dict[str, set[int] | None] = {s: None for s in sides}
        if it.kind == "pair":
            c, r = sides["chosen"], sides["rejected"]
            sa, sb, mass = pair_alignment(c, r)
            # shown as contributions to the margin (chosen - rejected): the rejected side's scores change sign
            r.scores = [None if s is None else -s for s in r.scores]
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
            if opts.plots:
                d = Path(opts.plots)
                d.mkdir(parents=True, exist_ok=True)
                stem = f"item{k}-{side}"
                draw_scores(d / f"tokens-{stem}.png", e, f"{title} / {side}: {e.info['headline']} ({method})")
                x = torch.tensor([e.ids], device=device)
                att = attention_map(attn_model, x, opts.layer, opts.head)
                which = (
                    f"layer {opts.layer if opts.layer is not None else 'mean'}, "
                    f"head {opts.head if opts.head is not None else 'mean'}"
                )
                draw_attention(d / f"attention-{stem}.png", att, e.tokens, f"{title} / {side}: attention ({which})")
                plots += [str(d / f"tokens-{stem}.png"), str(d / f"attention-{stem}.png")]
        out_items.append(rec)
        blocks.append(({"title": title}, [(side, e, shared[side]) for side, e in sides.items()]))
    scale_all = _scale([e for _, sides_ in blocks for _, e, _ in sides_])
    summary["items"] = out_items
    summary["plots"] = plots
    warnings = []
    for rec in out_items:
        for side in ("text", "chosen", "rejected"):
            info = rec.get(side) or {}
            if "convergence_delta" in info:
                gap = abs(info["score"] - info["baseline_score"])
                if abs(info["convergence_delta"]) > 0.05 * max(gap, 1e-6):
                    warnings.append(
                        f"item {rec['item']} ({side}): the attributions miss score - baseline by "
                        f"{info['convergence_delta']:+.3g} of {gap:.3g}; raise --steps (now {opts.steps})"
                    )
    summary["warnings"] = warnings
    if not opts.quiet:
        from rich.console import Console

        con = Console(stderr=True, highlight=False)
        con.print(f"prefcli explain {opts.model} ({kind}, {method})", style="bold", markup=False)
        con.print(summary["what"], markup=False, style="dim")
        for info, sides_ in blocks:
            con.print(info["title"], style="bold", markup=False)
            for side, e, _ in sides_:
                con.print(f"  {side}: {e.info['headline']}", markup=False)
                con.print(terminal_text(e, scale_all), soft_wrap=True)
        for w in warnings:
            con.print(f"warning: {w}", style="yellow", markup=False)
    if opts.html:
        page = render_html(summary, blocks)
        Path(opts.html).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.html).write_text(page, encoding="utf-8")
        summary["html"] = opts.html
    summary["wall_s"] = round(time.perf_counter() - t0, 3)
    return summary
