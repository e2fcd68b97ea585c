"""Reward sources in recipes: `rewards: [{kind: ..., weight: ...}, ...]`.

Several sources combine as a weighted sum. The founding idea R(s, a) = HumanScore(a) is any of
them: a reward model trained on human comparisons (`model`), several of them as a conservative
`ensemble`, a local language model as a `judge`, human scores read from a file (`human_scores`), a
sentiment lexicon built from human ratings (`sentiment`, VADER), a rule (`length`, `keyword`), or your
own Python function (`function`).
"""

from __future__ import annotations

import string
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from .paths import LocalPath, PathOrHubId
from .sections import Section


class _RewardBase(Section):
    weight: float = Field(1.0, description="Multiplier of this source in the summed reward.")
    name: str | None = Field(None, description="Label in metrics (reward/<name>); defaults to the kind.")


class ModelReward(_RewardBase):
    kind: Literal["model"] = Field(
        description="A reward model (e.g. final/ of `prefcli reward`): the scalar "
        "score of prompt + completion, read at the last real token."
    )
    path: PathOrHubId = Field(
        description="Reward model folder or hub id (AutoModelForSequenceClassification, 1 label)."
    )
    batch_size: int = Field(16, gt=0, description="Sequences scored per forward pass.")
    max_length: int = Field(1024, gt=1, description="Longer prompt + completion texts are truncated from the left.")
    user: str | None = Field(
        None,
        description="A personalised reward model (`reward.personalisation`): score every completion for this user "
        "(one seen in training). Default: each row's own user where the caller has one (the prompts' user column "
        "in rlhf and eval), else the shared part.",
    )
    context: LocalPath | None = Field(
        None,
        description="A personalised reward model: a JSONL file of a new user's labelled pairs (prompt, chosen, "
        "rejected), 5-50 of them. The user is fitted from them when the model loads (latent: summarised by the "
        "encoder; user_embedding, lowrank: the user's vector or weights fitted with the rest frozen) and every "
        "completion is scored for that user. No retraining.",
    )

    @model_validator(mode="after")
    def _one_user(self):
        if self.user is not None and self.context is not None:
            raise ValueError("give user (a user seen in training) or context (a new user's pairs), not both")
        if self.user is not None and not self.user.strip():
            raise ValueError("user: an empty user id")
        return self


class FunctionReward(_RewardBase):
    kind: Literal["function"] = Field(
        description="Your Python function: fn(prompts, completions, **kwargs) -> list of floats."
    )
    function: str = Field(
        description="'package.module:function', or 'path/to/file.py:function' relative to the recipe."
    )
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra keyword arguments passed to the function.")

    @field_validator("function")
    @classmethod
    def _resolve(cls, value: str, info: ValidationInfo) -> str:
        import os

        mod, sep, attr = value.rpartition(":")
        if not sep or not mod or not attr:
            raise ValueError(f"function must look like 'module:function' or 'file.py:function', got '{value}'")
        if mod.endswith(".py"):  # a file: resolve it against the recipe's folder, like every path
            path = os.path.expanduser(mod)
            if not os.path.isabs(path):
                path = os.path.join((info.context or {}).get("base_dir") or os.getcwd(), path)
            if not os.path.exists(path):
                raise ValueError(f"no such file: {os.path.abspath(path)}")
            return f"{os.path.abspath(path)}:{attr}"
        return value


class LengthReward(_RewardBase):
    kind: Literal["length"] = Field(
        description="-|length - target| / target: 0 at the target length, lower either side."
    )
    target: int = Field(gt=0, description="Target completion length in `unit`s.")
    unit: Literal["words", "chars", "tokens"] = Field("words", description="How length is counted.")


class KeywordReward(_RewardBase):
    kind: Literal["keyword"] = Field(
        description="The fraction of `keywords` present in the completion (and/or 1 if "
        "`regex` matches); negated with mode: penalty."
    )
    keywords: list[str] = Field(default_factory=list, description="Words or phrases to look for.")
    regex: str | None = Field(None, description="A regular expression (Python syntax) to search for.")
    case_sensitive: bool = Field(False, description="Match case exactly.")
    mode: Literal["reward", "penalty"] = Field("reward", description="'penalty' negates the score (banned words).")

    @model_validator(mode="after")
    def _check(self):
        if not self.keywords and not self.regex:
            raise ValueError("give keywords, regex, or both")
        if self.regex is not None:
            import re

            try:
                re.compile(self.regex)
            except re.error as e:
                raise ValueError(f"regex does not compile: {e}") from None
        return self


class SentimentReward(_RewardBase):
    kind: Literal["sentiment"] = Field(
        description="VADER compound sentiment of the completion, in [-1, 1] (Hutto & Gilbert "
        "2014; its lexicon comes from human ratings): a stand-in for human scores."
    )
    target: Literal["positive", "negative"] = Field("positive", description="'negative' negates the score.")


