"""RL advantage estimators and losses against hand-worked numbers."""

import math

import pytest
import torch

from prefcli.algos.rlhf.advantages import (
    ALGORITHMS,
    AdvantageInputs,
    algorithm_key,
    discounted_returns,
    gae,
    group_normalised,
    kl_per_token,
    masked_whiten,
    rloo_advantages,
    token_rewards,
)
from prefcli.algos.rlhf.loss import NORMALISERS as AGGREGATIONS
from prefcli.algos.rlhf.loss import clipped_value_loss, ppo_clip_loss
from prefcli.recipe.commands import RLHFSection


def t(x):
    return torch.tensor(x, dtype=torch.float64)


def test_gae_by_hand():
    # gamma 1, lambda 0.5: delta_2 = 1 - 0.3 = 0.7; delta_1 = 0.3 - 0.4; A_1 = -0.1 + 0.5*0.7 = 0.25;
    # A_0 = (0.4 - 0.5) + 0.5*0.25 = 0.025
    adv, ret = gae(t([[0, 0, 1.0]]), t([[0.5, 0.4, 0.3]]), t([[1, 1, 1.0]]), gamma=1.0, lam=0.5)
    assert adv.tolist()[0] == pytest.approx([0.025, 0.25, 0.7])
    assert ret.tolist()[0] == pytest.approx([0.525, 0.65, 1.0])
    # a completion of 2 tokens: the value after its last token is 0, the padded slot gets nothing
    adv, ret = gae(t([[0, 1.0, 0]]), t([[0.5, 0.4, 9.0]]), t([[1, 1, 0.0]]), gamma=1.0, lam=0.5)
    assert adv.tolist()[0] == pytest.approx([0.2, 0.6, 0.0])
    assert ret.tolist()[0] == pytest.approx([0.7, 1.0, 0.0])
    # gamma discounts the bootstrap: delta_0 = 0 + 0.9*0.4 - 0.5
    adv, _ = gae(t([[0, 1.0]]), t([[0.5, 0.4]]), t([[1, 1.0]]), gamma=0.9, lam=0.0)
    assert adv.tolist()[0] == pytest.approx([0.9 * 0.4 - 0.5, 0.6])


def test_rloo_leave_one_out():
    # returns 1,2,3,6 (one prompt, k=4): baselines (12 - R_i)/3
    assert rloo_advantages(t([1, 2, 3, 6.0]), 4).tolist() == pytest.approx([1 - 11 / 3, 2 - 10 / 3, 0.0, 4.0])
    # two prompts are independent
    a = rloo_advantages(t([1, 3, 10, 20.0]), 2).tolist()
    assert a == pytest.approx([-2, 2, -10, 10])


def test_grpo_and_dr_grpo_advantages():
    std = math.sqrt((4 + 1 + 0 + 9) / 3)  # unbiased std of 1,2,3,6
    assert group_normalised(t([1, 2, 3, 6.0]), 4, scale=True).tolist() == pytest.approx(
        [x / (std + 1e-4) for x in (-2, -1, 0, 3)]
    )
    assert group_normalised(t([1, 2, 3, 6.0]), 4, scale=False).tolist() == [-2, -1, 0, 3]
    assert group_normalised(t([5, 5, 1, 2.0]), 2, scale=True).tolist()[:2] == [0.0, 0.0]  # zero variance: no NaN


def test_reinforce_pp_returns_and_token_rewards():
    r = token_rewards(t([1.0]), t([[1.0, 1.0, 1.0]]), t([[1, 1, 1.0]]), beta=0.1)
    assert r.tolist()[0] == pytest.approx([-0.1, -0.1, 0.9])
    assert discounted_returns(r, t([[1, 1, 1.0]]), 1.0).tolist()[0] == pytest.approx([0.7, 0.8, 0.9])
    r2 = token_rewards(t([2.0]), t([[0.5, 0.5, 0.5]]), t([[1, 1, 0.0]]), beta=1.0)  # score lands on the last real token
    assert r2.tolist()[0] == pytest.approx([-0.5, 1.5, 0.0])


