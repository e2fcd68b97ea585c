"""What prefcli's own code paths need to know about a model family, as data.

prefcli computes log-probabilities with its own chunked kernels (logprobs.py), packs SFT examples into
shared rows, and samples RL rollouts with its own static-KV-cache decoder (rollout.py). Each of these
re-implements a piece of the model's forward, so each must know what the family does there:

- `logit_transform(config)`: what the forward does to the output layer's result before the softmax
  (Granite divides by `logits_scaling`, Cohere multiplies by `logit_scale`, Gemma 2 soft-caps with
  `final_logit_softcapping`), read from config attributes, so a new family that reuses one is covered;
- `MASK_IGNORES_POSITION_IDS`: families whose attention mask is built without the position ids, so a
  packed row needs an explicit block-diagonal mask (`packed_mask`);
- `DECODERS`: where each family the fast sampler covers keeps its parts and how its block computes
  (`Layout`); `decoder_support(lm)` says whether the fast sampler runs a model, and why not; `NORMS` and
  `rope`, the norms and rotary embeddings a Layout names, computed as each family's modules compute them.

Anything the tables miss is caught by the start-up guard (guard.py), which compares these paths with the
model's own forward on a real batch before the first step (docs/families.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .logprobs import LogitTransform

# config attribute -> how the model's forward applies it to the logits (transformers' modeling code:
# GraniteForCausalLM `logits / logits_scaling`, CohereForCausalLM `logits * logit_scale`,
# Gemma2ForCausalLM / Gemma3ForCausalLM `tanh(logits / cap) * cap`)
_LOGIT_SCALES = (("logits_scaling", lambda v: 1.0 / v), ("logit_scale", lambda v: v))
_LOGIT_SOFTCAP = "final_logit_softcapping"


def logit_transform(config) -> LogitTransform:
    """The logit scaling and soft-capping a model's forward applies (identity for most families)."""
    scale = 1.0
    for attr, factor in _LOGIT_SCALES:
        v = getattr(config, attr, None)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v not in (0, 1):
            scale *= float(factor(v))
    cap = getattr(config, _LOGIT_SOFTCAP, None)
    return LogitTransform(scale=scale, softcap=float(cap) if cap else None)


# Families whose forward builds its attention mask from the 2-D mask alone (transformers' OPTDecoder calls
# create_causal_mask without position_ids), so a packed row (no mask, positions restarting at 0) would let
# its examples attend to each other: PolicyLM hands them an explicit block-diagonal mask instead.
MASK_IGNORES_POSITION_IDS = frozenset({"opt"})


def packed_mask(position_ids: torch.Tensor, dtype: torch.dtype, attn_implementation: str) -> torch.Tensor:
    """The 4-D mask of packed rows [B, T]: causal within each example (examples start where the position ids
    restart at 0), nothing across. Boolean for sdpa/flex (True: attend), additive in `dtype` for eager."""
    seg = (position_ids == 0).long().cumsum(-1)
    T = position_ids.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=position_ids.device).tril()
    allowed = (seg[:, :, None] == seg[:, None, :]) & causal
    allowed = allowed[:, None]
    if attn_implementation == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )
    return allowed


# ------------------------------------------------------------------------------------ the fast decoder


