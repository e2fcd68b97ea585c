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


def test_multi_turn_credit_runs_over_the_policy_tokens_across_turns():
    """An episode [policy, policy, env, env, policy]: the environment's tokens are not steps of the recursion.
    GAE (gamma 1, lambda 0.5) over the three policy tokens with rewards (0, 0.2, 1) and values (0.5, 0.4, 0.3)
    (the turn reward 0.2 at the first turn's last token): delta_4 = 1 - 0.3 = 0.7; delta_1 = 0.2 + 0.3 - 0.4 =
    0.1, A_1 = 0.1 + 0.5*0.7 = 0.45; delta_0 = 0.4 - 0.5 = -0.1, A_0 = -0.1 + 0.5*0.45 = 0.125."""
    mask = t([[1, 1, 0, 0, 1.0]])
    step = t([[0, 0.2, 0, 0, 0]])  # the environment's reward after turn 1
    r = token_rewards(t([1.2]), t([[0.0] * 5]), mask, beta=0.1, step_rewards=step)
    assert r.tolist()[0] == pytest.approx([0, 0.2, 0, 0, 1.0])  # the rest of the score (1.2 - 0.2) at the end
    adv, ret = gae(r, t([[0.5, 0.4, 9.0, 9.0, 0.3]]), mask, gamma=1.0, lam=0.5)
    assert adv.tolist()[0] == pytest.approx([0.125, 0.45, 0.0, 0.0, 0.7])
    assert ret.tolist()[0] == pytest.approx([0.625, 0.85, 0.0, 0.0, 1.0])
    # the same numbers as the packed single-turn sequence
    adv1, _ = gae(t([[0, 0.2, 1.0]]), t([[0.5, 0.4, 0.3]]), t([[1, 1, 1.0]]), gamma=1.0, lam=0.5)
    assert adv1.tolist()[0] == pytest.approx([0.125, 0.45, 0.7])
    # discounted returns (gamma 0.5) over policy tokens: G_4 = 1, G_1 = 0.2 + 0.5, G_0 = 0.35
    assert discounted_returns(r, mask, 0.5).tolist()[0] == pytest.approx([0.35, 0.7, 0, 0, 1.0])
    # the KL penalty lands on policy tokens only, and the score on the last policy token, not on padding
    r2 = token_rewards(t([2.0]), t([[0.5] * 6]), t([[1, 0, 1, 0, 0, 0.0]]), beta=1.0)
    assert r2.tolist()[0] == pytest.approx([-0.5, 0, 1.5, 0, 0, 0])


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


def _params(**kw):
    from prefcli.algos.rlhf.loss import LossParams

    base = dict(eps_low=0.2, eps_high=0.2, beta=0.0, kl_in_loss=False, normaliser="token_mean", max_new_tokens=2,
                vf_coef=0.0, value_clip_eps=0.2)  # fmt: skip
    return LossParams(**{**base, **kw})


def test_clip_higher_lets_a_positive_advantage_push_further():
    """DAPO's decoupled bounds: ratio 1.25 with A = 1 is clipped at 1.2 by eps_high 0.2 (no gradient), kept by
    0.28 (gradient A rho = 1.25 on log pi). The split clip fractions count the high side."""
    from prefcli.algos.rlhf.loss import policy_loss

    logp = torch.log(t([[0.5]])).requires_grad_(True)
    old, adv, mask = torch.log(t([[0.4]])), t([[1.0]]), t([[1.0]])
    sym, m = policy_loss(logp, old, adv, mask, _params())
    (g_sym,) = torch.autograd.grad(sym, logp)
    hi, m_hi = policy_loss(logp, old, adv, mask, _params(eps_high=0.28))
    (g_hi,) = torch.autograd.grad(hi, logp)
    assert sym.item() == pytest.approx(-1.2) and g_sym.item() == 0.0 and m["policy/clipfrac_high"][0] == 1
    assert hi.item() == pytest.approx(-1.25) and g_hi.item() == pytest.approx(-1.25)
    assert m_hi["policy/clipfrac_high"][0] == 0


