"""One recipe schema per command, built from the shared sections plus the algorithm's own section.

`SCHEMAS` is the command table: `prefcli <command>` validates against `SCHEMAS[command]`, and a
test keeps it in sync with the CLI and the bundled recipes.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

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


SCHEMAS: dict[str, type[RecipeBase]] = {
    "sft": SFTRecipe,
}
