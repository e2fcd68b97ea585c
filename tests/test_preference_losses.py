"""Every preference loss against hand-worked numbers, and against TRL's own code on identical tensors.

TRL keeps most losses inline in trainer methods; the tests call those methods unbound, with a stub
`self` holding the attributes they read and a stub model returning fixed log-probs, so TRL's code
(not a copy of it) computes the reference values.
"""

from __future__ import annotations

import math
import re
import types
from collections import defaultdict
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch

from prefcli.algos.contrastive import (
    OBJECTIVES,
    Hyper,
    PairLogps,
    UnpairedLogps,
    cdpo_loss,
    cpo_loss,
    dpo_loss,
    hinge_loss,
    ipo_loss,
    kto_loss,
    log1mexp,
    orpo_loss,
    robust_loss,
    simpo_loss,
)
from prefcli.algos.infonce import infonce_loss
from prefcli.algos.reward_model import (
    bradley_terry_loss,
    calibration,
    calibration_errors,
    ranking_loss,
    ranking_pairs,
    regression_loss,
)
from prefcli.engine.pairs import sequence_logps

LN2 = math.log(2)


def sig(x):
    return 1 / (1 + math.exp(-x))


def lp(c, r, rc=None, rr=None, nll=None):
    t = lambda v: None if v is None else torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return PairLogps(chosen=t(c), rejected=t(r), ref_chosen=t(rc), ref_rejected=t(rr), chosen_nll=t(nll))


# ------------------------------------------------------------------------------ by hand


def test_dpo_family_by_hand():
    # h = (-10 - -12) - (-14 - -13) = 2 - (-1) = 3; beta = 0.1 -> beta*h = 0.3
    x = lp([-10.0], [-14.0], [-12.0], [-13.0])
    z = 0.3
    assert dpo_loss(x, Hyper(beta=0.1))[0].item() == pytest.approx(-math.log(sig(z)))
    eps = 0.2
    assert cdpo_loss(x, Hyper(beta=0.1, label_smoothing=eps))[0].item() == pytest.approx(
        -(1 - eps) * math.log(sig(z)) - eps * math.log(sig(-z))
    )
    assert robust_loss(x, Hyper(beta=0.1, label_smoothing=eps))[0].item() == pytest.approx(
        (-(1 - eps) * math.log(sig(z)) + eps * math.log(sig(-z))) / (1 - 2 * eps)
    )
    assert ipo_loss(x, Hyper(beta=0.1))[0].item() == pytest.approx((3 - 5) ** 2)
    assert hinge_loss(x, Hyper(beta=0.1))[0].item() == pytest.approx(0.7)
    assert hinge_loss(x, Hyper(beta=0.5))[0].item() == 0.0  # 1 - 1.5 < 0
    _, m = dpo_loss(x, Hyper(beta=0.1))
    assert m["reward/chosen"].item() == pytest.approx(0.2) and m["reward/rejected"].item() == pytest.approx(-0.1)


def test_dpo_is_ln2_when_policy_equals_reference():
    x = lp([-3.0, -50.0], [-7.0, -1.0], [-3.0, -50.0], [-7.0, -1.0])
    for name in ("dpo", "cdpo", "robust"):
        loss = OBJECTIVES[name].loss_fn(x, Hyper(beta=0.1, label_smoothing=0.1))[0]
        assert loss.tolist() == pytest.approx([LN2, LN2]), name


def test_reference_free_losses_by_hand():
    # simpo on mean log-probs: beta 2, gamma 0.5: -log sig(2 * (-1 - -1.5) - 0.5) = -log sig(0.5)
    x = lp([-1.0], [-1.5])
    assert simpo_loss(x, Hyper(beta=2.0, simpo_gamma=0.5))[0].item() == pytest.approx(-math.log(sig(0.5)))
    # cpo: -log sig(0.1 * (-10 - -14)) + 1.0 * 2.5
    x = lp([-10.0], [-14.0], nll=[2.5])
    loss, m = cpo_loss(x, Hyper(beta=0.1, cpo_alpha=1.0))
    assert loss.item() == pytest.approx(-math.log(sig(0.4)) + 2.5)
    assert m["loss/nll"].item() == 2.5 and m["reward/chosen"].item() == pytest.approx(-1.0)
    # orpo: mean log-probs log p_w = log 0.5, log p_l = log 0.25 -> odds 1 and 1/3 -> log odds ratio ln 3
    x = lp([math.log(0.5)], [math.log(0.25)], nll=[0.7])
    loss, m = orpo_loss(x, Hyper(beta=0.1))
    assert m["reward/log_odds"].item() == pytest.approx(math.log(3))
    assert loss.item() == pytest.approx(0.7 - 0.1 * math.log(sig(math.log(3))))  # sig(ln 3) = 3/4


