"""Building a PolicyLearner from a recipe, in the order that keeps runs reproducible (the random values drawn
while models are made come in this order): the update rule, the tokenizer and prompts, the rewards, the
policy with its reference and value head, the rollout's shape, the optimizer group, the sampler."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from ...engine.data import DataCursor, blank_rows, load_rows, split_eval
from ...engine.families import FALLBACK_COST
from ...engine.models import PolicyLM, build_trained_model, frozen_copy
from ...engine.rollout import FastDecoder, supports_fast_decoder
from ...engine.run import RunContext
from ...engine.sampling import HFSampler, SamplingConfig
from ...engine.task import Group
from ...engine.tokenizer import load_tokenizer
from ...errors import DataError, UsageError
from ...reward_sources import RewardSet, RewardSource, build_rewards
from .advantages import ALGORITHMS, algorithm_key
from .env_rollout import EnvRollouts
from .learner import ActorCritic, Models, PolicyLearner, Prompts, RolloutShape, UpdateRule
from .loss import POLICY_LOSSES
from .online import OnlinePreferenceLoss
from .sampling import prompt_rows
from .users import PromptUsers


def build_learner(ctx: RunContext, extra_rewards: Sequence[RewardSource] = ()) -> PolicyLearner:
    """The learner of `ctx.recipe`; `extra_rewards` come before the recipe's `rewards:` in the summed reward
    (the GAN's discriminator)."""
    r, rt = ctx.recipe, ctx.rt
    c, g = r.rlhf, r.generation
    rule = update_rule(c)
    tok = load_tokenizer(r.model)
    # episodes in an environment instead of prompt rows (env_rollout.py): the class checked before models load
    env = EnvRollouts(r, tok, rt) if getattr(r, "env", None) is not None else None
    prompts = Prompts(None, None, [], [], [], [], 0) if env else load_prompts(ctx, tok)
    rewards = reward_set(r.rewards, tok, rt.device, extra_rewards, empty_ok=env is not None)
    # old and new log-probs must come from the same function: dropout off (the builder's default)
    lm = build_trained_model(r.model, tok, rt, r.train.gradient_checkpointing, r.train.seed, ctx.smoke)
    ref_policy = None
    if r.model.lora is None and rule.need_ref:
        # a frozen copy in the compute dtype (with LoRA: the same weights with the adapters off)
        ref_policy = rt.place_frozen(
            PolicyLM(frozen_copy(lm, rt.compute_dtype if rt.device.type == "cuda" else rt.param_dtype), rt)
        )
    policy = PolicyLM(lm, rt)
    value_head = None
    if rule.algo.needs_value:
        value_head = nn.Linear(lm.config.hidden_size, 1).to(rt.device, rt.param_dtype)
        nn.init.zeros_(value_head.weight)  # std 0 (Huang et al. 2023)
        nn.init.zeros_(value_head.bias)
    model = ActorCritic(policy, value_head)
    shape = rollout_shape(c, rule, env.max_context if env else max(len(p) for p in prompts.ids + prompts.eval_ids))
    scfg = SamplingConfig(
        max_new_tokens=g.max_new_tokens,
        min_new_tokens=g.min_new_tokens,
        temperature=g.temperature,
        top_k=g.top_k,
        top_p=g.top_p,
        stop_token_ids=[tok.eos_token_id],
        pad_token_id=tok.pad_token_id,
    )
    if env is None and len(prompts.ids) < c.prompts_per_rollout * rt.world_size:
        raise DataError(
            f"data.train has {len(prompts.ids)} prompts; a rollout needs "
            f"{c.prompts_per_rollout * rt.world_size} (rlhf.prompts_per_rollout x processes)"
        )
    cursor = (
        env.cursor
        if env
        else DataCursor(len(prompts.ids), c.prompts_per_rollout * rt.world_size, r.train.seed, r.data.shuffle)
    )
    t = r.train
    if t.max_steps is not None:
        total = t.max_steps
    else:
        total = max(1, math.ceil((t.epochs or 1.0) * cursor.steps_per_epoch() * shape.steps_per_rollout))
    params = [{"params": [p for p in policy.parameters() if p.requires_grad], "weight_decay": t.weight_decay}]
    if value_head is not None:
        lr_scale = (c.value_lr / t.lr) if c.value_lr else 1.0
        params.append({"params": list(value_head.parameters()), "weight_decay": 0.0, "lr_scale": lr_scale})
    group = Group("policy", model, rt, t, total, param_groups=params)
    # after the Group: the sampler reads the weights as they are held now (whole, or gathered from shards)
    sampler = make_sampler(ctx, lm, group, shape)
    models = Models(tok, lm, policy, model, ref_policy, group, sampler)
    learner = PolicyLearner(ctx, prompts, rule, shape, models, rewards, scfg, cursor, total)
    if env is not None:
        learner.env = env
        env.attach(learner)
    return learner


def update_rule(c) -> UpdateRule:
    """The rlhf section's estimator, surrogate, clip bounds and normaliser, and what they need."""
    key = algorithm_key(c)
    algo = ALGORITHMS[key]
    preference = algo.update == "preference"
    online = OnlinePreferenceLoss(c.preference) if preference else None
    epochs = c.epochs_per_rollout or algo.default_epochs
    pl = POLICY_LOSSES[c.policy_loss]
    low, high = c.clip_low, c.clip_high
    eps_low = low if low is not None else pl.default_clip_low
    if high is None and c.policy_loss == "clip" and algo.default_clip_high is not None:
        high = algo.default_clip_high  # dapo's clip-higher
    eps_high = high if high is not None else (pl.default_clip_high or eps_low)
    # One pass over a rollout whose advantages need no rollout-time log-probs (grpo): the old policy is the
    # current one, so the training forward's own (detached) log-probs serve as pi_old and one no-grad forward
    # per rollout is saved (as TRL does for num_iterations=1). The adaptive KL controller reads the rollout's
    # KL, so it keeps the forward.
    old_is_current = (
        not preference
        and not algo.kl_in_reward
        and not algo.needs_value
        and epochs * c.minibatches_per_epoch == 1
        and c.kl_target is None
    )
    return UpdateRule(
        key=key,
        algo=algo,
        online=online,
        eps_low=eps_low,
        eps_high=eps_high,
        normaliser=pl.normaliser or algo.normaliser,
        need_ref=online.needs_ref if preference else (c.kl_coef > 0 or c.kl_target is not None),
        old_is_current=old_is_current,
    )


def rollout_shape(c, rule: UpdateRule, max_prompt: int) -> RolloutShape:
    """A rollout's sizes; its units (sequences, or online_dpo's pairs) must split into whole minibatches."""
    k = c.num_generations
    B = c.prompts_per_rollout * k
    epochs = c.epochs_per_rollout or rule.algo.default_epochs
    units, what = (
        (c.prompts_per_rollout, "pairs (one per prompt: prompts_per_rollout)")
        if rule.preference
        else (B, "sequences (prompts_per_rollout x num_generations)")
    )
    if units % c.minibatches_per_epoch:
        raise UsageError(
            f"rlhf.minibatches_per_epoch ({c.minibatches_per_epoch}) must divide the rollout's {units} {what}"
        )
    return RolloutShape(
        k=k,
        prompts=c.prompts_per_rollout,
        sequences=B,
        units=units,
        minibatch=units // c.minibatches_per_epoch,
        epochs=epochs,
        steps_per_rollout=epochs * c.minibatches_per_epoch,
        max_prompt=max_prompt,
    )


def load_prompts(ctx: RunContext, tok) -> Prompts:
    """The training and held-out prompts (data.eval, else data.eval_fraction of data.train), as token ids cut
    to max_prompt_length from the left; blank and cut prompts are reported."""
    r = ctx.recipe
    rows = load_rows(r.data.train, what="data.train")
    eval_rows = load_rows(r.data.eval, what="data.eval") if r.data.eval is not None else None
    if eval_rows is None and r.data.eval_fraction > 0:
        rows, eval_rows = split_eval(rows, r.data.eval_fraction, r.train.seed)
    src = f"data.train: {r.data.train.path}"
    text, ids, trunc = prompt_rows(rows, tok, r.data.max_prompt_length, src)
    eval_src = f"data.eval: {r.data.eval.path}" if r.data.eval is not None else src
    eval_text, eval_ids, _ = (
        prompt_rows(eval_rows, tok, r.data.max_prompt_length, eval_src) if eval_rows else ([], [], 0)
    )
    n_blank, first, _ = blank_rows(rows, ["prompt"] if "prompt" in rows.column_names else [])
    if n_blank:
        ctx.warn(f"{src}: {n_blank} prompts hold only whitespace (first: row {first}); remove them")
    if trunc:
        ctx.warn(
            f"data.train: {trunc} of {len(ids)} prompts were longer than max_prompt_length="
            f"{r.data.max_prompt_length} tokens and lost their beginning"
        )
    # whom each prompt is for (a user column); with rlhf.personalisation, their tokens before the prompts (added
    # to the tokenizer here, before the model is built: its embeddings grow to hold them)
    users = PromptUsers(r, tok, rows, eval_rows)
    ids, eval_ids = users.condition(ids, "train"), users.condition(eval_ids, "eval")
    return Prompts(rows, eval_rows, text, ids, eval_text, eval_ids, trunc, users)


def reward_set(specs, tok, device, extra: Sequence[RewardSource] = (), empty_ok: bool = False) -> RewardSet:
    """The recipe's rewards, after `extra` sources (`empty_ok`: none at all, in an environment that rewards)."""
    if not extra:
        return build_rewards(specs, tokenizer=tok, device=device, empty_ok=empty_ok)
    return RewardSet(list(extra) + (build_rewards(specs, tokenizer=tok, device=device).sources if specs else []))


def make_sampler(ctx: RunContext, lm, group: Group, shape: RolloutShape):
    """generation.sampler: the fast decoder where it covers the architecture (auto, fast), else transformers'
    generate (hf, or auto with a warning)."""
    g, rt = ctx.recipe.generation, ctx.rt
    ok, why = supports_fast_decoder(lm)
    if g.sampler == "fast" and not ok:
        raise UsageError(f"generation.sampler: fast does not support {why}; use 'auto' or 'hf'")
    if g.sampler == "hf" or not ok:
        if g.sampler == "auto":
            ctx.warn(
                f"the fast sampler does not support {why}; sampling with transformers generate, slower: {FALLBACK_COST}"
            )
        return HFSampler(lm, rt.autocast, gather=group.gathered)
    cuda = rt.device.type == "cuda"
    return FastDecoder(
        lm,
        batch=shape.sequences,
        max_len=shape.max_prompt + g.max_new_tokens,
        dtype=rt.compute_dtype,
        use_graph=g.cuda_graphs and cuda,
        compile=g.compile == "on" or (g.compile == "auto" and cuda),
        gather=group.gathered,
    )
