"""Fields every training recipe has, and how --smoke shrinks them."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

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

    def eval_metrics(self) -> tuple[str, ...]:
        """The metrics every evaluation of this recipe logs (what train.keep_best and train.early_stopping can
        watch). Each command's schema names its own; tests/test_conveniences.py checks them against real runs."""
        return ()

    def has_held_out(self) -> bool:
        d = getattr(self, "data", None)
        return d is not None and (getattr(d, "eval", None) is not None or getattr(d, "eval_fraction", 0) > 0)

    @model_validator(mode="after")
    def _check_monitors(self):
        t = self.train
        for name, mon in (("keep_best", t.keep_best), ("early_stopping", t.early_stopping)):
            if mon is None:
                continue
            if not self.has_held_out():
                raise field_error(
                    ("train", name), "needs held-out data to evaluate on: set data.eval or data.eval_fraction", None
                )
            if t.eval_every_steps is None:
                raise field_error(("train", name), "needs train.eval_every_steps (how often to evaluate)", None)
            logged = self.eval_metrics()
            if mon.metric not in logged:
                import difflib

                close = difflib.get_close_matches(mon.metric, logged, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise field_error(
                    ("train", name, "metric"),
                    f"prefcli {self.command} never logs {mon.metric!r}{hint}; its evaluations log: {', '.join(logged)}",
                    mon.metric,
                )
        if self.output.final == "best" and t.keep_best is None:
            raise field_error(
                ("output", "final"),
                "'best' needs train.keep_best (the metric that picks the best evaluation), e.g. "
                "{metric: eval/loss, mode: min}",
                "best",
            )
        return self

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
        for src in (data.get("data") or {}).values():  # every data source (each of a mixture's): a few rows
            for one in src.get("sources", [src]) if isinstance(src, dict) else ():
                if isinstance(one, dict) and "path" in one:
                    one["max_rows"] = min(one.get("max_rows") or self.SMOKE_ROWS, self.SMOKE_ROWS)


def field_error(loc: tuple, message: str, value: Any) -> ValidationError:
    """A validation error at `loc` (a field path from the recipe's root), raised from a recipe-level validator,
    so that the loader names that field and the line it is on."""
    return ValidationError.from_exception_data(
        "recipe",
        [InitErrorDetails(type=PydanticCustomError("value_error", message), loc=loc, input=value)],
    )
