"""`prefcli label serve` tasks: what a team of raters labels, how, and where the answers are kept.

A labelling task trains nothing (no model/train sections): `prefcli label serve TASK.yaml` serves it
to raters in a browser, `invite`, `stats`, `export` and `import` work on its store (docs/labelling.md).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ..paths import LocalPath, OutputFile, PathOrHubId
from ..sections import Section
from .eval import GenerationSection

LABEL_MODES = ("pair", "rate", "rank")


class LabelItems(Section):
    """The items to label: JSONL rows from files (e.g. `prefcli generate`'s output), or candidates a model
    samples for a prompts file when the task is first opened."""

    path: LocalPath | list[LocalPath] | None = Field(
        None,
        description="A JSONL file of items: {prompt, completions: [...]} (or completion_a/completion_b, or one "
        "`completion` per row). Several files: row n of each is joined into one item (e.g. the outputs of "
        "`prefcli generate` for two models on the same prompts); their prompts must match.",
    )
    model: PathOrHubId | None = Field(
        None, description="Instead of files: a model folder that samples the candidates for `prompts`."
    )
    prompts: LocalPath | None = Field(
        None, description="With `model`: the prompts (one per line, or JSONL with 'prompt')."
    )
    candidates: int = Field(
        2, ge=1, le=9, description="With `model`: candidates sampled per prompt (pair mode takes 2)."
    )
    generation: GenerationSection = Field(
        default_factory=GenerationSection, description="With `model`: how the candidates are sampled."
    )
    seed: int = Field(0, description="With `model`: the sampling seed.")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.path is None) == (self.model is None):
            raise ValueError("set exactly one of path (item files) and model (with prompts)")
        if self.model is not None and self.prompts is None:
            raise ValueError("model needs prompts (the prompts to sample candidates for)")
        if self.model is None:
            extra = [k for k in ("prompts", "candidates", "generation", "seed") if k in self.model_fields_set]
            if extra:
                raise ValueError(f"{', '.join(extra)} apply to model only")
        return self

    def files(self) -> list[str]:
        return [] if self.path is None else ([self.path] if isinstance(self.path, str) else list(self.path))


class GoldItems(Section):
    """Items with a known answer, mixed into every rater's stream at `rate` (raters cannot tell them apart):
    the dashboard's gold accuracy per rater, and its flags."""

    path: LocalPath = Field(
        description="JSONL items like the task's, each with a `gold` answer: for pairs the index (0 or 1) of the "
        "better completion or 'tie'; for ratings the score; for rankings the completion indices best first."
    )
    rate: float = Field(0.1, gt=0, lt=1, description="Share of the items handed out that are gold items.")


class ServerSection(Section):
    host: str = Field(
        "127.0.0.1",
        description="Interface to listen on. 127.0.0.1 serves this machine only; 0.0.0.0 serves every interface "
        "(put a TLS reverse proxy in front: docs/labelling.md).",
    )
    port: int = Field(8765, ge=0, le=65535, description="TCP port (--port overrides; 0 = any free port).")
    public_url: str | None = Field(
        None,
        description="The base URL raters reach (e.g. https://label.example.org behind a reverse proxy), used in "
        "invite links. Default: http://HOST:PORT.",
    )
    secure_cookies: bool = Field(False, description="Mark cookies Secure (set when raters reach the app over HTTPS).")


class FlagSection(Section):
    """When the dashboard flags a rater."""

    min_gold_accuracy: float = Field(0.7, ge=0, le=1, description="Flag a rater whose gold accuracy is below this.")
    min_kappa: float = Field(
        0.2, ge=-1, le=1, description="Flag a rater whose mean Cohen's kappa with the others is below this."
    )
    min_evidence: int = Field(
        5, ge=1, description="Answers needed (gold answers, or items shared with another rater) before a flag."
    )


class LabelRecipe(Section):
    """`prefcli label serve`: a labelling task for a team of raters; see docs/labelling.md."""

    command: Literal["label"] = Field("label", description="Always 'label' for this schema.")
    title: str | None = Field(None, description="Shown on the pages. Default: the task file's name.")
    items: LabelItems = Field(description="What is labelled.")
    mode: Literal[LABEL_MODES] = Field(
        "pair",
        description="'pair': which of two completions is better (A, B, tie or skip); 'rate': a score 1..scale "
        "per completion; 'rank': order all of an item's completions.",
    )
    scale: int = Field(5, ge=2, le=9, description="rate: scores go from 1 to this (one key each).")
    overlap: int = Field(1, ge=1, le=50, description="Raters who answer each item (agreement needs 2 or more).")
    gold: GoldItems | None = Field(None, description="Items with known answers mixed in, hidden from raters.")
    instructions: str = Field("", description="Instructions for raters, Markdown (rendered safely: no raw HTML).")
    instructions_file: LocalPath | None = Field(
        None, description="Instructions from a Markdown file instead (relative to the task file)."
    )
    shuffle: bool = Field(
        True, description="Show each rater the completions in a random order (seeded, stored), against position bias."
    )
    seed: int = Field(0, description="Seed of the shown order and of when gold items come.")
    quota: int | None = Field(
        None, gt=0, description="At most this many items per rater (gold items not counted). Default: no limit."
    )
    assignment_timeout_s: float = Field(
        900.0,
        gt=0,
        description="An item handed to a rater who has not answered it after this long may go to another rater.",
    )
    store: OutputFile | None = Field(
        None, description="The SQLite file holding items, raters and answers. Default: <task file name>.db beside it."
    )
    server: ServerSection = Field(default_factory=ServerSection, description="Where the web app listens.")
    flags: FlagSection = Field(default_factory=FlagSection, description="When the dashboard flags a rater.")

    @model_validator(mode="after")
    def _check(self):
        if self.instructions and self.instructions_file:
            raise ValueError("give instructions or instructions_file, not both")
        if self.mode == "pair" and self.items.model is not None and self.items.candidates != 2:
            raise ValueError(f"pair mode compares 2 candidates; items.candidates is {self.items.candidates}")
        if self.mode == "rank" and self.items.model is not None and self.items.candidates < 2:
            raise ValueError("rank mode needs items.candidates >= 2")
        return self