def test_log1mexp_is_stable():
    x = torch.tensor([-1e-9, -1e-4, -0.5, -5.0, -50.0, 0.0], dtype=torch.float64)
    got = log1mexp(x)
    assert torch.isfinite(got).all()
    want = torch.log(1 - torch.exp(x.clamp(max=-1e-7)))
    assert torch.allclose(got[1:5], want[1:5], rtol=1e-9)
    assert got[4].item() == pytest.approx(-math.exp(-50.0), rel=1e-6)


def test_kto_by_hand():
    u = UnpairedLogps(
        logps=torch.tensor([-10.0, -10.0]),
        ref=torch.tensor([-12.0, -9.0]),
        label=torch.tensor([True, False]),
        kl=torch.tensor(0.5),
    )
    loss, m = kto_loss(u, Hyper(beta=0.1, desirable_weight=1.0, undesirable_weight=2.0))
    # desirable: r = 2, 1 - sig(0.1 * (2 - 0.5)); undesirable: r = -1, 2 * (1 - sig(0.1 * (0.5 - -1)))
    assert loss.tolist() == pytest.approx([1 - sig(0.15), 2 * (1 - sig(0.15))], rel=1e-6)
    assert m["reward/row"].tolist() == pytest.approx([0.2, -0.1])


def test_infonce_by_hand():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    p = torch.tensor([[3.0, 0.0], [0.0, 1.0]])  # cos(a_i, p_i) = 1, cos(a_i, p_j) = 0
    n = torch.tensor([[1.0, 1.0], [1.0, 0.0]])  # cos(a_0, n_0) = 1/sqrt2, cos(a_0, n_1) = 1, cos(a_1, n_0) = 1/sqrt2
    tau = 0.5
    loss, m = infonce_loss(a, p, n, tau)
    r2 = 1 / math.sqrt(2)
    l0 = -math.log(math.exp(2) / (math.exp(2) + math.exp(0) + math.exp(r2 / tau) + math.exp(1 / tau)))
    l1 = -math.log(math.exp(2) / (math.exp(0) + math.exp(2) + math.exp(r2 / tau) + math.exp(0)))
    assert loss.tolist() == pytest.approx([l0, l1], rel=1e-6)
    assert m["reward/chosen"].tolist() == pytest.approx([1.0, 1.0])
    assert m["reward/rejected"].tolist() == pytest.approx([r2, 0.0], abs=1e-6)
    # without hard negatives: only the in-batch positives
    loss2, _ = infonce_loss(a, p, None, tau)
    assert loss2[0].item() == pytest.approx(-math.log(math.exp(2) / (math.exp(2) + 1.0)), rel=1e-6)


def test_reward_losses_by_hand():
    rc, rr = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.5])
    assert bradley_terry_loss(rc, rr).tolist() == pytest.approx([-math.log(sig(1.0)), -math.log(sig(-0.5))])
    assert bradley_terry_loss(rc, rr, torch.tensor([1.0, 0.0])).tolist() == pytest.approx([LN2, -math.log(sig(-0.5))])
    assert bradley_terry_loss(rc, rr, None, 0.01).tolist() == pytest.approx(
        [-math.log(sig(1.0)) + 0.01 * 9, -math.log(sig(-0.5)) + 0.01 * 0.25]
    )
    assert regression_loss(torch.tensor([1.0, 3.0]), torch.tensor([0.0, 1.0])).tolist() == [1.0, 4.0]
    better, worse = ranking_pairs([3, 2])
    assert (better, worse) == ([0, 0, 1, 3], [1, 2, 2, 4])
    r = torch.tensor([3.0, 1.0, 0.0, 5.0, 5.0])
    assert ranking_loss(r, torch.tensor(better), torch.tensor(worse)).tolist() == pytest.approx(
        [-math.log(sig(2.0)), -math.log(sig(3.0)), -math.log(sig(1.0)), LN2]
    )