class HumanScoreReward(_RewardBase):
    kind: Literal["human_scores"] = Field(
        description="Scores people gave, read from a file of prompt/completion/score rows "
        "and looked up by exact (prompt, completion)."
    )
    path: LocalPath = Field(description="JSONL/CSV/Parquet file with prompt, completion and score columns.")
    columns: dict[str, str] = Field(
        default_factory=dict, description="Column mapping {prompt|completion|score: your column}."
    )
    missing: Literal["error", "default"] = Field(
        "error", description="A pair not in the file: stop with an error, or use `default`."
    )
    default: float = Field(0.0, description="Score of pairs not in the file when missing: default.")


class JudgeReward(_RewardBase):
    kind: Literal["judge"] = Field(
        description="A local causal language model as the judge: the score is read from its next-token "
        "probabilities over the answer tokens after a prompt built from `template` (no text parsing)."
    )
    path: PathOrHubId = Field(description="The judge: a causal LM folder or hub id.")
    tokenizer: PathOrHubId | None = Field(None, description="Its tokenizer (default: path's).")
    mode: Literal["score", "pairwise"] = Field(
        "score",
        description="'score': judge each completion alone ({prompt}, {completion}); 'pairwise': judge which of "
        "two completions of the same prompt is better ({prompt}, {completion_a}, {completion_b}), each "
        "completion scored by its mean win rate over the others of its prompt, both orders asked.",
    )
    template: str = Field(
        description="The judge's prompt (Python str.format; write literal braces as {{ }}). Must contain "
        "{completion} (score) or {completion_a} and {completion_b} (pairwise); may contain {prompt}."
    )
    answers: dict[str, float] | None = Field(
        None,
        description="Answer tokens and their values; the score is their probability-weighted mean. Each must be "
        "one token. null: {' yes': 1, ' no': 0} (score) or {' A': 1, ' B': 0} (pairwise: 1 = the first is better).",
    )
    chat_template: bool = Field(
        False, description="Wrap the rendered template as a user turn in the judge's chat template."
    )
    batch_size: int = Field(16, gt=0, description="Judge prompts per forward pass.")
    max_length: int = Field(1024, gt=1, description="Longer judge prompts lose their beginning.")
    cache_size: int = Field(100_000, gt=0, description="Verdicts kept in the cache (least recently used dropped).")

    @model_validator(mode="after")
    def _check(self):
        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(self.template) if f is not None}
        except ValueError as e:
            raise ValueError(
                f"template is not a valid format string ({e}); write literal braces as {{{{ }}}}"
            ) from None
        need = {"completion"} if self.mode == "score" else {"completion_a", "completion_b"}
        allowed = need | {"prompt"}
        if not need <= fields:
            missing = ", ".join("{" + f + "}" for f in sorted(need - fields))
            raise ValueError(f"template has no {missing} placeholder: the judge would never see the completion")
        if fields - allowed:
            extra = ", ".join("{" + f + "}" for f in sorted(fields - allowed))
            raise ValueError(
                f"template has unknown placeholders {extra} (mode {self.mode} allows "
                f"{', '.join('{' + f + '}' for f in sorted(allowed))})"
            )
        if self.answers is None:
            self.answers = {" yes": 1.0, " no": 0.0} if self.mode == "score" else {" A": 1.0, " B": 0.0}
        elif len(self.answers) < 2:
            raise ValueError("answers needs at least two answer tokens (their probabilities are renormalised)")
        return self


MemberSpec = Annotated[
    ModelReward | JudgeReward | FunctionReward | LengthReward | KeywordReward | SentimentReward | HumanScoreReward,
    Field(discriminator="kind"),
]


class EnsembleReward(_RewardBase):
    kind: Literal["ensemble"] = Field(
        description="Several reward sources, typically reward models trained with different seeds, combined "
        "into one score; their spread is logged as reward/<name>_spread (Coste et al. 2023, reward model "
        "ensembles against over-optimisation)."
    )
    members: list[MemberSpec] = Field(
        description="The members, at least two: reward specs of any kind but ensemble, e.g. "
        "[{kind: model, path: rm-seed0}, {kind: model, path: rm-seed1}, {kind: model, path: rm-seed2}]; "
        "their weight and name are not used."
    )
    # the names of prefcli.recipe.commands.names.REWARD_COMBINE, written out: that package imports this module
    combine: Literal["mean", "min", "mean_minus_std"] = Field(
        "mean",
        description="'mean' of the members; 'min' (worst case); 'mean_minus_std': mean - std_coef x the "
        "members' standard deviation (a conservative, uncertainty-penalised reward).",
    )
    std_coef: float = Field(1.0, ge=0, description="k of mean_minus_std.")
    normalize: bool = Field(
        True,
        description="Standardise each member with the mean and standard deviation of its scores on the first "
        "batch it scores (kept for the run and in checkpoints), so members trained apart share one scale "
        "before they are combined. Off: raw scores.",
    )

    @field_validator("members")
    @classmethod
    def _two(cls, value: list) -> list:
        if len(value) < 2:
            raise ValueError(f"an ensemble needs at least two members, got {len(value)}; use the member itself for one")
        return value


RewardSpec = Annotated[
    ModelReward
    | EnsembleReward
    | JudgeReward
    | FunctionReward
    | LengthReward
    | KeywordReward
    | SentimentReward
    | HumanScoreReward,
    Field(discriminator="kind"),
]
