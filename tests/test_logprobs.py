"""The chunked log-prob / cross-entropy kernels against plain autograd on full logits."""

import pytest
import torch
import torch.nn.functional as F

from prefcli.engine.logprobs import IGNORE, LogitTransform, cross_entropy_sum, shift_targets, token_logprobs


def _inputs(bias: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    N, d, V = 37, 8, 50
    h = torch.randn(N, d, dtype=torch.float64, generator=g).requires_grad_()
    w = torch.randn(V, d, dtype=torch.float64, generator=g).requires_grad_()
    b = torch.randn(V, dtype=torch.float64, generator=g).requires_grad_() if bias else None
    y = torch.randint(0, V, (N,), generator=g)
    y[::5] = IGNORE
    return h, w, b, y


def _grads(*ts):
    out = [t.grad.clone() if t is not None else None for t in ts]
    for t in ts:
        if t is not None:
            t.grad = None
    return out


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk", [1, 8, 1000])
def test_token_logprobs_match_full_logits(bias, temperature, chunk):
    h, w, b, y = _inputs(bias)
    z = h @ w.t() + (b if bias else 0)
    ref = torch.log_softmax(z / temperature, -1).gather(1, y.clamp_min(0)[:, None]).squeeze(1) * (y != IGNORE)
    upstream = torch.randn(len(y), dtype=torch.float64)
    (ref * upstream).sum().backward()
    ref_grads = _grads(h, w, b)
    lp, ent = token_logprobs(h, w, b, y, chunk=chunk, temperature=temperature)
    (lp * upstream).sum().backward()
    grads = _grads(h, w, b)
    assert torch.allclose(lp.double(), ref, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        if want is not None:
            assert torch.allclose(got, want, atol=1e-5)
    p = torch.softmax(z / temperature, -1)
    ref_ent = -(p * torch.log_softmax(z / temperature, -1)).sum(-1)
    assert torch.allclose(ent.double(), ref_ent.detach(), atol=1e-4)
    assert (lp[y == IGNORE] == 0).all()


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [3, 64])
def test_cross_entropy_sum_matches_torch(bias, chunk):
    h, w, b, y = _inputs(bias, seed=1)
    z = h @ w.t() + (b if bias else 0)
    ref = F.cross_entropy(z, y, ignore_index=IGNORE, reduction="sum")
    (ref * 3.0).backward()
    ref_grads = _grads(h, w, b)
    ce = cross_entropy_sum(h, w, b, y, chunk=chunk)
    (ce * 3.0).backward()
    grads = _grads(h, w, b)
    assert torch.allclose(ce.double(), ref, rtol=1e-6)
    for got, want in zip(grads, ref_grads):
        if want is not None:
            assert torch.allclose(got, want, atol=1e-5)


def test_bf16_compute_stays_close_to_fp32():
    h, w, b, y = _inputs(False, seed=2)
    exact = cross_entropy_sum(h.detach().float(), w.detach().float(), None, y)
    approx = cross_entropy_sum(h.detach().float(), w.detach().float(), None, y, compute_dtype=torch.bfloat16)
    assert approx.dtype == torch.float32
    assert abs(approx.item() - exact.item()) / exact.item() < 2e-2


def test_no_grad_inputs_skip_gradient_work():
    h, w, b, y = _inputs(False)
    with torch.no_grad():
        ce = cross_entropy_sum(h, w, None, y)
    assert not ce.requires_grad


def test_shift_targets():
    ids = torch.tensor([[5, 6, 7, 8]])
    labels = torch.tensor([[IGNORE, IGNORE, 7, 8]])
    assert shift_targets(ids).tolist() == [[6, 7, 8, IGNORE]]
    assert shift_targets(ids, labels).tolist() == [[IGNORE, 7, 8, IGNORE]]


# Granite divides its logits by logits_scaling (here 8), Cohere multiplies by logit_scale (0.0625), Gemma 2
# soft-caps them (cap * tanh(z / cap), a cap of 2 bites on these logits); the last combines both.
TRANSFORMS = [
    LogitTransform(scale=1 / 8),
    LogitTransform(scale=0.0625),
    LogitTransform(softcap=2.0),
    LogitTransform(scale=3.0, softcap=2.0),
]


@pytest.mark.parametrize("xf", TRANSFORMS, ids=lambda x: f"scale{x.scale:g}-cap{x.softcap}")
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logit_transforms_match_autograd_on_full_logits(xf, temperature):
    """The kernels apply the family's logit scaling and soft-cap and differentiate through them: values and
    gradients equal autograd on the transformed full logits (the model's own forward)."""
    h, w, b, y = _inputs(True, seed=3)

    def logits():
        z = h @ w.t() + b
        if xf.scale != 1.0:
            z = z * xf.scale
        return torch.tanh(z / xf.softcap) * xf.softcap if xf.softcap else z

    ref = torch.log_softmax(logits() / temperature, -1).gather(1, y.clamp_min(0)[:, None]).squeeze(1) * (y != IGNORE)
    upstream = torch.randn(len(y), dtype=torch.float64)
    (ref * upstream).sum().backward()
    ref_grads = _grads(h, w, b)
    lp, _ = token_logprobs(h, w, b, y, chunk=8, temperature=temperature, transform=xf)
    (lp * upstream).sum().backward()
    assert torch.allclose(lp.double(), ref, atol=1e-5)
    for got, want in zip(_grads(h, w, b), ref_grads):
        assert torch.allclose(got, want, atol=1e-5)
    # the summed cross-entropy (SFT), temperature 1
    ref_ce = F.cross_entropy(logits(), y, ignore_index=IGNORE, reduction="sum")
    (ref_ce * 2.0).backward()
    ref_grads = _grads(h, w, b)
    ce = cross_entropy_sum(h, w, b, y, chunk=8, transform=xf)
    (ce * 2.0).backward()
    assert torch.allclose(ce.double(), ref_ce.detach(), rtol=1e-6)
    for got, want in zip(_grads(h, w, b), ref_grads):
        assert torch.allclose(got, want, atol=1e-5)
    # and the transform is not a no-op here: the plain kernel gives other numbers
    assert not torch.allclose(token_logprobs(h, w, b, y, chunk=8, temperature=temperature)[0].double(), ref, atol=1e-3)
