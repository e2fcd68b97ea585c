"""Held-out evaluation of the policy: one sampled completion per held-out prompt, its reward, KL to the
reference and length. A mixin of PolicyLearner."""

from __future__ import annotations

import torch

from ...engine.data import shard_for_rank
from .advantages import kl_per_token


class HeldOutEvaluation:
    def has_eval(self) -> bool:
        return self.env is not None or bool(self.eval_ids)

    def eval_samples(self) -> tuple[list[int], list[str], list[str]]:
        """One completion per held-out prompt of this rank (capped by train.eval_max_batches): (prompt
        indices, prompts, completions)."""
        idx = list(range(len(self.eval_ids)))[: (self.cfg.train.eval_max_batches or 10**9) * self.B]
        prompts, completions = [], []
        for s in range(0, len(idx), self.B):
            chunk = idx[s : s + self.B]
            real = len(chunk)
            smp = self.sample(chunk + [chunk[0]] * (self.B - real), self.eval_text, self.eval_ids, 1)
            prompts += smp.prompts[:real]
            completions += smp.completions[:real]
        return idx, prompts, completions

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean reward, KL to the reference and length of one sampled completion per held-out prompt."""
        rt = self.rt
        self.sampler.sync()
        if self.env is not None:
            return self.env.evaluate()
        idx = shard_for_rank(list(range(len(self.eval_ids))), rt.rank, rt.world_size)
        if self.cfg.train.eval_max_batches:
            idx = idx[: self.cfg.train.eval_max_batches * self.B]
        sums = torch.zeros(4, dtype=torch.float64, device=rt.device)
        for s in range(0, len(idx), self.B):
            chunk = idx[s : s + self.B]
            real = len(chunk)
            smp = self.sample(chunk + [chunk[0]] * (self.B - real), self.eval_text, self.eval_ids, 1)
            r = smp.rollout
            total, _ = self.rewards.score(smp.prompts[:real], smp.completions[:real])
            seq = self.sequences(r)
            lp, _ = self.score_logprobs(seq, reference=False)
            ref = self.score_logprobs(seq, reference=True)[0] if self.need_ref else lp
            kl = (kl_per_token(lp, ref, "k1") * r.completion_mask).sum(1)[:real]
            sums += torch.tensor(
                [sum(total), float(kl.sum()), float(r.completion_mask[:real].sum()), real],
                dtype=torch.float64,
                device=rt.device,
            )
        rt.all_reduce(sums)
        tot, kl, length, n = sums.tolist()
        if n == 0:
            return {}
        return {"eval/reward": tot / n, "eval/kl": kl / n, "eval/length": length / n}
