"""Online preference learning, `rlhf.algorithm: online_dpo`: the policy samples k >= 2 completions per prompt
(the RL sampler), any reward source ranks them, and the best and the worst of each prompt become a
preference pair for an objective of the contrastive registry (`prefcli.algos.contrastive.OBJECTIVES`:
dpo = online DPO, Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback", arXiv
2402.04792; ipo = online IPO, Calandriello et al. 2024; ... ). The loss is that registry's function on the
pair's sequence log-probs, nothing copied:

    h = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)],   dpo: -log sigma(beta h)

y_w = the completion with the highest score, y_l the lowest; a prompt whose completions all score the same
gives no pair (weight 0; `reward/zero_var_groups` counts them). With k = 2 this is TRL's OnlineDPOTrainer
(which also keeps tied pairs, the first completion as chosen). Log-probs are the model's own (temperature
1), as in `prefcli contrastive`; the reference is the frozen start.
"""

from __future__ import annotations

import torch

from ...engine.pairs import sequence_logps
from ..contrastive import OBJECTIVES, Hyper, PairLogps, pair_objective


def best_worst_pairs(
    scores: torch.Tensor, k: int, tol: float = 1e-8
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For rows grouped k per prompt: (chosen row, rejected row, has a pair) per group, the chosen the first
    highest score, the rejected the first lowest; a group whose scores all agree (within tol) has no pair."""
    g = scores.view(-1, k)
    base = torch.arange(g.shape[0], device=scores.device) * k
    valid = (g.max(1).values - g.min(1).values) > tol
    return base + g.argmax(1), base + g.argmin(1), valid


class OnlinePreferenceLoss:
    """The update of online_dpo: the contrastive objective on a minibatch of pairs (chosen rows first,
    then their rejected rows)."""

    def __init__(self, section):
        self.obj = OBJECTIVES[section.objective]
        self.hp = Hyper(
            beta=section.beta if section.beta is not None else self.obj.default_beta,
            label_smoothing=(
                section.label_smoothing if section.label_smoothing is not None else self.obj.default_label_smoothing
            ),
            simpo_gamma=section.simpo_gamma,
            cpo_alpha=section.cpo_alpha,
        )
        self.reduce = self.obj.reduce if section.reduce == "auto" else section.reduce
        self.needs_ref = self.obj.needs_ref

    def sequence(self, logp: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(reduced sequence log-prob, summed log-prob, token count) per row from token log-probs."""
        s, n = sequence_logps(logp, targets, "sum")
        return (s / n.clamp_min(1.0) if self.reduce == "mean" else s), s, n

    def __call__(self, module, mb) -> tuple[torch.Tensor, dict]:
        logp, ent, _ = module(
            mb["input_ids"], mb["attention_mask"], mb["position_ids"], mb["targets"], int(mb["start"]), 1.0
        )
        seq, s, n = self.sequence(logp, mb["targets"])
        P = seq.shape[0] // 2
        lp = PairLogps(chosen=seq[:P], rejected=seq[P:], chosen_nll=-s[:P] / n[:P].clamp_min(1.0))
        if self.needs_ref:
            lp.ref_chosen, lp.ref_rejected = mb["ref_seq"][:P], mb["ref_seq"][P:]
        loss, metrics = pair_objective(self.obj, self.hp, lp, s[:P], s[P:], weight=mb["pair_weight"][:P])
        m = (mb["targets"] != -100).float()
        metrics["policy/entropy"] = ((ent * m).sum(), m.sum())
        return loss, metrics
