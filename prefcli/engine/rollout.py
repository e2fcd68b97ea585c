"""The fast sampler (engine/sampling.py's protocol) for RL and GAN rollouts: a static KV cache, and on CUDA the
one-token decode step captured once in a CUDA graph and replayed, so a decode step costs one graph launch
instead of hundreds of kernel launches from Python. `continue_from` extends the sequences of its latest call
in the same cache (the turns of a multi-turn episode).

Why by hand: Hugging Face `generate` re-enters Python for every layer of every step (518 new
tokens/s at batch 8 on an H200 for a 0.5B model, docs/performance.md), and its static-cache path
needs torch.compile; vLLM is not available on every machine. The decoder below reuses the
policy's own modules and weights (no second model) and covers the families of
`engine.families.DECODERS` (Llama, Mistral, Qwen 2/3, Granite, Cohere, Phi-3, Gemma 2/3, GPT-2,
GPT-NeoX, OPT): pre-norm blocks (RMSNorm or LayerNorm; sequential, parallel or Gemma's sandwich),
rotary or learned positions, grouped-query attention with sliding windows and soft-capped scores,
gated or plain MLPs, and the family's logit scaling or soft-cap. Each family's layout is a row of
that table, not code here. Other architectures sample with HF `generate` (docs/families.md).

Weights: the decoder reads "shadow" tensors: fused QKV and gate/up projections in the
sampling dtype. `sync()` refreshes them in place from the live parameters (merging LoRA
adapters) once per rollout, after the optimizer has stepped; the captured graph keeps reading
the same memory, so it never needs re-capturing. Greedy decoding equals HF `generate` token for
token (tests/test_rollout.py). Under runtime.parallel fsdp the shadows are the one whole copy of the
weights a process keeps (in the sampling dtype): they are filled one decoder layer at a time, each
layer's shards gathered only while it is copied (`gather`), so sampling needs no whole model.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .families import NORM_F32, NORMS, at, block_kind, decoder_support, logit_transform, rope
from .models import unwrap_lm
from .sampling import Rollout, SamplingConfig, continued_prompt, sample_with_logprob


def supports_fast_decoder(lm) -> tuple[bool, str]:
    """(True, "") when FastDecoder runs this model's family (engine.families.DECODERS), else (False, why not)."""
    layout, why = decoder_support(unwrap_lm(lm).config)
    return layout is not None, why


