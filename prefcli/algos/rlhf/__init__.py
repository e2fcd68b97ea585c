"""`prefcli rlhf`: reinforcement learning from a reward, R(s, a) = HumanScore(a).

Where things are:
- learner.py     `PolicyLearner`, the Task: one RL step top to bottom in `rollout` (sample and score ->
                 log-probs and KL -> advantages or pairs -> minibatches -> statistics), each minibatch an update
                 through `loss`; held-out evaluation; its state. The generator of `prefcli gan` is one too.
- build.py       `build_learner`: the update rule, prompts, rewards, policy, reference, value head, the
                 rollout's shape, the optimizer group and the sampler, from the recipe.
- draws.py       one scored sampling round, and a rollout's rounds (DAPO's dynamic sampling, online_dpo's pairs);
- advantages.py  the advantage estimators (ppo/GAE, rloo, grpo, dr_grpo, dapo, reinforce_pp) as pure
                 functions, score shaping (DAPO's overlong penalty, tied groups), and the registry `ALGORITHMS`
                 that pairs each with its KL placement, normaliser and defaults (online_dpo included);
- loss.py        the policy update on one screen: the surrogate (`POLICY_LOSSES`: clip, gspo, cispo), clipping,
                 importance weights, KL term, value loss, normaliser;
- correction.py  the sampler/trainer mismatch and its truncated importance weights (`IS_CORRECTIONS`);
- online.py      online preference learning: best/worst pairs, the contrastive registry's objectives;
- stats.py       a rollout's metrics, from what the step produced;
- sampling.py    prompt rows, the transformers-generate fallback sampler, stop strings, sampled rounds.
- users.py       whom each prompt is for (a user column): the users the rewards score for, and with
                 rlhf.personalisation each user's token before their prompts.
Equations and sources: docs/algorithms.md, section rlhf.
"""

from __future__ import annotations

from ...engine.run import RunContext
from .build import build_learner
from .learner import PolicyLearner


def build(ctx: RunContext) -> PolicyLearner:
    return build_learner(ctx)