@dataclass(frozen=True)
class Layout:
    """Where a decoder-only family keeps its parts (attribute paths: from the base model for the first four,
    from a decoder layer for the rest) and how its block computes. The defaults are the Llama family's."""

    layers: str = "layers"
    embed: str = "embed_tokens"
    final_norm: str = "norm"
    positions: str | None = None  # a learned absolute position table (its `offset` honoured: OPT's is 2)
    attn: str = "self_attn"
    qkv: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")  # one name: a fused projection, rows q, k, v
    qkv_by_head: bool = False  # the fused rows are grouped by head: [q0 k0 v0 | q1 k1 v1 | ...] (GPT-NeoX)
    o: str = "o_proj"
    mlp: str = "mlp"  # "" = the layer itself (OPT)
    gate_up: tuple[str, ...] | None = ("gate_proj", "up_proj")  # gated MLP act(gate) * up; one name: fused
    up: str = ""  # the first projection of a plain MLP (gate_up None)
    down: str = "down_proj"
    act: str = "act_fn"  # attribute of the MLP module (or the layer, mlp "") that holds the activation
    norm: str = "rms"  # rms | rms_1p (x * (1 + w), in float32: Gemma) | layer (nn.LayerNorm) | layer_f32 (Cohere)
    ln1: str = "input_layernorm"
    ln2: str | None = "post_attention_layernorm"  # None in a parallel block with one norm (Cohere)
    # "sequential" (pre-norm), "parallel" (h + attn(ln1 h) + mlp(ln2 h)), "sandwich" (Gemma: extra norms after
    # attention and around the MLP); a config attribute name: parallel when it is true (GPT-NeoX)
    block: str = "sequential"
    sandwich: tuple[str, str, str] = (
        "post_attention_layernorm",
        "pre_feedforward_layernorm",
        "post_feedforward_layernorm",
    )
    rotary: str | None = "half"  # half (rotate_half) | interleaved (Cohere: pairs, in float32) | None: no rotary
    rope_by_layer_type: bool = False  # rotary_emb(x, pos, layer_type): local and global rope (Gemma 3)
    # every layer's sliding window is config.sliding_window (Mistral, Phi-3: their attention reads the config);
    # otherwise a layer has the window its attention module holds (Qwen 2, Gemma: None on full layers), or none
    window_from_config: bool = False
    residual_scale: str | None = None  # config attribute scaling each branch before the residual add (Granite)
    embed_scale: str | None = None  # config attribute scaling the embeddings (Granite; Gemma's embedding scales itself)


def _opt_unsupported(cfg) -> str | None:
    if not getattr(cfg, "do_layer_norm_before", True):
        return "OPT with post-layer-norm blocks (do_layer_norm_before: false, as opt-350m)"
    if getattr(cfg, "word_embed_proj_dim", cfg.hidden_size) != cfg.hidden_size:
        return "OPT with embedding projections (word_embed_proj_dim != hidden_size)"
    if not getattr(cfg, "layer_norm_elementwise_affine", True):
        return "OPT without layer-norm weights"
    return None


def _gpt2_unsupported(cfg) -> str | None:
    return "GPT-2 with cross-attention" if getattr(cfg, "add_cross_attention", False) else None


_LLAMA = Layout()
_GEMMA = Layout(norm="rms_1p", ln2=None, block="sandwich")

# model_type -> layout. A family transformers adds later that matches one of these is one line here (and one
# in tests/test_families.py); the guard checks the sampler against the trainer on the first rollout anyway.
DECODERS: dict[str, Layout] = {
    "llama": _LLAMA,
    "mistral": Layout(window_from_config=True),
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,  # its q_norm/k_norm are found on the attention module
    "granite": Layout(residual_scale="residual_multiplier", embed_scale="embedding_multiplier"),
    "cohere": Layout(norm="layer_f32", ln2=None, block="parallel", rotary="interleaved"),
    "phi3": Layout(qkv=("qkv_proj",), gate_up=("gate_up_proj",), act="activation_fn", window_from_config=True),
    "gemma2": _GEMMA,
    "gemma3_text": Layout(norm="rms_1p", ln2=None, block="sandwich", rope_by_layer_type=True),
    "gpt2": Layout(
        layers="h",
        embed="wte",
        final_norm="ln_f",
        positions="wpe",
        attn="attn",
        qkv=("c_attn",),
        o="c_proj",
        gate_up=None,
        up="c_fc",
        down="c_proj",
        act="act",
        norm="layer",
        ln1="ln_1",
        ln2="ln_2",
        rotary=None,
    ),
    "gpt_neox": Layout(
        embed="embed_in",
        final_norm="final_layer_norm",
        attn="attention",
        qkv=("query_key_value",),
        qkv_by_head=True,
        o="dense",
        gate_up=None,
        up="dense_h_to_4h",
        down="dense_4h_to_h",
        act="act",
        norm="layer",
        block="use_parallel_residual",
    ),
    "opt": Layout(
        layers="decoder.layers",
        embed="decoder.embed_tokens",
        final_norm="decoder.final_layer_norm",
        positions="decoder.embed_positions",
        o="out_proj",
        mlp="",
        gate_up=None,
        up="fc1",
        down="fc2",
        act="activation_fn",
        norm="layer",
        ln1="self_attn_layer_norm",
        ln2="final_layer_norm",
        rotary=None,
    ),
}
_UNSUPPORTED = {"opt": _opt_unsupported, "gpt2": _gpt2_unsupported}