def test_calibration_by_hand():
    # margins: p = sig(m); confidences 0.5 (tie), ~0.731 (m=1, right), ~0.731 (m=-1, wrong), ~0.982 (m=4, right)
    t = calibration(torch.tensor([0.0, 1.0, -1.0, 4.0]), bins=5)
    assert t[:, 0].tolist() == [1, 0, 2, 0, 1]
    ece, mce = calibration_errors(t)
    c1, c4 = sig(1.0), sig(4.0)
    gaps = [abs(0.5 - 0.5), abs(0.5 - c1), abs(1.0 - c4)]
    assert ece == pytest.approx((1 * gaps[0] + 2 * gaps[1] + 1 * gaps[2]) / 4)
    assert mce == pytest.approx(max(gaps))


def test_sequence_logps_reduce_over_the_completion_mask():
    tok = torch.tensor([[-1.0, -2.0, -3.0, 0.0], [-4.0, -5.0, 0.0, 0.0]])
    tgt = torch.tensor([[-100, 7, 8, -100], [5, 6, -100, -100]])
    s, n = sequence_logps(tok, tgt, "sum")
    assert s.tolist() == [-5.0, -9.0] and n.tolist() == [2.0, 2.0]
    assert sequence_logps(tok, tgt, "mean")[0].tolist() == [-2.5, -4.5]


# ------------------------------------------------------------------------------ against TRL


class _Accel:
    device = torch.device("cpu")

    def gather_for_metrics(self, x):
        return x

    def gather(self, x):
        return x

    def autocast(self):
        return nullcontext()

    def unwrap_model(self, m):
        return m


def _metrics():
    return defaultdict(lambda: defaultdict(list))


def _random_pairs(B=4, T=7, seed=0):
    """Per-token log-probs of B chosen and B rejected rows (0 off the completion), the completion
    mask (TRL's layout) and our targets (-100 off the completion, shifted)."""
    g = torch.Generator().manual_seed(seed)
    comp = torch.zeros(2 * B, T, dtype=torch.long)
    for i in range(2 * B):
        start = 1 + i % 3
        end = T - (i % 2)
        comp[i, start:end] = 1
    shift = comp[:, 1:]
    tok = -torch.rand(2 * B, T - 1, generator=g, dtype=torch.float64) * 3 * shift
    ref_tok = -torch.rand(2 * B, T - 1, generator=g, dtype=torch.float64) * 3 * shift
    targets = torch.where(shift.bool(), torch.ones_like(shift), torch.full_like(shift, -100))
    return tok, ref_tok, comp, targets


