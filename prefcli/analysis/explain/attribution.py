"""The per-token scores of `prefcli explain`: integrated gradients and prefix-score differences for a reward model, the implicit reward beta log(pi / pi_ref) for a policy, attention maps, and how two texts of a pair line up."""

from __future__ import annotations

import difflib
import math
from pathlib import Path

from ...errors import UsageError
from .inputs import Explained, token_strings
from .render import display_token

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

    from ...engine.data import move
    from ...engine.guard import check_logprobs
    from ...engine.models import PolicyLM
    from ...engine.pairs import completion_batch, encode_completion

    p, c = encode_completion(tok, "plain", prompt, text)
    b = move(completion_batch([p], [c], tok.pad_token_id), rt.device)
    policy, ref = PolicyLM(policy_lm, rt), PolicyLM(ref_lm, rt)
    for which, m in (("the policy", policy), ("the reference", ref)):  # the start-up guard (engine.guard)
        check_logprobs(m, b, "error", lambda text: None, what=f"{which}'s text")
    with torch.no_grad():
        lp, _ = policy(b["input_ids"], b["targets"], b["attention_mask"], b["position_ids"])
        lr, _ = ref(b["input_ids"], b["targets"], b["attention_mask"], b["position_ids"])
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
    labels = [display_token(t) for t in tokens]
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
    ax.set_xticks(range(n), [display_token(t) for t in e.tokens], rotation=90, fontsize=7)
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
