"""`prefcli rlhf` and `prefcli gan` recipes: prompts, rollout sampling, the RL algorithm, the discriminator."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationError, model_validator
from pydantic_core import InitErrorDetails

from ..envs import EnvSpec
from ..paths import PathOrHubId
from ..personal import PolicyPersonalisation
from ..reward_specs import RewardSpec
from ..sections import (
    DataSource,
    HeldOut,
    ModelInit,
    Section,
    TrainSource,
)
from .base import RecipeBase, field_error
from .names import (
    GRPO_LOSSES,
    IS_CORRECTIONS,
    ONLINE_OBJECTIVES,
    POLICY_LOSSES,
    RL_ALGORITHMS,
    RL_TOKEN_ADVANTAGES,
)


class PromptData(HeldOut):
    train: TrainSource = Field(
        description="Prompt rows: a 'prompt' column (text) or 'messages' (a chat, rendered "
        "with the chat template and a generation prompt); or a list of weighted sources (a mixture)."
    )
    eval: DataSource | None = Field(None, description="Held-out prompts for eval/reward and eval/kl.")
    eval_fraction: float = Field(
        0.0, ge=0, lt=1, description="Hold out this fraction of the prompts when no eval set is given."
    )
    max_prompt_length: int = Field(
        256, gt=0, description="Prompt tokens kept; longer prompts lose their beginning (counted in the summary)."
    )
    shuffle: bool = Field(True, description="Shuffle the prompts every epoch (seeded by train.seed).")
    user_column: str | None = Field(
        None,
        description="The column naming each prompt's user: a personalised policy (rlhf.personalisation) samples "
        "for that user, personalised reward models score for that user, and eval/reward is also reported per "
        "user. null = 'rater' when the rows have it, else 'user_id', else none.",
    )


class RolloutGeneration(Section):
    max_new_tokens: int = Field(64, gt=0, description="Most tokens sampled per completion.")
    min_new_tokens: int = Field(0, ge=0, description="The stop token is blocked until this many tokens exist.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature; log-probs in the update use the same one.")
    top_k: int = Field(0, ge=0, description="Sample among the k most likely tokens (0: all).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (1: off).")
    stop_strings: list[str] = Field(
        default_factory=list,
        description="A completion ends at the first of these (it counts as finished, like the stop token).",
    )
    sampler: Literal["auto", "fast", "hf"] = Field(
        "auto",
        description="'fast': prefcli's static-KV-cache decoder (the families of docs/families.md: Llama, Mistral, "
        "Qwen 2/3, Granite, Cohere, Phi-3, Gemma 2/3, GPT-2, GPT-NeoX, OPT); 'hf': transformers generate; 'auto': "
        "fast where supported, else hf with a warning.",
    )
    cuda_graphs: bool = Field(True, description="Capture the fast decoder's step in a CUDA graph (GPU only).")
    compile: Literal["auto", "on", "off"] = Field(
        "auto",
        description="torch.compile the fast decoder's layer step (fuses its small ops; compiles once, on the "
        "first rollout). 'auto': on a GPU only.",
    )

    @model_validator(mode="after")
    def _check(self):
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens ({self.min_new_tokens}) exceeds max_new_tokens ({self.max_new_tokens})")
        return self


class OnlinePreference(Section):
    """online_dpo: the objective applied to the pairs of each rollout (the contrastive registry's paired
    objectives) and its knobs, as `prefcli contrastive` names them."""

    objective: Literal[ONLINE_OBJECTIVES] = Field(
        "dpo",
        description="The preference loss on (best, worst) completion pairs: dpo (online DPO, Guo et al. 2024), "
        "ipo (online IPO), cdpo, robust, hinge, simpo, cpo, orpo (docs/commands/contrastive.md).",
    )
    beta: float | None = Field(
        None,
        gt=0,
        description="beta of the objective, its KL weight to the reference (orpo: lambda). null = the "
        "objective's default: 0.1 (2.0 for simpo).",
    )
    label_smoothing: float | None = Field(
        None, ge=0, lt=0.5, description="cdpo/robust: assumed label-flip probability (null = 0.1)."
    )
    simpo_gamma: float = Field(0.5, ge=0, description="simpo: target reward margin gamma.")
    cpo_alpha: float = Field(1.0, ge=0, description="cpo: weight of the NLL term on the chosen completion.")
    reduce: Literal["auto", "sum", "mean"] = Field(
        "auto",
        description="Sequence log-prob: 'sum' or 'mean' over completion tokens; 'auto' = the objective's choice "
        "(mean for ipo, simpo, orpo).",
    )


class RLHFSection(Section):
    personalisation: PolicyPersonalisation | None = Field(
        None,
        description="Train one policy conditioned on the user (data.user_column): each prompt starts with its "
        "user's control token, and the rewards score each completion for that user (a personalised reward model, "
        "`kind: model`, reads the user from the prompt row). Not with model.lora, not in gan. See "
        "docs/personalisation.md.",
    )
    algorithm: Literal[RL_ALGORITHMS] = Field(
        "grpo",
        description="ppo: value head + GAE (Ouyang et al. 2022); rloo: leave-one-out baseline (Ahmadian et al. "
        "2024); grpo: group-normalised advantages (Shao et al. 2024); reinforce_pp: REINFORCE++ (Hu et al. 2025); "
        "online_dpo: the best and worst of each prompt's completions become a preference pair for an objective "
        "of the contrastive registry (rlhf.preference; Guo et al. 2024).",
    )
    grpo_loss: Literal[GRPO_LOSSES] = Field(
        "grpo",
        description="GRPO variant: 'grpo' (std-normalised advantages, per-sequence token mean), 'dr_grpo' (no "
        "std, token sums over a constant), 'dapo' (token mean over the batch, clip_high 0.28 by default).",
    )
    policy_loss: Literal[POLICY_LOSSES] = Field(
        "clip",
        description="The surrogate: 'clip' (PPO's token ratio, clipped), 'gspo' (one length-normalised ratio per "
        "completion, clipped per completion; Zheng et al. 2025; not with ppo or reinforce_pp, whose advantages "
        "vary by token), 'cispo' (REINFORCE with a clipped stop-gradient importance weight on every token; "
        "MiniMax 2025).",
    )
    num_generations: int = Field(4, gt=0, description="Completions sampled per prompt (the group size G / k).")
    prompts_per_rollout: int = Field(8, gt=0, description="Prompts per rollout per process.")
    epochs_per_rollout: int | None = Field(
        None, gt=0, description="Passes over each rollout (default 4 for ppo, 1 otherwise)."
    )
    minibatches_per_epoch: int = Field(1, gt=0, description="Optimizer steps per pass over a rollout.")
    kl_coef: float = Field(
        0.05, ge=0, description="Weight beta of the KL penalty to the frozen reference (0: no reference)."
    )
    kl_target: float | None = Field(
        None,
        gt=0,
        description="Adaptive KL: steer the per-sequence KL to this value "
        "(Ziegler et al. 2019); null keeps kl_coef fixed.",
    )
    kl_horizon: int = Field(10000, gt=0, description="Adaptive-KL horizon (in sequences).")
    clip_low: float | None = Field(
        None,
        ge=0,
        le=1,
        description="eps_low: the ratio is clipped below at 1 - clip_low. null = the policy loss's default: 0.2 "
        "(clip), 3e-4 (gspo), 1.0 = no lower bound (cispo).",
    )
    clip_high: float | None = Field(
        None,
        ge=0,
        description="eps_high: the ratio is clipped above at 1 + clip_high (DAPO's clip-higher: 0.28). null = "
        "0.28 for grpo_loss: dapo, 4e-4 for gspo, 4.0 for cispo, else clip_low.",
    )
    value_clip_eps: float = Field(0.2, gt=0, description="PPO value clip epsilon.")
    vf_coef: float = Field(0.1, ge=0, description="PPO value-loss weight c_v.")
    value_lr: float | None = Field(None, gt=0, description="Learning rate of the value head (default train.lr).")
    gamma: float = Field(1.0, gt=0, le=1, description="Discount.")
    gae_lambda: float = Field(0.95, ge=0, le=1, description="GAE lambda (ppo).")
    whiten_advantages: bool = Field(
        True, description="Normalise advantages to mean 0, std 1 over the batch (ppo, reinforce_pp)."
    )
    reinforce_baseline: bool = Field(False, description="REINFORCE++-Baseline: subtract the group's mean score first.")
    missing_eos_penalty: float | None = Field(
        None,
        ge=0,
        description="Subtracted from the score of completions cut by "
        "max_new_tokens before their stop token (TRL's missing_eos_penalty).",
    )
    mask_truncated_completions: bool = Field(
        False,
        description="Leave completions without a stop token out of the loss (DAPO's overlong filtering). With env: "
        "the episodes the environment did not end (cut by env.max_turns or env.max_episode_tokens, or failed).",
    )
    dynamic_sampling: bool = Field(
        False,
        description="DAPO's dynamic sampling: drop prompts whose completions all score the same (no signal for "
        "group-relative advantages) and sample fresh prompts until the rollout is full "
        "(needs num_generations >= 2).",
    )
    dynamic_sampling_max_rounds: int = Field(
        4,
        ge=1,
        description="Cap on dynamic sampling: at most this many extra sampling rounds of prompts_per_rollout "
        "prompts per rollout; a rollout still short after them keeps some tied groups (advantage 0).",
    )
    overlong_buffer: int | None = Field(
        None,
        gt=0,
        description="DAPO's overlong reward shaping: over the last this-many tokens of max_new_tokens the score "
        "loses up to overlong_penalty, linearly in the length (null: off).",
    )
    overlong_penalty: float = Field(1.0, gt=0, description="The overlong penalty at max_new_tokens.")
    is_correction: Literal[IS_CORRECTIONS] = Field(
        "none",
        description="Correct for the sampler/trainer mismatch with truncated importance weights pi_trainer / "
        "pi_sampler on each token's loss: 'token_truncate' (TIS, Yao et al. 2025), 'token_mask', "
        "'sequence_truncate', 'sequence_mask' (TRL's modes). The mismatch is logged either way.",
    )
    is_cap: float = Field(2.0, gt=0, description="C_max of is_correction: weights above it are cut to it (or masked).")
    is_floor: float | None = Field(
        None, ge=0, description="C_min of is_correction: weights below it are raised to it (or masked); null: none."
    )
    preference: OnlinePreference = Field(
        default_factory=OnlinePreference, description="online_dpo: the preference objective and its knobs."
    )
    log_examples_every_steps: int = Field(
        10,
        gt=0,
        description="Show (and append to samples.jsonl) a few prompt/completion/reward examples every N steps.",
    )
    num_examples: int = Field(3, ge=0, description="Examples shown each time.")

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data):
        """The names clip_low and clip_high had before 0.2.0."""
        for old, new in (("clip_eps", "clip_low"), ("clip_eps_high", "clip_high")):
            if isinstance(data, dict) and old in data:
                raise ValueError(f"{old} is the old name of {new}, no longer read: write {new}: {data[old]}")
        return data

    @model_validator(mode="after")
    def _check(self):
        # fields changed from their defaults (not model_fields_set: --smoke re-validates a full dump)
        given = {
            k
            for k, f in type(self).model_fields.items()
            if getattr(self, k) != f.get_default(call_default_factory=True)
        }
        if self.algorithm in ("rloo", "grpo", "online_dpo") and self.num_generations < 2:
            raise ValueError(f"{self.algorithm} compares completions of the same prompt: num_generations must be >= 2")
        low, high = self.clip_low, self.clip_high
        if low is not None and high is not None and high < low:
            raise ValueError(
                f"clip_high ({high}) is below clip_low ({low}): the bounds are out of order (clip-higher widens "
                "the upper side; swap them if that was meant)"
            )
        if self.dynamic_sampling and self.num_generations < 2:
            raise ValueError(
                "dynamic_sampling drops prompts whose completions all score the same; with num_generations 1 every "
                "prompt would be dropped: set num_generations >= 2"
            )
        if self.is_floor is not None and self.is_floor >= self.is_cap:
            raise ValueError(f"is_floor ({self.is_floor}) must be below is_cap ({self.is_cap}): out of order")
        if self.is_correction == "none" and given & {"is_cap", "is_floor"}:
            raise ValueError("is_cap / is_floor bound the importance weights of is_correction, which is 'none'")
        if self.policy_loss == "gspo":
            if self.algorithm in RL_TOKEN_ADVANTAGES:
                raise ValueError(
                    f"policy_loss gspo clips one ratio per completion and needs one advantage per completion; "
                    f"{self.algorithm}'s advantages vary token by token (use rloo or grpo, or policy_loss clip/cispo)"
                )
            if self.algorithm == "grpo" and self.grpo_loss != "grpo":
                raise ValueError(
                    f"policy_loss gspo averages each completion's loss (its own normaliser); grpo_loss "
                    f"{self.grpo_loss} chooses another: use grpo_loss grpo with gspo"
                )
        if self.algorithm == "online_dpo":
            moot = given & {
                "policy_loss", "clip_low", "clip_high", "is_correction", "kl_coef",
                "kl_target", "mask_truncated_completions", "grpo_loss", "whiten_advantages", "vf_coef",
            }  # fmt: skip
            if moot:
                raise ValueError(
                    f"{', '.join(sorted(moot))}: not used by online_dpo, whose update is the preference objective "
                    "(its KL weight is rlhf.preference.beta); remove them"
                )
        elif "preference" in given:
            raise ValueError("rlhf.preference configures algorithm online_dpo; remove it or set algorithm: online_dpo")
        if self.algorithm == "online_dpo" and self.policy_loss != "clip":
            raise ValueError("online_dpo has no policy-gradient surrogate: remove policy_loss")
        return self


SMOKE_NEW_TOKENS = 16


def check_overlong(rl: RLHFSection, gen: RolloutGeneration) -> None:
    if rl.overlong_buffer is not None and rl.overlong_buffer > gen.max_new_tokens:
        raise ValueError(
            f"rlhf.overlong_buffer ({rl.overlong_buffer}) exceeds generation.max_new_tokens ({gen.max_new_tokens}): "
            "the penalty ramps over the last overlong_buffer tokens of the length budget"
        )


def shrink_rollouts(data: dict) -> None:
    """--smoke for a recipe that samples: short rollouts of 2 prompts x 2 completions, one pass."""
    gen = data["generation"]
    gen["max_new_tokens"] = min(gen["max_new_tokens"], SMOKE_NEW_TOKENS)
    gen["min_new_tokens"] = min(gen["min_new_tokens"], gen["max_new_tokens"])
    rl = data["rlhf"]
    rl["prompts_per_rollout"] = min(rl["prompts_per_rollout"], 2)
    rl["num_generations"] = min(rl["num_generations"], 2)
    rl["epochs_per_rollout"] = 1
    rl["minibatches_per_epoch"] = 1
    if rl.get("overlong_buffer"):
        rl["overlong_buffer"] = min(rl["overlong_buffer"], max(1, gen["max_new_tokens"] // 4))


ENV_EVAL_METRICS = ("eval/success_rate", "eval/env_reward", "eval/turns", "eval/tool_error_rate")


class RLHFRecipe(RecipeBase):
    """`prefcli rlhf`: reinforcement learning from a reward, R(s, a) = HumanScore(a): PPO, RLOO, GRPO, REINFORCE++;
    on single prompts (`data`) or on episodes in an environment (`env`: multi-turn, tools; docs/environments.md)."""

    command: Literal["rlhf"] = Field("rlhf", description="Always 'rlhf' for this schema.")
    data: PromptData | None = Field(
        None, description="Prompts to sample completions for (one of data and env; required without env)."
    )
    env: EnvSpec | None = Field(
        None,
        description="An environment to play episodes in instead of prompts: multi-turn, with tools "
        "(docs/environments.md). Each group of rlhf.num_generations episodes starts from the same reset(seed).",
    )
    rewards: list[RewardSpec] = Field(
        default_factory=list,
        description="Reward sources, summed with their weights (at least one without env; with env they score the "
        "final transcript and are added to the environment's reward).",
    )
    generation: RolloutGeneration = Field(
        default_factory=RolloutGeneration,
        description="Sampling settings (with env: per turn, max_new_tokens being each turn's budget).",
    )
    rlhf: RLHFSection = Field(default_factory=RLHFSection, description="The algorithm and its knobs.")

    @model_validator(mode="after")
    def _check(self):
        if self.train.grad_accum_steps != 1:
            raise ValueError(
                "train.grad_accum_steps does not apply to rlhf: each optimizer step takes a minibatch of "
                "the rollout (see rlhf.minibatches_per_epoch), split into micro-batches of train.batch_size"
            )
        if self.rlhf.personalisation is not None and self.model.lora is not None:
            raise field_error(
                ("rlhf", "personalisation"),
                "does not work with model.lora: the user tokens' embeddings must train, and LoRA freezes them; "
                "train all weights (remove model.lora)",
                None,
            )
        if self.rlhf.personalisation is not None and self.env is not None:
            raise field_error(
                ("rlhf", "personalisation"),
                "not with env: the users come from the prompt rows' user column (data.user_column), and an "
                "environment has no prompt rows",
                None,
            )
        if self.env is None:
            # without env, data and rewards are required: a recipe that leaves them out gets pydantic's own
            # 'missing' error (a base: fragment may leave them out for the recipes built on it to give)
            for name in ("data", "rewards"):
                if name not in self.model_fields_set:
                    raise ValidationError.from_exception_data(
                        "recipe", [InitErrorDetails(type="missing", loc=(name,), input={})]
                    )
            if self.data is None:
                raise field_error(("data",), "null without env: give prompts (or env: an environment)", None)
            if not self.rewards:
                raise field_error(
                    ("rewards",), "List should have at least 1 item after validation, not 0 (a reward source)", []
                )
            check_overlong(self.rlhf, self.generation)
            return self
        if self.data is not None:
            raise field_error(
                ("data",),
                "not used with env: the environment's reset(seed) gives each episode its task; remove data (or env)",
                None,
            )
        if self.generation.max_new_tokens >= self.env.max_episode_tokens:
            raise field_error(
                ("generation", "max_new_tokens"),
                f"the per-turn budget ({self.generation.max_new_tokens}) must be below env.max_episode_tokens "
                f"({self.env.max_episode_tokens}), which also holds the prompt and the replies",
                self.generation.max_new_tokens,
            )
        b = self.rlhf.overlong_buffer
        if b is not None and b > self.env.max_episode_tokens:
            raise field_error(
                ("rlhf", "overlong_buffer"),
                f"{b} exceeds env.max_episode_tokens ({self.env.max_episode_tokens}): with env the penalty ramps over "
                "the last overlong_buffer tokens of the episode's length cap",
                b,
            )
        return self

    def has_held_out(self) -> bool:
        return self.env is not None or super().has_held_out()

    def eval_metrics(self) -> tuple[str, ...]:
        if self.env is not None:
            return ("eval/reward", "eval/kl", "eval/length", *ENV_EVAL_METRICS)
        return ("eval/reward", "eval/kl", "eval/length")

    def _shrink(self, data: dict) -> None:
        super()._shrink(data)
        shrink_rollouts(data)
        if data.get("env"):
            e = data["env"]
            e["max_turns"] = min(e["max_turns"], 2)
            e["eval_episodes"] = min(e["eval_episodes"], 4)


# ----------------------------------------------------------------------------------------- gan


class GANData(PromptData):
    """Prompts with the human/gold completion the discriminator treats as real."""

    train: DataSource = Field(description="Rows with 'prompt' (or 'messages') and 'completion': the human/gold answer.")
    pairs: DataSource | None = Field(
        None,
        description="Optional preference pairs (prompt, chosen, rejected) mixed into "
        "the discriminator's loss under Bradley-Terry (weight gan.bt_weight).",
    )
    max_length: int = Field(
        256, gt=1, description="Discriminator input tokens (prompt + completion), cut from the left."
    )


class DiscriminatorSection(Section):
    """The discriminator: a sequence classifier scoring prompt + completion (1 logit: real vs generated).
    Default: the generator's architecture (model.init) or pretrained weights (model.path) with a new
    score head; `path` can be a reward model from `prefcli reward`."""

    path: PathOrHubId | None = Field(
        None,
        description="Start from this model folder or hub id (a reward model keeps "
        "its head; a causal LM gets a new score head).",
    )
    init: ModelInit | None = Field(None, description="A random discriminator of this architecture instead.")
    tokenizer: PathOrHubId | None = Field(None, description="Its tokenizer (default: path's, else the generator's).")
    lr: float = Field(1e-4, gt=0, description="Discriminator learning rate (the generator uses train.lr).")
    batch_size: int = Field(16, gt=0, description="Real/generated pairs per discriminator step.")

    @model_validator(mode="after")
    def _check(self):
        if self.path is not None and self.init is not None:
            raise ValueError("set discriminator.path or discriminator.init, not both")
        return self


class GANSection(Section):
    disc_steps: int = Field(1, ge=0, description="Discriminator steps per generator rollout.")
    disc_warmup_steps: int = Field(10, ge=0, description="Discriminator steps before the first generator update.")
    buffer_size: int = Field(256, gt=0, description="The most recent generated completions kept for the discriminator.")
    label_smoothing: float = Field(
        0.0,
        ge=0,
        lt=0.5,
        description="One-sided label smoothing: real targets 1 - epsilon "
        "(Salimans et al. 2016); slows a discriminator that wins too early.",
    )
    generator_reward: Literal["log_sigmoid", "logit"] = Field(
        "log_sigmoid",
        description="'log_sigmoid': log D(x, y), the non-saturating generator objective (Goodfellow et "
        "al. 2014); 'logit': the raw logit (keeps a gradient when D is sure).",
    )
    reward_weight: float = Field(1.0, gt=0, description="Weight of the discriminator reward (summed with `rewards:`).")
    bt_weight: float = Field(
        0.0,
        ge=0,
        description="Weight of the Bradley-Terry loss on data.pairs in the "
        "discriminator's loss (APO, Cheng et al. 2023).",
    )
    grad_penalty: float = Field(
        0.0,
        ge=0,
        description="R1 gradient penalty gamma/2 E||grad_emb D(real)||^2 (Mescheder "
        "et al. 2018), on the real texts' input embeddings.",
    )
    max_disc_accuracy: float = Field(
        1.0,
        gt=0.5,
        le=1.0,
        description="Skip discriminator steps while its recent accuracy is above this (1.0: never skip).",
    )
    saturation_steps: int = Field(
        20,
        gt=0,
        description="Warn when the discriminator's accuracy stays >= 99% (the "
        "generator gets no signal) or within 50 +- 5% (it is not learning) this many steps.",
    )
    stop_on_saturation: bool = Field(
        False,
        description="End the run (exit 0, reason in the summary) when the "
        "discriminator has stayed saturated for saturation_steps.",
    )
    eval_rewards: list[RewardSpec] = Field(
        default_factory=list,
        description="Scores of held-out samples that the "
        "generator never trains on (e.g. sentiment when the gold set is positive): "
        "eval/<name>.",
    )


class GANRecipe(RecipeBase):
    """`prefcli gan`: a discriminator learns to tell human/gold completions from generated ones; the generator learns, by
    policy gradient (RLOO, GRPO, PPO), to be scored as human."""

    command: Literal["gan"] = Field("gan", description="Always 'gan' for this schema.")
    data: GANData = Field(description="Prompts with gold completions (and optional preference pairs).")
    discriminator: DiscriminatorSection = Field(default_factory=DiscriminatorSection, description="The discriminator.")
    gan: GANSection = Field(default_factory=GANSection, description="Alternation and balance.")
    rewards: list[RewardSpec] = Field(
        default_factory=list, description="Extra reward sources added to the discriminator's reward (optional)."
    )
    generation: RolloutGeneration = Field(default_factory=RolloutGeneration, description="Sampling settings.")
    rlhf: RLHFSection = Field(
        default_factory=lambda: RLHFSection(algorithm="rloo"),
        description="The generator's policy-gradient algorithm (default rloo).",
    )

    @model_validator(mode="after")
    def _check(self):
        if self.train.grad_accum_steps != 1:
            raise ValueError("train.grad_accum_steps does not apply to gan (see rlhf.minibatches_per_epoch)")
        if self.gan.bt_weight > 0 and self.data.pairs is None:
            raise ValueError("gan.bt_weight needs data.pairs (prompt, chosen, rejected rows)")
        if self.rlhf.personalisation is not None:
            raise field_error(("rlhf", "personalisation"), "applies to prefcli rlhf, not gan", None)
        check_overlong(self.rlhf, self.generation)
        return self

    def eval_metrics(self) -> tuple[str, ...]:
        return ("eval/reward", "eval/kl", "eval/length", "eval/disc_fake_prob")

    def _shrink(self, data: dict) -> None:
        super()._shrink(data)
        shrink_rollouts(data)  # the generator's rollouts, as rlhf shrinks them
        g = data["gan"]
        g["disc_warmup_steps"] = min(g["disc_warmup_steps"], 1)
        g["disc_steps"] = min(g["disc_steps"], 1)
        # SMOKE_STEPS loop steps in all, as every command: the loop counts discriminator steps too (warm-up +
        # disc_steps per generator update), so the generator gets what is left: by default 1 warm-up step,
        # 1 discriminator step, 1 generator update.
        data["train"]["max_steps"] = max(1, (self.SMOKE_STEPS - g["disc_warmup_steps"]) // (1 + g["disc_steps"]))
        data["discriminator"]["batch_size"] = min(data["discriminator"]["batch_size"], 4)
