"""One recipe schema per command, built from the shared sections plus the algorithm's own section, and
`COMMANDS`, the command table: every `prefcli <command> RECIPE` is a row, and everything else is derived
from it: the schema a recipe of that command is validated against (`SCHEMAS`), the CLI command with its help
and examples (prefcli/cli/train.py makes the training commands from the rows, `eval` reads its help here),
and for a training command the module whose `build(ctx)` makes its Task (prefcli/runner.py). The names each
choice can take are in `names.py`; each command family has its module (sft, preference, rl, eval, label).
"""

from dataclasses import dataclass

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


@dataclass(frozen=True)
class Command:
    """A row of the command table: `prefcli <name> RECIPE`."""

    schema: type[Section]  # what a recipe of this command holds
    help: str  # the command's --help text
    examples: tuple[str, ...]  # command lines shown under it
    # a training command: the module whose `build(ctx)` makes the Task the engine runs (imported only when the
    # command runs, so that a run loads its own algorithm and `prefcli --help` loads none); None: trains nothing
    task: str | None = None


COMMANDS: dict[str, Command] = {
    "sft": Command(
        SFTRecipe,
        "Supervised fine-tuning, and pretraining from scratch (model.init). Logs held-out perplexity.",
        (
            "prefcli sft recipes/tiny/sft.yaml --set train.lr=1e-3 -o runs/lr1e-3",
            "prefcli sft recipes/gpu/sft-qwen2.5-0.5b.yaml --smoke      # prove a recipe on a laptop",
            "prefcli sft recipes/tiny/sft.yaml -q | jq -e '.status == \"completed\"'",
        ),
        task="prefcli.algos.sft",
    ),
    "reward": Command(
        RewardRecipe,
        "Reward model (a scalar head at the last real token) from preference pairs (Bradley-Terry), human "
        "scores or rankings. Logs held-out pairwise accuracy, margin and calibration.",
        (
            "prefcli reward recipes/tiny/reward.yaml",
            "prefcli reward recipes/quickstart/reward.yaml --set train.max_steps=100 -o runs/rm",
        ),
        task="prefcli.algos.reward_model",
    ),
    "rlhf": Command(
        RLHFRecipe,
        "Reinforcement learning from a reward (a reward model, human scores, a rule, your function): PPO, RLOO, "
        "GRPO, REINFORCE++; on prompts, or on multi-turn episodes in an environment (env:, with tools).",
        (
            "prefcli rlhf recipes/quickstart/rlhf.yaml",
            "prefcli rlhf recipes/tiny/rlhf-env-guess.yaml              # episodes in an environment",
            "prefcli rlhf recipes/tiny/rlhf-grpo.yaml --set 'rewards=[{kind: model, path: runs/rm/final}]'",
            "prefcli rlhf recipes/tiny/rlhf-grpo.yaml --resume          # after Ctrl-C",
        ),
        task="prefcli.algos.rlhf",
    ),
    "gan": Command(
        GANRecipe,
        "Adversarial training: a discriminator learns to tell human/gold completions from generated ones, the "
        "generator learns by policy gradient to pass as human.",
        (
            "prefcli gan recipes/tiny/gan.yaml",
            "prefcli gan recipes/gpu/gan-qwen2.5-0.5b.yaml --smoke",
        ),
        task="prefcli.algos.gan",
    ),
    "contrastive": Command(
        ContrastiveRecipe,
        "Policy from preferences (dpo, cdpo, robust, ipo, hinge, simpo, cpo, orpo, kto) or an InfoNCE "
        "preference encoder (infonce). Logs preference accuracy, rewards, margins and log-probs.",
        (
            "prefcli contrastive recipes/tiny/contrastive-dpo.yaml",
            "prefcli contrastive recipes/tiny/contrastive-dpo.yaml --set contrastive.objective=ipo -o runs/ipo",
        ),
        task="prefcli.algos.contrastive",
    ),
    "eval": Command(
        EvalRecipe,
        "Measure models: perplexity, BLEU, ROUGE, reward, win rate, KL, distinct-n, lengths, preference accuracy.\n\n"
        "A table on stderr, the JSON summary on stdout, per-example rows in examples.jsonl.",
        (
            "prefcli eval recipes/tiny/eval.yaml                       # after prefcli sft recipes/tiny/sft.yaml",
            "prefcli generate prefcli/assets/kjv-base < prompts.txt | prefcli eval recipes/tiny/eval-completions.yaml "
            "--completions -",
        ),
    ),
    "label": Command(
        LabelRecipe,
        "Collect human preferences. `prefcli label FILE -o OUT` labels in the terminal, one rater "
        "({prompt, completions: [a, b]} rows); `prefcli label serve TASK.yaml` serves a task to a team of raters "
        "in the browser, with invites, a live dashboard of agreement, gold items and an export for training.",
        (
            "prefcli label pairs.jsonl -o answers.jsonl                  # one rater, in the terminal",
            "prefcli label serve recipes/tiny/label-task.yaml           # a team, in the browser",
            "prefcli label invite recipes/tiny/label-task.yaml --rater ann",
            "prefcli label export recipes/tiny/label-task.yaml -o prefs.jsonl",
        ),
    ),
}

# the recipe schema of each command (a recipe's `command:` picks it)
SCHEMAS: dict[str, type[Section]] = {name: c.schema for name, c in COMMANDS.items()}

__all__ = [
    "COMMANDS",
    "CONTRASTIVE_OBJECTIVES",
    "Command",
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
