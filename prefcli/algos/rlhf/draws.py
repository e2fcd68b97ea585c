"""How a rollout's samples are drawn: one scored sampling round (`draw_once`), or several when DAPO's dynamic
sampling drops the prompts whose completions all tie, or online_dpo needs more pairs (`draw_rollout`)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ...errors import TrainingError
from ...reward_sources import RewardSet
from .advantages import overlong_penalty, tied_groups
from .sampling import Draw, Samples, fill_groups
from .stats import max_op


def draw_once(smp: Samples, rewards: RewardSet, c, max_new_tokens: int, device, users=None) -> Draw:
    """One sampling round scored: the summed reward, and the score the advantages see, which loses the
    missing-EOS penalty and DAPO's overlong penalty (rlhf section `c`). `users`: whom each completion is for (a
    personalised reward model scores it for that user)."""
    total, parts = rewards.score(smp.prompts, smp.completions, users=users)
    raw = torch.tensor(total, dtype=torch.float32, device=device)
    scores, over = raw.clone(), None
    r = smp.rollout
    if c.missing_eos_penalty is not None:
        scores = scores - c.missing_eos_penalty * (~r.finished).float()
    if c.overlong_buffer is not None:
        over = overlong_penalty(r.lengths, max_new_tokens, c.overlong_buffer, c.overlong_penalty)
        scores = scores + over
    return Draw(smp, total, parts, raw, scores, over)


def draw_rollout(
    draw: Callable[[], Draw], c, k: int, rt, preference: bool, pad_id: int = 0
) -> tuple[Draw, dict[str, float]]:
    """The rollout's samples, from `draw()` rounds of the next prompts. With dynamic sampling (DAPO), groups
    whose scores all tie are dropped and fresh prompts drawn, at most dynamic_sampling_max_rounds extra rounds,
    until the rollout is full (short of that, tied groups fill it). online_dpo (`preference`) needs enough
    pairs (groups that do not tie) for every minibatch: it draws again, within the same cap, when a rollout has
    too few. Every process draws as many rounds (their counts are all-reduced). `pad_id` pads the token ids of
    rounds narrower than the widest."""
    n = c.prompts_per_rollout
    draws = [draw()]
    untied = lambda: sum(int((~tied_groups(d.scores, k)).sum()) for d in draws)  # noqa: E731
    for _ in range(c.dynamic_sampling_max_rounds):
        if c.dynamic_sampling:
            short = torch.tensor([float(max(0, n - untied()))], device=rt.device)
            if rt.all_reduce(short).item() == 0:  # every rank agrees, so every rank draws alike
                break
        elif preference:
            best = torch.tensor([float(untied())], device=rt.device)
            if rt.all_reduce(best, op=max_op(rt)).item() >= c.minibatches_per_epoch:
                break
        else:
            break
        draws.append(draw())
    d = Draw.concat(draws, pad_id)
    groups = fill_groups(tied_groups(d.scores, k), n).tolist()
    d = d.take([g * k + j for g in groups for j in range(k)])
    if preference:
        pairs = rt.all_reduce(torch.tensor([float((~tied_groups(d.scores, k)).sum())], device=rt.device))
        if pairs.item() == 0:
            raise TrainingError(
                f"online_dpo: every prompt's {k} completions scored the same in {len(draws)} sampling "
                "rounds, so no preference pair exists; the reward cannot rank these completions (raise "
                "num_generations or generation.temperature, or check the reward)"
            )
    stats = {
        "rollout/sample_rounds": float(len(draws)),
        "rollout/resampled_prompts": float((len(draws) - 1) * n * rt.world_size),
        "rollout/tied_groups_kept": float(tied_groups(d.scores, k).float().mean()),
    }
    return d, stats
