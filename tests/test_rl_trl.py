"""prefcli's RL losses against TRL 1.16's code on identical tensors: GRPOTrainer's loss types (grpo, dr_grpo,
dapo with clip-higher, cispo), its sequence-level importance sampling (GSPO), its importance-sampling
correction modes, and the experimental OnlineDPOTrainer's loss.

GRPOTrainer computes its loss in one method, `GRPOTrainer._compute_loss(self, model, inputs)`
(trl/trainer/grpo_trainer.py, lines 3020-3290 in TRL 1.16): the tests run that method itself on a minimal
stand-in for the trainer whose `_get_per_token_logps_and_entropies` returns given log-probs, so TRL's own
code computes the ratio, clipping, KL and normaliser. The importance-sampling ratio is computed inline in
`_generate_and_score_completions` (lines 2660-2707) and the online DPO loss inline in
`OnlineDPOTrainer.training_step` (trl/experimental/online_dpo/online_dpo_trainer.py, lines 1222-1256); both
methods also generate text, so the tests reproduce those lines verbatim (cited at each) on the tensors.
"""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from prefcli.algos.contrastive import OBJECTIVES, Hyper, PairLogps, pair_objective
from prefcli.algos.rlhf.correction import importance_weights
from prefcli.algos.rlhf.loss import NORMALISERS, LossParams, policy_loss
from prefcli.algos.rlhf.online import best_worst_pairs

trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")

B, T = 6, 5


class _Accelerator:
    num_processes = 1
    sync_gradients = True

    @staticmethod
    def reduce(t, reduction="sum"):
        return t

    @staticmethod
    def gather(t):
        return t

    gather_for_metrics = gather


class _FakeGRPO:
    """The attributes GRPOTrainer._compute_loss reads, for one process, no gradient accumulation, no vLLM
    unless asked, no entropy masking or bonus."""

    def __init__(self, logp, loss_type, eps, eps_high, beta, level="token", is_correction=False):
        self._logp = logp
        self.loss_type = loss_type
        self.epsilon_low, self.epsilon_high = eps, eps_high
        self.beta = beta
        self.importance_sampling_level = level
        self.top_entropy_quantile = 1.0
        self.aux_loss_enabled = False
        self.off_policy_mask_threshold = None
        self.use_vllm = is_correction
        self.vllm_importance_sampling_correction = is_correction
        self.model = SimpleNamespace(training=True)
        self.current_gradient_accumulation_steps = 1
        self.max_completion_length = T
        self.accelerator = _Accelerator()
        self._entropy_bonus_enabled = False
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        # use_bias_correction_kl (TRL's default True) multiplies the KL by the differentiable ratio
        # (DeepSeek-V3.2); prefcli's KL term is Shao et al.'s beta * k3 without it
        self.args = SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1)

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, **kw):
        return self._logp, torch.zeros_like(self._logp), None


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, T)
    mask[1, 3:] = 0
    mask[4, 1:] = 0
    mask[5, 4:] = 0
    old = -torch.rand(B, T, generator=g, dtype=torch.float64).float() * 2 - 0.1
    # ratios spread over [0.5, 1.6] so that both clip bounds bite
    logp = (old + torch.empty(B, T).uniform_(-0.7, 0.5, generator=g)).requires_grad_(True)
    ref = old + torch.empty(B, T).uniform_(-0.3, 0.3, generator=g)
    adv = torch.tensor([1.2, -0.7, 0.3, -1.5, 0.9, -0.2])
    sampler = old + torch.empty(B, T).uniform_(-0.9, 0.9, generator=g)
    return logp, old, ref, adv, mask, sampler


def _trl_loss(fake, logp, old, ref, adv, mask, is_ratio=None):
    inputs = {
        "prompt_ids": torch.zeros(B, 2, dtype=torch.long),
        "prompt_mask": torch.ones(B, 2, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long),
        "completion_mask": mask.long(),
        "advantages": adv,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
        "num_items_in_batch": mask.sum(),
    }
    if is_ratio is not None:
        inputs["importance_sampling_ratio"] = is_ratio
    return trl_grpo.GRPOTrainer._compute_loss(fake, None, inputs)