def test_gspo_by_hand():
    """Two completions, log-ratios [ln 1.21, 0] (2 tokens) and [ln 0.64] (1 token): s = sqrt(1.21) = 1.1 and
    0.64. A = [1, -1], eps 0.05/0.05: -A s = [-1.1, 0.64], -A clip(s, 0.95, 1.05) = [-1.05, 0.95] -> max
    [-1.05, 0.95], both clipped; on every token of the completion, so sequence_mean gives -1.05 + 0.95.
    With eps_high 0.2 the first keeps -1.1 and its gradient d(-A s)/d log pi_t = -A s / |y| = -0.55."""
    from prefcli.algos.rlhf.loss import policy_loss

    old = t([[-1.0, -2.0], [-1.5, 0.0]])
    logp = (old + t([[math.log(1.21), 0.0], [math.log(0.64), 0.0]])).requires_grad_(True)
    mask, adv = t([[1.0, 1.0], [1.0, 0.0]]), t([[1.0, 1.0], [-1.0, -1.0]])
    p = _params(eps_low=0.05, eps_high=0.05, normaliser="sequence_mean", policy_loss="gspo")
    loss, m = policy_loss(logp, old, adv, mask, p)
    assert loss.item() == pytest.approx(-1.05 + 0.95) and m["policy/clipfrac"] == (2, 2)
    loss, m = policy_loss(logp, old, adv, mask, _params(eps_low=0.05, eps_high=0.2, normaliser="sequence_mean",
                                                        policy_loss="gspo"))  # fmt: skip
    (g,) = torch.autograd.grad(loss, logp)
    assert loss.item() == pytest.approx(-1.1 + 0.95) and m["policy/clipfrac"][0] == 1
    assert g.tolist() == [pytest.approx([-0.55, -0.55]), [0.0, 0.0]]


def test_cispo_by_hand():
    """rho = [2, 0.5], A = [1, -1], weight clip(rho, 1 - 1, 1 + 0.5) = [1.5, 0.5]: loss -w A log pi =
    -1.5 * log(0.5) + 0.5 * log(0.25); gradient -w A on log pi: [-1.5, 0.5] (no token loses its gradient)."""
    from prefcli.algos.rlhf.loss import policy_loss

    logp = torch.log(t([[0.5, 0.25]])).requires_grad_(True)
    old = torch.log(t([[0.25, 0.5]]))
    loss, m = policy_loss(logp, old, t([[1.0, -1.0]]), t([[1.0, 1.0]]), _params(eps_low=1.0, eps_high=0.5,
                                                                            policy_loss="cispo"))  # fmt: skip
    (g,) = torch.autograd.grad(loss, logp)
    assert loss.item() == pytest.approx(-1.5 * math.log(0.5) + 0.5 * math.log(0.25))
    assert g.tolist()[0] == pytest.approx([-1.5, 0.5]) and m["policy/clipfrac"][0] == 1


def test_truncated_importance_weights_by_hand():
    """log pi_old - log pi_sampler = [[ln 3, ln 0.5], [ln 1.5, 0]] (second row: 1 token). token_truncate at
    C = 2: [[2, 0.5], [1.5, .]]; token_mask: [[0, 0.5], [1.5, .]]; sequence: prod = 1.5 (both rows), under
    the cap; with floor 0.6 and cap 1.2 sequence_mask zeroes both, sequence_truncate gives 1.2."""
    from prefcli.algos.rlhf.correction import importance_weights, mismatch_stats

    sampler = t([[-1.0, -1.0], [-2.0, -7.0]])
    old = sampler + t([[math.log(3), math.log(0.5)], [math.log(1.5), 5.0]])
    mask = t([[1.0, 1.0], [1.0, 0.0]])
    w, m = importance_weights(old, sampler, mask, "token_truncate", 2.0)
    assert (w * mask).tolist() == [pytest.approx([2.0, 0.5]), pytest.approx([1.5, 0.0])]
    assert m["mismatch/is_clipfrac"] == (1, 3) and m["mismatch/is_weight"][0].item() == pytest.approx(4.0)
    w, _ = importance_weights(old, sampler, mask, "token_mask", 2.0)
    assert (w * mask).tolist() == [pytest.approx([0.0, 0.5]), pytest.approx([1.5, 0.0])]
    w, _ = importance_weights(old, sampler, mask, "sequence_truncate", 2.0)
    assert w.shape == (2, 1) and w.flatten().tolist() == pytest.approx([1.5, 1.5])
    assert importance_weights(old, sampler, mask, "sequence_mask", 1.2, 0.6)[0].flatten().tolist() == [0.0, 0.0]
    assert importance_weights(old, sampler, mask, "sequence_truncate", 1.2, 0.6)[0].flatten().tolist() == (
        pytest.approx([1.2, 1.2])
    )
    stats, mx = mismatch_stats(old, sampler, mask)
    d = [math.log(3), math.log(0.5), math.log(1.5)]
    assert stats["mismatch/abs_mean"][0].item() == pytest.approx(sum(abs(x) for x in d))
    assert mx.item() == pytest.approx(math.log(3))  # the masked 5.0 does not count
    assert stats["mismatch/kl"][0].item() == pytest.approx(sum(math.exp(x) - 1 - x for x in d))


