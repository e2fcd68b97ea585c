"""`prefcli rlhf`: reinforcement learning from a reward, R(s, a) = HumanScore(a).

Where things are:
- advantages.py  the advantage estimators (ppo/GAE, rloo, grpo, dr_grpo, dapo, reinforce_pp) as pure
                 functions, score shaping (DAPO's overlong penalty, tied groups), and the registry `ALGORITHMS`
                 that pairs each with its KL placement, normaliser and defaults (online_dpo included);
- loss.py        the policy update on one screen: the surrogate (`POLICY_LOSSES`: clip, gspo, cispo), clipping,
                 importance weights, KL term, value loss, normaliser;
- correction.py  the sampler/trainer mismatch and its truncated importance weights (`IS_CORRECTIONS`);
- online.py      online preference learning: best/worst pairs, the contrastive registry's objectives;
- policy.py      `PolicyLearner`: prompts, policy, reference, sampler, rewards, rollouts, minibatch plans
                 (also the generator of `prefcli gan`); draws.py (sampling rounds, dynamic sampling),
                 stats.py (rollout metrics) and evaluation.py (held-out evaluation) are its parts;
- sampling.py    prompt rows, the transformers-generate fallback sampler, stop strings, sampled rounds.
Equations and sources: docs/algorithms.md, section rlhf.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from ...engine.task import Plan
from .advantages import ALGORITHMS, AdvantageInputs, algorithm_key  # noqa: F401  (the registry, for readers)
from .loss import NORMALISERS, LossParams, policy_loss  # noqa: F401
from .policy import PolicyLearner


class RLHFTask:
    """The Task the engine runs for `prefcli rlhf`: one PolicyLearner, a rollout whenever its minibatches
    are used up."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.learner = PolicyLearner(ctx)
        self.groups = {"policy": self.learner.group}

    def total_steps(self) -> int:
        return self.learner.total_updates

    def plans(self, start_step: int) -> Iterator[Plan]:
        while True:
            if self.learner.needs_rollout():
                self.learner.rollout()
            yield self.learner.next_plan()

    def state_dict(self) -> dict:
        return self.learner.state_dict()

    def load_state_dict(self, state: dict, extra: dict) -> None:
        self.learner.load_state_dict(state, extra)

    def extra_tensors(self) -> dict:
        return self.learner.extra_tensors()

    def has_eval(self) -> bool:
        return self.learner.has_eval()

    def evaluate(self) -> dict:
        return self.learner.evaluate()

    def describe(self) -> dict:
        return self.learner.describe()

    def save_final(self, out_dir: Path) -> None:
        self.learner.save_final(out_dir)


def build(ctx) -> RLHFTask:
    return RLHFTask(ctx)
