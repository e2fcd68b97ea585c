"""`prefcli reward` and `prefcli contrastive` recipes: preference data and each objective's section."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ..debias import DebiasSection
from ..personal import Personalisation, PolicyPersonalisation
from ..sections import (
    DataSource,
    HeldOut,
    Section,
    TrainSource,
)
from .base import RecipeBase, field_error
from .names import CONTRASTIVE_OBJECTIVES, PAIR_FORMATS, REWARD_OBJECTIVES


class PreferenceData(HeldOut):
    """Preference rows. Pairs: `chosen`, `rejected`, optional `prompt` (and `margin` for reward
    models). Unpaired (kto): `prompt`, `completion`, `label`. Human scores (reward regression):
    `text` (or `prompt` + `completion`) and `score`. Rankings: optional `prompt`, `completions`
    (a list, best first). Map your column names with `columns`."""

    train: TrainSource = Field(description="Training rows: one source, or a list of weighted sources (a mixture).")
    eval: DataSource | None = Field(None, description="Held-out rows for the eval/ metrics.")
    eval_fraction: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Hold out this fraction of the training rows for evaluation when no eval set is given.",
    )
    format: Literal[PAIR_FORMATS] = Field(
        "auto",
        description="'plain': text values; 'chat': lists of {role, content} messages rendered with the chat template "
        "(with no `prompt` column, the messages both conversations share are the prompt); pairs in formats people "
        "already have, read as chat pairs: 'sharegpt' (conversations of {from, value} + chosen/rejected turns), "
        "'alpaca' (instruction, input, chosen, rejected) and 'openai' (OpenAI's DPO rows: input.messages, "
        "preferred_output, non_preferred_output); pair rows only (reward bradley_terry, the paired contrastive "
        "objectives). 'auto' looks at the columns, then the values (docs/recipes.md).",
    )
    max_length: int = Field(
        1024,
        gt=1,
        description="Tokens per sequence (prompt + completion). Longer completions are truncated and "
        "counted; rows whose prompt alone fills max_length are skipped and counted.",
    )
    shuffle: bool = Field(True, description="Shuffle the training rows every epoch (seeded by train.seed).")
    debias: DebiasSection = Field(
        default_factory=DebiasSection,
        description="Opt-in cleaning and length debiasing: deduplication, held-out prompts dropped, "
        "length-balanced sampling or reweighting of pairs (docs/commands/data.md).",
    )
    user_column: str | None = Field(
        None,
        description="The column naming who gave each label (the user a personalised model serves; per-user "
        "held-out figures). null = 'rater' when the data has it (what `prefcli label` writes), else 'user_id', "
        "else none. A row with an empty user is scored by the shared part.",
    )
    eval_users: list[str] = Field(
        default_factory=list,
        description="Hold out every row of these users (new users, never trained on): their rows join the held-out "
        "set, where they give the new-user figures. Needs a user column.",
    )
    eval_user_fraction: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Hold out this fraction of the training rows' users (at least one, chosen by train.seed), as "
        "eval_users does for named users.",
    )

    @model_validator(mode="after")
    def _check_users(self):
        if self.eval_users and self.eval_user_fraction > 0:
            raise ValueError("set data.eval_users or data.eval_user_fraction, not both")
        if len(set(self.eval_users)) != len(self.eval_users):
            raise ValueError("data.eval_users: a user is listed twice")
        if any(not u.strip() for u in self.eval_users):
            raise ValueError("data.eval_users: an empty user id")
        if self.user_column is not None and not self.user_column.strip():
            raise ValueError("data.user_column: an empty column name")
        return self


# -------------------------------------------------------------------------------------- reward


class RewardSection(Section):
    objective: Literal[REWARD_OBJECTIVES] = Field(
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
    personalisation: Personalisation | None = Field(
        None,
        description="Serve each user (data.user_column) rather than their average: kind user_embedding (a learned "
        "vector per user, P-RLHF-style), latent (a user summarised from a few of their labels, VPL-style) or "
        "lowrank (per-user weights over a basis of reward heads, LoRe/PAL-style). See docs/personalisation.md.",
    )

    @model_validator(mode="after")
    def _check_personal(self):
        if self.personalisation is not None and self.objective != "bradley_terry":
            raise ValueError(
                f"reward.personalisation needs pairs (objective bradley_terry), not objective '{self.objective}'"
            )
        return self


# the data.format values that read pair rows of another tool's format (prefcli/engine/formats.py)
OUTSIDE_PAIR_FORMATS = ("sharegpt", "alpaca", "openai")


def _check_pair_format(fmt: str, objective: str, paired: bool) -> None:
    if fmt in OUTSIDE_PAIR_FORMATS and not paired:
        raise ValueError(
            f"data.format '{fmt}' reads preference pairs (reward bradley_terry and the paired contrastive "
            f"objectives); objective '{objective}' reads other rows: use auto, plain or chat"
        )


class RewardRecipe(RecipeBase):
    """`prefcli reward`: a reward model (a scalar head read at the last real token) from preference pairs,
    human scores or rankings."""

    command: Literal["reward"] = Field("reward", description="Always 'reward' for this schema.")
    data: PreferenceData = Field(description="Training and held-out preference data.")
    reward: RewardSection = Field(default_factory=RewardSection, description="The reward-model objective.")

    @model_validator(mode="after")
    def _outside_format_needs_pairs(self):
        _check_pair_format(self.data.format, self.reward.objective, "bradley_terry" == self.reward.objective)
        return self

    def eval_metrics(self) -> tuple[str, ...]:
        if self.reward.objective == "regression":
            return ("eval/loss", "eval/mse", "eval/reward_mean", "eval/pearson")
        names = ["loss", "accuracy", "margin", "reward_chosen", "reward_rejected", "ece", "mce", "pairs"]
        p = self.reward.personalisation
        if p is not None:  # a user column is then required, so the per-user figures are always logged
            names += ["accuracy_worst_user", "accuracy_shared"]
        return tuple(f"eval/{k}" for k in names)


# --------------------------------------------------------------------------------- contrastive


class ContrastiveSection(Section):
    objective: Literal[CONTRASTIVE_OBJECTIVES] = Field(
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
    length_alpha: float = Field(
        0.0,
        ge=0,
        description="dpo: alpha of the length-regularised DPO (R-DPO, Park et al. 2024): "
        "-log sigmoid(beta h + alpha (|y_w| - |y_l|)), lengths in completion tokens; 0 = plain DPO.",
    )
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
    personalisation: PolicyPersonalisation | None = Field(
        None,
        description="Train one policy conditioned on the user (data.user_column): each row's prompt starts with "
        "its user's control token (the reference scores the same input at the initial weights). Paired objectives "
        "only; not with model.lora (the tokens' embeddings must train). See docs/personalisation.md.",
    )

    @model_validator(mode="after")
    def _check_length_alpha(self):
        if self.personalisation is not None and self.objective in ("kto", "infonce"):
            raise ValueError(
                f"contrastive.personalisation needs a paired objective (dpo ... orpo), not '{self.objective}'"
            )
        if self.length_alpha and self.objective != "dpo":
            raise ValueError(
                f"contrastive.length_alpha (R-DPO's length term) applies to objective dpo only, not '{self.objective}'"
            )
        return self


class ContrastiveRecipe(RecipeBase):
    """`prefcli contrastive`: a policy trained directly from preferences (DPO family, KTO), or an InfoNCE
    preference encoder."""

    command: Literal["contrastive"] = Field("contrastive", description="Always 'contrastive' for this schema.")
    data: PreferenceData = Field(description="Training and held-out preference data.")
    contrastive: ContrastiveSection = Field(default_factory=ContrastiveSection, description="The objective.")

    @model_validator(mode="after")
    def _outside_format_needs_pairs(self):
        o = self.contrastive.objective
        _check_pair_format(self.data.format, o, o not in ("kto", "infonce"))
        return self

    @model_validator(mode="after")
    def _check_personal_lora(self):
        if self.contrastive.personalisation is not None and self.model.lora is not None:
            raise field_error(
                ("contrastive", "personalisation"),
                "does not work with model.lora: the user tokens' embeddings must train, and LoRA freezes them; "
                "train all weights (remove model.lora)",
                None,
            )
        return self

    def eval_metrics(self) -> tuple[str, ...]:
        o = self.contrastive.objective
        if o == "infonce":
            names = ("loss", "cos_chosen", "top1", "cos_rejected", "margin", "accuracy")
        elif o == "kto":
            names = ("loss", "reward_chosen", "reward_rejected", "accuracy", "logps_chosen", "logps_rejected")
        else:
            names = ("loss", "accuracy", "margin", "reward_chosen", "reward_rejected", "logps_chosen", "logps_rejected")
            if self.contrastive.personalisation is not None:  # a user column is then required
                names += ("accuracy_worst_user",)
        return tuple(f"eval/{k}" for k in names)