def test_overlong_penalty_dapo_eq13():
    """L_max 16, L_cache 4: 0 up to 12 tokens, then (12 - |y|) / 4: -0.25 at 13, -1 at 16."""
    from prefcli.algos.rlhf.advantages import overlong_penalty

    got = overlong_penalty(torch.tensor([5, 12, 13, 14, 16]), 16, 4, 1.0).tolist()
    assert got == pytest.approx([0.0, 0.0, -0.25, -0.5, -1.0])
    assert overlong_penalty(torch.tensor([14]), 16, 4, 0.5).tolist() == pytest.approx([-0.25])


def test_dynamic_sampling_keeps_untied_groups_first():
    from prefcli.algos.rlhf.advantages import tied_groups
    from prefcli.algos.rlhf.sampling import fill_groups

    tied = tied_groups(t([1, 1, 0, 1, 0.5, 0.5, 0, 0, 1, 0]), 2)
    assert tied.tolist() == [True, False, True, True, False]
    assert fill_groups(tied, 2).tolist() == [1, 4]  # enough untied groups: only those, in drawing order
    assert fill_groups(tied, 3).tolist() == [0, 1, 4]  # short: the first tied group fills in


def test_rounds_of_episodes_of_other_widths_concatenate_padded():
    """Dynamic sampling (and online_dpo's extra rounds) join sampling rounds whose episodes have other lengths:
    prompts pad on the left, the rest on the right, ids with the pad id and masks, log-probs, rewards with 0."""
    from prefcli.algos.rlhf.env_rollout import EpisodeRollout
    from prefcli.algos.rlhf.sampling import concat_rollouts

    a = EpisodeRollout(
        torch.tensor([[5, 6]]), torch.tensor([[1, 1]]), torch.tensor([[7, 8]]), torch.tensor([[1, 0]]),
        torch.tensor([True]), torch.tensor([[-0.5, 0.0]]),
        completion_attention=torch.tensor([[1, 1]]), step_rewards=torch.tensor([[0.0, 1.0]]),
    )  # fmt: skip
    b = EpisodeRollout(
        torch.tensor([[4, 5, 6]]), torch.tensor([[1, 1, 1]]), torch.tensor([[7, 8, 9, 3]]),
        torch.tensor([[1, 0, 1, 1]]), torch.tensor([False]), torch.tensor([[-0.1, 0.0, -0.2, -0.3]]),
        completion_attention=torch.tensor([[1, 1, 1, 1]]), step_rewards=torch.tensor([[0.0, 0.0, 0.0, 0.5]]),
    )  # fmt: skip
    r = concat_rollouts([a, b], pad_id=99)
    assert isinstance(r, EpisodeRollout)
    assert r.prompt_ids.tolist() == [[99, 5, 6], [4, 5, 6]] and r.prompt_mask.tolist() == [[0, 1, 1], [1, 1, 1]]
    assert r.completion_ids.tolist() == [[7, 8, 99, 99], [7, 8, 9, 3]]
    assert r.completion_mask.tolist() == [[1, 0, 0, 0], [1, 0, 1, 1]]
    assert r.completion_attention.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert torch.equal(r.logprobs, torch.tensor([[-0.5, 0.0, 0.0, 0.0], [-0.1, 0.0, -0.2, -0.3]]))
    assert r.step_rewards.tolist() == [[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.5]]
    assert r.finished.tolist() == [True, False] and r.lengths.tolist() == [1, 3]


def test_online_pairs_best_against_worst():
    from prefcli.algos.rlhf.online import best_worst_pairs

    c, r, valid = best_worst_pairs(t([0.1, 0.9, 0.5, 0.9, 0.2, 0.2, 0.2, 0.2]), 4)
    assert c.tolist() == [1, 4] and r.tolist() == [0, 4] and valid.tolist() == [True, False]
