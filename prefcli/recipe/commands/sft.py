"""`prefcli sft` recipes: data, and the objective with its knobs (PHF_KNOBS: which objective reads which)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ..debias import SFTDebiasSection
from ..reward_specs import RewardSpec
from ..sections import (
    DataSource,
    HeldOut,
    Section,
    TrainSource,
)
from .base import RecipeBase
from .names import SFT_FORMATS, SFT_OBJECTIVES


class SFTData(HeldOut):
    train: TrainSource = Field(description="Training rows: one source, or a list of weighted sources (a mixture).")
    eval: DataSource | None = Field(None, description="Held-out rows for perplexity (eval/ppl).")
    eval_fraction: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Hold out this fraction of the training rows for evaluation when no eval set is given.",
    )
    format: Literal[SFT_FORMATS] = Field(
        "auto",
        description="Row shape: 'text' (column text), 'prompt_completion' (prompt, completion), 'messages' "
        "(a list of {role, content}, rendered with the chat template; OpenAI's chat fine-tuning rows, 'openai', are "
        "these, an assistant message with weight 0 untrained), 'sharegpt' (conversations of {from, value}, optional "
        "system) or 'alpaca' (instruction, input, output, optional system and history), both read as messages. "
        "'auto' picks by the columns present (docs/recipes.md).",
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
    debias: SFTDebiasSection = Field(
        default_factory=SFTDebiasSection, description="Opt-in cleaning: deduplication, held-out prompts dropped."
    )


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

    objective: Literal[SFT_OBJECTIVES] = Field(
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

    def eval_metrics(self) -> tuple[str, ...]:
        return ("eval/loss", "eval/ppl", "eval/tokens")

    def _shrink(self, data: dict) -> None:
        super()._shrink(data)
        # eval/control_gap samples gap_samples() completions after each control token at every evaluation, 2 x 32
        # x 48 tokens by default: most of a conditional smoke's time. A smoke proves the metric is computed and
        # scored, which a few short samples do.
        n = self.sft.gap_samples()
        if n:
            data["sft"]["control_gap_samples"] = min(n, 4)
            data["sft"]["control_gap_max_new_tokens"] = min(self.sft.control_gap_max_new_tokens, 16)

    @model_validator(mode="after")
    def _check_objective(self):
        if self.sft.objective == "conditional" and self.model.lora is not None:
            raise ValueError(
                "sft.objective 'conditional' adds control tokens whose embeddings must train; LoRA "
                "freezes the embeddings. Remove model.lora or pick another objective"
            )
        return self
