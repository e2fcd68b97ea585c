"""The fast sampler (engine/sampling.py's protocol) for RL and GAN rollouts: a static KV cache, and on CUDA the
one-token decode step captured once in a CUDA graph and replayed, so a decode step costs one graph launch
instead of hundreds of kernel launches from Python. `continue_from` extends the sequences of its latest call
in the same cache (the turns of a multi-turn episode).

Why by hand: Hugging Face `generate` re-enters Python for every layer of every step (518 new
tokens/s at batch 8 on an H200 for a 0.5B model, docs/performance.md), and its static-cache path
needs torch.compile; vLLM is not available on every machine. The decoder below reuses the
policy's own modules and weights (no second model), covers the Llama family (llama, mistral,
qwen2, qwen3: RMSNorm, rotary, grouped-query attention, gated MLP), and falls back to HF
`generate` for other architectures.

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

from .models import unwrap_lm
from .sampling import Rollout, SamplingConfig, continued_prompt

FAST_ARCHS = ("llama", "mistral", "qwen2", "qwen3")


def sample_next(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """One token per row from [B, V] float32 logits: temperature, top-k, top-p, then Gumbel-max
    (the same distribution as softmax sampling, and graph-capturable)."""
    return sample_with_logprob(logits, cfg)[0]


def sample_with_logprob(logits: torch.Tensor, cfg: SamplingConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """`sample_next`, and the log-prob [B] of the chosen token under the distribution it was drawn from
    (after temperature, top-k and top-p; greedy: under the softmax of the raw logits). The trainer
    compares it with its own log-prob of the same token (sampler/trainer mismatch)."""
    if cfg.temperature <= 0:
        tok = logits.argmax(-1)
        return tok, logits.log_softmax(-1).gather(-1, tok[:, None])[:, 0]
    logits = logits / cfg.temperature
    if cfg.top_k and cfg.top_k < logits.shape[-1]:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        cum = probs.cumsum(-1)
        drop_sorted = (cum - probs) > cfg.top_p  # keep the smallest prefix whose mass reaches top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    u = torch.rand_like(logits).clamp_(min=1e-20, max=1.0 - 1e-7)
    tok = (logits - torch.log(-torch.log(u))).argmax(-1)
    return tok, logits.log_softmax(-1).gather(-1, tok[:, None])[:, 0]


def supports_fast_decoder(lm) -> tuple[bool, str]:
    inner = unwrap_lm(lm)
    cfg = inner.config
    mt = getattr(cfg, "model_type", "")
    if mt not in FAST_ARCHS:
        return False, f"model type '{mt}' (fast decoder covers {', '.join(FAST_ARCHS)})"
    rp = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if isinstance(rp, dict) and rp.get("rope_type", rp.get("type", "default")) == "dynamic":
        return False, "dynamic rope scaling"
    types = getattr(cfg, "layer_types", None) or []
    if any(t != "full_attention" for t in types):
        return False, "sliding-window attention layers"
    if getattr(cfg, "hidden_act", "silu") not in ("silu", "swish", "gelu", "gelu_pytorch_tanh"):
        return False, f"activation {cfg.hidden_act}"
    return True, ""


def _effective_weight(module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight (and bias) a linear module applies, LoRA adapters merged in."""
    base = getattr(module, "base_layer", None)
    if base is None:
        return module.weight, module.bias
    w = base.weight
    for name in getattr(module, "active_adapters", []):
        if name in getattr(module, "lora_A", {}):
            A, B = module.lora_A[name].weight, module.lora_B[name].weight
            w = w + (B @ A) * module.scaling[name]
    return w, base.bias


@dataclass
class _DecoderCache:
    """A FastDecoder's hold on the sequences of its latest call, for `continue_from`."""

    owner: FastDecoder
    call: int
    slot_end: int  # the first cache slot not yet written
    valid: torch.Tensor  # [B, L] bool: the slots that hold a real token of the sequence
    next_pos: torch.Tensor  # [B] the position of the next token fed
    pending: torch.Tensor  # [B] each completion's last token, sampled but not fed ...
    has_pending: list[bool]  # ... for the completions that did not end (or ended on the last step)


