"""`data.debias`: opt-in cleaning and rebalancing of training rows, before tokenization.

Two sections, because length balancing needs two completions to compare:

- `SFTDebiasSection` (sft): deduplication and dropping training prompts that appear in the
  held-out set;
- `DebiasSection` (reward, contrastive): the same, plus length-balanced sampling or reweighting
  of preference pairs.

What they do is in prefcli/engine/debias.py and docs/commands/data.md. This module imports only
pydantic (`prefcli validate` must not pay for torch).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .sections import Section


class SFTDebiasSection(Section):
    """Data cleaning for training rows. Off by default; each step reports what it removed (a warning
    line and `data.debias` in the run summary)."""

    dedup: Literal["off", "exact", "normalized"] = Field(
        "off",
        description="Drop rows that repeat an earlier row (the first is kept), in the training and the held-out "
        "set: 'exact' compares the text columns as they are; 'normalized' after Unicode NFKC, case folding, "
        "punctuation removed and whitespace collapsed (near duplicates). Metadata columns (rater, margin, ...) "
        "are not compared.",
    )
    drop_eval_prompts: bool = Field(
        False,
        description="Drop training rows whose prompt (normalized as in dedup) is also a prompt of the held-out set, "
        "so held-out metrics measure unseen prompts (rows without a prompt: the whole row is compared). Needs "
        "data.eval or data.eval_fraction.",
    )


class DebiasSection(SFTDebiasSection):
    """Data cleaning and length debiasing for preference pairs. Off by default; each step reports what it
    removed or reweighted (a warning line and `data.debias` in the run summary)."""

    length_balance: Literal["off", "subsample", "reweight"] = Field(
        "off",
        description="Break the link between length and label in the training pairs (pair rows only: reward "
        "bradley_terry and the paired contrastive objectives). Pairs are put in length_bins bins of "
        "|len(chosen) - len(rejected)| (completion tokens, equal-count bins); in each bin 'subsample' keeps as "
        "many pairs whose chosen is longer as pairs whose chosen is shorter (a seeded random subset of the "
        "larger side), 'reweight' keeps every pair and weights each side of a bin so both carry the same total "
        "weight (weights averaging 1; a bin with one side empty gets weight 0). Pairs of equal length are kept "
        "with weight 1.",
    )
    length_bins: int = Field(
        4,
        ge=1,
        description="Number of length-difference bins for length_balance (1 = balance the whole set at once).",
    )

    @model_validator(mode="after")
    def _check(self):
        if self.length_balance == "off" and "length_bins" in self.model_fields_set and self.length_bins != 4:
            raise ValueError("data.debias.length_bins applies only with length_balance 'subsample' or 'reweight'")
        return self
