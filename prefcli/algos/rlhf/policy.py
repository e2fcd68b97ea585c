"""The policy side of RL training, shared by `prefcli rlhf` and the generator of `prefcli gan`.

`PolicyLearner` owns the prompts, the policy (with a value head for PPO), the frozen reference, the
sampler and the reward sources. One rollout: prompts -> k completions each (the fast sampler, which also
returns its log-probs) -> scores (shaped; with dynamic sampling, tied groups replaced by fresh prompts:
draws.py) -> log-probs of the policy at sampling time and of the reference -> advantages
(`advantages.ALGORITHMS`), or best/worst pairs for online_dpo (online.py) -> `epochs_per_rollout` passes
of `minibatches_per_epoch` optimizer steps, each a `Plan` whose loss is `loss.policy_loss` (or the
preference objective). `rollout()` returns what it sampled (`Experience`), so a caller (the GAN) can use
the completions without hooks.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from ...engine.data import DataCursor, blank_rows, load_rows, shard_for_rank, split_eval
from ...engine.models import (
    PolicyLM,
    build_trained_model,
    frozen_copy,
    reference_mode,
    save_hf,
    trainable_parameters,
    whole_state,
)
from ...engine.rollout import FastDecoder
from ...engine.sampling import Rollout, SamplingConfig, left_pad
from ...engine.task import Group, Micro, Plan
from ...engine.tokenizer import load_tokenizer
from ...errors import DataError, TrainingError, UsageError
from ...reward_sources import RewardSet, RewardSource, build_rewards
from .advantages import ALGORITHMS, AdvantageInputs, algorithm_key, kl_per_token
from .correction import mismatch_stats
from .draws import RolloutDraws
from .env_rollout import EnvRollouts, EpisodeRollout, episode_sequences
from .evaluation import HeldOutEvaluation
from .loss import NORMALISERS, POLICY_LOSSES, LossParams, policy_loss
from .online import OnlinePreferenceLoss, best_worst_pairs
from .sampling import Draw, HFSampler, Samples, apply_stop_strings, choose_sampler, prompt_rows
from .stats import max_op, rollout_stats

# ---------------------------------------------------------------------------- modules


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
class Experience:
    """What one rollout sampled and how it scored (its training tensors stay in the learner's buffer)."""

    rows: list[int]
    prompts: list[str]
    completions: list[str]
    rewards: list[float]  # summed reward before the missing-EOS penalty


# ------------------------------------------------------------------------------ learner


class PolicyLearner(RolloutDraws, HeldOutEvaluation):
    """The policy being trained by RL: see the module docstring. `extra_rewards` come before the recipe's
    `rewards:` in the summed reward (the GAN's discriminator)."""

    def __init__(self, ctx, extra_rewards: list[RewardSource] = ()):
        r = ctx.recipe
        self.ctx, self.rt, self.cfg = ctx, ctx.rt, r
        rt, c, g = self.rt, r.rlhf, r.generation
        self.key = algorithm_key(c)
        self.algo = ALGORITHMS[self.key]
        self.preference = self.algo.update == "preference"
        self.online = OnlinePreferenceLoss(c.preference) if self.preference else None
        self.tok = tok = load_tokenizer(r.model)
        self.env = None
        if r.env is not None:  # episodes in an environment instead of prompt rows (env_rollout.py)
            self.train_rows = self.eval_rows = None
            self.prompt_text, self.prompt_ids, self.eval_text, self.eval_ids = [], [], [], []
            self.n_truncated = 0
            self.env = EnvRollouts(self)
        else:
            self._load_prompts(ctx)
        extra = list(extra_rewards)
        if extra:
            self.rewards = RewardSet(
                extra + (build_rewards(r.rewards, tokenizer=tok, device=rt.device).sources if r.rewards else [])
            )
        else:
            self.rewards = build_rewards(r.rewards, tokenizer=tok, device=rt.device, empty_ok=self.env is not None)

        # old and new log-probs must come from the same function: dropout off (the builder's default)
        lm = build_trained_model(r.model, tok, rt, r.train.gradient_checkpointing, r.train.seed, ctx.smoke)
        self.need_ref = self.online.needs_ref if self.preference else (c.kl_coef > 0 or c.kl_target is not None)
        self.ref_policy = None
        if r.model.lora is None and self.need_ref:
            # a frozen copy in the compute dtype (with LoRA: the same weights with the adapters off)
            self.ref_policy = rt.place_frozen(
                PolicyLM(frozen_copy(lm, rt.compute_dtype if rt.device.type == "cuda" else rt.param_dtype), rt)
            )
        self.lm = lm
        self.policy = PolicyLM(lm, rt)
        value_head = None
        if self.algo.needs_value:
            value_head = nn.Linear(lm.config.hidden_size, 1).to(rt.device, rt.param_dtype)
            nn.init.zeros_(value_head.weight)  # std 0 (Huang et al. 2023)
            nn.init.zeros_(value_head.bias)
        self.model = ActorCritic(self.policy, value_head)

        self.k = c.num_generations
        self.B = c.prompts_per_rollout * self.k
        self.epochs = c.epochs_per_rollout or self.algo.default_epochs
        # the units a rollout is split into: its sequences, or (online_dpo) its pairs, one per prompt
        units, what = (
            (c.prompts_per_rollout, "pairs (one per prompt: prompts_per_rollout)")
            if self.preference
            else (self.B, "sequences (prompts_per_rollout x num_generations)")
        )
        if units % c.minibatches_per_epoch:
            raise UsageError(
                f"rlhf.minibatches_per_epoch ({c.minibatches_per_epoch}) must divide the rollout's {units} {what}"
            )
        self.units = units
        self.mb_size = units // c.minibatches_per_epoch
        # One pass over a rollout whose advantages need no rollout-time log-probs (grpo): the old
        # policy is the current one, so the training forward's own (detached) log-probs serve as
        # pi_old and one no-grad forward per rollout is saved (as TRL does for num_iterations=1).
        # The adaptive KL controller reads the rollout's KL, so it keeps the forward.
        self.old_is_current = (
            not self.preference
            and not self.algo.kl_in_reward
            and not self.algo.needs_value
            and self.epochs * c.minibatches_per_epoch == 1
            and c.kl_target is None
        )
        self.pl = POLICY_LOSSES[c.policy_loss]
        low, high = c.clip_range()
        self.eps_low = low if low is not None else self.pl.default_clip_low
        if high is None and c.policy_loss == "clip" and self.algo.default_clip_high is not None:
            high = self.algo.default_clip_high  # dapo's clip-higher
        self.eps_high = high if high is not None else (self.pl.default_clip_high or self.eps_low)
        self.normaliser = self.pl.normaliser or self.algo.normaliser
        self.beta = c.kl_coef
        self.max_prompt = self.env.max_context if self.env else max(len(p) for p in self.prompt_ids + self.eval_ids)
        self.scfg = SamplingConfig(
            max_new_tokens=g.max_new_tokens,
            min_new_tokens=g.min_new_tokens,
            temperature=g.temperature,
            top_k=g.top_k,
            top_p=g.top_p,
            stop_token_ids=[tok.eos_token_id],
            pad_token_id=tok.pad_token_id,
        )
        if self.env is None and len(self.prompt_ids) < c.prompts_per_rollout * rt.world_size:
            raise DataError(
                f"data.train has {len(self.prompt_ids)} prompts; a rollout needs "
                f"{c.prompts_per_rollout * rt.world_size} (rlhf.prompts_per_rollout x processes)"
            )
        self.cursor = (
            self.env.cursor
            if self.env
            else DataCursor(len(self.prompt_ids), c.prompts_per_rollout * rt.world_size, r.train.seed, r.data.shuffle)
        )
        self.steps_per_rollout = self.epochs * c.minibatches_per_epoch
        t = r.train
        if t.max_steps is not None:
            self.total_updates = t.max_steps
        else:
            self.total_updates = max(
                1, math.ceil((t.epochs or 1.0) * self.cursor.steps_per_epoch() * self.steps_per_rollout)
            )
        params = [{"params": [p for p in self.policy.parameters() if p.requires_grad], "weight_decay": t.weight_decay}]
        if value_head is not None:
            params.append(
                {
                    "params": list(value_head.parameters()),
                    "weight_decay": 0.0,
                    "lr_scale": (c.value_lr / t.lr) if c.value_lr else 1.0,
                }
            )
        self.group = Group("policy", self.model, rt, t, self.total_updates, param_groups=params)
        # after the Group: the sampler reads the weights as they are held now (whole, or gathered from shards)
        self.sampler = choose_sampler(
            lm, g, self.rt, self.B, self.max_prompt + g.max_new_tokens, self.group.gathered, ctx.warn
        )
        if self.env is not None:
            self.env.attach(self.sampler)
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

    def _load_prompts(self, ctx) -> None:
        """The prompt rows (data.train, data.eval) as token ids."""
        r, tok = self.cfg, self.tok
        rows = load_rows(r.data.train, what="data.train")
        eval_rows = load_rows(r.data.eval, what="data.eval") if r.data.eval is not None else None
        if eval_rows is None and r.data.eval_fraction > 0:
            rows, eval_rows = split_eval(rows, r.data.eval_fraction, r.train.seed)
        self.train_rows, self.eval_rows = rows, eval_rows
        src = f"data.train: {r.data.train.path}"
        self.prompt_text, self.prompt_ids, trunc = prompt_rows(rows, tok, r.data.max_prompt_length, src)
        eval_src = f"data.eval: {r.data.eval.path}" if r.data.eval is not None else src
        self.eval_text, self.eval_ids, _ = (
            prompt_rows(eval_rows, tok, r.data.max_prompt_length, eval_src) if eval_rows else ([], [], 0)
        )
        n_blank, first, _ = blank_rows(rows, ["prompt"] if "prompt" in rows.column_names else [])
        if n_blank:
            ctx.warn(f"{src}: {n_blank} prompts hold only whitespace (first: row {first}); remove them")
        if trunc:
            ctx.warn(
                f"data.train: {trunc} of {len(self.prompt_ids)} prompts were longer than max_prompt_length="
                f"{r.data.max_prompt_length} tokens and lost their beginning"
            )
        self.n_truncated = trunc

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
            self.sampler = HFSampler(self.lm, self.rt, gather=self.group.gathered)
        return replace

    # ------------------------------------------------------------------ sampling
    def next_prompts(self) -> list[int]:
        """This rank's prompts of the next rollout."""
        items = self.cursor.next()
        mine = shard_for_rank(items, self.rt.rank, self.rt.world_size)
        while len(mine) < self.cfg.rlhf.prompts_per_rollout:  # a short last step: repeat prompts to fill the batch
            mine.append(mine[len(mine) % max(1, len(mine))] if mine else items[0])
        return mine

    def sample(self, prompt_idx: list[int], texts: list[str], ids: list[list[int]], k: int) -> Samples:
        """k completions for each prompt index, from the current policy."""
        rt = self.rt
        rows = [i for i in prompt_idx for _ in range(k)]
        p_ids, p_mask = left_pad([ids[i] for i in rows], self.tok.pad_token_id, rt.device)
        P = p_ids.shape[1]
        if P < self.max_prompt:  # a fixed prompt width keeps the decoder's buffers (and CUDA graph) reusable
            pad = self.max_prompt - P
            p_ids = torch.cat([torch.full((len(rows), pad), self.tok.pad_token_id, device=rt.device), p_ids], 1)
            p_mask = torch.cat([torch.zeros((len(rows), pad), dtype=p_mask.dtype, device=rt.device), p_mask], 1)
        self.model.eval()
        rt.synchronize()
        t0 = time.perf_counter()
        r = self.sampler.generate(p_ids, p_mask, self.scfg)
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
            r = self.sampler.generate(p_ids, p_mask, self.scfg)
        r = apply_stop_strings(r, self.tok, self.cfg.generation.stop_strings, self.tok.pad_token_id)
        comp_text = [
            self.tok.decode(c[m.bool()].tolist(), skip_special_tokens=True)
            for c, m in zip(r.completion_ids, r.completion_mask)
        ]
        return Samples(r, rows, [texts[i] for i in rows], comp_text, gen_s)

    def sample_train(self) -> Samples:
        """Completions of the policy for the next prompts, with no update (the GAN's discriminator warm-up)."""
        return self.sample(self.next_prompts(), self.prompt_text, self.prompt_ids, self.k)

    @staticmethod
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

    # ------------------------------------------------------------------ rollout
    def rollout(self) -> Experience:
        """Sample, score and compute advantages (or pairs) for the next prompts; queue the minibatches of
        its updates."""
        rt, c = self.rt, self.cfg.rlhf
        t0 = time.perf_counter()
        self.sampler.sync()
        d, draw_stats = self._draw_rollout()
        r, prompts, completions = d.samples.rollout, d.samples.prompts, d.samples.completions
        seq = self.sequences(r)
        mask = r.completion_mask.float()
        if c.mask_truncated_completions:
            mask = mask * r.finished.float()[:, None]
            if rt.all_reduce(mask.sum().reshape(1)).item() == 0:
                raise TrainingError(
                    f"rollout {self.rollouts + 1}: every completion was cut by generation.max_new_tokens "
                    f"({self.scfg.max_new_tokens}) before its stop token, and rlhf.mask_truncated_completions "
                    "leaves them all out of the loss: raise max_new_tokens, or turn it off (overlong_buffer "
                    "shapes their reward instead)"
                )
        ref_logp = self.score_logprobs(seq, reference=True)[0] if self.need_ref else None
        if self.old_is_current:
            old_logp, old_values = None, None
            kl = torch.zeros_like(mask)  # measured in the update instead (kl/mean is logged there)
        else:
            old_logp, old_values = self.score_logprobs(seq, reference=False)
            if ref_logp is None:
                ref_logp = old_logp
            kl = kl_per_token(old_logp, ref_logp, "k1") * r.completion_mask
        self.model.train()
        self.buffer = {**seq, "mask": mask}
        if r.logprobs is not None:
            self.buffer["sampler_logp"] = r.logprobs
        if self.preference:
            self._queue_pairs(d, seq, ref_logp)
        else:
            self._queue_policy(d, r, kl, mask, old_logp, old_values, ref_logp)
        self.rollout_metrics, n = rollout_stats(self, r, d, kl, old_logp, t0)
        self.rollout_metrics.update(draw_stats)
        if self.env is not None:
            self.rollout_metrics.update(self.env.metrics())
        if c.kl_target is not None:  # adaptive KL controller (Ziegler et al. 2019); n: sequences, all ranks
            err = max(-0.2, min(0.2, self.rollout_metrics["kl/mean"] / c.kl_target - 1.0))
            self.beta *= 1.0 + err * n / c.kl_horizon
        if c.num_examples and self.rollouts % c.log_examples_every_steps == 0 and rt.is_main:
            self._show_examples(prompts, completions, d.total)
        self.rollouts += 1
        return Experience(d.samples.rows, prompts, completions, d.total)

    def _queue_policy(self, d: Draw, r: Rollout, kl, mask, old_logp, old_values, ref_logp) -> None:
        """Advantages of a policy-gradient rollout, and its minibatches (sequence indices)."""
        rt, c = self.rt, self.cfg.rlhf
        x = AdvantageInputs(
            scores=d.scores,
            kl=kl if self.algo.kl_in_reward else torch.zeros_like(kl),
            mask=r.completion_mask.float(),
            values=old_values,
            k=self.k,
            beta=self.beta,
            cfg=c,
            all_reduce=rt.all_reduce if rt.distributed else None,
            step_rewards=r.step_rewards if isinstance(r, EpisodeRollout) else None,
        )
        adv, returns = self.algo.advantages(x)
        self.buffer["adv"] = adv
        if old_logp is not None:
            self.buffer["old_logp"] = old_logp
        if ref_logp is not None:
            self.buffer["ref_logp"] = ref_logp
        if old_values is not None:
            self.buffer.update(old_values=old_values, returns=returns)
        self.queue = []
        for e in range(self.epochs):
            perm = torch.randperm(self.B, generator=self._epoch_generator(e)).tolist()
            self.queue += [perm[s : s + self.mb_size] for s in range(0, self.B, self.mb_size)]

    def _queue_pairs(self, d: Draw, seq: dict, ref_logp) -> None:
        """online_dpo: the best/worst pair of each prompt, the reference's sequence log-probs (temperature 1,
        the objective's reduction), and minibatches of pairs, the pairs with a signal spread over them."""
        chosen, rejected, valid = best_worst_pairs(d.scores, self.k)
        self.buffer.update(pair_chosen=chosen, pair_rejected=rejected, pair_valid=valid.float())
        if self.need_ref:
            t1 = self.cfg.generation.temperature == 1.0 and ref_logp is not None
            ref_tok = ref_logp if t1 else self.score_logprobs(seq, reference=True, temperature=1.0)[0]
            self.buffer["ref_seq"] = self.online.sequence(ref_tok, seq["targets"])[0]
        P, M = self.units, self.cfg.rlhf.minibatches_per_epoch
        self.queue = []
        for e in range(self.epochs):
            perm = torch.randperm(P, generator=self._epoch_generator(e))
            perm = torch.cat([perm[valid[perm]], perm[~valid[perm]]]).tolist()  # pairs first, dealt round-robin
            self.queue += [perm[j::M] for j in range(M)]

    def _epoch_generator(self, e: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.cfg.train.seed * 1_000_003 + self.rollouts * 101 + e)

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

    # ------------------------------------------------------------------ updates
    def loss_params(self) -> LossParams:
        c = self.cfg.rlhf
        return LossParams(
            eps_low=self.eps_low,
            eps_high=self.eps_high,
            beta=self.beta,
            kl_in_loss=not self.algo.kl_in_reward,
            normaliser=self.normaliser,
            max_new_tokens=self.cfg.generation.max_new_tokens,
            vf_coef=c.vf_coef,
            value_clip_eps=c.value_clip_eps,
            policy_loss=c.policy_loss,
            is_correction=c.is_correction,
            is_cap=c.is_cap,
            is_floor=c.is_floor,
        )

    def loss(self, module, mb) -> tuple[torch.Tensor, dict]:
        """One micro-batch of a rollout through the policy: `loss.policy_loss` plus what only the forward
        knows (entropy; the KL to the reference and the sampler/trainer mismatch when the rollout skipped
        its policy forward). online_dpo: the preference objective on pairs (online.py)."""
        if self.preference:
            return self.online(module, mb)
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
        if self.old_is_current and "ref_logp" in mb:
            k1 = (kl_per_token(logp.detach(), mb["ref_logp"], "k1") * mask).sum()
            metrics["kl/mean"] = (k1, (mask.sum(1) > 0).sum())
        if self.old_is_current and "sampler_logp" in mb:
            mm, mx = mismatch_stats(logp, mb["sampler_logp"], (mb["targets"] != -100).float())
            metrics.update(mm)
            mx = self.rt.all_reduce(mx.detach().double().reshape(1), op=max_op(self.rt))
            # the largest difference is not a mean: kept in the step's own metrics, max over micro-batches
            self._plan_metrics["mismatch/abs_max"] = max(self._plan_metrics.get("mismatch/abs_max", 0.0), float(mx))
        return loss_sum, metrics

    def needs_rollout(self) -> bool:
        return not self.queue

    def next_plan(self) -> Plan:
        """The next policy update: a minibatch of the current rollout (call `rollout()` first when
        `needs_rollout()`)."""
        rows = self.queue.pop(0)
        idx = torch.tensor(rows, device=self.rt.device)
        micro = []
        bs = self.cfg.train.batch_size
        norm = NORMALISERS[self.normaliser]
        pair_keys = ("pair_chosen", "pair_rejected", "pair_valid")
        for s in range(0, len(rows), bs):
            sub = idx[s : s + bs]
            if self.preference:  # a micro-batch of pairs: their chosen rows, then their rejected rows
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
            group="policy",
            micro=micro,
            loss_fn=self.loss,
            name=self.cfg.rlhf.algorithm,
            metrics=self._plan_metrics,
        )

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

    def describe(self) -> dict:
        data = (
            {"env": self.env.factory.name, "tasks": self.cfg.env.num_tasks, "tools": self.env.factory.tool_names}
            if self.env
            else {}
        )
        return {
            "data": {
                **data,
                "prompts": len(self.prompt_ids),
                "eval_prompts": len(self.eval_ids),
                "truncated_prompts": self.n_truncated,
            },
            "model": {
                "parameters": sum(p.numel() for p in self.lm.parameters()),
                "trainable_parameters": trainable_parameters(self.model),
            },
            "rlhf": {
                "algorithm": self.cfg.rlhf.algorithm,
                "rollouts": self.rollouts,
                "sequences_per_rollout": self.B * self.rt.world_size,
                "sampler": type(self.sampler).__name__,
                "sampler_bytes": self.sampler.nbytes(),  # per process, kept between rollouts
                "final_kl_coef": self.beta,
                "prompts_sampled": self.prompts_sampled,
                **(
                    {"objective": self.cfg.rlhf.preference.objective, "beta": self.online.hp.beta}
                    if self.preference
                    else {"policy_loss": self.cfg.rlhf.policy_loss, "clip": [self.eps_low, self.eps_high]}
                ),
            },
        }

    def save_final(self, out_dir) -> None:
        from pathlib import Path

        from safetensors.torch import save_file

        save_hf(self.lm, self.tok, out_dir, self.rt)
        if self.model.value_head is not None:
            head = whole_state(self.model.value_head, self.rt)  # every rank: gathered when sharded
            if head is not None:
                save_file(head, str(Path(out_dir) / "value_head.safetensors"))
