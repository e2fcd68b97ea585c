"""One recipe schema per command, built from the shared sections plus the algorithm's own section.

`SCHEMAS` is the command table: `prefcli <command>` validates against `SCHEMAS[command]`, and a
test keeps it in sync with the CLI and the bundled recipes.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .paths import LocalPath, OutputPath, PathOrHubId
from .rewards import RewardSpec
from .sections import (
    DataSource,
    HeldOut,
    LogSection,
    ModelInit,
    ModelSection,
    OutputSection,
    RuntimeSection,
    Section,
    TrainSection,
)


class RecipeBase(Section):
    """Fields every training recipe has."""

    command: str = Field(description="The prefcli command this recipe is for (sft, reward, ...).")
    model: ModelSection = Field(description="The model to train and its tokenizer.")
    train: TrainSection = Field(default_factory=TrainSection, description="Optimisation, schedule, cadence.")
    runtime: RuntimeSection = Field(default_factory=RuntimeSection, description="Device, precision, kernels.")
    output: OutputSection = Field(default_factory=OutputSection, description="Where the run is written.")
    log: LogSection = Field(default_factory=LogSection, description="Progress and metrics logging.")


# ---------------------------------------------------------------------------------------- sft


class SFTData(HeldOut):
    train: DataSource = Field(description="Training rows.")
    eval: DataSource | None = Field(None, description="Held-out rows for perplexity (eval/ppl).")
    eval_fraction: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Hold out this fraction of the training rows for evaluation when no eval set is given.",
    )
    format: Literal["auto", "text", "prompt_completion", "messages"] = Field(
        "auto",
        description="Row shape: 'text' (column text), 'prompt_completion' (prompt, completion), 'messages' "
        "(a list of {role, content}, rendered with the chat template). 'auto' picks by the columns present.",
    )
    max_length: int = Field(1024, gt=1, description="Tokens per example; longer examples are truncated and counted.")
    mask_prompt: bool = Field(
        True,
        description="Train only on completion/assistant tokens (prompt tokens get no loss). 'text' rows have no prompt.",
    )
    packing: bool = Field(
        False, description="Pack several examples into each max_length row; attention never crosses example boundaries."
    )
    add_eos: bool = Field(True, description="End every example with the EOS token (so the model learns to stop).")
    shuffle: bool = Field(True, description="Shuffle the training rows every epoch (seeded by train.seed).")


# Which objectives read which knob of SFTSection (a knob changed from its default under an objective that
# ignores it is an error: it would silently do nothing).
PHF_KNOBS: dict[str, tuple[str, ...]] = {
    "rewards": ("filter", "conditional", "unlikelihood", "rwr", "awr"),
    "score_column": ("filter", "conditional", "unlikelihood", "rwr", "awr"),
    "score_batch_size": ("filter", "conditional", "unlikelihood", "rwr", "awr"),
    "threshold": ("filter", "conditional", "unlikelihood"),
    "threshold_quantile": ("filter", "conditional", "unlikelihood"),
    "aligned_token": ("conditional",),
    "misaligned_token": ("conditional",),
    "drop_control_fraction": ("conditional",),
    "control_position": ("conditional",),
    "segment_separator": ("conditional",),
    "control_init": ("conditional",),
    "control_lr_scale": ("conditional",),
    "control_gap_samples": ("conditional",),
    "control_gap_max_new_tokens": ("conditional",),
    "unlikelihood_alpha": ("unlikelihood",),
    "beta": ("rwr", "awr"),
    "awr_alpha": ("awr",),
    "awr_max_weight": ("awr",),
}


class SFTSection(Section):
    """The SFT objective. Beside plain maximum likelihood (`mle`), the objectives of pretraining with human
    preferences (Korbak et al. 2023): every training row is a segment, scored once before training by a
    scorer (`rewards` or `score_column`); see docs/commands/sft.md."""

    objective: Literal["mle", "filter", "conditional", "unlikelihood", "rwr", "awr"] = Field(
        "mle",
        description="Training objective. 'mle': next-token cross-entropy. With a scorer: 'filter' (MLE on the rows "
        "scoring >= the threshold only), 'conditional' (each row prefixed with aligned_token or misaligned_token by "
        "its score; generate after aligned_token), 'unlikelihood' (MLE on rows >= the threshold, -log(1-p) on the "
        "others), 'rwr' (NLL weighted by exp(score/beta)), 'awr' (NLL weighted by exp((score - V)/beta) with a "
        "learned value head V).",
    )
    rewards: list[RewardSpec] | None = Field(
        None,
        description="Scorer: reward sources (summed by weight) that score every training row once, before training; "
        "the scores are cached with the tokenized data. A 'text' row is scored as the completion with an empty prompt; "
        "a 'messages' row as its last assistant turn after the earlier turns. One of rewards and score_column is "
        "needed by every objective but mle.",
    )
    score_column: str | None = Field(
        None,
        description="Scorer alternative: a numeric column of the training data holding each row's score "
        "(e.g. human ratings); higher is better.",
    )
    score_batch_size: int = Field(256, gt=0, description="Rows per call to the reward sources when scoring.")
    threshold: float | None = Field(
        None,
        description="Fixed score threshold: a row is aligned (desirable) when its score >= threshold, misaligned "
        "otherwise. When null, the threshold is the threshold_quantile quantile of the training rows' scores.",
    )
    threshold_quantile: float = Field(
        0.25,
        gt=0,
        lt=1,
        description="When threshold is null: the threshold is this quantile of the training rows' scores (about "
        "this fraction of rows is misaligned; fewer when scores tie at the threshold).",
    )
    aligned_token: str = Field(
        "<|aligned|>",
        min_length=1,
        description="Control token of aligned rows (conditional); "
        "added to the tokenizer as a special token and the embeddings resized.",
    )
    misaligned_token: str = Field(
        "<|misaligned|>", min_length=1, description="Control token of misaligned rows (conditional)."
    )
    drop_control_fraction: float = Field(
        0.01,
        ge=0,
        le=1,
        description="Fraction of training rows given no control token (conditional), chosen by a hash of "
        "(train.seed, row) so that resume and reruns see the same rows.",
    )
    # -- conditional training: where the control token goes, how its embedding starts, and the evaluation-time
    #    check that the model has learned what the two tokens mean (docs/commands/sft.md, "conditional")
    control_position: Literal["start", "after_prompt", "per_segment"] = Field(
        "start",
        description="Where the control token goes (conditional). 'start': first in the row (after a BOS). "
        "'after_prompt': right before the first token the row trains on, after the masked prompt of a "
        "prompt_completion row or the turns before an assistant reply ('text' rows: as start). 'per_segment': "
        "every row's text ('text') or completion ('prompt_completion') is cut after each segment_separator; each "
        "segment is scored on its own and gets its own token (Korbak et al. condition every sentence); needs "
        "`rewards`. Sampling must put the token where training did.",
    )
    segment_separator: str = Field(
        "\n",
        min_length=1,
        description="control_position per_segment: the string that ends a segment (it stays with the segment "
        "before it).",
    )
    control_init: Literal["default", "mean", "random"] = Field(
        "default",
        description="How the two control tokens' embedding rows start (conditional). 'default': as the model "
        "is built (from model.init: like every other token; from model.path: transformers' mean resizing, the "
        "mean of the existing rows plus negligible noise, so both tokens start almost identical). 'mean': both "
        "exactly the mean of the other rows. 'random': each a draw from a normal with the other rows' mean and "
        "covariance (a typical token; the two differ from the start), seeded by train.seed.",
    )
    control_lr_scale: float = Field(
        1.0,
        gt=0,
        description="Multiplies the learning rate (and weight decay step) of the two control tokens' embedding "
        "rows (conditional): new rows in a pretrained model otherwise move at the finetuning learning rate.",
    )
    control_gap_samples: int | None = Field(
        None,
        ge=0,
        description="At every evaluation (conditional), sample this many completions after each control token "
        "from held-out prompts, score them with `rewards`, and log eval/control_gap (undesirable share after "
        "misaligned_token minus after aligned_token) and eval/control_score_gap. 0 = off. null = 32 with a "
        "`rewards` scorer that can score new text (no human_scores source), off otherwise.",
    )
    control_gap_max_new_tokens: int = Field(
        48, gt=0, description="Longest sample (tokens) for eval/control_gap (conditional)."
    )
    unlikelihood_alpha: float = Field(
        1.0, ge=0, description="Weight of the unlikelihood term -log(1-p) on misaligned rows (unlikelihood)."
    )
    beta: float = Field(
        10.0,
        gt=0,
        description="Temperature of the weights exp(score/beta) (rwr) and exp(advantage/beta) (awr), in score units.",
    )
    awr_alpha: float = Field(
        0.5, gt=0, le=1, description="AWR loss = awr_alpha * weighted NLL + (1 - awr_alpha) * value MSE."
    )
    awr_max_weight: float = Field(1000.0, gt=0, description="AWR weights exp(advantage/beta) are clipped to this.")

    @model_validator(mode="after")
    def _check(self):
        o = self.objective
        for name, users in PHF_KNOBS.items():
            if name not in self.model_fields_set or o in users:
                continue
            default = type(self).model_fields[name].get_default(call_default_factory=True)
            if getattr(self, name) != default:
                raise ValueError(
                    f"sft.{name} applies to objective {' or '.join(users)} only, not '{o}'; remove "
                    "it or change sft.objective"
                )
        if self.rewards is not None and self.score_column is not None:
            raise ValueError("give one scorer: sft.rewards or sft.score_column, not both")
        if o != "mle" and not self.rewards and self.score_column is None:
            raise ValueError(
                f"objective '{o}' needs a scorer: sft.rewards (e.g. [{{kind: sentiment}}]) or "
                "sft.score_column (a numeric column of the data)"
            )
        if (
            self.threshold is not None
            and "threshold_quantile" in self.model_fields_set
            and self.threshold_quantile != type(self).model_fields["threshold_quantile"].default
        ):
            raise ValueError("set sft.threshold (a fixed value) or sft.threshold_quantile, not both")
        if self.aligned_token == self.misaligned_token:
            raise ValueError("sft.aligned_token and sft.misaligned_token must differ")
        if self.segment_separator != "\n" and self.control_position != "per_segment":
            raise ValueError(
                f"sft.segment_separator applies to control_position per_segment only, not "
                f"'{self.control_position}'; remove it or set sft.control_position: per_segment"
            )
        if self.control_position == "per_segment" and self.score_column is not None:
            raise ValueError(
                "sft.control_position per_segment scores every segment on its own, which needs a scorer "
                "(sft.rewards); a score_column holds one score per row"
            )
        if self.score_column is not None and self.control_gap_samples:
            raise ValueError(
                "sft.control_gap_samples scores samples with sft.rewards; a score_column cannot score new text. "
                "Remove control_gap_samples (or set it to 0), or give sft.rewards"
            )
        return self

    def gap_samples(self) -> int:
        """Samples per control token for eval/control_gap (0 = off): the `control_gap_samples` rule."""
        if self.objective != "conditional":
            return 0
        if self.control_gap_samples is not None:
            return self.control_gap_samples
        if not self.rewards or any(r.kind == "human_scores" for r in self.rewards):
            return 0
        return 32


class SFTRecipe(RecipeBase):
    """`prefcli sft`: supervised fine-tuning, and pretraining from scratch with model.init."""

    command: Literal["sft"] = Field("sft", description="Always 'sft' for this schema.")
    data: SFTData = Field(description="Training and held-out data.")
    sft: SFTSection = Field(default_factory=SFTSection, description="The SFT objective.")

    @model_validator(mode="after")
    def _check_objective(self):
        if self.sft.objective == "conditional" and self.model.lora is not None:
            raise ValueError(
                "sft.objective 'conditional' adds control tokens whose embeddings must train; LoRA "
                "freezes the embeddings. Remove model.lora or pick another objective"
            )
        return self


# ------------------------------------------------------------------------------ preference data


class PreferenceData(HeldOut):
    """Preference rows. Pairs: `chosen`, `rejected`, optional `prompt` (and `margin` for reward
    models). Unpaired (kto): `prompt`, `completion`, `label`. Human scores (reward regression):
    `text` (or `prompt` + `completion`) and `score`. Rankings: optional `prompt`, `completions`
    (a list, best first). Map your column names with `columns`."""

    train: DataSource = Field(description="Training rows.")
    eval: DataSource | None = Field(None, description="Held-out rows for the eval/ metrics.")
    eval_fraction: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Hold out this fraction of the training rows for evaluation when no eval set is given.",
    )
    format: Literal["auto", "plain", "chat"] = Field(
        "auto",
        description="'plain': text values; 'chat': lists of {role, content} messages rendered with the chat template "
        "(with no `prompt` column, the messages both conversations share are the prompt). 'auto' looks at the values.",
    )
    max_length: int = Field(
        1024,
        gt=1,
        description="Tokens per sequence (prompt + completion). Longer completions are truncated and "
        "counted; rows whose prompt alone fills max_length are skipped and counted.",
    )
    shuffle: bool = Field(True, description="Shuffle the training rows every epoch (seeded by train.seed).")


# -------------------------------------------------------------------------------------- reward


class RewardSection(Section):
    objective: Literal["bradley_terry", "regression", "ranking"] = Field(
        "bradley_terry",
        description="'bradley_terry': pairwise loss -log sigmoid(r_chosen - r_rejected - margin) on chosen/rejected "
        "rows; 'regression': squared error to human scores on text/score rows; 'ranking': Bradley-Terry on every "
        "ordered pair of a K-way ranking (rows with `completions`, best first).",
    )
    use_margin: bool = Field(
        True, description="Subtract the row's `margin` column inside the Bradley-Terry loss when the data has one."
    )
    center_rewards_coefficient: float = Field(
        0.0,
        ge=0,
        description="eta of the reward-centering term eta * (r_chosen + r_rejected)^2 (Eisenstein et al. "
        "2023); 0 = off, ~0.01 is typical.",
    )
    calibration_bins: int = Field(10, gt=0, description="Equal-width confidence bins for eval/ece and eval/mce.")


class RewardRecipe(RecipeBase):
    """`prefcli reward`: a reward model (a scalar head read at the last real token) from preference pairs,
    human scores or rankings."""

    command: Literal["reward"] = Field("reward", description="Always 'reward' for this schema.")
    data: PreferenceData = Field(description="Training and held-out preference data.")
    reward: RewardSection = Field(default_factory=RewardSection, description="The reward-model objective.")


# --------------------------------------------------------------------------------- contrastive

CONTRASTIVE_OBJECTIVES = ("dpo", "cdpo", "robust", "ipo", "hinge", "simpo", "cpo", "orpo", "kto", "infonce")


class ContrastiveSection(Section):
    objective: Literal["dpo", "cdpo", "robust", "ipo", "hinge", "simpo", "cpo", "orpo", "kto", "infonce"] = Field(
        "dpo",
        description="Preference objective: dpo, cdpo (label smoothing), robust, ipo, hinge (SLiC), simpo, cpo, orpo "
        "(paired rows); kto (unpaired prompt/completion/label rows); infonce (an encoder trained with in-batch "
        "negatives; chosen = positive, rejected = hard negative). See docs/commands/contrastive.md.",
    )
    beta: float | None = Field(
        None,
        gt=0,
        description="Temperature of the implicit reward (orpo: lambda, the weight of the odds-ratio term). "
        "null = the objective's default: 0.1 (dpo, cdpo, robust, ipo, hinge, cpo, orpo, kto), 2.0 (simpo).",
    )
    label_smoothing: float | None = Field(
        None,
        ge=0,
        lt=0.5,
        description="cdpo/robust: the assumed probability epsilon that a pair's label is flipped. null = 0.1 for cdpo "
        "and robust (ignored by the other objectives).",
    )
    simpo_gamma: float = Field(0.5, ge=0, description="simpo: target reward margin gamma.")
    cpo_alpha: float = Field(1.0, ge=0, description="cpo: weight of the NLL term on the chosen completion.")
    desirable_weight: float = Field(1.0, gt=0, description="kto: lambda_D, weight of desirable rows.")
    undesirable_weight: float = Field(1.0, gt=0, description="kto: lambda_U, weight of undesirable rows.")
    reduce: Literal["auto", "sum", "mean"] = Field(
        "auto",
        description="How token log-probs become a sequence log-prob: 'sum' over completion tokens, or their 'mean'. "
        "'auto' = the objective's own choice (mean for ipo, simpo, orpo; sum otherwise).",
    )
    temperature: float = Field(
        0.05, gt=0, description="infonce: tau dividing the cosine similarities (0.05 = scale 20)."
    )
    pooling: Literal["mean", "last"] = Field(
        "mean",
        description="infonce: sentence embedding = mean of the last hidden states over real tokens, or the "
        "hidden state of the last real token (EOS).",
    )
    hard_negatives: bool = Field(
        True, description="infonce: add each row's `rejected` text as a hard negative (when the data has it)."
    )


class ContrastiveRecipe(RecipeBase):
    """`prefcli contrastive`: a policy trained directly from preferences (DPO family, KTO), or an InfoNCE
    preference encoder."""

    command: Literal["contrastive"] = Field("contrastive", description="Always 'contrastive' for this schema.")
    data: PreferenceData = Field(description="Training and held-out preference data.")
    contrastive: ContrastiveSection = Field(default_factory=ContrastiveSection, description="The objective.")


# ---------------------------------------------------------------------------------------- rlhf


class PromptData(HeldOut):
    train: DataSource = Field(
        description="Prompt rows: a 'prompt' column (text) or 'messages' (a chat, rendered "
        "with the chat template and a generation prompt)."
    )
    eval: DataSource | None = Field(None, description="Held-out prompts for eval/reward and eval/kl.")
    eval_fraction: float = Field(
        0.0, ge=0, lt=1, description="Hold out this fraction of the prompts when no eval set is given."
    )
    max_prompt_length: int = Field(
        256, gt=0, description="Prompt tokens kept; longer prompts lose their beginning (counted in the summary)."
    )
    shuffle: bool = Field(True, description="Shuffle the prompts every epoch (seeded by train.seed).")


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
        description="'fast': prefcli's static-KV-cache decoder (llama, mistral, qwen2, qwen3); 'hf': "
        "transformers generate; 'auto': fast where supported.",
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


class RLHFSection(Section):
    algorithm: Literal["ppo", "rloo", "grpo", "reinforce_pp"] = Field(
        "grpo",
        description="ppo: value head + GAE (Ouyang et al. 2022); rloo: leave-one-out baseline (Ahmadian et al. "
        "2024); grpo: group-normalised advantages (Shao et al. 2024); reinforce_pp: REINFORCE++ (Hu et al. 2025).",
    )
    grpo_loss: Literal["grpo", "dr_grpo", "dapo"] = Field(
        "grpo",
        description="GRPO variant: 'grpo' (std-normalised advantages, per-sequence token mean), 'dr_grpo' (no "
        "std, token sums over a constant), 'dapo' (token mean over the batch, clip_eps_high 0.28 by default).",
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
    clip_eps: float = Field(
        0.2, gt=0, description="PPO ratio clip epsilon (lower side, and upper unless clip_eps_high)."
    )
    clip_eps_high: float | None = Field(
        None, gt=0, description="Upper clip epsilon (DAPO 'clip-higher'); default clip_eps (0.28 for grpo_loss: dapo)."
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
        False, description="Leave completions without a stop token out of the loss (DAPO)."
    )
    log_examples_every_steps: int = Field(
        10,
        gt=0,
        description="Show (and append to samples.jsonl) a few prompt/completion/reward examples every N steps.",
    )
    num_examples: int = Field(3, ge=0, description="Examples shown each time.")

    @model_validator(mode="after")
    def _check(self):
        if self.algorithm in ("rloo", "grpo") and self.num_generations < 2:
            raise ValueError(f"{self.algorithm} compares completions of the same prompt: num_generations must be >= 2")
        return self


class RLHFRecipe(RecipeBase):
    """`prefcli rlhf`: reinforcement learning from a reward, R(s, a) = HumanScore(a): PPO, RLOO, GRPO, REINFORCE++."""

    command: Literal["rlhf"] = Field("rlhf", description="Always 'rlhf' for this schema.")
    data: PromptData = Field(description="Prompts to sample completions for.")
    rewards: list[RewardSpec] = Field(min_length=1, description="Reward sources, summed with their weights.")
    generation: RolloutGeneration = Field(default_factory=RolloutGeneration, description="Sampling settings.")
    rlhf: RLHFSection = Field(default_factory=RLHFSection, description="The algorithm and its knobs.")

    @model_validator(mode="after")
    def _check(self):
        if self.train.grad_accum_steps != 1:
            raise ValueError(
                "train.grad_accum_steps does not apply to rlhf: each optimizer step takes a minibatch of "
                "the rollout (see rlhf.minibatches_per_epoch), split into micro-batches of train.batch_size"
            )
        return self


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
        return self


# ---------------------------------------------------------------------------------------- eval
# `prefcli eval` trains nothing: its recipe has no model/train sections (it names several models), and
# it runs through prefcli.evaluate.eval instead of the training runner (runner.RECIPE_TOOLS).


class GenerationSection(Section):
    """How completions are sampled (shared by `prefcli eval` and the options of `prefcli generate`).
    Output control: length limits, banned words, required keywords, stop strings, control codes."""

    max_new_tokens: int = Field(64, gt=0, description="At most this many new tokens per completion.")
    min_new_tokens: int = Field(0, ge=0, description="EOS is blocked until this many new tokens exist.")
    do_sample: bool = Field(True, description="Sample (true) or decode greedily (false).")
    temperature: float = Field(
        1.0, gt=0, description="Softmax temperature for sampling; KL to the reference is computed at this temperature."
    )
    top_p: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Nucleus sampling: keep the smallest set of tokens with this much probability (1 = off).",
    )
    top_k: int = Field(0, ge=0, description="Keep only the k most likely tokens (0 = off).")
    ban: list[str] = Field(
        default_factory=list,
        description="Words or phrases that never appear in a completion: whole "
        "words, any letter case, however they are tokenized.",
    )
    require: list[str] = Field(
        default_factory=list,
        description="Keywords every completion contains (whole word, any "
        "case): EOS and stop strings wait for them, and a missing one is written out when the "
        "token budget runs low.",
    )
    stop: list[str] = Field(
        default_factory=list,
        description="Stop strings: generation ends when one appears; the completion is cut before it.",
    )
    control_code: str | None = Field(
        None,
        description="Text put before every prompt, e.g. a control token such as "
        "'<|aligned|>' learned in conditional training; it is never generated.",
    )
    chat: bool = Field(
        False,
        description="Render each prompt as a user turn with the tokenizer's chat template "
        "(and the assistant header) before generating.",
    )
    batch_size: int = Field(8, gt=0, description="Prompts per generate call (left-padded).")

    @model_validator(mode="after")
    def _check(self):
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens ({self.min_new_tokens}) exceeds max_new_tokens ({self.max_new_tokens})")
        for name in ("ban", "require"):
            if any(not w.strip() for w in getattr(self, name)):
                raise ValueError(f"{name}: empty or blank words are not allowed")
        if any(s == "" for s in self.stop):
            raise ValueError("stop: an empty stop string would stop at once")
        both = {w.lower() for w in self.ban} & {w.lower() for w in self.require}
        if both:
            raise ValueError(f"these words are both banned and required: {', '.join(sorted(both))}")
        return self


class EvalModel(Section):
    """A model to evaluate: a folder or hub id (`path`), the model a training recipe wrote (`from_recipe`), or a
    random initialisation (`init`: a floor to compare against, and offline tests)."""

    name: str | None = Field(
        None,
        description="Label in the table, the summary and examples.jsonl. Default: the "
        "folder name (path; the parent's name for a folder called 'final'), the recipe's "
        "file name without .yaml (from_recipe), or 'init'.",
    )
    path: PathOrHubId | None = Field(
        None, description="A Hugging Face model folder (relative to the recipe) or hub id."
    )
    from_recipe: LocalPath | None = Field(
        None,
        description="A training recipe (e.g. sft.yaml, relative to this recipe): evaluate `final/` in that "
        "recipe's run folder, i.e. its output.dir, else runs/<command>-<recipe name> under the current directory, "
        "exactly where the training command wrote it. It must have been trained first.",
    )
    init: ModelInit | None = Field(None, description="A random initialisation from an architecture config.")
    tokenizer: PathOrHubId | None = Field(
        None, description="Tokenizer folder or hub id; defaults to the model's own (required with init)."
    )
    seed: int = Field(0, description="Seed of the random initialisation (init only).")
    revision: str | None = Field(None, description="Hub revision for hub ids.")
    trust_remote_code: bool = Field(False, description="Run code shipped with a hub repo. Off unless you trust it.")

    @model_validator(mode="after")
    def _one_source(self):
        given = [k for k in ("path", "from_recipe", "init") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "set exactly one of path, from_recipe and init" + (f" (got {', '.join(given)})" if given else "")
            )
        if self.init is not None and self.tokenizer is None:
            raise ValueError("init needs tokenizer (a tokenizer folder or hub id)")
        if "seed" in self.model_fields_set and self.init is None:
            raise ValueError("seed applies to init only")
        return self

    def display_name(self) -> str:
        import os

        if self.name:
            return self.name
        if self.path is not None:
            p = self.path.rstrip("/")
            base = os.path.basename(p)
            if base == "final" and os.path.dirname(p):
                base = os.path.basename(os.path.dirname(p))
            return base or p
        if self.from_recipe is not None:
            return os.path.splitext(os.path.basename(self.from_recipe))[0]
        return "init"


class EvalData(Section):
    text: DataSource | None = Field(
        None,
        description="Rows for perplexity: 'text' rows (every token), 'prompt'+'completion' rows (completion "
        "tokens, given the prompt) or chat 'messages' (assistant turns).",
    )
    text_format: Literal["auto", "text", "prompt_completion", "messages"] = Field(
        "auto", description="Row shape of data.text; 'auto' picks by the columns present."
    )
    add_eos: bool = Field(
        True,
        description="Score an EOS token at the end of every data.text example, as `prefcli sft` "
        "trains it (its eval/ppl is the same number).",
    )
    prompts: DataSource | None = Field(
        None,
        description="Prompts to sample completions from (column 'prompt'), with a 'reference' column for BLEU and "
        "ROUGE. Map other names with columns: {reference: answer}.",
    )
    pairs: DataSource | None = Field(
        None, description="Preference pairs (columns prompt, chosen, rejected) for the rewards' preference accuracy."
    )


class PerplexityOptions(Section):
    """Token-weighted perplexity with a sliding window (Hugging Face, "Perplexity of fixed-length models")."""

    window_tokens: int | None = Field(
        None,
        gt=1,
        description="Tokens the model sees at once. Default: the model's max_position_embeddings, at most "
        "2048. Longer examples are scored in overlapping windows.",
    )
    stride_tokens: int | None = Field(
        None,
        gt=0,
        description="Step between windows; each token is scored once, with at least window - stride "
        "tokens of context once the first window is passed (stride = window: no overlap, and the first token of "
        "each later window goes unscored). Default: half the window.",
    )
    batch_size: int = Field(8, gt=0, description="Windows per forward pass.")

    @model_validator(mode="after")
    def _check(self):
        if (
            self.window_tokens is not None
            and self.stride_tokens is not None
            and self.stride_tokens > self.window_tokens
        ):
            raise ValueError(f"stride_tokens ({self.stride_tokens}) exceeds window_tokens ({self.window_tokens})")
        return self


class WinRateOptions(Section):
    bootstrap_samples: int = Field(
        1000,
        ge=10,
        description="Resamples of the prompts for the percentile bootstrap confidence interval (seeded by `seed`).",
    )
    confidence: float = Field(0.95, gt=0, lt=1, description="Coverage of the confidence interval.")


class DistinctOptions(Section):
    n: list[int] = Field(
        default_factory=lambda: [1, 2],
        min_length=1,
        description="n-gram orders for distinct-n (unique / total whitespace-token n-grams).",
    )

    @model_validator(mode="after")
    def _check(self):
        if any(k < 1 for k in self.n):
            raise ValueError("n-gram orders must be >= 1")
        return self


class RougeOptions(Section):
    tokenizer: Literal["default", "whitespace"] = Field(
        "default",
        description="'default': rouge-score's own (lowercases, keeps only [a-z0-9], so non-Latin text scores "
        "0); 'whitespace': lowercase and split on whitespace (any script).",
    )


class EvalRuntime(Section):
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="'auto' takes CUDA when present, else CPU.")
    precision: Literal["auto", "fp32", "bf16-mixed", "bf16"] = Field(
        "auto", description="'auto' = bf16-mixed on a GPU with bf16 support, fp32 on CPU."
    )
    loss_chunk_tokens: int = Field(
        4096, gt=0, description="Tokens per chunk when computing log-probs from hidden states."
    )


class EvalOutput(Section):
    dir: OutputPath | None = Field(
        None,
        description="Where recipe.yaml, summary.json and examples.jsonl go (relative to the recipe). Default: "
        "runs/eval-<recipe name> under the current directory.",
    )


EVAL_METRICS = ("perplexity", "bleu", "rouge", "reward", "win_rate", "kl", "distinct", "length", "preference_accuracy")
# What each metric needs from the recipe: data sources, a baseline/reference, rewards.
_NEEDS = {
    "perplexity": ("data.text",),
    "bleu": ("data.prompts",),
    "rouge": ("data.prompts",),
    "reward": ("data.prompts", "rewards"),
    "win_rate": ("data.prompts", "rewards", "baseline"),
    "kl": ("data.prompts", "reference"),
    "distinct": ("data.prompts",),
    "length": ("data.prompts",),
    "preference_accuracy": ("data.pairs", "rewards"),
}


class EvalRecipe(Section):
    """`prefcli eval`: measure models (and a baseline) on held-out data; see docs/commands/eval.md."""

    command: Literal["eval"] = Field("eval", description="Always 'eval' for this schema.")
    models: list[EvalModel] = Field(min_length=1, description="The models to evaluate.")
    baseline: EvalModel | None = Field(
        None, description="Evaluated like the models; win_rate compares every model with it on the same prompts."
    )
    reference: EvalModel | None = Field(
        None, description="The frozen reference for kl (e.g. the SFT model an RLHF run started from)."
    )
    data: EvalData = Field(description="Where the texts, prompts and pairs come from.")
    metrics: list[Literal[EVAL_METRICS]] = Field(
        min_length=1, description="Metrics to compute; each needs parts of the recipe (see docs/commands/eval.md)."
    )
    generation: GenerationSection = Field(
        default_factory=GenerationSection, description="Sampling of completions from data.prompts."
    )
    rewards: list[RewardSpec] = Field(
        default_factory=list,
        description="Reward sources for reward, win_rate and preference_accuracy; several are summed by weight.",
    )
    perplexity: PerplexityOptions = Field(default_factory=PerplexityOptions, description="Sliding-window perplexity.")
    win_rate: WinRateOptions = Field(default_factory=WinRateOptions, description="Bootstrap confidence interval.")
    distinct: DistinctOptions = Field(default_factory=DistinctOptions, description="distinct-n orders.")
    rouge: RougeOptions = Field(default_factory=RougeOptions, description="ROUGE tokenization.")
    seed: int = Field(0, description="Seed for sampling (reset before each model) and the bootstrap.")
    runtime: EvalRuntime = Field(default_factory=EvalRuntime, description="Device and precision.")
    output: EvalOutput = Field(default_factory=EvalOutput, description="Where results are written.")

    @model_validator(mode="after")
    def _check(self):
        dup = sorted({m for m in self.metrics if self.metrics.count(m) > 1})
        if dup:
            raise ValueError(f"metrics: listed twice: {', '.join(dup)}")
        have = {
            "data.text": self.data.text,
            "data.prompts": self.data.prompts,
            "data.pairs": self.data.pairs,
            "rewards": self.rewards or None,
            "baseline": self.baseline,
            "reference": self.reference,
        }
        problems = []
        for m in self.metrics:
            missing = [n for n in _NEEDS[m] if have[n] is None]
            if missing:
                problems.append(f"metric '{m}' needs {' and '.join(missing)}")
        used = {n for m in self.metrics for n in _NEEDS[m]}
        for n in ("data.text", "data.prompts", "data.pairs", "reference"):
            if have[n] is not None and n not in used:
                readers = [m for m, needs in _NEEDS.items() if n in needs]
                problems.append(f"{n} is given but no listed metric reads it (add one of: {', '.join(readers)})")
        names = [m.display_name() for m in self.models] + [x.display_name() for x in (self.baseline,) if x is not None]
        same = sorted({n for n in names if names.count(n) > 1})
        if same:
            problems.append(
                f"models: two models are named {', '.join(repr(s) for s in same)}; give each a distinct name"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self


SCHEMAS: dict[str, type[Section]] = {
    "sft": SFTRecipe,
    "reward": RewardRecipe,
    "rlhf": RLHFRecipe,
    "gan": GANRecipe,
    "contrastive": ContrastiveRecipe,
    "eval": EvalRecipe,
}
