"""One recipe schema per command, built from the shared sections plus the algorithm's own section.

`SCHEMAS` is the command table: `prefcli <command>` validates against `SCHEMAS[command]`, and a
test keeps it in sync with the CLI and the bundled recipes.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .rewards import RewardSpec
from .sections import (
    DataSource,
    LogSection,
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


class SFTData(Section):
    train: DataSource = Field(description="Training rows.")
    eval: DataSource | None = Field(None, description="Held-out rows for perplexity (eval/ppl).")
    eval_fraction: float = Field(
        0.0, ge=0, lt=1, description="Hold out this fraction of the training rows for evaluation when no eval set is given."
    )
    format: Literal["auto", "text", "prompt_completion", "messages"] = Field(
        "auto",
        description="Row shape: 'text' (column text), 'prompt_completion' (prompt, completion), 'messages' "
        "(a list of {role, content}, rendered with the chat template). 'auto' picks by the columns present.",
    )
    max_length: int = Field(1024, gt=1, description="Tokens per example; longer examples are truncated and counted.")
    mask_prompt: bool = Field(
        True, description="Train only on completion/assistant tokens (prompt tokens get no loss). 'text' rows have no prompt."
    )
    packing: bool = Field(
        False, description="Pack several examples into each max_length row; attention never crosses example boundaries."
    )
    add_eos: bool = Field(True, description="End every example with the EOS token (so the model learns to stop).")
    shuffle: bool = Field(True, description="Shuffle the training rows every epoch (seeded by train.seed).")

    @model_validator(mode="after")
    def _check(self):
        if self.eval is not None and self.eval_fraction > 0:
            raise ValueError("set data.eval or data.eval_fraction, not both")
        return self


class SFTSection(Section):
    objective: Literal["mle"] = Field(
        "mle", description="Training objective. 'mle': token-level cross-entropy (next-token prediction)."
    )


class SFTRecipe(RecipeBase):
    """`prefcli sft`: supervised fine-tuning, and pretraining from scratch with model.init."""

    command: Literal["sft"] = Field("sft", description="Always 'sft' for this schema.")
    data: SFTData = Field(description="Training and held-out data.")
    sft: SFTSection = Field(default_factory=SFTSection, description="The SFT objective.")


# ---------------------------------------------------------------------------------------- rlhf


class PromptData(Section):
    train: DataSource = Field(description="Prompt rows: a 'prompt' column (text) or 'messages' (a chat, rendered "
                              "with the chat template and a generation prompt).")
    eval: DataSource | None = Field(None, description="Held-out prompts for eval/reward and eval/kl.")
    eval_fraction: float = Field(0.0, ge=0, lt=1, description="Hold out this fraction of the prompts when no eval set is given.")
    max_prompt_length: int = Field(256, gt=0, description="Prompt tokens kept; longer prompts lose their beginning "
                                   "(counted in the summary).")
    shuffle: bool = Field(True, description="Shuffle the prompts every epoch (seeded by train.seed).")

    @model_validator(mode="after")
    def _check(self):
        if self.eval is not None and self.eval_fraction > 0:
            raise ValueError("set data.eval or data.eval_fraction, not both")
        return self


class GenerationSection(Section):
    max_new_tokens: int = Field(64, gt=0, description="Most tokens sampled per completion.")
    min_new_tokens: int = Field(0, ge=0, description="The stop token is blocked until this many tokens exist.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature; log-probs in the update use the same one.")
    top_k: int = Field(0, ge=0, description="Sample among the k most likely tokens (0: all).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (1: off).")
    stop_strings: list[str] = Field(default_factory=list, description="A completion ends at the first of these "
                                    "(it counts as finished, like the stop token).")
    sampler: Literal["auto", "fast", "hf"] = Field(
        "auto", description="'fast': prefcli's static-KV-cache decoder (llama, mistral, qwen2, qwen3); 'hf': "
        "transformers generate; 'auto': fast where supported.")
    cuda_graphs: bool = Field(True, description="Capture the fast decoder's step in a CUDA graph (GPU only).")
    compile: Literal["auto", "on", "off"] = Field(
        "auto", description="torch.compile the fast decoder's layer step (fuses its small ops; compiles once, on the "
        "first rollout). 'auto': on a GPU only.")

    @model_validator(mode="after")
    def _check(self):
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens ({self.min_new_tokens}) exceeds max_new_tokens ({self.max_new_tokens})")
        return self


class RLHFSection(Section):
    algorithm: Literal["ppo", "rloo", "grpo", "reinforce_pp"] = Field(
        "grpo", description="ppo: value head + GAE (Ouyang et al. 2022); rloo: leave-one-out baseline (Ahmadian et al. "
        "2024); grpo: group-normalised advantages (Shao et al. 2024); reinforce_pp: REINFORCE++ (Hu et al. 2025).")
    grpo_loss: Literal["grpo", "dr_grpo", "dapo"] = Field(
        "grpo", description="GRPO variant: 'grpo' (std-normalised advantages, per-sequence token mean), 'dr_grpo' (no "
        "std, token sums over a constant), 'dapo' (token mean over the batch, clip_eps_high 0.28 by default).")
    num_generations: int = Field(4, gt=0, description="Completions sampled per prompt (the group size G / k).")
    prompts_per_rollout: int = Field(8, gt=0, description="Prompts per rollout per process.")
    epochs_per_rollout: int | None = Field(None, gt=0, description="Passes over each rollout (default 4 for ppo, 1 otherwise).")
    minibatches_per_epoch: int = Field(1, gt=0, description="Optimizer steps per pass over a rollout.")
    kl_coef: float = Field(0.05, ge=0, description="Weight beta of the KL penalty to the frozen reference (0: no reference).")
    kl_target: float | None = Field(None, gt=0, description="Adaptive KL: steer the per-sequence KL to this value "
                                    "(Ziegler et al. 2019); null keeps kl_coef fixed.")
    kl_horizon: int = Field(10000, gt=0, description="Adaptive-KL horizon (in sequences).")
    clip_eps: float = Field(0.2, gt=0, description="PPO ratio clip epsilon (lower side, and upper unless clip_eps_high).")
    clip_eps_high: float | None = Field(None, gt=0, description="Upper clip epsilon (DAPO 'clip-higher'); default clip_eps "
                                        "(0.28 for grpo_loss: dapo).")
    value_clip_eps: float = Field(0.2, gt=0, description="PPO value clip epsilon.")
    vf_coef: float = Field(0.1, ge=0, description="PPO value-loss weight c_v.")
    value_lr: float | None = Field(None, gt=0, description="Learning rate of the value head (default train.lr).")
    gamma: float = Field(1.0, gt=0, le=1, description="Discount.")
    gae_lambda: float = Field(0.95, ge=0, le=1, description="GAE lambda (ppo).")
    whiten_advantages: bool = Field(True, description="Normalise advantages to mean 0, std 1 over the batch (ppo, reinforce_pp).")
    reinforce_baseline: bool = Field(False, description="REINFORCE++-Baseline: subtract the group's mean score first.")
    missing_eos_penalty: float | None = Field(None, ge=0, description="Subtracted from the score of completions cut by "
                                              "max_new_tokens before their stop token (TRL's missing_eos_penalty).")
    mask_truncated_completions: bool = Field(False, description="Leave completions without a stop token out of the loss (DAPO).")
    log_examples_every_steps: int = Field(10, gt=0, description="Show (and append to samples.jsonl) a few "
                                          "prompt/completion/reward examples every N steps.")
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
    generation: GenerationSection = Field(default_factory=GenerationSection, description="Sampling settings.")
    rlhf: RLHFSection = Field(default_factory=RLHFSection, description="The algorithm and its knobs.")

    @model_validator(mode="after")
    def _check(self):
        if self.train.grad_accum_steps != 1:
            raise ValueError("train.grad_accum_steps does not apply to rlhf: each optimizer step takes a minibatch of "
                             "the rollout (see rlhf.minibatches_per_epoch), split into micro-batches of train.batch_size")
        return self


SCHEMAS: dict[str, type[RecipeBase]] = {
    "sft": SFTRecipe,
    "rlhf": RLHFRecipe,
}
