"""Per-token log-probabilities and cross-entropy computed from hidden states in chunks.

A language model's output layer turns N hidden states (N x d) into N x V logits. For a 152k
vocabulary that is 2.4 GB of fp32 per 4,096 tokens, and autograd keeps it for backward. The two
autograd functions here never hold more than one chunk of logits:

- `cross_entropy_sum`: summed next-token cross-entropy (SFT). The loss is known in forward, so
  its gradients w.r.t. hidden states and weights are computed there too, chunk by chunk, and
  backward only scales them: 3 matmuls per chunk, as plain autograd would do, at a fraction of
  the memory. (The same idea as Liger-Kernel's fused linear cross-entropy, in plain torch.)
- `token_logprobs`: log p(target) per token for any downstream loss (DPO, PPO, ...). The
  upstream gradient is unknown in forward, so backward recomputes each chunk's logits (one extra
  matmul per chunk) instead of storing them.

Both read targets already aligned with the hidden states (target t is the token that follows
position t); -100 marks positions without a target (prompt, padding), whose log-prob is 0. Both
apply the family's own logit transform (`LogitTransform`: Granite's and Cohere's logit scaling,
Gemma 2's final soft-capping) before the softmax, as the model's forward does, and differentiate
through it.
Written by hand because no maintained library offers this for arbitrary Hugging Face models on
CPU and GPU alike (Liger-Kernel needs Triton and a GPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE = -100


@dataclass(frozen=True)
class LogitTransform:
    """What a model's forward does to its output layer's result before the softmax: z = scale * (h W^T + b),
    then, with `softcap`, z = softcap * tanh(z / softcap). (engine.families reads it from the config.)"""

    scale: float = 1.0
    softcap: float | None = None

    @property
    def identity(self) -> bool:
        return self.scale == 1.0 and not self.softcap

    def apply(self, z: torch.Tensor) -> torch.Tensor:
        """On float32 logits (not in place)."""
        if self.scale != 1.0:
            z = z * self.scale
        if self.softcap:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z

    def chain_(self, dz: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """dz (the gradient w.r.t. the transformed logits z) becomes the gradient w.r.t. h W^T + b, in place."""
        if self.softcap:
            dz.mul_(1.0 - (z / self.softcap).square())  # d/dx c tanh(x / c) = 1 - tanh^2
        if self.scale != 1.0:
            dz.mul_(self.scale)
        return dz


IDENTITY = LogitTransform()


def _chunk_logits(h, w, b, temperature, xf: LogitTransform = IDENTITY):
    """float32 logits of one chunk, transformed and divided by the temperature; and, when the transform
    has a soft-cap, the capped logits before the temperature (the backward pass needs them)."""
    z = h @ w.t()
    if b is not None:
        z = z + b
    z = xf.apply(z.float())
    capped = z if xf.softcap else None
    if temperature != 1.0:
        z = z / temperature
    return z, capped


class _CrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, b, targets, chunk, compute_dtype, xf):
        need_h, need_w, need_b = (
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[1],
            b is not None and ctx.needs_input_grad[2],
        )
        wc = w.to(compute_dtype)
        bc = b.to(compute_dtype) if b is not None else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.zeros_like(h) if need_h else None
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
        grad_b = torch.zeros(w.shape[0], dtype=torch.float32, device=w.device) if need_b else None
        for s in range(0, h.shape[0], chunk):  # no host sync inside: every chunk is processed
            y = targets[s : s + chunk]
            valid = (y != IGNORE).unsqueeze(1)
            y0 = y.clamp_min(0).unsqueeze(1)
            hc = h[s : s + chunk].to(compute_dtype)
            z, capped = _chunk_logits(hc, wc, bc, 1.0, xf)  # float32 [c, V]
            lse = torch.logsumexp(z, dim=-1, keepdim=True)
            total += ((lse - z.gather(1, y0)) * valid).sum()
            if need_h or need_w or need_b:
                if capped is not None:
                    capped = capped.clone()  # z is overwritten below
                # d(-log p_y)/dz = softmax(z) - onehot(y), built in place in z's memory
                dz = z.sub_(lse).exp_()
                dz.scatter_add_(1, y0, torch.full_like(lse, -1.0))
                dz.mul_(valid)
                xf.chain_(dz, capped)
                dzc = dz.to(compute_dtype)
                if need_h:
                    grad_h[s : s + chunk] = (dzc @ wc).to(h.dtype)
                if need_w:
                    grad_w.add_(dzc.t() @ hc)
                if need_b:
                    grad_b += dz.sum(0)
                del dzc
            del z
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (w.dtype, b.dtype if b is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        wdt, bdt = ctx.dtypes
        gh = (grad_h * grad_out.to(grad_h.dtype)) if grad_h is not None else None
        gw = (grad_w * grad_out).to(wdt) if grad_w is not None else None
        gb = (grad_b * grad_out).to(bdt) if grad_b is not None else None
        return gh, gw, gb, None, None, None, None


class _TokenLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, b, targets, chunk, compute_dtype, temperature, shape, xf):
        # allocated in the targets' shape and filled through flat views: the outputs are no views themselves
        # (FSDP2 attaches its backward hooks to a module's outputs; an in-place op on a view would lose them)
        out_shaped = torch.zeros(shape, dtype=torch.float32, device=h.device)
        ent_shaped = torch.zeros(shape, dtype=torch.float32, device=h.device)
        out, ent = out_shaped.view(-1), ent_shaped.view(-1)
        lse_all = torch.zeros(h.shape[0], dtype=torch.float32, device=h.device)
        wc = w.to(compute_dtype)
        bc = b.to(compute_dtype) if b is not None else None
        for s in range(0, h.shape[0], chunk):
            y = targets[s : s + chunk]
            z, _ = _chunk_logits(h[s : s + chunk].to(compute_dtype), wc, bc, temperature, xf)
            lse = torch.logsumexp(z, dim=-1)
            lse_all[s : s + chunk] = lse
            zy = z.gather(1, y.clamp_min(0).unsqueeze(1)).squeeze(1)
            out[s : s + chunk] = torch.where(y != IGNORE, zy - lse, torch.zeros_like(lse))
            # entropy = lse - sum_v p_v z_v
            p = torch.exp(z - lse.unsqueeze(1))
            ent[s : s + chunk] = lse - p.mul_(z).sum(-1)
            del z, p
        ctx.save_for_backward(h, w, b, targets, lse_all)
        ctx.cfg = (chunk, compute_dtype, temperature, xf)
        ctx.mark_non_differentiable(ent_shaped)
        return out_shaped, ent_shaped

    @staticmethod
    def backward(ctx, grad_out, _grad_ent):
        h, w, b, targets, lse_all = ctx.saved_tensors
        chunk, compute_dtype, temperature, xf = ctx.cfg
        grad_out = grad_out.reshape(-1)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = b is not None and ctx.needs_input_grad[2]
        wc = w.to(compute_dtype)
        bc = b.to(compute_dtype) if b is not None else None
        grad_h = torch.zeros_like(h) if need_h else None
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
        grad_b = torch.zeros(w.shape[0], dtype=torch.float32, device=w.device) if need_b else None
        for s in range(0, h.shape[0], chunk):
            y = targets[s : s + chunk]
            g = (grad_out[s : s + chunk].float() * (y != IGNORE)).unsqueeze(1)
            hc = h[s : s + chunk].to(compute_dtype)
            z, capped = _chunk_logits(hc, wc, bc, temperature, xf)
            if capped is not None and capped is z:
                capped = capped.clone()  # z is overwritten below
            # d logp_y / dz = (onehot_y - softmax(z)) / temperature, scaled by the upstream gradient
            dz = z.sub_(lse_all[s : s + chunk].unsqueeze(1)).exp_().mul_(-g)
            dz.scatter_add_(1, y.clamp_min(0).unsqueeze(1), g)
            if temperature != 1.0:
                dz.div_(temperature)
            xf.chain_(dz, capped)
            dzc = dz.to(compute_dtype)
            if need_h:
                grad_h[s : s + chunk] = (dzc @ wc).to(h.dtype)
            if need_w:
                grad_w.add_(dzc.t() @ hc)
            if need_b:
                grad_b += dz.sum(0)
            del z, dz, dzc
        return (
            grad_h,
            grad_w.to(w.dtype) if grad_w is not None else None,
            grad_b.to(b.dtype) if grad_b is not None else None,
            None,
            None,
            None,
            None,
            None,
            None,
        )


def cross_entropy_sum(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    chunk: int = 2048,
    compute_dtype: torch.dtype | None = None,
    transform: LogitTransform = IDENTITY,
) -> torch.Tensor:
    """Sum over positions with a target of -log softmax(transform(h @ W^T + b))[target].

    h: (..., d) hidden states; targets: (...) token ids or -100. Returns a float32 scalar."""
    h2 = h.reshape(-1, h.shape[-1])
    return _CrossEntropySum.apply(h2, weight, bias, targets.reshape(-1), chunk, compute_dtype or h.dtype, transform)


def token_logprobs(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    chunk: int = 2048,
    compute_dtype: torch.dtype | None = None,
    temperature: float = 1.0,
    transform: LogitTransform = IDENTITY,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target_t | h_t) for every position (0 where target is -100), and the entropy of the
    full next-token distribution there (no gradient). The logits are `transform(h @ W^T + b)` (the
    family's own scaling or soft-cap), then divided by `temperature`: use the sampling temperature so
    that ratios and KL match what was sampled. Returns float32 tensors shaped like `targets`."""
    h2 = h.reshape(-1, h.shape[-1])
    return _TokenLogProbs.apply(
        h2, weight, bias, targets.reshape(-1), chunk, compute_dtype or h.dtype, temperature, targets.shape, transform
    )


def shift_targets(input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Targets aligned with positions: target[t] = labels[t+1] (or input_ids[t+1]); last = -100."""
    src = input_ids if labels is None else labels
    out = torch.full_like(src, IGNORE)
    out[..., :-1] = src[..., 1:]
    return out


def positions_of(x, targets, start: int):
    """x's positions that `targets` covers (all, or start .. start + targets.shape[1] - 1)."""
    if start or targets.shape[1] != x.shape[1]:
        if targets.shape[1] == x.shape[1]:
            targets = targets[:, start:]
        x = x[:, start : start + targets.shape[1]]
    return x, targets


def logits_logprobs(logits, targets, mode: str = "logprobs", temperature: float = 1.0, start: int = 0):
    """What PolicyLM.forward returns, from full logits [B, T, V] (the model's own forward) instead of the
    kernels: summed cross-entropy (mode 'ce'), or per-token log-probs and entropies."""
    z, targets = positions_of(logits, targets, start)
    lp = (z / temperature if temperature != 1.0 else z).log_softmax(-1)
    valid = targets != IGNORE
    tok = lp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1) * valid
    if mode == "ce":
        return -tok.sum()
    with torch.no_grad():
        ent = -(lp.exp() * lp).sum(-1)
    return tok, ent
