"""`prefcli rlhf` in an environment (the recipe's `env:`): the rollout is a batch of episodes instead of prompt
completions. A part of PolicyLearner (`learner.env`), which it hands:

- the seeds: training episodes start from reset(seed) with seeds 0 .. env.num_tasks-1, a DataCursor over them
  (shuffled by train.seed; resumed exactly like prompt rows), each seed played by rlhf.num_generations episodes
  (a group: the group methods' advantages compare episodes of the same task);
- a `Draw` of played episodes (`draw`): their trajectories as a rollout (episodes.py: the loss mask over the
  policy's tokens, the environment's tokens attended but untargeted, the step rewards), scored by the
  environment's reward plus the recipe's `rewards:` on the final transcripts, shaped like completions (the
  missing-EOS penalty for episodes the environment did not end, DAPO's overlong penalty against
  env.max_episode_tokens);
- the env/ metrics of the episodes it played, and the held-out evaluation (eval/success_rate, ...).

Each turn is sampled by the learner's sampler (`turn_policy`), in a batch of the episodes still going.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ...engine.data import DataCursor, shard_for_rank
from ...engine.rollout import Rollout, SamplingConfig, left_pad
from ...envs.episode import ChatRenderer, EnvPool, Episode, EpisodeConfig, TurnSample, play_episodes
from ...envs.loading import build_factory
from .advantages import kl_per_token, overlong_penalty
from .episodes import episode_batch, episode_metrics, episode_sums, transcripts
from .sampling import Draw, Samples, apply_stop_strings


@dataclass
class EpisodeRollout(Rollout):
    """A rollout of episodes: `completion_mask` is the loss mask (the policy's tokens), `completion_attention`
    every real token after the prompt (the environment's replies are context), `step_rewards` the environment's
    reward after each turn at that turn's last token (already part of the episode's score). `finished`: the
    environment ended the episode."""

    completion_attention: torch.Tensor | None = None
    step_rewards: torch.Tensor | None = None


def episode_config(spec, generation) -> EpisodeConfig:
    return EpisodeConfig(
        max_turns=spec.max_turns,
        max_new_tokens=generation.max_new_tokens,
        max_episode_tokens=spec.max_episode_tokens,
        tool_format=spec.tool_format,
        timeout_s=spec.timeout_s,
        tool_timeout_s=spec.tool_timeout_s,
        on_error=spec.on_error,
        concurrency=spec.concurrency,
    )


class TurnSampler:
    """The `Policy` of play_episodes on a prefcli sampler: the live episodes' trajectories, left-padded to the
    decoder's fixed width `width` and filled to its batch `batch` (by repeating the first), continued by one
    turn of at most each episode's budget; the generation's stop strings end a turn early. The tokens and the
    sampler's log-probs are returned as sampled (no decode and re-encode)."""

    def __init__(
        self, sampler, tok, scfg: SamplingConfig, stop_strings: list[str], batch: int, width: int, device, fill=True
    ):
        self.sampler, self.tok, self.scfg = sampler, tok, scfg
        self.stop_strings, self.batch, self.width, self.device = stop_strings, batch, width, device
        self.fill = fill  # fill each call to `batch` rows (a fast decoder's fixed batch)
        self.gen_s = 0.0
        self.before = None  # called before each sampling call (the learner: model.eval())

    def __call__(self, slots: list[int], contexts: list[list[int]], budgets: list[int]) -> list[TurnSample]:
        out: list[TurnSample] = []
        for s in range(0, len(contexts), self.batch):
            out += self._sample(contexts[s : s + self.batch], budgets[s : s + self.batch])
        return out

    def _sample(self, contexts: list[list[int]], budgets: list[int]) -> list[TurnSample]:
        n, pad = len(contexts), self.scfg.pad_token_id
        rows = contexts + [contexts[0]] * (self.batch - n if self.fill else 0)
        ids, mask = left_pad(rows, pad, self.device)
        if ids.shape[1] < self.width:  # a fixed width keeps the fast decoder's buffers reusable
            extra = self.width - ids.shape[1]
            ids = torch.cat([torch.full((len(rows), extra), pad, device=self.device), ids], 1)
            mask = torch.cat([torch.zeros((len(rows), extra), dtype=mask.dtype, device=self.device), mask], 1)
        if self.before is not None:
            self.before()
        t0 = time.perf_counter()
        r = self.sampler.generate(ids, mask, self.scfg)
        self.gen_s += time.perf_counter() - t0
        r = apply_stop_strings(r, self.tok, self.stop_strings, pad)
        out = []
        for i in range(n):
            k = min(int(r.completion_mask[i].sum()), budgets[i])
            toks = r.completion_ids[i, :k].tolist()
            lp = r.logprobs[i, :k].tolist() if r.logprobs is not None else [0.0] * k
            out.append(TurnSample(toks, lp, bool(r.finished[i]) and k == int(r.completion_mask[i].sum())))
        return out


class EnvRollouts:
    def __init__(self, learner):
        r = learner.cfg
        self.learner, self.spec, self.rt = learner, r.env, learner.rt
        self.factory = build_factory(r.env)  # bad input (exit 2, naming env.*) before anything is written
        self.renderer = ChatRenderer(learner.tok, tools=self.factory.tools, system_prompt=r.env.system_prompt)
        self.cfg = episode_config(r.env, r.generation)
        self.pool = EnvPool(self.factory)
        self.eval_pool = EnvPool(self.factory)
        c = r.rlhf
        self.cursor = DataCursor(r.env.num_tasks, c.prompts_per_rollout * self.rt.world_size, r.train.seed, True)
        self.sums: dict[str, float] = {}
        self.policy: TurnSampler | None = None

    # the width of the sampler's prompts: everything an episode holds before its last turn
    @property
    def max_context(self) -> int:
        return self.spec.max_episode_tokens - self.learner.cfg.generation.max_new_tokens

    def attach(self, sampler) -> None:
        L = self.learner
        g = L.cfg.generation
        self.policy = TurnSampler(sampler, L.tok, L.scfg, g.stop_strings, L.B, self.max_context, self.rt.device)
        self.policy.before = L.model.eval

    def next_seeds(self) -> list[int]:
        """This rank's task seeds of the next rollout."""
        mine = shard_for_rank(self.cursor.next(), self.rt.rank, self.rt.world_size)
        n = self.learner.cfg.rlhf.prompts_per_rollout
        while len(mine) < n:
            mine.append(mine[len(mine) % max(1, len(mine))] if mine else 0)
        return mine

    def play(self, pool: EnvPool, seeds: list[int]) -> tuple[list[Episode], float]:
        t0 = self.policy.gen_s
        eps = play_episodes(pool, seeds, self.policy, self.renderer, self.cfg)
        return eps, self.policy.gen_s - t0

    def draw(self) -> Draw:
        """One round of episodes: k per seed of the next rollout, scored and shaped."""
        L, c = self.learner, self.learner.cfg.rlhf
        tasks = self.next_seeds()
        seeds = [s for s in tasks for _ in range(L.k)]
        eps, gen_s = self.play(self.pool, seeds)
        for k, v in episode_sums(eps).items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        w = self.spec.reward_weight
        b = episode_batch(eps, L.tok.pad_token_id, w, self.rt.device)
        prompts, completions = transcripts(eps, self.renderer)
        total, parts = L.rewards.score(prompts, completions)
        env_part = [w * e.env_reward for e in eps]
        total = [t + x for t, x in zip(total, env_part)]
        parts = {"env": env_part, **parts}
        raw = torch.tensor(total, dtype=torch.float32, device=self.rt.device)
        scores, over = raw.clone(), None
        if c.missing_eos_penalty is not None:
            scores = scores - c.missing_eos_penalty * (~b.finished).float()
        if c.overlong_buffer is not None:
            over = overlong_penalty(
                b.episode_lengths, self.spec.max_episode_tokens, c.overlong_buffer, c.overlong_penalty
            )
            scores = scores + over
        L.prompts_sampled += c.prompts_per_rollout * self.rt.world_size
        r = EpisodeRollout(
            b.prompt_ids,
            b.prompt_mask,
            b.completion_ids,
            b.completion_mask,
            b.finished,
            b.logprobs,
            completion_attention=b.completion_attention,
            step_rewards=b.step_rewards,
        )
        return Draw(Samples(r, seeds, prompts, completions, gen_s), total, parts, raw, scores, over)

    def metrics(self) -> dict[str, float]:
        """The env/ metrics of the episodes played since the last call (all processes)."""
        names = list(self.sums)
        if not names:
            return {}
        flat = torch.tensor([self.sums[k] for k in names], dtype=torch.float64, device=self.rt.device)
        self.rt.all_reduce(flat)
        self.sums = {}
        return episode_metrics(dict(zip(names, flat.tolist())))

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """env.eval_episodes held-out episodes (seeds env.eval_seed, ...; split across processes), one per seed:
        the success rate, the environment's reward, turns, tool-error rate, and the reward, KL to the reference
        and policy tokens of each episode."""
        L, rt = self.learner, self.rt
        seeds = shard_for_rank(list(range(self.spec.eval_episodes)), rt.rank, rt.world_size)
        seeds = [self.spec.eval_seed + s for s in seeds]
        sums = {"kl": 0.0, "reward": 0.0, "policy_tokens": 0.0}
        counts: dict[str, float] = {}
        for s in range(0, len(seeds), L.B):
            eps, _ = self.play(self.eval_pool, seeds[s : s + L.B])
            for k, v in episode_sums(eps).items():
                counts[k] = counts.get(k, 0.0) + v
            b = episode_batch(eps, L.tok.pad_token_id, self.spec.reward_weight, rt.device)
            prompts, completions = transcripts(eps, self.renderer)
            total, _ = L.rewards.score(prompts, completions)
            sums["reward"] += sum(t + self.spec.reward_weight * e.env_reward for t, e in zip(total, eps))
            seq = episode_sequences(b)
            lp, _ = L.score_logprobs(seq, reference=False)
            ref = L.score_logprobs(seq, reference=True)[0] if L.need_ref else lp
            sums["kl"] += float((kl_per_token(lp, ref, "k1") * b.completion_mask).sum())
            sums["policy_tokens"] += float(b.completion_mask.sum())
        names = list(sums) + list(counts)
        flat = torch.tensor([{**sums, **counts}.get(k, 0.0) for k in names], dtype=torch.float64, device=rt.device)
        rt.all_reduce(flat)
        v = dict(zip(names, flat.tolist()))
        n = v.get("episodes", 0.0)
        if not n:
            return {}
        m = episode_metrics(v, "eval")
        return {
            "eval/reward": v["reward"] / n,
            "eval/kl": v["kl"] / n,
            "eval/length": v["policy_tokens"] / n,
            "eval/success_rate": m["eval/success_rate"],
            "eval/env_reward": m["eval/reward"],
            "eval/turns": m["eval/turns"],
            "eval/tool_error_rate": 1.0 - m["eval/tool_call_validity"],
        }

    def close(self) -> None:
        self.pool.close()
        self.eval_pool.close()


def episode_sequences(r) -> dict[str, torch.Tensor]:
    """The training forward's inputs of a rollout of episodes (an EpisodeRollout or an EpisodeBatch): every token
    attended, targets only on the policy's tokens."""
    att = r.completion_attention
    ids = torch.cat([r.prompt_ids, r.completion_ids], 1)
    mask = torch.cat([r.prompt_mask, att.to(r.prompt_mask.dtype)], 1)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    targets = torch.where(r.completion_mask.bool(), r.completion_ids, torch.full_like(r.completion_ids, -100))
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": pos,
        "targets": targets,
        "start": torch.tensor(r.prompt_ids.shape[1] - 1),
    }