def _trl_dpo(loss_type, tok, ref_tok, comp, beta, eps=0.0):
    from trl import DPOTrainer

    B2 = tok.shape[0]

    class Model:
        training = True

        def __call__(self, **kw):
            n = kw["input_ids"].shape[1] - 1
            return SimpleNamespace(
                log_probs=tok,
                entropy=torch.zeros(B2, n),
                mean_logits=torch.zeros(B2, n),
                is_top1=torch.zeros(B2, n, dtype=torch.bool),
            )

    ref = ref_tok.sum(1)
    stub = SimpleNamespace(
        model=Model(),
        accelerator=_Accel(),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=eps,
        use_weighting=False,
        _metrics=_metrics(),
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.ones_like(comp),
        "attention_mask": torch.ones_like(comp),
        "completion_mask": comp,
        "ref_chosen_logps": ref[: B2 // 2],
        "ref_rejected_logps": ref[B2 // 2 :],
    }
    loss = DPOTrainer._compute_loss(stub, stub.model, inputs, False)
    return loss, {k: v[0] for k, v in stub._metrics["train"].items()}


@pytest.mark.parametrize(
    "name,trl_name,eps",
    [("dpo", "sigmoid", 0.0), ("hinge", "hinge", 0.0), ("ipo", "ipo", 0.0), ("robust", "robust", 0.2)],
)
def test_dpo_family_matches_trl_dpo_trainer(name, trl_name, eps):
    tok, ref_tok, comp, tgt = _random_pairs(seed=hash(name) % 1000)
    obj = OBJECTIVES[name]
    hp = Hyper(beta=0.1, label_smoothing=eps)
    seq, _ = sequence_logps(tok, tgt, obj.reduce)
    ref, _ = sequence_logps(ref_tok, tgt, obj.reduce)
    B = seq.shape[0] // 2
    losses, m = obj.loss_fn(PairLogps(seq[:B], seq[B:], ref[:B], ref[B:]), hp)
    want, wm = _trl_dpo(trl_name, tok, ref_tok, comp, 0.1, eps)
    assert losses.mean().item() == pytest.approx(want.item(), rel=1e-9)
    if name != "ipo":  # TRL logs sum-based rewards; ipo's are on token means
        assert m["reward/chosen"].mean().item() == pytest.approx(wm["rewards/chosen"], rel=1e-9)
        assert m["reward/rejected"].mean().item() == pytest.approx(wm["rewards/rejected"], rel=1e-9)
    sums, _ = sequence_logps(tok, tgt, "sum")
    assert sums[:B].mean().item() == pytest.approx(wm["logps/chosen"], rel=1e-9)


def test_first_dpo_loss_is_ln2_in_trl_too():
    tok, _, comp, tgt = _random_pairs(seed=3)
    want, _ = _trl_dpo("sigmoid", tok, tok, comp, 0.1)
    assert want.item() == pytest.approx(LN2)


def _trl_cpo(loss_type, chosen, rejected, beta, eps=0.0, gamma=0.5):
    from trl.experimental.cpo import CPOTrainer

    stub = SimpleNamespace(
        alpha=0.0, accelerator=_Accel(), loss_type=loss_type, beta=beta, label_smoothing=eps, simpo_gamma=gamma
    )
    return CPOTrainer.cpo_loss(stub, chosen, rejected)


def test_cdpo_simpo_cpo_match_trl_cpo_trainer():
    tok, ref_tok, comp, tgt = _random_pairs(seed=11)
    B = tok.shape[0] // 2
    # cdpo: TRL's label-smoothed sigmoid on reference-normalised log-probs
    s, _ = sequence_logps(tok, tgt, "sum")
    r, _ = sequence_logps(ref_tok, tgt, "sum")
    ours, _ = cdpo_loss(PairLogps(s[:B], s[B:], r[:B], r[B:]), Hyper(beta=0.1, label_smoothing=0.15))
    want, _, _ = _trl_cpo("sigmoid", s[:B] - r[:B], s[B:] - r[B:], 0.1, eps=0.15)
    assert torch.allclose(ours, want, rtol=1e-9)
    # simpo on token-mean log-probs (TRL CPO's average_log_prob for simpo)
    m, _ = sequence_logps(tok, tgt, "mean")
    ours, om = simpo_loss(PairLogps(m[:B], m[B:]), Hyper(beta=2.0, simpo_gamma=0.7))
    want, wc, wr = _trl_cpo("simpo", m[:B], m[B:], 2.0, gamma=0.7)
    assert torch.allclose(ours, want, rtol=1e-9)
    assert torch.allclose(om["reward/chosen"], wc) and torch.allclose(om["reward/rejected"], wr)
    # cpo's preference term (alpha = 0 leaves only it)
    ours, om = cpo_loss(
        PairLogps(s[:B], s[B:], chosen_nll=torch.zeros(B, dtype=torch.float64)), Hyper(beta=0.1, cpo_alpha=0.0)
    )
    want, wc, _ = _trl_cpo("sigmoid", s[:B], s[B:], 0.1)
    assert torch.allclose(ours, want, rtol=1e-9) and torch.allclose(om["reward/chosen"], wc)


def test_orpo_odds_ratio_matches_trl_orpo_trainer():
    from trl.experimental.orpo import ORPOTrainer

    tok, _, comp, tgt = _random_pairs(seed=5)
    B = tok.shape[0] // 2
    m, _ = sequence_logps(tok, tgt, "mean")
    nll = torch.full((B,), 1.25, dtype=torch.float64)
    ours, om = orpo_loss(PairLogps(m[:B], m[B:], chosen_nll=nll), Hyper(beta=0.1))
    stub = SimpleNamespace(beta=0.1, accelerator=_Accel())
    losses, wc, wr, ratio, log_odds = ORPOTrainer.odds_ratio_loss(stub, m[:B], m[B:])
    # TRL: loss = nll - mean(beta * log sigmoid(log odds)); ours per pair, same mean
    assert ours.mean().item() == pytest.approx(1.25 - losses.mean().item(), rel=1e-6)
    assert om["reward/log_odds"].mean().item() == pytest.approx(log_odds.item(), rel=1e-6)
    assert torch.allclose(om["reward/chosen"], wc.double(), rtol=1e-6)


def test_kto_matches_trl_kto_trainer():
    from trl import KTOTrainer

    g = torch.Generator().manual_seed(7)
    B, T = 6, 6
    comp = torch.zeros(B, T, dtype=torch.long)
    comp[:, 2:] = 1
    shift = comp[:, 1:]
    tok = -torch.rand(B, T - 1, generator=g, dtype=torch.float64) * shift
    kl_tok = -torch.rand(B, T - 1, generator=g, dtype=torch.float64) * shift
    ref = -torch.rand(B, generator=g, dtype=torch.float64) * 3
    ref_kl = -torch.rand(B, generator=g, dtype=torch.float64) * 3 - 2  # KL estimate > 0
    labels = torch.tensor([True, False, True, True, False, False])
    main_ids, kl_ids = torch.ones(B, T, dtype=torch.long), torch.full((B, T), 2, dtype=torch.long)

    class Model:
        training = True

        def __call__(self, **kw):
            lp = kl_tok if kw["input_ids"] is kl_ids else tok
            n = T - 1
            return SimpleNamespace(log_probs=lp, entropy=torch.zeros(B, n), mean_logits=torch.zeros(B, n))

    stub = SimpleNamespace(
        model=Model(),
        accelerator=_Accel(),
        calculate_KL=True,
        aux_loss_enabled=False,
        precompute_ref_logps=True,
        loss_type="kto",
        beta=0.1,
        desirable_weight=1.0,
        undesirable_weight=1.3,
        _metrics=_metrics(),
        _total_train_tokens=0,
        _tp_size=1,
    )
    stub._compute_kl_logps = types.MethodType(KTOTrainer._compute_kl_logps, stub)
    inputs = {
        "input_ids": main_ids,
        "attention_mask": torch.ones(B, T),
        "completion_mask": comp,
        "label": labels,
        "KL_input_ids": kl_ids,
        "KL_attention_mask": torch.ones(B, T),
        "KL_completion_mask": comp,
        "ref_logps": ref,
        "ref_KL_logps": ref_kl,
    }
    want = KTOTrainer._compute_loss(stub, stub.model, inputs, False)
    kl = (kl_tok.sum(1) - ref_kl).mean().clamp(min=0)
    ours, m = kto_loss(
        UnpairedLogps(logps=tok.sum(1), ref=ref, label=labels, kl=kl),
        Hyper(beta=0.1, desirable_weight=1.0, undesirable_weight=1.3),
    )
    assert ours.mean().item() == pytest.approx(want.item(), rel=1e-9)
    assert stub._metrics["train"]["kl"][0] == pytest.approx(kl.item())
    assert m["reward/row"][labels].mean().item() == pytest.approx(stub._metrics["train"]["rewards/chosen"][0])


@pytest.mark.parametrize("with_margin,center", [(False, None), (True, None), (True, 0.01)])
def test_bradley_terry_matches_trl_reward_trainer(with_margin, center):
    from trl import RewardTrainer

    g = torch.Generator().manual_seed(1)
    B = 5
    logits = torch.randn(2 * B, 1, generator=g, dtype=torch.float64)
    margin = torch.rand(B, generator=g, dtype=torch.float64) if with_margin else None
    stub = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=_Accel(),
        args=SimpleNamespace(center_rewards_coefficient=center),
        _metrics=_metrics(),
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {"input_ids": torch.ones(2 * B, 3, dtype=torch.long), "attention_mask": torch.ones(2 * B, 3)}
    if with_margin:
        inputs["margin"] = margin
    want = RewardTrainer.compute_loss(stub, lambda **kw: SimpleNamespace(logits=logits), inputs)
    ours = bradley_terry_loss(logits[:B, 0], logits[B:, 0], margin, center or 0.0)
    assert ours.mean().item() == pytest.approx(want.item(), rel=1e-9)
    diff = logits[:B, 0] - logits[B:, 0]
    assert (diff > 0).double().mean().item() == pytest.approx(stub._metrics["train"]["accuracy"][0])
    assert diff.mean().item() == pytest.approx(stub._metrics["train"]["margin"][0])


def test_every_objective_is_registered_with_a_pure_function():
    from prefcli.recipe.commands import CONTRASTIVE_OBJECTIVES

    assert set(OBJECTIVES) == set(CONTRASTIVE_OBJECTIVES)
    for name, o in OBJECTIVES.items():
        assert re.search(r"\(\w[^)]* (19|20)\d\d\b", o.loss_fn.__doc__ or ""), name  # cites its paper: (Author year
    assert {n for n, o in OBJECTIVES.items() if not o.needs_ref} == {"simpo", "cpo", "orpo", "infonce"}
