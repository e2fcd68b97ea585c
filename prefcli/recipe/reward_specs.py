"""Reward sources in recipes: `rewards: [{kind: ..., weight: ...}, ...]`.

Several sources combine as a weighted sum. The founding idea R(s, a) = HumanScore(a) is any of
them: a reward model trained on human comparisons (`model`), human scores read from a file
(`human_scores`), a sentiment lexicon built from human ratings (`sentiment`, VADER), a rule
(`length`, `keyword`), or your own Python function (`function`).
"""

from __future__ import annotations

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


RewardSpec = Annotated[
    ModelReward | FunctionReward | LengthReward | KeywordReward | SentimentReward | HumanScoreReward,
    Field(discriminator="kind"),
]