def _ours(logp, old, ref, adv, mask, normaliser, eps, eps_high, beta, policy="clip", sampler=None, **is_kw):
    p = LossParams(
        eps_low=eps,
        eps_high=eps_high,
        beta=beta,
        kl_in_loss=True,
        normaliser=normaliser,
        max_new_tokens=T,
        vf_coef=0.0,
        value_clip_eps=0.2,
        policy_loss=policy,
        **is_kw,
    )
    s, _ = policy_loss(logp, old, adv[:, None] * mask, mask, p, ref_logp=ref, sampler_logp=sampler)
    _, units = NORMALISERS[normaliser](mask, mask, T)
    return s / units


def _same(ours, theirs, logp):
    (g1,) = torch.autograd.grad(ours, logp, retain_graph=True)
    (g2,) = torch.autograd.grad(theirs, logp, retain_graph=True)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6, abs=1e-7)
    assert torch.allclose(g1, g2, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize(
    "loss_type,normaliser,eps_high",
    [("grpo", "sequence_mean", 0.2), ("dr_grpo", "constant", 0.2), ("dapo", "token_mean", 0.28)],
)
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_loss_types_and_clip_higher_equal_trl(loss_type, normaliser, eps_high, beta):
    logp, old, ref, adv, mask, _ = _tensors()
    theirs = _trl_loss(_FakeGRPO(logp, loss_type, 0.2, eps_high, beta), logp, old, ref, adv, mask)
    ours = _ours(logp, old, ref, adv, mask, normaliser, 0.2, eps_high, beta)
    _same(ours, theirs, logp)


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_gspo_equals_trl_sequence_level_importance_sampling(beta):
    """GSPO = TRL's importance_sampling_level='sequence' with loss_type='grpo' (the paper's setup), at the
    paper's clip range and at a wide one."""
    for eps, eps_high in ((3e-4, 4e-4), (0.05, 0.1)):
        logp, old, ref, adv, mask, _ = _tensors(1)
        fake = _FakeGRPO(logp, "grpo", eps, eps_high, beta, level="sequence")
        theirs = _trl_loss(fake, logp, old, ref, adv, mask)
        ours = _ours(logp, old, ref, adv, mask, "sequence_mean", eps, eps_high, beta, policy="gspo")
        _same(ours, theirs, logp)


@pytest.mark.parametrize("cap", [5.0, 1.3])
def test_cispo_equals_trl(cap):
    """TRL's cispo clamps the ratio at epsilon_high (an absolute cap, no floor): prefcli's clip_low 1.0 (floor
    0) and clip_high = cap - 1."""
    logp, old, ref, adv, mask, _ = _tensors(2)
    theirs = _trl_loss(_FakeGRPO(logp, "cispo", 0.2, cap, 0.04), logp, old, ref, adv, mask)
    ours = _ours(logp, old, ref, adv, mask, "token_mean", 1.0, cap - 1.0, 0.04, policy="cispo")
    _same(ours, theirs, logp)


def _trl_is_ratio(old_per_token_logps, sampling_per_token_logps, completion_mask, mode, clip_min, clip_max):
    """trl/trainer/grpo_trainer.py lines 2660-2707 (TRL 1.16), verbatim but for `self.` attributes."""
    mask = completion_mask
    per_token_logps_diff = (old_per_token_logps - sampling_per_token_logps) * mask
    per_token_logps_diff = torch.nan_to_num(per_token_logps_diff, nan=0.0)
    sequence_level_is = mode in ["sequence_mask", "sequence_truncate"]
    if sequence_level_is:
        per_sequence_logps_diff = per_token_logps_diff.sum(dim=-1, keepdim=True)
        logps_diff = per_sequence_logps_diff
    else:
        logps_diff = per_token_logps_diff
    ratio = torch.exp(logps_diff)
    if mode in ["sequence_truncate", "token_truncate"]:
        ratio = torch.clamp(ratio, min=clip_min, max=clip_max)
    elif mode in ["sequence_mask", "token_mask"]:
        min_val = clip_min if clip_min is not None else -math.inf
        max_val = clip_max if clip_max is not None else math.inf
        invalid_mis_mask = (ratio < min_val) | (ratio > max_val)
        ratio = ratio.masked_fill(invalid_mis_mask, value=0.0)
    return ratio


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
@pytest.mark.parametrize("floor", [None, 0.5])
def test_importance_sampling_correction_equals_trl(mode, floor):
    logp, old, ref, adv, mask, sampler = _tensors(3)
    cap = 1.5 if mode.startswith("token") else 2.0
    want = _trl_is_ratio(old, sampler, mask, mode, floor, cap)
    got, metrics = importance_weights(old, sampler, mask, mode, cap, floor)
    assert got.shape == want.shape and torch.allclose(got, want, rtol=1e-6)
    if mode.startswith("token"):  # the cap and the floor both bite on these tensors
        assert 0 < metrics["mismatch/is_clipfrac"][0] < mask.sum()
    # and the whole loss with the weights, through TRL's _compute_loss (use_vllm and its correction on)
    fake = _FakeGRPO(logp, "dapo", 0.2, 0.28, 0.04, is_correction=True)
    theirs = _trl_loss(fake, logp, old, ref, adv, mask, is_ratio=want)
    ours = _ours(
        logp, old, ref, adv, mask, "token_mean", 0.2, 0.28, 0.04, sampler=sampler,
        is_correction=mode, is_cap=cap, is_floor=floor,
    )  # fmt: skip
    _same(ours, theirs, logp)


def _trl_online_dpo(logprobs, ref_logprobs, completion_mask, rewards, beta, loss_type):
    """trl/experimental/online_dpo/online_dpo_trainer.py lines 1222-1256 (TRL 1.16): chosen/rejected from the
    rewards of two completions per prompt (the first half of the batch against the second), then the loss."""
    batch_size = logprobs.shape[0] // 2
    device = logprobs.device
    first_half, second_half = rewards.split(batch_size)
    mask = first_half >= second_half
    batch_range = torch.arange(batch_size, device=device)
    chosen_indices = batch_range + (~mask * batch_size)
    rejected_indices = batch_range + (mask * batch_size)
    cr_indices = torch.cat((chosen_indices, rejected_indices), dim=0)
    cr_logprobs = logprobs[cr_indices]
    cr_ref_logprobs = ref_logprobs[cr_indices]
    padding_mask = ~completion_mask.bool()
    cr_padding_mask = padding_mask[cr_indices]
    cr_logprobs_sum = (cr_logprobs * ~cr_padding_mask).sum(1)
    cr_ref_logprobs_sum = (cr_ref_logprobs * ~cr_padding_mask).sum(1)
    chosen_logprobs_sum, rejected_logprobs_sum = torch.split(cr_logprobs_sum, batch_size)
    chosen_ref_logprobs_sum, rejected_ref_logprobs_sum = torch.split(cr_ref_logprobs_sum, batch_size)
    pi_logratios = chosen_logprobs_sum - rejected_logprobs_sum
    ref_logratios = chosen_ref_logprobs_sum - rejected_ref_logprobs_sum
    logits = pi_logratios - ref_logratios
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * logits)
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    return losses.mean()


