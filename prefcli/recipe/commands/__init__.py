"""One recipe schema per command, built from the shared sections plus the algorithm's own section.

`SCHEMAS` is the command table: `prefcli <command>` validates against `SCHEMAS[command]`, and a
test keeps it in sync with the CLI and the bundled recipes. The names each choice can take are in
`names.py`; each command family has its module (sft, preference, rl, eval, label).
"""

from ..sections import Section
from .base import RecipeBase
from .eval import (
    DistinctOptions,
    EvalData,
    EvalModel,
    EvalOutput,
    EvalRecipe,
    EvalRuntime,
    GenerationSection,
    PerplexityOptions,
    RougeOptions,
    WinRateOptions,
)
from .label import LABEL_MODES, GoldItems, LabelItems, LabelRecipe
from .names import CONTRASTIVE_OBJECTIVES, EVAL_METRICS, GRPO_LOSSES, REWARD_OBJECTIVES, RL_ALGORITHMS, SFT_OBJECTIVES
from .preference import ContrastiveRecipe, ContrastiveSection, PreferenceData, RewardRecipe, RewardSection
from .rl import (
    DiscriminatorSection,
    GANData,
    GANRecipe,
    GANSection,
    PromptData,
    RLHFRecipe,
    RLHFSection,
    RolloutGeneration,
)
from .sft import PHF_KNOBS, SFTData, SFTRecipe, SFTSection

SCHEMAS: dict[str, type[Section]] = {
    "sft": SFTRecipe,
    "reward": RewardRecipe,
    "rlhf": RLHFRecipe,
    "gan": GANRecipe,
    "contrastive": ContrastiveRecipe,
    "eval": EvalRecipe,
    "label": LabelRecipe,
}

__all__ = [
    "CONTRASTIVE_OBJECTIVES",
    "ContrastiveRecipe",
    "ContrastiveSection",
    "DiscriminatorSection",
    "DistinctOptions",
    "EVAL_METRICS",
    "EvalData",
    "EvalModel",
    "EvalOutput",
    "EvalRecipe",
    "EvalRuntime",
    "GANData",
    "GANRecipe",
    "GANSection",
    "GRPO_LOSSES",
    "GoldItems",
    "LABEL_MODES",
    "LabelItems",
    "LabelRecipe",
    "GenerationSection",
    "PHF_KNOBS",
    "PerplexityOptions",
    "PreferenceData",
    "PromptData",
    "REWARD_OBJECTIVES",
    "RLHFRecipe",
    "RLHFSection",
    "RL_ALGORITHMS",
    "RecipeBase",
    "RewardRecipe",
    "RewardSection",
    "RolloutGeneration",
    "RougeOptions",
    "SCHEMAS",
    "SFTData",
    "SFTRecipe",
    "SFTSection",
    "SFT_OBJECTIVES",
    "WinRateOptions",
]
