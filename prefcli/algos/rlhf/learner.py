"""The policy side of RL training: the Task `prefcli rlhf` runs, and the generator of `prefcli gan`.

One RL step reads top to bottom in `PolicyLearner.rollout`: sample k completions per prompt and score
them (`draws.draw_rollout`), the tensors the update needs (`training_batch`: the policy's log-probs at
sampling time and the reference's, the KL), advantages (`advantages.ALGORITHMS`) or best/worst pairs
(online_dpo, `online.py`), the minibatches of `epochs_per_rollout` passes, and the rollout's statistics
(`stats.rollout_stats`, from what the step produced). `next_plan` then hands the minibatches to the loop one
at a time; each is an update through `loss` (`loss.policy_loss`, or the preference objective). Construction
(data, models, sampler, optimizer group) is `build.build_learner`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...engine.data import DataCursor, shard_for_rank
from ...engine.models import PolicyLM, reference_mode, save_hf, trainable_parameters, whole_state
from ...engine.rollout import FastDecoder
from ...engine.run import RunContext
from ...engine.sampling import HFSampler, Rollout, Sampler, SamplingConfig, left_pad
from ...engine.task import Group, Micro, Plan
from ...errors import TrainingError
from ...reward_sources import RewardSet
from .advantages import AdvantageInputs, RLAlgorithm, kl_per_token
from .correction import mismatch_stats
from .draws import draw_once, draw_rollout
from .env_rollout import EnvRollouts, EpisodeRollout, episode_sequences
from .loss import NORMALISERS, LossParams, policy_loss
from .online import OnlinePreferenceLoss, best_worst_pairs
from .sampling import Draw, Samples, apply_stop_strings
from .stats import max_op, rollout_stats
from .users import PromptUsers

# ------------------------------------------------------------------------------ parts


class ActorCritic(nn.Module):
    """The policy (and, for PPO, a linear value head on the same hidden states): one forward
    gives log-probs, entropies and values over the completion positions."""

    def __init__(self, policy: PolicyLM, value_head: nn.Linear | None):
        super().__init__()
        self.policy = policy
        self.value_head = value_head

    def forward(self, input_ids, attention_mask, position_ids, targets, start: int, temperature: float):
        logp, ent, h = self.policy(
            input_ids, targets, attention_mask, position_ids, "logprobs", temperature, start, return_hidden=True
        )
        values = None
        if self.value_head is not None:
            hv = h[:, start : start + targets.shape[1]]
            values = self.value_head(hv.to(self.value_head.weight.dtype)).squeeze(-1).float()
        return logp, ent, values


@dataclass
class Prompts:
    """The prompt rows the policy samples from (this process's view of the whole data set)."""

    train_rows: Any  # datasets.Dataset (the GAN reads its gold completions from it)
    eval_rows: Any | None
    text: list[str]
    ids: list[list[int]]
    eval_text: list[str]
    eval_ids: list[list[int]]
    truncated: int  # training prompts cut to max_prompt_length
    users: PromptUsers | None = None  # whom each prompt is for (a user column); their tokens are in `ids` already


@dataclass
class UpdateRule:
    """How a rollout becomes updates (rlhf section): the estimator and the surrogate with its bounds."""

    key: str  # the entry of advantages.ALGORITHMS (grpo's grpo_loss variants have their own)
    algo: RLAlgorithm
    online: OnlinePreferenceLoss | None  # online_dpo's objective; None for the policy-gradient algorithms
    eps_low: float
    eps_high: float
    normaliser: str
    need_ref: bool  # the reference's log-probs are needed (KL, or the online objective's reference)
    old_is_current: bool  # one pass: the update's own detached log-probs are pi_old (no rollout forward)

    @property
    def preference(self) -> bool:
        return self.online is not None


@dataclass
class RolloutShape:
    """The sizes of one rollout and its updates, per process."""

    k: int  # completions per prompt
    prompts: int  # prompts per rollout
    sequences: int  # prompts x k
    units: int  # what a rollout is split into: its sequences, or (online_dpo) its pairs, one per prompt
    minibatch: int  # units per minibatch
    epochs: int
    steps_per_rollout: int  # epochs x minibatches_per_epoch
    max_prompt: int  # the widest prompt (train or held out): prompts are padded to it


@dataclass
class Models:
    """The trained policy and what reads it."""

    tok: Any
    lm: Any  # the transformers model (LoRA-wrapped when model.lora)
    policy: PolicyLM
    model: ActorCritic  # what the optimizer group trains
    ref_policy: PolicyLM | None  # the frozen reference; None: none needed, or LoRA's adapters-off base
    group: Group
    sampler: Sampler  # engine.rollout.FastDecoder, or the transformers-generate fallback (engine.sampling)


@dataclass
class Experience:
    """What one rollout sampled and how it scored (its training tensors stay in the learner's buffer)."""

    rows: list[int]
    prompts: list[str]
    completions: list[str]
    rewards: list[float]  # summed reward before the missing-EOS penalty


@dataclass
class TrainingBatch:
    """A rollout as the update reads it: the sequences, the loss mask and the log-probs at sampling time."""

    seq: dict[str, torch.Tensor]  # input_ids, attention_mask, position_ids, targets, start
    mask: torch.Tensor  # [B, N] completion tokens that count in the loss
    ref_logp: torch.Tensor | None
    old_logp: torch.Tensor | None  # None when the update measures it (old_is_current)
    old_values: torch.Tensor | None
    kl: torch.Tensor  # [B, N] k1 to the reference on completion tokens (zeros when measured in the update)


# ---------------------------------------------------------------------------- learner


class PolicyLearner:
    """The policy being trained by RL (see the module docstring). Its reward is `rewards` (the GAN puts its
    discriminator first in it)."""

    def __init__(
        self,
        ctx: RunContext,
        prompts: Prompts,
        rule: UpdateRule,
        shape: RolloutShape,
        models: Models,
        rewards: RewardSet,
        scfg: SamplingConfig,
        cursor: DataCursor,
        total_updates: int,
    ):
        self.ctx, self.rt, self.cfg = ctx, ctx.rt, ctx.recipe
        self.prompts, self.rule, self.shape, self.rewards, self.scfg = prompts, rule, shape, rewards, scfg
        self.tok, self.lm, self.policy, self.model = models.tok, models.lm, models.policy, models.model
        self.ref_policy, self.group, self.sampler = models.ref_policy, models.group, models.sampler
        self.groups = {"policy": self.group}
        self.cursor = cursor
        self.total_updates = total_updates
        self.beta = self.cfg.rlhf.kl_coef  # the KL weight (moved by the adaptive controller under kl_target)
        # position: rollouts done, and where we are inside the current rollout (the prompt cursor above)
        self.rollouts = 0
        self.prompts_sampled = 0  # all ranks, resampled prompts (dynamic sampling) included
        self.buffer: dict[str, torch.Tensor] | None = None
        self.queue: list[list[int]] = []  # remaining minibatches of the current rollout (row indices)
        self.rollout_metrics: dict[str, float] = {}
        self.examples_file = ctx.run_dir / "samples.jsonl"
        self._warned_sampler = False
        self._guarded = False  # the start-up guard runs on the first completions this process samples
        self._plan_metrics: dict[str, float] = {}
        self.env: EnvRollouts | None = None  # episodes in an environment instead of prompts (build_learner sets it)

    # ------------------------------------------------------------------ the Task
    def total_steps(self) -> int:
        return self.total_updates

    def plans(self, start_step: int) -> Iterator[Plan]:
        """A rollout whenever the last one's minibatches are used up, then its updates one by one."""
        while True:
            if self.needs_rollout():
                self.rollout()
            yield self.next_plan()

    def needs_rollout(self) -> bool:
        return not self.queue

    # ------------------------------------------------------------------ one RL step
    def rollout(self) -> Experience:
        """Sample and score the next prompts, compute advantages (or pairs), and queue the minibatches of the
        rollout's updates; returns what it sampled (the GAN's discriminator reads the completions)."""
        c, rule = self.cfg.rlhf, self.rule
        t0 = time.perf_counter()
        self.sampler.sync()
        draw, draw_stats = draw_rollout(self._draw, c, self.shape.k, self.rt, rule.preference, self.tok.pad_token_id)
        self.prompts_sampled += int(draw_stats["rollout/sample_rounds"]) * c.prompts_per_rollout * self.rt.world_size
        batch = self.training_batch(draw.samples.rollout)
        self.buffer = self._buffer(batch, draw.samples.rollout)
        if rule.preference:
            self.queue = self._pair_minibatches(draw, batch)
        else:
            adv, returns = rule.algo.advantages(self._advantage_inputs(draw, batch))
            self.buffer.update(_policy_tensors(batch, adv, returns))
            self.queue = epoch_minibatches(self.shape.sequences, self.shape.minibatch, self.shape.epochs, self._shuffle)
        stats, n = rollout_stats(draw, batch, self.rt, self.shape.k, self.beta, rule.old_is_current, t0)
        self.rollout_metrics = {**stats, **draw_stats}
        if self.env is not None:
            self.rollout_metrics.update(self.env.metrics())
        if c.kl_target is not None:  # adaptive KL controller (Ziegler et al. 2019); n: sequences, all ranks
            err = max(-0.2, min(0.2, self.rollout_metrics["kl/mean"] / c.kl_target - 1.0))
            self.beta *= 1.0 + err * n / c.kl_horizon
        if c.num_examples and self.rollouts % c.log_examples_every_steps == 0 and self.rt.is_main:
            self._show_examples(draw.samples.prompts, draw.samples.completions, draw.total)
        self.rollouts += 1
        return Experience(draw.samples.rows, draw.samples.prompts, draw.samples.completions, draw.total)

    def next_plan(self) -> Plan:
        """The next policy update: a minibatch of the current rollout (call `rollout()` first when
        `needs_rollout()`)."""
        rows = self.queue.pop(0)
        idx = torch.tensor(rows, device=self.rt.device)
        micro = []
        bs = self.cfg.train.batch_size
        norm = NORMALISERS[self.rule.normaliser]
        pair_keys = ("pair_chosen", "pair_rejected", "pair_valid")
        for s in range(0, len(rows), bs):
            sub = idx[s : s + bs]
            if self.rule.preference:  # a micro-batch of pairs: their chosen rows, then their rejected rows
                b = self.buffer
                seqs = torch.cat([b["pair_chosen"][sub], b["pair_rejected"][sub]])
                mb = {k: (v[seqs] if v.dim() else v) for k, v in b.items() if k not in pair_keys}
                mb["pair_weight"] = b["pair_valid"][sub].repeat(2)
                units = b["pair_valid"][sub].sum()
            else:
                mb = {k: (v[sub] if v.dim() else v) for k, v in self.buffer.items()}
                _, units = norm(mb["mask"], mb["mask"], self.cfg.generation.max_new_tokens)
            micro.append(Micro(batch=mb, n=float(units), tokens=int(mb["attention_mask"].sum())))
        self._plan_metrics = dict(self.rollout_metrics)
        return Plan(
            group="policy", micro=micro, loss_fn=self.loss, name=self.cfg.rlhf.algorithm, metrics=self._plan_metrics
        )

    def loss(self, module, mb) -> tuple[torch.Tensor, dict]:
        """One micro-batch of a rollout through the policy: `loss.policy_loss` plus what only the forward
        knows (entropy; the KL to the reference and the sampler/trainer mismatch when the rollout skipped
        its policy forward). online_dpo: the preference objective on pairs (online.py)."""
        if self.rule.preference:
            return self.rule.online(module, mb)
        temp = self.cfg.generation.temperature
        logp, ent, values = module(
            mb["input_ids"], mb["attention_mask"], mb["position_ids"], mb["targets"], int(mb["start"]), temp
        )
        mask = mb["mask"]
        old_logp = mb["old_logp"] if "old_logp" in mb else logp.detach()
        loss_sum, metrics = policy_loss(
            logp,
            old_logp,
            mb["adv"],
            mask,
            self.loss_params(),
            ref_logp=mb.get("ref_logp"),
            values=values,
            old_values=mb.get("old_values"),
            returns=mb.get("returns"),
            sampler_logp=mb.get("sampler_logp"),
        )
        metrics["policy/entropy"] = ((ent * mask).sum(), mask.sum())
        if self.rule.old_is_current and "ref_logp" in mb:
            k1 = (kl_per_token(logp.detach(), mb["ref_logp"], "k1") * mask).sum()
            metrics["kl/mean"] = (k1, (mask.sum(1) > 0).sum())
        if self.rule.old_is_current and "sampler_logp" in mb:
            mm, mx = mismatch_stats(logp, mb["sampler_logp"], (mb["targets"] != -100).float())
            metrics.update(mm)
            mx = self.rt.all_reduce(mx.detach().double().reshape(1), op=max_op(self.rt))
            # the largest difference is not a mean: kept in the step's own metrics, max over micro-batches
            self._plan_metrics["mismatch/abs_max"] = max(self._plan_metrics.get("mismatch/abs_max", 0.0), float(mx))
        return loss_sum, metrics

    def loss_params(self) -> LossParams:
        c = self.cfg.rlhf
        return LossParams(
            eps_low=self.rule.eps_low,
            eps_high=self.rule.eps_high,
            beta=self.beta,
            kl_in_loss=not self.rule.algo.kl_in_reward,
            normaliser=self.rule.normaliser,
            max_new_tokens=self.cfg.generation.max_new_tokens,
            vf_coef=c.vf_coef,
            value_clip_eps=c.value_clip_eps,
            policy_loss=c.policy_loss,
            is_correction=c.is_correction,
            is_cap=c.is_cap,
            is_floor=c.is_floor,
        )

    # ------------------------------------------------------------------ the step's parts
    def _draw(self) -> Draw:
        """One scored sampling round of the next prompts (dynamic sampling may ask for several)."""
        c, users = self.cfg.rlhf, self.prompts.users
        if self.env is not None:  # a round of episodes (env_rollout.py)
            return self.env.draw()
        smp = self.sample_train()
        who = users.of("train", smp.rows) if users is not None else None
        return draw_once(smp, self.rewards, c, self.scfg.max_new_tokens, self.rt.device, users=who)

    def _all_cut(self) -> str:
        """Why rlhf.mask_truncated_completions left a whole rollout out of the loss, and what to change."""
        if self.env is not None:
            e = self.env.spec
            return (
                f"the environment ended none of the episodes: every one was cut by env.max_turns ({e.max_turns}) "
                f"or env.max_episode_tokens ({e.max_episode_tokens}), or failed, and "
                "rlhf.mask_truncated_completions leaves such episodes out of the loss: raise env.max_turns or "
                "env.max_episode_tokens, or turn it off (overlong_buffer shapes their reward instead)"
            )
        return (
            f"every completion was cut by generation.max_new_tokens ({self.scfg.max_new_tokens}) before its stop "
            "token, and rlhf.mask_truncated_completions leaves them all out of the loss: raise max_new_tokens, or "
            "turn it off (overlong_buffer shapes their reward instead)"
        )

    def training_batch(self, r: Rollout) -> TrainingBatch:
        """The sequences, the loss mask (without the cut completions under mask_truncated_completions), the
        reference's and (unless the update measures them) the policy's log-probs and values, and the KL."""
        c = self.cfg.rlhf
        seq = sequences(r)
        mask = r.completion_mask.float()
        if c.mask_truncated_completions:
            mask = mask * r.finished.float()[:, None]
            if self.rt.all_reduce(mask.sum().reshape(1)).item() == 0:
                raise TrainingError(f"rollout {self.rollouts + 1}: {self._all_cut()}")
        ref_logp = self.score_logprobs(seq, reference=True)[0] if self.rule.need_ref else None
        if self.rule.old_is_current:
            old_logp, old_values = None, None
            kl = torch.zeros_like(mask)  # measured in the update instead (kl/mean is logged there)
        else:
            old_logp, old_values = self.score_logprobs(seq, reference=False)
            if ref_logp is None:
                ref_logp = old_logp
            kl = kl_per_token(old_logp, ref_logp, "k1") * r.completion_mask
        self.model.train()
        return TrainingBatch(seq, mask, ref_logp, old_logp, old_values, kl)

    @staticmethod
    def _buffer(batch: TrainingBatch, r: Rollout) -> dict[str, torch.Tensor]:
        buffer = {**batch.seq, "mask": batch.mask}
        if r.logprobs is not None:
            buffer["sampler_logp"] = r.logprobs
        return buffer

    def _advantage_inputs(self, draw: Draw, batch: TrainingBatch) -> AdvantageInputs:
        rt, r = self.rt, draw.samples.rollout
        return AdvantageInputs(
            scores=draw.scores,
            kl=batch.kl if self.rule.algo.kl_in_reward else torch.zeros_like(batch.kl),
            mask=r.completion_mask.float(),
            values=batch.old_values,
            k=self.shape.k,
            beta=self.beta,
            cfg=self.cfg.rlhf,
            all_reduce=rt.all_reduce if rt.distributed else None,
            step_rewards=r.step_rewards if isinstance(r, EpisodeRollout) else None,
        )

    def _pair_minibatches(self, draw: Draw, batch: TrainingBatch) -> list[list[int]]:
        """online_dpo: the best/worst pair of each prompt, the reference's sequence log-probs (temperature 1,
        the objective's reduction), and minibatches of pairs, the pairs with a signal spread over them."""
        chosen, rejected, valid = best_worst_pairs(draw.scores, self.shape.k)
        self.buffer.update(pair_chosen=chosen, pair_rejected=rejected, pair_valid=valid.float())
        if self.rule.need_ref:
            t1 = self.cfg.generation.temperature == 1.0 and batch.ref_logp is not None
            ref_tok = batch.ref_logp if t1 else self.score_logprobs(batch.seq, reference=True, temperature=1.0)[0]
            self.buffer["ref_seq"] = self.rule.online.sequence(ref_tok, batch.seq["targets"])[0]
        return pair_minibatches(valid, self.cfg.rlhf.minibatches_per_epoch, self.shape.epochs, self._shuffle)

    def _shuffle(self, n: int, epoch: int) -> torch.Tensor:
        """The order of epoch `epoch` of the current rollout: seeded by the run's seed and the rollout."""
        g = torch.Generator().manual_seed(self.cfg.train.seed * 1_000_003 + self.rollouts * 101 + epoch)
        return torch.randperm(n, generator=g)

    def _show_examples(self, prompts, completions, total):
        n = min(self.cfg.rlhf.num_examples, len(prompts))
        pick = list(range(0, len(prompts), max(1, len(prompts) // max(n, 1))))[:n]
        rows = [[prompts[i][-60:], completions[i][:100], f"{total[i]:.3f}"] for i in pick]
        if self.ctx.progress is not None:
            full = [[prompts[i], completions[i], float(total[i])] for i in pick]  # trackers get the whole texts
            self.ctx.progress.table(
                f"rollout {self.rollouts}: examples", ["prompt", "completion", "reward"], rows, "samples", full
            )
        with open(self.examples_file, "a", encoding="utf-8") as f:
            for i in pick:
                row = {"rollout": self.rollouts, "prompt": prompts[i], "completion": completions[i], "reward": total[i]}
                f.write(json.dumps(row) + "\n")

    # ------------------------------------------------------------------ sampling and scoring
    def next_prompts(self) -> list[int]:
        """This rank's prompts of the next rollout."""
        items = self.cursor.next()
        mine = shard_for_rank(items, self.rt.rank, self.rt.world_size)
        while len(mine) < self.shape.prompts:  # a short last step: repeat prompts to fill the batch
            mine.append(mine[len(mine) % max(1, len(mine))] if mine else items[0])
        return mine

    def sample(self, prompt_idx: list[int], texts: list[str], ids: list[list[int]], k: int) -> Samples:
        """k completions for each prompt index, from the current policy."""
        rt = self.rt
        rows = [i for i in prompt_idx for _ in range(k)]
        p_ids, p_mask = left_pad([ids[i] for i in rows], self.tok.pad_token_id, rt.device)
        P = p_ids.shape[1]
        if P < self.shape.max_prompt:  # a fixed prompt width keeps the decoder's buffers (and CUDA graph) reusable
            pad = self.shape.max_prompt - P
            p_ids = torch.cat([torch.full((len(rows), pad), self.tok.pad_token_id, device=rt.device), p_ids], 1)
            p_mask = torch.cat([torch.zeros((len(rows), pad), dtype=p_mask.dtype, device=rt.device), p_mask], 1)
        self.model.eval()
        rt.synchronize()
        t0 = time.perf_counter()
        r = self.sampler.sample(p_ids, p_mask, self.scfg)
        if not self._warned_sampler:
            for what, err in (
                ("compiling", getattr(self.sampler, "compile_error", None)),
                ("capturing a CUDA graph of", getattr(self.sampler, "graph_error", None)),
            ):
                if err:
                    self.ctx.warn(f"{what} the sampler's decode step failed ({err}); decoding without it")
            self._warned_sampler = True
        rt.synchronize()
        gen_s = time.perf_counter() - t0
        if not self._guarded and self._guard(r):  # the fast sampler gave way to transformers generate: again
            r = self.sampler.sample(p_ids, p_mask, self.scfg)
        r = apply_stop_strings(r, self.tok, self.cfg.generation.stop_strings, self.tok.pad_token_id)
        comp_text = [
            self.tok.decode(c[m.bool()].tolist(), skip_special_tokens=True)
            for c, m in zip(r.completion_ids, r.completion_mask)
        ]
        return Samples(r, rows, [texts[i] for i in rows], comp_text, gen_s)

    def _guard(self, r: Rollout) -> bool:
        """The start-up guard on the first completions sampled (a rollout, the GAN's discriminator warm-up or a
        held-out evaluation; engine.guard.check_rollout): the trainer's and the sampler's log-probs against the
        model's own forward. Returns True when the fast sampler gave way to transformers generate
        (model.on_mismatch: fallback); the reference follows the policy onto the model's own forward."""
        from ...engine.guard import check_rollout

        self._guarded = True
        kind = "fast" if isinstance(self.sampler, FastDecoder) else "hf"
        on = self.cfg.model.on_mismatch
        replace = check_rollout(self.policy, r, self.scfg, on, self.ctx.warn, self.rt, kind)
        if self.ref_policy is not None:
            self.ref_policy.own_forward = self.policy.own_forward
        if replace:
            self.sampler = HFSampler(self.lm, self.rt.autocast, gather=self.group.gathered)
        return replace

    def sample_train(self) -> Samples:
        """Completions of the policy for the next prompts, with no update (the GAN's discriminator warm-up)."""
        return self.sample(self.next_prompts(), self.prompts.text, self.prompts.ids, self.shape.k)

    @torch.no_grad()
    def score_logprobs(
        self, seq: dict, reference: bool, temperature: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-probs [B, N] at the sampling temperature unless given (and values, for the policy),
        micro-batched."""
        out_lp, out_v = [], []
        bs = self.cfg.train.batch_size
        start = int(seq["start"])
        temp = self.cfg.generation.temperature if temperature is None else temperature
        for s in range(0, seq["input_ids"].shape[0], bs):
            sl = {k: (v[s : s + bs] if v.dim() else v) for k, v in seq.items()}
            lm_args = (sl["input_ids"], sl["targets"], sl["attention_mask"], sl["position_ids"])
            if reference and self.ref_policy is not None:
                lp, _ = self.ref_policy(*lm_args, temperature=temp, start=start)
            elif reference:
                with reference_mode(self.lm):
                    lp, _ = self.policy(*lm_args, temperature=temp, start=start)
            else:
                lp, _, v = self.model(
                    sl["input_ids"], sl["attention_mask"], sl["position_ids"], sl["targets"], start, temp
                )
                if v is not None:
                    out_v.append(v)
            out_lp.append(lp)
        return torch.cat(out_lp), (torch.cat(out_v) if out_v else None)

    # ------------------------------------------------------------------ held-out evaluation
    def has_eval(self) -> bool:
        return self.env is not None or bool(self.prompts.eval_ids)

    def eval_samples(self) -> tuple[list[int], list[str], list[str]]:
        """One completion per held-out prompt of this rank (capped by train.eval_max_batches): (prompt
        indices, prompts, completions)."""
        B = self.shape.sequences
        idx = list(range(len(self.prompts.eval_ids)))[: (self.cfg.train.eval_max_batches or 10**9) * B]
        prompts, completions = [], []
        for chunk in _chunks(idx, B):
            smp = self.sample(_fill(chunk, B), self.prompts.eval_text, self.prompts.eval_ids, 1)
            prompts += smp.prompts[: len(chunk)]
            completions += smp.completions[: len(chunk)]
        return idx, prompts, completions

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean reward, KL to the reference and length of one sampled completion per held-out prompt; with a user
        column, the mean reward of each user's prompts (each scored for its user) and the worst user."""
        rt, B = self.rt, self.shape.sequences
        self.sampler.sync()
        if self.env is not None:
            return self.env.evaluate()
        idx = shard_for_rank(list(range(len(self.prompts.eval_ids))), rt.rank, rt.world_size)
        if self.cfg.train.eval_max_batches:
            idx = idx[: self.cfg.train.eval_max_batches * B]
        sums = torch.zeros(4, dtype=torch.float64, device=rt.device)
        users = self.prompts.users if self.prompts.users is not None and self.prompts.users.active else None
        all_total, all_users = [], []
        for chunk in _chunks(idx, B):
            real = len(chunk)
            smp = self.sample(_fill(chunk, B), self.prompts.eval_text, self.prompts.eval_ids, 1)
            r = smp.rollout
            who = users.of("eval", chunk) if users is not None else None
            total, _ = self.rewards.score(smp.prompts[:real], smp.completions[:real], users=who)
            if who is not None:
                all_total += total
                all_users += who
            seq = sequences(r)
            lp, _ = self.score_logprobs(seq, reference=False)
            ref = self.score_logprobs(seq, reference=True)[0] if self.rule.need_ref else lp
            kl = (kl_per_token(lp, ref, "k1") * r.completion_mask).sum(1)[:real]
            sums += torch.tensor(
                [sum(total), float(kl.sum()), float(r.completion_mask[:real].sum()), real],
                dtype=torch.float64,
                device=rt.device,
            )
        rt.all_reduce(sums)
        per_user = users.per_user(all_total, all_users, rt, rt.device) if users is not None else {}
        tot, kl, length, n = sums.tolist()
        if n == 0:
            return {}
        return {"eval/reward": tot / n, "eval/kl": kl / n, "eval/length": length / n, **per_user}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {
            **self.cursor.state(),
            "rollouts": self.rollouts,
            "prompts_sampled": self.prompts_sampled,
            "rewards": self.rewards.state_dict(),
            "beta": self.beta,
            "queue": self.queue,
            "rollout_metrics": self.rollout_metrics,
        }

    def load_state_dict(self, state: dict, extra: dict) -> None:
        self.cursor.load(state, self.ctx.warn)
        self.rollouts, self.beta = state["rollouts"], state["beta"]
        self.prompts_sampled = state.get("prompts_sampled", 0)
        self.rewards.load_state_dict(state.get("rewards", {}))
        self.queue = [list(q) for q in state["queue"]]
        self.rollout_metrics = state.get("rollout_metrics", {})
        self.buffer = {
            k[len("buffer.") :]: v.to(self.rt.device) for k, v in extra.items() if k.startswith("buffer.")
        } or None
        if self.queue and self.buffer is None:
            self.queue = []

    def extra_tensors(self) -> dict:
        if not self.buffer or not self.queue:
            return {}
        return {f"buffer.{k}": v for k, v in self.buffer.items()}

    def startup_check(self) -> None:
        """Nothing before the first step: RL's start-up guard compares the trainer's and the sampler's log-probs
        on the first completions sampled (`_guard`, before any optimizer step)."""

    def describe(self) -> dict:
        c, rule = self.cfg.rlhf, self.rule
        env = self.env
        return {
            "data": {
                **(
                    {"env": env.factory.name, "tasks": env.spec.num_tasks, "tools": env.factory.tool_names}
                    if env
                    else {}
                ),
                "prompts": len(self.prompts.ids),
                "eval_prompts": len(self.prompts.eval_ids),
                "truncated_prompts": self.prompts.truncated,
                **({"users": users.describe()} if (users := self.prompts.users) is not None and users.active else {}),
            },
            "model": {
                "parameters": sum(p.numel() for p in self.lm.parameters()),
                "trainable_parameters": trainable_parameters(self.model),
            },
            "rlhf": {
                "algorithm": c.algorithm,
                "rollouts": self.rollouts,
                "sequences_per_rollout": self.shape.sequences * self.rt.world_size,
                "sampler": type(self.sampler).__name__,
                "sampler_bytes": self.sampler.nbytes(),  # per process, kept between rollouts
                "final_kl_coef": self.beta,
                "prompts_sampled": self.prompts_sampled,
                **(
                    {"objective": c.preference.objective, "beta": rule.online.hp.beta}
                    if rule.preference
                    else {"policy_loss": c.policy_loss, "clip": [rule.eps_low, rule.eps_high]}
                ),
            },
        }

    def save_final(self, out_dir) -> None:
        from safetensors.torch import save_file

        save_hf(self.lm, self.tok, out_dir, self.rt)
        if self.prompts.users is not None:
            self.prompts.users.save(out_dir, self.rt)
        if self.model.value_head is not None:
            head = whole_state(self.model.value_head, self.rt)  # every rank: gathered when sharded
            if head is not None:
                save_file(head, str(Path(out_dir) / "value_head.safetensors"))


# ------------------------------------------------------------------------- tensors and orders


def sequences(r: Rollout) -> dict[str, torch.Tensor]:
    """Full sequences for the training forward: left-padded prompt + completion (episodes: every token
    attended, only the policy's targeted)."""
    if isinstance(r, EpisodeRollout):
        return episode_sequences(r)
    ids = torch.cat([r.prompt_ids, r.completion_ids], 1)
    mask = torch.cat([r.prompt_mask, r.completion_mask], 1)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    P = r.prompt_ids.shape[1]
    targets = torch.where(r.completion_mask.bool(), r.completion_ids, torch.full_like(r.completion_ids, -100))
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": pos,
        "targets": targets,
        "start": torch.tensor(P - 1),
    }


def _policy_tensors(batch: TrainingBatch, adv: torch.Tensor, returns: torch.Tensor | None) -> dict:
    """What a policy-gradient update reads besides the sequences: advantages, pi_old, the reference, values."""
    out = {"adv": adv}
    if batch.old_logp is not None:
        out["old_logp"] = batch.old_logp
    if batch.ref_logp is not None:
        out["ref_logp"] = batch.ref_logp
    if batch.old_values is not None:
        out.update(old_values=batch.old_values, returns=returns)
    return out


def epoch_minibatches(n: int, size: int, epochs: int, order) -> list[list[int]]:
    """`epochs` passes over n units, each in the order `order(n, epoch)`, cut into minibatches of `size`."""
    out = []
    for e in range(epochs):
        perm = order(n, e).tolist()
        out += [perm[s : s + size] for s in range(0, n, size)]
    return out


def pair_minibatches(valid: torch.Tensor, m: int, epochs: int, order) -> list[list[int]]:
    """online_dpo: `epochs` passes over the pairs, each shuffled by `order(n, epoch)`, the pairs with a signal
    (`valid`) first and dealt round-robin to the m minibatches, so that every minibatch gets its share."""
    out = []
    n = valid.shape[0]
    for e in range(epochs):
        perm = order(n, e)
        perm = torch.cat([perm[valid[perm]], perm[~valid[perm]]]).tolist()
        out += [perm[j::m] for j in range(m)]
    return out


def _chunks(idx: list[int], size: int) -> Iterator[list[int]]:
    for s in range(0, len(idx), size):
        yield idx[s : s + size]


def _fill(chunk: list[int], size: int) -> list[int]:
    """A chunk padded to the sampler's batch by repeating its first prompt."""
    return chunk + [chunk[0]] * (size - len(chunk))