# rotary variants whose frequencies depend on the sequence length seen so far (a static cos/sin table cannot
# follow them)
_LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


def _rope_types(cfg) -> set[str]:
    rp = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if not isinstance(rp, dict):
        return set()
    groups = [v for v in rp.values() if isinstance(v, dict)] or [rp]  # per layer type (Gemma 3) or one
    return {str(g.get("rope_type", g.get("type", "default"))) for g in groups}


def block_kind(layout: Layout, cfg) -> str:
    if layout.block in ("sequential", "parallel", "sandwich"):
        return layout.block
    return "parallel" if getattr(cfg, layout.block, False) else "sequential"


def decoder_support(cfg) -> tuple[Layout | None, str]:
    """(the family's layout, "") when the fast sampler runs this config, else (None, why not)."""
    mt = getattr(cfg, "model_type", "")
    layout = DECODERS.get(mt)
    if layout is None:
        return None, f"model type '{mt}' (the fast sampler covers {', '.join(sorted(DECODERS))})"
    for t in _rope_types(cfg):
        if any(k in t for k in _LENGTH_DEPENDENT_ROPE):
            return None, f"{t} rope scaling (its frequencies change with the sequence length)"
    check = _UNSUPPORTED.get(mt)
    why = check(cfg) if check else None
    if why:
        return None, why
    return layout, ""


# What falling back to transformers generate costs, as measured (docs/families.md; bench/families.py): the
# warning that announces the fallback says it.
FALLBACK_COST = (
    "measured at 1.5-1.7x the fast sampler's CPU time at the quickstart's shape on a 2-core CPU, and about 12x "
    "its time on an H200 (docs/families.md)"
)


def at(obj, path: str):
    """obj.a.b for path 'a.b' ('' is obj itself)."""
    for part in path.split(".") if path else []:
        obj = getattr(obj, part)
    return obj


# -------------------------------------- norms and rotary embeddings, as the families' modules compute them
# (the fast sampler replays them; a Layout's `norm` and `rotary` name them)
def _rms(x, w, b, eps):  # LlamaRMSNorm: normalised in float32, cast back, then scaled
    x32 = x.float()
    return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rms_1p(x, w, b, eps):  # Gemma's RMSNorm: scaled by (1 + weight) in float32; w holds 1 + weight, float32
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * w).to(x.dtype)


def _layer(x, w, b, eps):  # nn.LayerNorm
    return F.layer_norm(x, x.shape[-1:], w, b, eps)


def _layer_f32(x, w, b, eps):  # CohereLayerNorm: in float32, its weight may span (heads, head_dim)
    x32 = x.float()
    mean = x32.mean(-1, keepdim=True)
    var = (x32 - mean).pow(2).mean(-1, keepdim=True)
    y = (x32 - mean) * torch.rsqrt(var + eps) * w
    return (y if b is None else y + b).to(x.dtype)


NORMS = {"rms": _rms, "rms_1p": _rms_1p, "layer": _layer, "layer_f32": _layer_f32}
NORM_F32 = ("rms_1p", "layer_f32")  # kinds whose weights are kept in float32


def rope(x, cos, sin, interleaved: bool):
    """Rotary embedding of x [B, H, T, hd] with cos/sin [.., T, rd]; rd < hd rotates the first rd dims only
    (partial rotary: GPT-NeoX, Phi-3). Interleaved (Cohere): pairs (2i, 2i+1), computed in float32."""
    rd = cos.shape[-1]
    xr, xp = (x[..., :rd], x[..., rd:]) if rd < x.shape[-1] else (x, None)
    if interleaved:
        x32 = xr.float()
        rot = torch.stack((-x32[..., 1::2], x32[..., ::2]), dim=-1).flatten(-2)
        out = (x32 * cos + rot * sin).to(x.dtype)
    else:
        h = rd // 2
        rot = torch.cat((-xr[..., h:], xr[..., :h]), dim=-1)
        out = xr * cos + rot * sin
    return out if xp is None else torch.cat((out, xp), dim=-1)
