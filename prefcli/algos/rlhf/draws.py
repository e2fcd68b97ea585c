"""How a rollout's samples are drawn: one scored sampling round, or several when DAPO's dynamic sampling
drops the prompts whose completions all tie (or online_dpo needs more pairs). A mixin of PolicyLearner."""

from __future__ import annotations

import torch

from ...errors import TrainingError
from .advantages import overlong_penalty, tied_groups
from .sampling import Draw, fill_groups
from .stats import max_op


class RolloutDraws:
    def _draw(self) -> Draw:
        """One sampling round: the next prompts, k completions each, scored; the scores the advantages see
        lose the missing-EOS penalty and DAPO's overlong penalty."""
        c = self.cfg.rlhf
        if self.env is not None:  # a round of episodes (env_rollout.py)
            return self.env.draw()
        smp = self.sample(self.next_prompts(), self.prompt_text, self.prompt_ids, self.k)
        total, parts = self.rewards.score(smp.prompts, smp.completions)
        raw = torch.tensor(total, dtype=torch.float32, device=self.rt.device)
        scores, over = raw.clone(), None
        r = smp.rollout
        if c.missing_eos_penalty is not None:
            scores = scores - c.missing_eos_penalty * (~r.finished).float()
        if c.overlong_buffer is not None:
            over = overlong_penalty(r.lengths, self.scfg.max_new_tokens, c.overlong_buffer, c.overlong_penalty)
            scores = scores + over
        self.prompts_sampled += self.cfg.rlhf.prompts_per_rollout * self.rt.world_size
        return Draw(smp, total, parts, raw, scores, over)

    def _draw_rollout(self) -> tuple[Draw, dict[str, float]]:
        """The rollout's samples. With dynamic sampling (DAPO), groups whose scores all tie are dropped and
        fresh prompts drawn, at most dynamic_sampling_max_rounds extra rounds, until the rollout is full
        (short of that, tied groups fill it). online_dpo needs enough pairs (groups that do not tie) for
        every minibatch: it draws again, within the same cap, when a rollout has too few."""
        c, rt = self.cfg.rlhf, self.rt
        n = c.prompts_per_rollout
        draws = [self._draw()]
        untied = lambda: sum(int((~tied_groups(d.scores, self.k)).sum()) for d in draws)  # noqa: E731
        for _ in range(c.dynamic_sampling_max_rounds):
            if c.dynamic_sampling:
                short = torch.tensor([float(max(0, n - untied()))], device=rt.device)
                if rt.all_reduce(short).item() == 0:  # every rank agrees, so every rank draws alike
                    break
            elif self.preference:
                best = torch.tensor([float(untied())], device=rt.device)
                if rt.all_reduce(best, op=max_op(rt)).item() >= c.minibatches_per_epoch:
                    break
            else:
                break
            draws.append(self._draw())
        d = Draw.concat(draws)
        groups = fill_groups(tied_groups(d.scores, self.k), n).tolist()
        d = d.take([g * self.k + j for g in groups for j in range(self.k)])
        if self.preference:
            pairs = rt.all_reduce(torch.tensor([float((~tied_groups(d.scores, self.k)).sum())], device=rt.device))
            if pairs.item() == 0:
                raise TrainingError(
                    f"online_dpo: every prompt's {self.k} completions scored the same in {len(draws)} sampling "
                    "rounds, so no preference pair exists; the reward cannot rank these completions (raise "
                    "num_generations or generation.temperature, or check the reward)"
                )
        stats = {
            "rollout/sample_rounds": float(len(draws)),
            "rollout/resampled_prompts": float((len(draws) - 1) * n * rt.world_size),
            "rollout/tied_groups_kept": float(tied_groups(d.scores, self.k).float().mean()),
        }
        return d, stats