def _effective_weight(module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight (as nn.Linear lays it out: [out, in]) and bias a projection applies, LoRA adapters merged in.
    transformers' Conv1D (GPT-2) stores its weight [in, out]."""
    base = getattr(module, "base_layer", None)
    lin = module if base is None else base
    w = lin.weight.t() if type(lin).__name__ == "Conv1D" else lin.weight
    if base is not None:
        for name in getattr(module, "active_adapters", []):
            if name in getattr(module, "lora_A", {}):
                A, B = module.lora_A[name].weight, module.lora_B[name].weight
                w = w + (B @ A) * module.scaling[name]
    return w, lin.bias


def _eps(norm) -> float:
    v = getattr(norm, "variance_epsilon", None)
    return float(v if v is not None else norm.eps)


@dataclass(frozen=True)
class _LayerStatic:
    """A decoder layer's constants (Python numbers: torch.compile specialises on them)."""

    eps1: float
    eps2: float
    eps_qk: float
    scale: float  # attention scores' scale
    softcap: float | None  # attention logit soft-cap (Gemma 2)
    window: int | None  # sliding window: keys at most window - 1 slots back
    rope: str | None  # which rotary table (a layer type for Gemma 3)
    residual_scale: float


@dataclass
class _DecoderCache:
    """A FastDecoder's hold on the sequences of its latest call, for `continue_from`."""

    owner: FastDecoder
    call: int
    slot_end: int  # the first cache slot not yet written
    valid: torch.Tensor  # [B, L] bool: the slots that hold a real token of the sequence
    slot_pos: torch.Tensor  # [B, L] the position of the token in each slot (sliding windows count positions)
    next_pos: torch.Tensor  # [B] the position of the next token fed
    pending: torch.Tensor  # [B] each completion's last token, sampled but not fed ...
    has_pending: list[bool]  # ... for the completions that did not end (or ended on the last step)


class FastDecoder:
    """Static-KV-cache sampler for one batch size and one maximum length (engine.sampling.Sampler), for the
    families in engine.families.DECODERS (their layouts say where each part lives and how the block computes)."""

    def __init__(
        self,
        lm,
        batch: int,
        max_len: int,
        dtype: torch.dtype,
        use_graph: bool | None = None,
        compile: bool = False,
        compile_backend: str = "inductor",
        gather=None,
    ):
        """`gather(modules)`: a context in which the weights of `modules` are whole (engine.loop.Group.gathered
        for a sharded policy); without it the weights are read as they are."""
        inner = unwrap_lm(lm)
        self.gather = gather or (lambda modules=None, hold=False: contextlib.nullcontext())
        self.cfg = cfg = inner.config
        layout, why = decoder_support(cfg)
        if layout is None:
            raise ValueError(f"the fast sampler does not support {why}")
        self.layout = layout
        self.block = block_kind(layout, cfg)
        self.body = inner.base_model
        self.head = inner.get_output_embeddings()
        self.embed_mod = at(self.body, layout.embed)
        self.norm_mod = at(self.body, layout.final_norm)
        self.pos_mod = at(self.body, layout.positions) if layout.positions else None
        self.xf = logit_transform(cfg)
        with self.gather([self.embed_mod]):  # where the whole weights live (not a CPU-offloaded shard)
            self.device = self.embed_mod.weight.device
        self.dtype = dtype
        self.B, self.L = batch, max_len
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.layers = list(at(self.body, layout.layers))
        self.norm_fn = NORMS[layout.norm]
        self.act = at(self._mlp(self.layers[0]), layout.act)
        self.static = [self._layer_static(i, layer) for i, layer in enumerate(self.layers)]
        self.windows = sorted({st.window for st in self.static if st.window is not None})
        self.use_graph = (self.device.type == "cuda") if use_graph is None else use_graph
        self.calls = 0  # sampling calls so far: only the latest can be continued
        self._alloc()
        self.sync()
        self.graph = None
        # torch.compile fuses each layer's small ops (norms, rotary, activation, residuals) into a few
        # kernels. The two halves take the weights as arguments, so one compiled graph serves every
        # layer; the KV-cache write stays outside (no mutated inputs in the compiled code).
        self._compiled = None
        self.compile_error: str | None = None
        self.graph_error: str | None = None
        self._compile_checked = not compile
        if compile:
            self._compiled = (
                torch.compile(self._attn_in, backend=compile_backend, dynamic=False, fullgraph=True),
                torch.compile(self._attn_out, backend=compile_backend, dynamic=False, fullgraph=True),
            )

    # ----------------------------------------------------------------- the family's parts
    def _mlp(self, layer):
        return at(layer, self.layout.mlp)

    def _attn(self, layer):
        return at(layer, self.layout.attn)

    def _layer_static(self, i: int, layer) -> _LayerStatic:
        lo, cfg, a = self.layout, self.cfg, self._attn(layer)
        types = getattr(cfg, "layer_types", None)
        if lo.window_from_config:  # Mistral, Phi-3: every layer, from the config
            window = getattr(cfg, "sliding_window", None)
        else:  # per layer (Qwen 2, Gemma: None on full-attention layers), or none
            window = getattr(a, "sliding_window", None)
        ln2 = at(layer, lo.sandwich[1] if self.block == "sandwich" else (lo.ln2 or lo.ln1))
        qn = getattr(a, "q_norm", None)
        return _LayerStatic(
            eps1=_eps(at(layer, lo.ln1)),
            eps2=_eps(ln2),
            eps_qk=_eps(qn) if qn is not None else 0.0,
            scale=float(getattr(a, "scaling", None) or self.hd**-0.5),
            softcap=getattr(a, "attn_logit_softcapping", None) or None,
            window=int(window) if window else None,
            rope=types[i] if (lo.rope_by_layer_type and types) else None,
            residual_scale=float(getattr(cfg, lo.residual_scale, 1.0)) if lo.residual_scale else 1.0,
        )

    def _layer_parts(self, layer) -> dict:
        """The layer's weights in the decoder's layout: name -> (weight, bias) or a tensor, LoRA merged."""
        lo, a, m = self.layout, self._attn(layer), self._mlp(layer)
        parts = {}
        proj = [_effective_weight(at(a, n)) for n in lo.qkv]
        w = torch.cat([p[0] for p in proj], 0) if len(proj) > 1 else proj[0][0]
        bs = [p[1] for p in proj]
        b = (torch.cat(bs, 0) if len(bs) > 1 else bs[0]) if all(x is not None for x in bs) else None
        if lo.qkv_by_head:  # rows [head, (q, k, v), hd] -> [(q, k, v), head, hd]
            H = self.n_heads
            w = w.reshape(H, 3, self.hd, -1).transpose(0, 1).reshape(3 * H * self.hd, -1)
            b = b.reshape(H, 3, self.hd).transpose(0, 1).reshape(-1) if b is not None else None
        parts["qkv"] = (w, b)
        parts["o"] = _effective_weight(at(a, lo.o))
        if lo.gate_up is not None:
            gu = [_effective_weight(at(m, n)) for n in lo.gate_up]
            gw = torch.cat([p[0] for p in gu], 0) if len(gu) > 1 else gu[0][0]
            gbs = [p[1] for p in gu]
            gb = (torch.cat(gbs, 0) if len(gbs) > 1 else gbs[0]) if all(x is not None for x in gbs) else None
            parts["up"] = (gw, gb)
        else:
            parts["up"] = _effective_weight(at(m, lo.up))
        parts["down"] = _effective_weight(at(m, lo.down))
        norms = {"ln1": lo.ln1}
        if self.block == "sandwich":
            norms.update(zip(("post_attn", "pre_ffw", "post_ffw"), lo.sandwich))
        elif lo.ln2 is not None:
            norms["ln2"] = lo.ln2
        for key, path in norms.items():
            mod = at(layer, path)
            parts[key] = self._norm_weight(mod.weight), getattr(mod, "bias", None)
        for key in ("q_norm", "k_norm"):
            mod = getattr(a, key, None)
            if mod is not None:
                parts[key] = self._norm_weight(mod.weight), getattr(mod, "bias", None)
        return parts

    def _norm_weight(self, w):
        return (1.0 + w.float()) if self.layout.norm == "rms_1p" else w

    # ----------------------------------------------------------------- weights
    def _alloc(self):
        dev, dt = self.device, self.dtype
        nl, B, L = len(self.layers), self.B, self.L
        self.k_cache = torch.zeros(nl, B, self.n_kv, L, self.hd, device=dev, dtype=dt)
        self.v_cache = torch.zeros_like(self.k_cache)
        self.slots = torch.arange(L, device=dev)
        self.rope: dict = {}  # rotary table per layer type: (cos, sin) [L, rotary dims]
        if self.layout.rotary is not None:
            pos = self.slots[None]
            x = torch.zeros(1, device=dev, dtype=torch.float32)
            with torch.no_grad():
                for key in {st.rope for st in self.static}:
                    cos, sin = self.body.rotary_emb(x, pos, key) if key else self.body.rotary_emb(x, pos)
                    self.rope[key] = (cos[0].to(dt), sin[0].to(dt))
        self.shadow: list[dict] = []
        for layer in self.layers:
            with self.gather([layer]):
                self.shadow.append(self._alloc_layer(layer))
        outer = [m for m in (self.embed_mod, self.norm_mod, self.head, self.pos_mod) if m is not None]
        with self.gather(outer):
            ndt = torch.float32 if self.layout.norm in NORM_F32 else dt
            self.final_norm = torch.empty_like(self.norm_mod.weight, dtype=ndt)
            nb = getattr(self.norm_mod, "bias", None)
            self.final_norm_b = torch.empty_like(nb, dtype=ndt) if nb is not None else None
            self.embed = torch.empty_like(self.embed_mod.weight, dtype=dt)
            hw, hb = _effective_weight(self.head)
            self.head_w = self.embed if hw is self.embed_mod.weight else torch.empty_like(hw, dtype=dt)
            self.head_b = torch.empty_like(hb, dtype=dt) if hb is not None else None
            self.pos_w = torch.empty_like(self.pos_mod.weight, dtype=dt) if self.pos_mod is not None else None
        self.final_eps = _eps(self.norm_mod)
        self.pos_offset = int(getattr(self.pos_mod, "offset", 0) or 0) if self.pos_mod is not None else 0
        lo = self.layout
        scale = float(getattr(self.embed_mod, "scalar_embed_scale", 1.0))  # Gemma's scaled embedding
        if lo.embed_scale:
            scale *= float(getattr(self.cfg, lo.embed_scale, 1.0))
        # in the sampling dtype, as Gemma's embedding rounds its scale to the weights' dtype
        self.embed_scale = torch.tensor(scale, dtype=dt, device=dev) if scale != 1.0 else None

    def _alloc_layer(self, layer) -> dict:
        dev, dt = self.device, self.dtype
        ndt = torch.float32 if self.layout.norm in NORM_F32 else dt
        d = {}
        for key, val in self._layer_parts(layer).items():
            w, b = val
            wdt = ndt if key in ("ln1", "ln2", "post_attn", "pre_ffw", "post_ffw", "q_norm", "k_norm") else dt
            d[f"{key}_w"] = torch.empty(w.shape, device=dev, dtype=wdt)
            if b is not None:
                d[f"{key}_b"] = torch.empty(b.shape, device=dev, dtype=wdt)
        return d

    def nbytes(self) -> dict[str, int]:
        """Memory the sampler keeps between rollouts: its whole-weight shadows and its KV cache."""
        seen: set[int] = set()
        weights = 0
        extra = [self.final_norm, self.final_norm_b, self.embed, self.head_w, self.head_b, self.pos_w]
        for t in [*(v for d in self.shadow for v in d.values()), *extra]:
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                weights += t.numel() * t.element_size()
        kv = 2 * self.k_cache.numel() * self.k_cache.element_size()
        return {"weights": weights, "kv_cache": kv}

    @torch.no_grad()
    def sync(self) -> None:
        """Copy the live (possibly updated, possibly LoRA-adapted) weights into the shadows, in place."""
        for layer, d in zip(self.layers, self.shadow):
            with self.gather([layer]):  # one layer whole at a time
                for key, (w, b) in self._layer_parts(layer).items():
                    d[f"{key}_w"].copy_(w)
                    if b is not None:
                        d[f"{key}_b"].copy_(b)
        outer = [m for m in (self.embed_mod, self.norm_mod, self.head, self.pos_mod) if m is not None]
        with self.gather(outer):
            self.final_norm.copy_(self._norm_weight(self.norm_mod.weight))
            if self.final_norm_b is not None:
                self.final_norm_b.copy_(self.norm_mod.bias)
            self.embed.copy_(self.embed_mod.weight)
            hw, hb = _effective_weight(self.head)
            if self.head_w is not self.embed:
                self.head_w.copy_(hw)
            if self.head_b is not None:
                self.head_b.copy_(hb)
            if self.pos_w is not None:
                self.pos_w.copy_(self.pos_mod.weight)

    # ----------------------------------------------------------------- forward
    def _embed(self, ids, pos):
        h = self.embed[ids]
        if self.embed_scale is not None:
            h = h * self.embed_scale
        if self.pos_w is not None:
            h = h + self.pos_w[pos + self.pos_offset]
        return h

    def _attn_in(self, h, d: dict, st: _LayerStatic, cos, sin):
        """Norm, fused QKV projection, (qk-norm,) rotary: q [B, H, T, hd], k/v [B, Hkv, T, hd]."""
        B, T, _ = h.shape
        nq, nkv, hd = self.n_heads, self.n_kv, self.hd
        x = self.norm_fn(h, d["ln1_w"], d.get("ln1_b"), st.eps1)
        qkv = F.linear(x, d["qkv_w"], d.get("qkv_b"))
        q, k, v = qkv.split([nq * hd, nkv * hd, nkv * hd], dim=-1)
        q = q.view(B, T, nq, hd)
        k = k.view(B, T, nkv, hd)
        if "q_norm_w" in d:
            q = self.norm_fn(q, d["q_norm_w"], d.get("q_norm_b"), st.eps_qk)
            k = self.norm_fn(k, d["k_norm_w"], d.get("k_norm_b"), st.eps_qk)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        if cos is not None:
            interleaved = self.layout.rotary == "interleaved"
            q, k = rope(q, cos, sin, interleaved), rope(k, cos, sin, interleaved)
        return q, k, v.view(B, T, nkv, hd).transpose(1, 2)

    def _mlp_fn(self, x, d):
        u = F.linear(x, d["up_w"], d.get("up_b"))
        if self.layout.gate_up is not None:
            g, u = u.chunk(2, dim=-1)
            u = self.act(g) * u
        else:
            u = self.act(u)
        return F.linear(u, d["down_w"], d.get("down_b"))

    def _attn_out(self, h, q, k_all, v_all, attn_mask, d: dict, st: _LayerStatic):
        """Attention over the given keys/values, output projection, and the rest of the block (MLP, residuals)."""
        B, T, _ = h.shape
        o = self._attend(q, k_all, v_all, attn_mask, st.scale, st.softcap)
        a = F.linear(o.transpose(1, 2).reshape(B, T, self.n_heads * self.hd), d["o_w"], d.get("o_b"))
        norm = self.norm_fn
        if self.block == "sandwich":
            h = h + norm(a, d["post_attn_w"], None, st.eps1)
            return h + norm(self._mlp_fn(norm(h, d["pre_ffw_w"], None, st.eps2), d), d["post_ffw_w"], None, st.eps2)
        if self.block == "parallel":
            x = (
                norm(h, d["ln2_w"], d.get("ln2_b"), st.eps2)
                if "ln2_w" in d
                else norm(h, d["ln1_w"], d.get("ln1_b"), st.eps1)
            )
            return h + a + self._mlp_fn(x, d)
        rs = st.residual_scale
        h = h + (a * rs if rs != 1.0 else a)
        m = self._mlp_fn(norm(h, d["ln2_w"], d.get("ln2_b"), st.eps2), d)
        return h + (m * rs if rs != 1.0 else m)

    def _layers(self, h, ropes: dict, write, masks: dict, fns=None):
        """h: [B, T, d]; ropes: rotary table key -> (cos, sin) [B, 1, T, rd]; write(i, k, v) stores the new
        keys/values and returns the keys/values to attend to; masks: sliding window (None: full) -> bool
        [B, 1, T, S]. `fns` = (attn_in, attn_out) replaces the two per-layer halves (the compiled versions)."""
        attn_in, attn_out = fns or (self._attn_in, self._attn_out)
        for i, (d, st) in enumerate(zip(self.shadow, self.static)):
            cos, sin = ropes.get(st.rope, (None, None))
            q, k, v = attn_in(h, d, st, cos, sin)
            k_all, v_all = write(i, k, v)
            h = attn_out(h, q, k_all, v_all, masks[st.window], d, st)
        return self.norm_fn(h, self.final_norm, self.final_norm_b, self.final_eps)

    def _attend(self, q, k, v, mask, scale: float, softcap: float | None):
        """Grouped-query attention without expanding the cache. With one new token per row, the
        G = n_heads / n_kv query heads that share a key/value head are laid out as G query
        positions of that head (same mask), so attention reads each cached key once; HF's repeat_kv
        order (query head j uses kv head j // G) is kept. Prefill (T > 1) expands k/v once."""
        B, H, T, hd = q.shape
        G = H // self.n_kv
        if G > 1 and T == 1:
            o = self._scores(q.reshape(B, self.n_kv, G, hd), k, v, mask, scale, softcap)
            return o.reshape(B, H, 1, hd)
        if G > 1:
            k = k.repeat_interleave(G, dim=1)
            v = v.repeat_interleave(G, dim=1)
        return self._scores(q, k, v, mask, scale, softcap)

    @staticmethod
    def _scores(q, k, v, mask, scale: float, softcap: float | None):
        if softcap is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        # soft-capped scores (Gemma 2): SDPA has no hook for them; as transformers' eager attention computes it
        s = torch.matmul(q, k.transpose(-1, -2)) * scale
        s = torch.tanh(s / softcap) * softcap
        s = s.masked_fill(~mask, float("-inf"))
        return torch.matmul(s.softmax(-1, dtype=torch.float32).to(q.dtype), v)

    def _logits(self, h):
        return self.xf.apply(F.linear(h, self.head_w, self.head_b).float())

    def _masks(self, base, q_pos, kv_pos) -> dict:
        """The attention mask of every distinct window: `base` (bool [B, 1, T, S]) and, for a window w, keys
        less than w positions behind the query (q_pos [B, 1, T, 1]; kv_pos [B, 1, 1, S], each cache slot's
        position). By position, not by slot: the slots of a sequence continued by `continue_from` have gaps."""
        out = {None: base}
        for w in self.windows:
            out[w] = base & (kv_pos > q_pos - w)
        return out

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Run left-padded prompts [B, P] through the model, filling cache slots [0, P). Returns the
        last position's logits [B, V] (float32)."""
        B, P = ids.shape
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        ropes = {key: (cos[pos].unsqueeze(1), sin[pos].unsqueeze(1)) for key, (cos, sin) in self.rope.items()}
        valid = mask.bool()
        causal = torch.ones(P, P, dtype=torch.bool, device=ids.device).tril()
        eye = torch.eye(P, dtype=torch.bool, device=ids.device)[None, None]
        attn = ((causal[None] & valid[:, None, :]).unsqueeze(1)) | eye
        masks = {w: m | eye for w, m in self._masks(attn, pos[:, None, :, None], pos[:, None, None, :]).items()}

        def write(i, k, v):
            self.k_cache[i, :, :, :P] = k
            self.v_cache[i, :, :, :P] = v
            return k, v

        h = self._layers(self._embed(ids, pos), ropes, write, masks)
        return self._logits(h[:, -1])

    def _decode_step(self):
        """Feed the previous token (at cache slot s_idx, position s_pos) and choose the next one.
        Reads and writes only static buffers, so it can be captured in a CUDA graph."""
        idx = self.s_idx
        ropes = {
            key: (cos[self.s_pos][:, None, None, :], sin[self.s_pos][:, None, None, :])
            for key, (cos, sin) in self.rope.items()
        }
        self.s_valid.index_fill_(1, idx.view(1), True)
        if self.windows:
            self.s_slot_pos.index_copy_(1, idx.view(1), self.s_pos[:, None])
        masks = self._masks(
            self.s_valid[:, None, None, :], self.s_pos[:, None, None, None], self.s_slot_pos[:, None, None, :]
        )

        def write(i, k, v):
            self.k_cache[i].index_copy_(2, idx.view(1), k)
            self.v_cache[i].index_copy_(2, idx.view(1), v)
            return self.k_cache[i], self.v_cache[i]

        h = self._layers(self._embed(self.s_tok, self.s_pos)[:, None, :], ropes, write, masks, self._compiled)
        self._choose(self._logits(h[:, 0]), idx - self.s_start + 1)
        self.s_idx.add_(1)
        self.s_pos.add_(1)

    def _choose(self, logits, k):
        """Pick new token number k (0-d tensor) from [B, V] logits and record it."""
        cfg = self.scfg
        if cfg.stop_token_ids and cfg.min_new_tokens > 0:
            block = k < cfg.min_new_tokens
            cols = logits[:, self.stop_ids]
            logits[:, self.stop_ids] = torch.where(block, torch.full_like(cols, float("-inf")), cols)
        nxt, lp = sample_with_logprob(logits, cfg)
        nxt = torch.where(self.s_done, torch.full_like(nxt, cfg.pad_token_id), nxt)
        slot = k.clamp_max(self.out.shape[1] - 1).view(1)
        self.out.index_copy_(1, slot, nxt[:, None])
        self.out_logp.index_copy_(1, slot, torch.where(self.s_done, torch.zeros_like(lp), lp)[:, None])
        self.out_mask.index_copy_(1, slot, (~self.s_done).long()[:, None])
        if cfg.stop_token_ids:
            hit = torch.isin(nxt, self.stop_ids) & ~self.s_done
            self.s_finished |= hit
            self.s_done |= hit
        self.s_tok.copy_(nxt)

    def _capture(self):
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        snap = [t.clone() for t in self._state()]
        with torch.cuda.stream(s):
            for _ in range(2):
                self._decode_step()
        torch.cuda.current_stream().wait_stream(s)
        self._restore(snap)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._decode_step()
        self._restore(snap)

    def _check_compile(self):
        """Compile on a trial step; if compiling fails (no compiler, unsupported op), decode eagerly."""
        snap = [t.clone() for t in self._state()]
        try:
            self._decode_step()
        except Exception as e:  # torch.compile raises many types
            self.compile_error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            self._compiled = None
        self._restore(snap)
        self._compile_checked = True

    def _state(self):
        return [
            self.s_idx,
            self.s_start,
            self.s_tok,
            self.s_pos,
            self.s_valid,
            self.s_slot_pos,
            self.s_done,
            self.s_finished,
            self.out,
            self.out_mask,
            self.out_logp,
            self.k_cache,
            self.v_cache,
        ]

    def _restore(self, snap):
        for t, v in zip(self._state(), snap):
            t.copy_(v)

    @torch.no_grad()
    def sample(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, cfg: SamplingConfig) -> Rollout:
        B, P = prompt_ids.shape
        if B != self.B or P + cfg.max_new_tokens > self.L:
            raise ValueError(
                f"decoder built for batch {self.B} and length {self.L}, got batch {B} and "
                f"{P} + {cfg.max_new_tokens} tokens"
            )
        if getattr(self, "scfg", None) is None or self.P != P or self.scfg != cfg:
            self.P = P
            self._buffers(cfg)
        logits = self.prefill(prompt_ids, prompt_mask)
        self.s_valid.zero_()
        self.s_valid[:, :P] = prompt_mask.bool()
        self.s_slot_pos[:, :P] = (prompt_mask.cumsum(-1) - 1).clamp_min(0)
        # new token 0 goes into cache slot P, at position = number of real prompt tokens
        return self._decode(logits, P, prompt_mask.sum(-1), cfg, prompt_ids, prompt_mask)

    @torch.no_grad()
    def continue_from(self, previous: Rollout, new_ids: list[list[int]], cfg: SamplingConfig) -> Rollout:
        """engine.sampling.Sampler.continue_from: the appended tokens (and each completion's last token, which
        sampling does not feed back) are run through the model on top of the cache, then decoding goes on."""
        held = previous.cache
        if not isinstance(held, _DecoderCache) or held.owner is not self or held.call != self.calls:
            raise ValueError(
                "continue_from: these sequences' cache is gone (only this decoder's latest call can be continued)"
            )
        blocks = [([int(held.pending[i])] if held.has_pending[i] else []) + list(x) for i, x in enumerate(new_ids)]
        if len(blocks) != self.B or not all(blocks):
            raise ValueError(
                "continue_from: give the tokens that follow each sequence (a completion that ended with its stop "
                "token needs at least one)"
            )
        S, T = held.slot_end, max(len(b) for b in blocks)
        if S + T + cfg.max_new_tokens > self.L:
            raise ValueError(
                f"decoder built for length {self.L}: {S} cached + {T} new + {cfg.max_new_tokens} sampled tokens "
                "do not fit (build it with a larger max_len)"
            )
        dev = self.device
        ids = torch.full((self.B, T), cfg.pad_token_id, dtype=torch.long, device=dev)
        mask = torch.zeros((self.B, T), dtype=torch.long, device=dev)
        for i, b in enumerate(blocks):
            ids[i, T - len(b) :] = torch.tensor(b, dtype=torch.long, device=dev)
            mask[i, T - len(b) :] = 1
        if cfg != self.scfg:
            self._buffers(cfg)
        pos = (held.next_pos[:, None] + mask.cumsum(-1) - 1).clamp_min(0)
        self.s_slot_pos.copy_(held.slot_pos)
        self.s_slot_pos[:, S : S + T] = pos
        logits = self._extend(ids, mask, S, pos, held.valid)
        self.s_valid.copy_(held.valid)
        self.s_valid[:, S : S + T] = mask.bool()
        p_ids, p_mask = continued_prompt(previous, new_ids, cfg.pad_token_id)
        return self._decode(logits, S + T, held.next_pos + mask.sum(-1), cfg, p_ids, p_mask)

    def _buffers(self, cfg: SamplingConfig) -> None:
        """The decode state for this batch and these settings (a new decode graph is captured for them)."""
        B, dev = self.B, self.device
        self.scfg = cfg
        self.stop_ids = torch.tensor(cfg.stop_token_ids or [-1], device=dev)
        self.s_idx = torch.tensor(self.P, device=dev)
        self.s_start = torch.tensor(self.P, device=dev)
        self.s_tok = torch.zeros(B, dtype=torch.long, device=dev)
        self.s_pos = torch.zeros(B, dtype=torch.long, device=dev)
        self.s_valid = torch.zeros(B, self.L, dtype=torch.bool, device=dev)
        self.s_slot_pos = torch.zeros(B, self.L, dtype=torch.long, device=dev)  # each slot's position (windows)
        self.s_done = torch.zeros(B, dtype=torch.bool, device=dev)
        self.s_finished = torch.zeros(B, dtype=torch.bool, device=dev)
        self.out = torch.full((B, cfg.max_new_tokens), cfg.pad_token_id, dtype=torch.long, device=dev)
        self.out_mask = torch.zeros(B, cfg.max_new_tokens, dtype=torch.long, device=dev)
        self.out_logp = torch.zeros(B, cfg.max_new_tokens, dtype=torch.float32, device=dev)
        self.graph = None

    def _decode(self, logits, start: int, pos: torch.Tensor, cfg: SamplingConfig, prompt_ids, prompt_mask) -> Rollout:
        """From the logits of the last token fed: new token 0 at cache slot `start` and positions `pos` [B], then
        one decode step per token."""
        dev = self.device
        self.s_done.zero_()
        self.s_finished.zero_()
        self.out.fill_(cfg.pad_token_id)
        self.out_mask.zero_()
        self.out_logp.zero_()
        self.s_start.fill_(start)
        self._choose(logits, torch.zeros((), dtype=torch.long, device=dev))  # new token 0, from the prefill
        self.s_idx.fill_(start)
        self.s_pos.copy_(pos)
        if not self._compile_checked and cfg.max_new_tokens > 1:
            self._check_compile()
        if self.use_graph and self.graph is None and cfg.max_new_tokens > 1:
            snap = [t.clone() for t in self._state()]
            try:
                self._capture()
            except Exception as e:  # a capture that fails (an op that syncs, a driver limit): decode eagerly
                self.graph_error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                self.use_graph, self.graph = False, None
                torch.cuda.synchronize()
                self._restore(snap)
        # each decode step feeds the previous token (slot s_idx) and samples the next
        for t in range(1, cfg.max_new_tokens):
            self._advance()
            if t % 16 == 0 and bool(self.s_done.all()):
                break
        self.calls += 1
        return Rollout(
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            completion_ids=self.out.clone(),
            completion_mask=self.out_mask.clone(),
            finished=self.s_finished.clone(),
            logprobs=self.out_logp.clone(),
            cache=self._held(start, pos),
        )

    def _held(self, start: int, pos0: torch.Tensor) -> _DecoderCache:
        """What the cache holds after a call: token k of completion i sits in slot start + k once a decode step
        has fed it; the last token sampled is not fed yet (it is `pending`), nor is the padding after a stop token
        valid (decode steps write it for every row)."""
        fed = int(self.s_idx) - start
        valid = self.s_valid.clone()
        valid[:, start + fed :] = False
        valid[:, start : start + fed] = self.out_mask[:, :fed].bool()
        lengths = self.out_mask.sum(-1)
        return _DecoderCache(
            owner=self,
            call=self.calls,
            slot_end=start + fed,
            valid=valid,
            slot_pos=self.s_slot_pos.clone(),
            next_pos=pos0 + torch.minimum(lengths, torch.full_like(lengths, fed)),
            pending=self.out[:, fed].clone(),
            has_pending=self.out_mask[:, fed].bool().tolist(),
        )

    @torch.no_grad()
    def _extend(self, ids, mask, S: int, pos, valid) -> torch.Tensor:
        """Run tokens [B, T] (left-padded) through the model into cache slots [S, S + T), each attending to the
        valid cached slots before S and to the block's earlier tokens. Returns the last position's logits."""
        B, T = ids.shape
        ropes = {key: (cos[pos].unsqueeze(1), sin[pos].unsqueeze(1)) for key, (cos, sin) in self.rope.items()}
        causal = torch.ones(T, T, dtype=torch.bool, device=ids.device).tril()
        eye = torch.eye(T, dtype=torch.bool, device=ids.device)
        block = (causal[None] & mask.bool()[:, None, :]) | eye[None]
        attn = torch.cat([valid[:, None, :S].expand(B, T, S), block], -1).unsqueeze(1)
        itself = torch.cat([torch.zeros(T, S, dtype=torch.bool, device=ids.device), eye], -1)[None, None]
        kv_pos = self.s_slot_pos[:, None, None, : S + T]  # the block's positions are written (continue_from)
        masks = {w: m | itself for w, m in self._masks(attn, pos[:, None, :, None], kv_pos).items()}

        def write(i, k, v):
            self.k_cache[i, :, :, S : S + T] = k
            self.v_cache[i, :, :, S : S + T] = v
            return self.k_cache[i, :, :, : S + T], self.v_cache[i, :, :, : S + T]

        h = self._layers(self._embed(ids, pos), ropes, write, masks)
        return self._logits(h[:, -1])

    def _advance(self):
        if self.graph is not None:
            self.graph.replay()
        else:
            self._decode_step()
