"""Fields every training recipe has, and how --smoke shrinks them."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from ..sections import (
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

    # --smoke: the same recipe on a few rows for a few steps, CPU when there is no GPU, no compile. (The
    # model is swapped for a tiny random one of the same family when the task builds it.)
    SMOKE_ROWS: ClassVar[int] = 16
    SMOKE_STEPS: ClassVar[int] = 3

    def smoke(self):
        """This recipe as --smoke runs it. A command whose recipe has more to shrink (rollouts, a
        discriminator) extends `_shrink`."""
        data = self.model_dump()
        self._shrink(data)
        return type(self).model_validate(data)

    def _shrink(self, data: dict) -> None:
        n = self.SMOKE_STEPS
        t = data["train"]
        t["max_steps"] = min(t.get("max_steps") or n, n)
        t["batch_size"] = min(t["batch_size"], 2)
        t["grad_accum_steps"] = 1
        t["eval_max_batches"] = 2
        t["warmup_steps"] = 0
        for key in ("eval_every_steps", "save_every_steps"):
            if t.get(key):
                t[key] = min(t[key], n)
        data["runtime"]["compile"] = False
        for src in data.get("data", {}).values():  # every data source: a few rows
            if isinstance(src, dict) and "path" in src:
                src["max_rows"] = min(src.get("max_rows") or self.SMOKE_ROWS, self.SMOKE_ROWS)
