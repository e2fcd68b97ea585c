"""`prefcli rlhf` in an environment (the recipe's `env:`): the rollout is a batch of episodes instead of prompt
completions. A part of PolicyLearner (`learner.env`, made by build.build_learner), which it hands:

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
from ...engine.sampling import Rollout, SamplingConfig, left_pad
from ...envs.episode import ChatRenderer, EnvPool, Episode, EpisodeConfig, TurnSample, play_episodes
from ...envs.loading import build_factory
from .advantages import kl_per_token, overlong_penalty
from .episodes import episode_batch, episode_metrics, episode_sums, transcripts
from .sampling import Draw, Samples, apply_stop_strings
from .stats import max_op


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
    """The `Policy` of play_episodes on a prefcli sampler (engine.sampling's protocol): each turn of a batch of
    episodes is one sampling call, and the episodes' KV cache is kept from turn to turn: `continue_from` runs
    only what was appended since an episode's last turn (the environment's reply) through the model, then samples
    the next turn. A turn whose tokens were cut after sampling (a stop string, the episode's last budget) cannot
    be continued from the cache (it holds the cut tokens), nor can a batch of more than `batch` episodes: those
    turns prefill the whole trajectory instead (`sample`), which gives the same distribution. `fill`: a call has
    exactly `batch` rows (a fast decoder's fixed batch; the spare rows repeat an episode and are dropped). The
    tokens and the sampler's log-probs are returned as sampled (no decode and re-encode)."""

    def __init__(self, sampler, tok, scfg: SamplingConfig, stop_strings: list[str], batch: int, device, fill=True):
        self.sampler, self.tok, self.scfg = sampler, tok, scfg
        self.stop_strings, self.batch, self.device, self.fill = stop_strings, batch, device, fill
        self.gen_s = 0.0
        self.before = None  # called before each sampling call (the learner: model.eval())
        # called on each turn prefilled afresh (the learner's start-up guard): a sampler to sample with instead
        # (the fast decoder gave way to transformers generate), or None
        self.guard = None
        self.calls = {"sample": 0, "continue_from": 0}
        self.reset()

    def reset(self) -> None:
        """Forget the cache's sequences (a new batch of episodes starts)."""
        self.prev: Rollout | None = None
        self.rows: list[int | None] = []  # the episode slot of each row of the previous call
        self.expected: dict[int, list[int]] = {}  # slot -> the trajectory the cache holds (when continuable)

    def __call__(self, slots: list[int], contexts: list[list[int]], budgets: list[int]) -> list[TurnSample]:
        if len(contexts) > self.batch:  # several calls: none of them can be continued
            self.reset()
            out: list[TurnSample] = []
            for s in range(0, len(contexts), self.batch):
                out += self._turn(slots[s : s + self.batch], contexts[s : s + self.batch], budgets[s : s + self.batch])
                self.reset()
            return out
        return self._turn(slots, contexts, budgets)

    def _turn(self, slots, contexts, budgets) -> list[TurnSample]:
        if self.before is not None:
            self.before()
        blocks = self._appended(slots, contexts)
        t0 = time.perf_counter()
        if blocks is not None:
            raw = self.sampler.continue_from(self.prev, blocks, self.scfg)
            self.calls["continue_from"] += 1
        else:
            self.rows = list(slots) + [None] * (self.batch - len(slots) if self.fill else 0)
            rows = contexts + [contexts[0]] * (len(self.rows) - len(slots))
            ids, mask = left_pad(rows, self.scfg.pad_token_id, self.device)
            raw = self.sampler.sample(ids, mask, self.scfg)
            self.calls["sample"] += 1
            other = self.guard(raw) if self.guard is not None else None
            if other is not None:  # the same turn again, from the sampler that replaced this one
                self.sampler = other
                raw = self.sampler.sample(ids, mask, self.scfg)
        self.gen_s += time.perf_counter() - t0
        r = apply_stop_strings(raw, self.tok, self.stop_strings, self.scfg.pad_token_id)
        self.prev = raw if getattr(raw, "cache", None) is not None else None
        row_of = {s: i for i, s in enumerate(self.rows) if s is not None}
        out, self.expected = [], {}
        for slot, ctx, budget in zip(slots, contexts, budgets):
            i = row_of[slot]
            n = int(raw.completion_mask[i].sum())
            k = min(int(r.completion_mask[i].sum()), budget)
            toks = r.completion_ids[i, :k].tolist()
            lp = r.logprobs[i, :k].tolist() if r.logprobs is not None else [0.0] * k
            out.append(TurnSample(toks, lp, bool(r.finished[i]) and k == n))
            if k == n:  # the cache holds exactly this turn
                self.expected[slot] = list(ctx) + toks
        return out

    def idle(self) -> None:
        """A sampling call whose result nobody reads (see EnvRollouts.play)."""
        rows = [[self.scfg.stop_token_ids[0] if self.scfg.stop_token_ids else self.scfg.pad_token_id]] * self.batch
        ids, mask = left_pad(rows, self.scfg.pad_token_id, self.device)
        self.sampler.sample(ids, mask, self.scfg)
        self.reset()

    def _appended(self, slots, contexts) -> list[list[int]] | None:
        """Per row of the previous call, the tokens appended since (a placeholder for the rows of episodes that
        ended); None when the turn cannot continue from the cache."""
        if self.prev is None:
            return None
        row_of = {s: i for i, s in enumerate(self.rows) if s is not None}
        blocks: list[list[int]] = [[self.scfg.pad_token_id] for _ in self.rows]  # rows no episode reads
        for slot, ctx in zip(slots, contexts):
            exp = self.expected.get(slot)
            if slot not in row_of or exp is None or len(ctx) <= len(exp) or ctx[: len(exp)] != exp:
                return None
            blocks[row_of[slot]] = ctx[len(exp) :]
        end, limit = getattr(self.prev.cache, "slot_end", None), getattr(self.sampler, "L", None)
        if end is not None and limit is not None and end + max(map(len, blocks)) + self.scfg.max_new_tokens > limit:
            return None  # the fast decoder's cache is full: prefill the trajectories afresh
        return blocks


class EnvRollouts:
    def __init__(self, recipe, tok, rt):
        self.recipe, self.spec, self.rt = recipe, recipe.env, rt
        self.factory = build_factory(recipe.env)  # bad input (exit 2, naming env.*) before anything is written
        self.renderer = ChatRenderer(tok, tools=self.factory.tools, system_prompt=recipe.env.system_prompt)
        self.cfg = episode_config(recipe.env, recipe.generation)
        self.pool = EnvPool(self.factory)
        self.eval_pool = EnvPool(self.factory)
        per_step = recipe.rlhf.prompts_per_rollout * rt.world_size
        self.cursor = DataCursor(recipe.env.num_tasks, per_step, recipe.train.seed, True)
        self.sums: dict[str, float] = {}
        self.learner = None
        self.policy: TurnSampler | None = None

    @property
    def max_context(self) -> int:
        """The fast decoder's length less a turn: an episode's tokens, and the cache slots that turns continued
        from the cache leave unused (each sampling call takes max_new_tokens slots, and each appended reply as
        many as the batch's longest)."""
        return self.spec.max_episode_tokens + self.spec.max_turns * self.recipe.generation.max_new_tokens

    def attach(self, learner) -> None:
        """Sample with the learner's sampler (and score with its rewards and models)."""
        self.learner = L = learner
        g = self.recipe.generation
        self.policy = TurnSampler(L.sampler, L.tok, L.scfg, g.stop_strings, L.shape.sequences, self.rt.device)
        self.policy.before = L.model.eval
        self.policy.guard = self._guard

    def _guard(self, raw):
        """The learner's start-up guard on the first turn it samples (engine.guard): the sampler that replaced its
        own, or None."""
        L = self.learner
        if L._guarded or not L._guard(raw):
            return None
        return L.sampler

    def next_seeds(self) -> list[int]:
        """This rank's task seeds of the next rollout."""
        mine = shard_for_rank(self.cursor.next(), self.rt.rank, self.rt.world_size)
        n = self.recipe.rlhf.prompts_per_rollout
        while len(mine) < n:
            mine.append(mine[len(mine) % max(1, len(mine))] if mine else 0)
        return mine

    def play(self, pool: EnvPool, seeds: list[int]) -> tuple[list[Episode], float]:
        t0 = self.policy.gen_s
        if hasattr(self.policy, "reset"):
            self.policy.reset()
        before = sum(getattr(self.policy, "calls", {}).values())
        eps = play_episodes(pool, seeds, self.policy, self.renderer, self.cfg)
        if self.rt.distributed and hasattr(self.policy, "idle"):
            # episodes end after different numbers of turns on each process, and a sampler that gathers sharded
            # weights in every call (transformers' generate under fsdp) needs every process in each call: the
            # processes that made fewer calls make idle ones
            mine = sum(self.policy.calls.values()) - before
            most = self.rt.all_reduce(torch.tensor([float(mine)], device=self.rt.device), op=max_op(self.rt))
            for _ in range(int(most.item()) - mine):
                self.policy.idle()
        return eps, self.policy.gen_s - t0

    def draw(self) -> Draw:
        """One round of episodes: k per seed of the next rollout, scored and shaped."""
        L, c = self.learner, self.recipe.rlhf
        tasks = self.next_seeds()
        seeds = [s for s in tasks for _ in range(L.shape.k)]
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
        L, rt, n_all = self.learner, self.rt, self.spec.eval_episodes
        seeds = [self.spec.eval_seed + s for s in shard_for_rank(list(range(n_all)), rt.rank, rt.world_size)]
        real = len(seeds)
        # every process plays as many episodes, so as many batches: each batch makes collective calls (play's
        # count of sampling calls; under FSDP every forward). A process with fewer seeds pads with copies of a
        # seed, whose episodes count nothing
        seeds += [seeds[-1] if seeds else self.spec.eval_seed] * (-(-n_all // rt.world_size) - real)
        sums = {"kl": 0.0, "reward": 0.0, "policy_tokens": 0.0}
        counts: dict[str, float] = {}
        B = L.shape.sequences
        for s in range(0, len(seeds), B):
            eps, _ = self.play(self.eval_pool, seeds[s : s + B])
            keep = max(0, min(len(eps), real - s))  # the episodes of this process's own seeds
            for k, v in episode_sums(eps[:keep]).items():
                counts[k] = counts.get(k, 0.0) + v
            b = episode_batch(eps, L.tok.pad_token_id, self.spec.reward_weight, rt.device)
            prompts, completions = transcripts(eps, self.renderer)
            total, _ = L.rewards.score(prompts, completions)
            sums["reward"] += sum(t + self.spec.reward_weight * e.env_reward for t, e in zip(total[:keep], eps))
            seq = episode_sequences(b)
            lp, _ = L.score_logprobs(seq, reference=False)
            ref = L.score_logprobs(seq, reference=True)[0] if L.rule.need_ref else lp
            sums["kl"] += float((kl_per_token(lp, ref, "k1") * b.completion_mask)[:keep].sum())
            sums["policy_tokens"] += float(b.completion_mask[:keep].sum())
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
            "eval/episodes": n,
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