def test_whitening_ignores_padding():
    w = masked_whiten(t([[1, 2, 3, 100.0]]), t([[1, 1, 1, 0.0]]))
    assert w.tolist()[0][:3] == pytest.approx([-1.0, 0.0, 1.0], abs=1e-6) and w[0, 3] == 0


def test_ppo_clip_by_hand():
    lp, old = t([math.log(1.5)] * 2 + [math.log(0.5)] * 2), t([0.0] * 4)
    loss, clipped = ppo_clip_loss(lp, old, t([1.0, -1.0, 1.0, -1.0]), 0.2, 0.2)
    assert loss.tolist() == pytest.approx([-1.2, 1.5, -0.5, 0.8])
    assert clipped.tolist() == [True, False, False, True]
    loss_hi, _ = ppo_clip_loss(lp[:1], old[:1], t([1.0]), 0.2, 0.28)  # clip-higher lets the ratio rise to 1.28
    assert loss_hi.tolist() == pytest.approx([-1.28])


def test_value_loss_and_kl_estimators():
    assert clipped_value_loss(t([1.0]), t([0.5]), t([0.0]), 0.2).tolist() == pytest.approx([0.5])
    assert clipped_value_loss(t([0.6]), t([0.5]), t([1.0]), 0.2).tolist() == pytest.approx([0.5 * 0.4**2])
    lp, ref = t([0.1, -0.2]), t([0.0, 0.0])
    assert kl_per_token(lp, ref, "k1").tolist() == pytest.approx([0.1, -0.2])
    assert kl_per_token(lp, ref, "k2").tolist() == pytest.approx([0.005, 0.02])
    assert kl_per_token(lp, ref, "k3").tolist() == pytest.approx([math.exp(-0.1) - 1 + 0.1, math.exp(0.2) - 1 - 0.2])


def test_aggregations():
    per_tok = t([[1, 2, 0.0], [3, 0, 0.0]])
    mask = t([[1, 1, 0.0], [1, 0, 0.0]])
    s, n = AGGREGATIONS["token_mean"](per_tok, mask, 3)
    assert (s.item(), n.item()) == (6.0, 3.0)
    s, n = AGGREGATIONS["sequence_mean"](per_tok, mask, 3)
    assert (s.item(), n.item()) == (1.5 + 3.0, 2)
    s, n = AGGREGATIONS["constant"](per_tok, mask, 3)
    assert (s.item(), n.item()) == (6.0, 6.0)


def test_registry_wires_each_algorithm():
    scores = t([1.0, 0.0, 2.0, 2.0])
    kl = t([[0.1, 0.1], [0.2, 0.0], [0.0, 0.0], [0.0, 0.0]])
    mask = t([[1, 1], [1, 0], [1, 1], [1, 1.0]])
    cfg = RLHFSection(algorithm="rloo", num_generations=2)
    x = AdvantageInputs(scores, kl, mask, None, 2, 0.5, cfg, None)
    adv, _ = ALGORITHMS["rloo"].advantages(x)
    # R = s - 0.5 * sum kl = [0.9, -0.1, 2, 2]: A = [1, -1, 0, 0] on every real token
    assert torch.allclose(adv, t([[1, 1], [-1, 0], [0, 0], [0, 0]]))
    dr = RLHFSection(grpo_loss="dr_grpo")
    adv, _ = ALGORITHMS[algorithm_key(dr)].advantages(AdvantageInputs(scores, kl, mask, None, 2, 0.5, dr, None))
    assert torch.allclose(adv, t([[0.5, 0.5], [-0.5, 0], [0, 0], [0, 0]]))
    assert ALGORITHMS["grpo"].kl_in_reward is False and ALGORITHMS["ppo"].needs_value