class FastDecoder:
    """Static-KV-cache sampler for one batch size and one maximum length (engine.sampling.Sampler)."""

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
        self.body = inner.base_model
        self.head = inner.get_output_embeddings()
        with self.gather([self.body.embed_tokens]):  # where the whole weights live (not a CPU-offloaded shard)
            self.device = self.body.embed_tokens.weight.device
        self.dtype = dtype
        self.B, self.L = batch, max_len
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.layers = list(self.body.layers)
        self.qk_norm = hasattr(self.layers[0].self_attn, "q_norm")
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

    # ----------------------------------------------------------------- weights
    def _alloc(self):
        dev, dt = self.device, self.dtype
        nl, B, L = len(self.layers), self.B, self.L
        self.k_cache = torch.zeros(nl, B, self.n_kv, L, self.hd, device=dev, dtype=dt)
        self.v_cache = torch.zeros_like(self.k_cache)
        pos = torch.arange(L, device=dev)[None]
        with torch.no_grad():
            cos, sin = self.body.rotary_emb(torch.zeros(1, device=dev, dtype=torch.float32), pos)
        self.cos, self.sin = cos[0].to(dt), sin[0].to(dt)  # [L, hd]
        self.shadow: list[dict] = []
        for layer in self.layers:
            with self.gather([layer]):
                self.shadow.append(self._alloc_layer(layer))
        with self.gather([self.body.embed_tokens, self.body.norm, self.head]):
            self.final_norm = torch.empty_like(self.body.norm.weight, dtype=dt)
            self.embed = torch.empty_like(self.body.embed_tokens.weight, dtype=dt)
            hw, hb = _effective_weight(self.head)
            self.head_w = self.embed if hw is self.body.embed_tokens.weight else torch.empty_like(hw, dtype=dt)
            self.head_b = torch.empty_like(hb, dtype=dt) if hb is not None else None
        self.eps = [layer.input_layernorm.variance_epsilon for layer in self.layers]
        self.act = self.layers[0].mlp.act_fn

    def _alloc_layer(self, layer) -> dict:
        dev, dt = self.device, self.dtype
        a, m = layer.self_attn, layer.mlp
        qkv_out = (self.n_heads + 2 * self.n_kv) * self.hd
        d = {
            "qkv_w": torch.empty(qkv_out, self.cfg.hidden_size, device=dev, dtype=dt),
            "o_w": torch.empty_like(_effective_weight(a.o_proj)[0], dtype=dt),
            "gu_w": torch.empty(2 * m.gate_proj.out_features, self.cfg.hidden_size, device=dev, dtype=dt),
            "down_w": torch.empty_like(_effective_weight(m.down_proj)[0], dtype=dt),
            "ln1": torch.empty_like(layer.input_layernorm.weight, dtype=dt),
            "ln2": torch.empty_like(layer.post_attention_layernorm.weight, dtype=dt),
        }
        if _effective_weight(a.q_proj)[1] is not None:
            d["qkv_b"] = torch.empty(qkv_out, device=dev, dtype=dt)
        if _effective_weight(a.o_proj)[1] is not None:
            d["o_b"] = torch.empty(self.cfg.hidden_size, device=dev, dtype=dt)
        if getattr(m.gate_proj, "bias", None) is not None or _effective_weight(m.gate_proj)[1] is not None:
            d["gu_b"] = torch.empty(2 * m.gate_proj.out_features, device=dev, dtype=dt)
        if _effective_weight(m.down_proj)[1] is not None:
            d["down_b"] = torch.empty(self.cfg.hidden_size, device=dev, dtype=dt)
        if self.qk_norm:
            d["q_norm"] = torch.empty_like(a.q_norm.weight, dtype=dt)
            d["k_norm"] = torch.empty_like(a.k_norm.weight, dtype=dt)
        return d

    def nbytes(self) -> dict[str, int]:
        """Memory the sampler keeps between rollouts: its whole-weight shadows and its KV cache."""
        seen: set[int] = set()
        weights = 0
        for t in [*(v for d in self.shadow for v in d.values()), self.final_norm, self.embed, self.head_w, self.head_b]:
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
                self._sync_layer(layer, d)
        with self.gather([self.body.embed_tokens, self.body.norm, self.head]):
            self.final_norm.copy_(self.body.norm.weight)
            self.embed.copy_(self.body.embed_tokens.weight)
            hw, hb = _effective_weight(self.head)
            if self.head_w is not self.embed:
                self.head_w.copy_(hw)
            if self.head_b is not None:
                self.head_b.copy_(hb)

    def _sync_layer(self, layer, d: dict) -> None:
        a, m = layer.self_attn, layer.mlp
        (qw, qb), (kw, kb), (vw, vb) = (_effective_weight(p) for p in (a.q_proj, a.k_proj, a.v_proj))
        torch.cat([qw, kw, vw], 0, out=d["qkv_w"]) if qw.dtype == self.dtype else d["qkv_w"].copy_(
            torch.cat([qw, kw, vw], 0)
        )
        if "qkv_b" in d:
            d["qkv_b"].copy_(torch.cat([qb, kb, vb], 0))
        ow, ob = _effective_weight(a.o_proj)
        d["o_w"].copy_(ow)
        if "o_b" in d:
            d["o_b"].copy_(ob)
        (gw, gb), (uw, ub) = _effective_weight(m.gate_proj), _effective_weight(m.up_proj)
        d["gu_w"].copy_(torch.cat([gw, uw], 0))
        if "gu_b" in d:
            d["gu_b"].copy_(torch.cat([gb, ub], 0))
        dw, db = _effective_weight(m.down_proj)
        d["down_w"].copy_(dw)
        if "down_b" in d:
            d["down_b"].copy_(db)
        d["ln1"].copy_(layer.input_layernorm.weight)
        d["ln2"].copy_(layer.post_attention_layernorm.weight)
        if self.qk_norm:
            d["q_norm"].copy_(a.q_norm.weight)
            d["k_norm"].copy_(a.k_norm.weight)

    # ----------------------------------------------------------------- forward
    @staticmethod
    def _rms(x, w, eps):
        dt = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        return w * x32.to(dt)

    @staticmethod
    def _rope(x, cos, sin):
        h = x.shape[-1] // 2
        rot = torch.cat((-x[..., h:], x[..., :h]), dim=-1)
        return x * cos + rot * sin

    def _attn_in(self, h, cos, sin, ln1, qkv_w, qkv_b, q_norm, k_norm, eps: float):
        """RMSNorm, fused QKV projection, (qk-norm,) rotary: q [B, H, T, hd], k/v [B, Hkv, T, hd]."""
        B, T, _ = h.shape
        nq, nkv, hd = self.n_heads, self.n_kv, self.hd
        x = self._rms(h, ln1, eps)
        qkv = F.linear(x, qkv_w, qkv_b)
        q, k, v = qkv.split([nq * hd, nkv * hd, nkv * hd], dim=-1)
        q = q.view(B, T, nq, hd)
        k = k.view(B, T, nkv, hd)
        if q_norm is not None:
            q = self._rms(q, q_norm, eps)
            k = self._rms(k, k_norm, eps)
        q = self._rope(q.transpose(1, 2), cos, sin)
        k = self._rope(k.transpose(1, 2), cos, sin)
        return q, k, v.view(B, T, nkv, hd).transpose(1, 2)

    def _attn_out(self, h, q, k_all, v_all, attn_mask, o_w, o_b, ln2, gu_w, gu_b, down_w, down_b, eps: float):
        """Attention over the given keys/values, output projection, residual, gated MLP, residual."""
        B, T, _ = h.shape
        o = self._attend(q, k_all, v_all, attn_mask)
        o = o.transpose(1, 2).reshape(B, T, self.n_heads * self.hd)
        h = h + F.linear(o, o_w, o_b)
        x = self._rms(h, ln2, eps)
        g, u = F.linear(x, gu_w, gu_b).chunk(2, dim=-1)
        return h + F.linear(self.act(g) * u, down_w, down_b)

    def _layers(self, h, cos, sin, write, attn_mask, fns=None):
        """h: [B, T, d]; cos/sin: [B, 1, T, hd]; write(i, k, v) stores the new keys/values and returns
        the keys/values to attend to; attn_mask: bool [B, 1, T, S]. `fns` = (attn_in, attn_out)
        replaces the two per-layer halves (the compiled decode versions)."""
        attn_in, attn_out = fns or (self._attn_in, self._attn_out)
        for i, d in enumerate(self.shadow):
            q, k, v = attn_in(
                h, cos, sin, d["ln1"], d["qkv_w"], d.get("qkv_b"), d.get("q_norm"), d.get("k_norm"), self.eps[i]
            )
            k_all, v_all = write(i, k, v)
            h = attn_out(
                h,
                q,
                k_all,
                v_all,
                attn_mask,
                d["o_w"],
                d.get("o_b"),
                d["ln2"],
                d["gu_w"],
                d.get("gu_b"),
                d["down_w"],
                d.get("down_b"),
                self.eps[i],
            )
        return self._rms(h, self.final_norm, self.eps[0])

    def _attend(self, q, k, v, mask):
        """Grouped-query attention without expanding the cache. With one new token per row, the
        G = n_heads / n_kv query heads that share a key/value head are laid out as G query
        positions of that head (same mask), so SDPA reads each cached key once; HF's repeat_kv
        order (query head j uses kv head j // G) is kept. Prefill (T > 1) expands k/v once."""
        B, H, T, hd = q.shape
        G = H // self.n_kv
        if G == 1:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        if T == 1:
            o = F.scaled_dot_product_attention(q.reshape(B, self.n_kv, G, hd), k, v, attn_mask=mask)
            return o.reshape(B, H, 1, hd)
        k = k.repeat_interleave(G, dim=1)
        v = v.repeat_interleave(G, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def _logits(self, h):
        return F.linear(h, self.head_w, self.head_b).float()

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Run left-padded prompts [B, P] through the model, filling cache slots [0, P). Returns the
        last position's logits [B, V] (float32)."""
        B, P = ids.shape
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        cos, sin = self.cos[pos].unsqueeze(1), self.sin[pos].unsqueeze(1)
        valid = mask.bool()
        causal = torch.ones(P, P, dtype=torch.bool, device=ids.device).tril()
        attn = (causal[None] & valid[:, None, :]) | torch.eye(P, dtype=torch.bool, device=ids.device)[None]
        attn = attn.unsqueeze(1)

        def write(i, k, v):
            self.k_cache[i, :, :, :P] = k
            self.v_cache[i, :, :, :P] = v
            return k, v

        h = self._layers(self.embed[ids], cos, sin, write, attn)
        return self._logits(h[:, -1])

    def _decode_step(self):
        """Feed the previous token (at cache slot s_idx, position s_pos) and choose the next one.
        Reads and writes only static buffers, so it can be captured in a CUDA graph."""
        idx = self.s_idx
        cos, sin = self.cos[self.s_pos][:, None, None, :], self.sin[self.s_pos][:, None, None, :]
        self.s_valid.index_fill_(1, idx.view(1), True)
        attn = self.s_valid[:, None, None, :]

        def write(i, k, v):
            self.k_cache[i].index_copy_(2, idx.view(1), k)
            self.v_cache[i].index_copy_(2, idx.view(1), v)
            return self.k_cache[i], self.v_cache[i]

        h = self._layers(self.embed[self.s_tok][:, None, :], cos, sin, write, attn, self._compiled)
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
            next_pos=pos0 + torch.minimum(lengths, torch.full_like(lengths, fed)),
            pending=self.out[:, fed].clone(),
            has_pending=self.out_mask[:, fed].bool().tolist(),
        )

    @torch.no_grad()
    def _extend(self, ids, mask, S: int, pos, valid) -> torch.Tensor:
        """Run tokens [B, T] (left-padded) through the model into cache slots [S, S + T), each attending to the
        valid cached slots before S and to the block's earlier tokens. Returns the last position's logits."""
        B, T = ids.shape
        cos, sin = self.cos[pos].unsqueeze(1), self.sin[pos].unsqueeze(1)
        causal = torch.ones(T, T, dtype=torch.bool, device=ids.device).tril()
        block = (causal[None] & mask.bool()[:, None, :]) | torch.eye(T, dtype=torch.bool, device=ids.device)[None]
        attn = torch.cat([valid[:, None, :S].expand(B, T, S), block], -1).unsqueeze(1)

        def write(i, k, v):
            self.k_cache[i, :, :, S : S + T] = k
            self.v_cache[i, :, :, S : S + T] = v
            return self.k_cache[i, :, :, : S + T], self.v_cache[i, :, :, : S + T]

        h = self._layers(self.embed[ids], cos, sin, write, attn)
        return self._logits(h[:, -1])

    def _advance(self):
        if self.graph is not None:
            self.graph.replay()
        else:
            self._decode_step()