@pytest.mark.parametrize("objective,loss_type", [("dpo", "sigmoid"), ("ipo", "ipo")])
def test_online_dpo_equals_trl(objective, loss_type):
    """Two completions per prompt, no ties: prefcli's pairs (best vs worst of each prompt's group) and the
    contrastive registry's loss on summed log-probs give TRL's loss and gradient. (TRL lays out the two
    completions of a prompt as the two halves of the batch, prefcli as consecutive rows.)"""
    logp, _, ref, _, mask, _ = _tensors(4)
    rewards = torch.tensor([0.3, -0.2, 0.9, 0.1, 0.5, -0.6])  # [first completions | second completions]
    theirs = _trl_online_dpo(logp, ref, mask, rewards, 0.1, loss_type)
    # prefcli: rows of a prompt consecutive: prompt i has rows (i, i + 3) of TRL's layout
    order = torch.tensor([0, 3, 1, 4, 2, 5])
    c, r, valid = best_worst_pairs(rewards[order], 2)
    assert valid.all()
    seq = (logp[order] * mask[order]).sum(1)
    ref_seq = (ref[order] * mask[order]).sum(1)
    lp = PairLogps(chosen=seq[c], rejected=seq[r], ref_chosen=ref_seq[c], ref_rejected=ref_seq[r])
    loss_sum, _ = pair_objective(OBJECTIVES[objective], Hyper(beta=0.1), lp, seq[c], seq[r])
    ours = loss_sum / c.shape[0]
    _same(ours, theirs, logp)