def test_reinforce_pp_whitens_only_when_asked():
    scores = t([1.0, 0.0])
    mask = t([[1, 1], [1, 0]])
    x = AdvantageInputs(scores, torch.zeros_like(mask), mask, None, 2, 0.0, RLHFSection(whiten_advantages=False), None)
    adv, _ = ALGORITHMS["reinforce_pp"].advantages(x)
    assert torch.allclose(adv, t([[1, 1], [0, 0]]))  # the returns themselves (gamma 1, no KL)
    x.cfg = RLHFSection()
    adv, _ = ALGORITHMS["reinforce_pp"].advantages(x)
    assert torch.allclose(adv, masked_whiten(t([[1, 1], [0, 0]]), mask))


def test_assembled_ppo_loss_on_a_fixed_buffer():
    """policy_loss as PPO uses it (token_mean, value loss), worked by hand. ratio = [1.25, 0.5], A = [1, -1]:
    -A rho = [-1.25, 0.5], -A clip(rho, 0.8, 1.2) = [-1.2, 0.8] -> max [-1.2, 0.8] (both clipped), sum -0.4.
    Value: V [0.5, 0], V_old [0.2, 0.1], R [1, -0.5], eps 0.2: clipped V [0.4, 0]; 1/2 max((V-R)^2,
    (Vc-R)^2) = [0.18, 0.125], sum 0.305, times c_v 0.1. Total -0.4 + 0.0305."""
    from prefcli.algos.rlhf.loss import LossParams, policy_loss

    p = LossParams(eps_low=0.2, eps_high=0.2, beta=0.0, kl_in_loss=False, normaliser="token_mean",
                   max_new_tokens=2, vf_coef=0.1, value_clip_eps=0.2)  # fmt: skip
    loss, m = policy_loss(
        torch.log(t([[0.5, 0.25]])), torch.log(t([[0.4, 0.5]])), t([[1.0, -1.0]]), t([[1.0, 1.0]]), p,
        values=t([[0.5, 0.0]]), old_values=t([[0.2, 0.1]]), returns=t([[1.0, -0.5]]),
    )  # fmt: skip
    assert loss.item() == pytest.approx(-0.4 + 0.1 * 0.305)
    assert m["policy/clipfrac"][0].item() == 2 and m["value/loss"][0].item() == pytest.approx(0.305)
    assert "kl/k3" not in m


def test_assembled_grpo_loss_on_a_fixed_buffer():
    """policy_loss as GRPO uses it (sequence_mean, beta k3 in the loss), worked by hand. ratio 1, so
    pg = -A; log pi - log pi_ref = d = [[0, ln 2], [-ln 2, .]], k3 = e^-d + d - 1 = [[0, 0.19315], [0.30685, .]].
    Rows: (-0.5 + 0) and (-0.5 + 0.1 * 0.19315) averaged = -0.4903425; the second row has one token:
    0.5 + 0.1 * 0.30685. Summed over the 2 completions (the loop divides by them)."""
    from prefcli.algos.rlhf.loss import LossParams, policy_loss

    p = LossParams(eps_low=0.2, eps_high=0.2, beta=0.1, kl_in_loss=True, normaliser="sequence_mean",
                   max_new_tokens=2, vf_coef=0.1, value_clip_eps=0.2)  # fmt: skip
    logp = t([[-1.0, -2.0], [-1.5, -3.0]])
    d = t([[0.0, math.log(2)], [-math.log(2), 0.0]])
    mask = t([[1.0, 1.0], [1.0, 0.0]])
    loss, m = policy_loss(logp, logp.clone(), t([[0.5, 0.5], [-0.5, -0.5]]), mask, p, ref_logp=logp - d)
    k3 = [0.5 + math.log(2) - 1, 2 - math.log(2) - 1]
    assert loss.item() == pytest.approx((-0.5 + (-0.5 + 0.1 * k3[0])) / 2 + (0.5 + 0.1 * k3[1]))
    assert m["kl/k3"][0].item() == pytest.approx(k3[0] + k3[1]) and m["kl/k3"][1].item() == 3
