"""The names every choice in a recipe can take, written once: the schemas' Literals, the algorithm
registries (tests/test_command_table.py checks that each registry has exactly these keys) and the
generated recipe reference all read them from here. (The tracker names of log.report_to live in sections.py,
which this package imports, and are re-exported here.)"""

from ..sections import CHAT_TEMPLATES, TRACKERS  # noqa: F401

SFT_OBJECTIVES = ("mle", "filter", "conditional", "unlikelihood", "rwr", "awr")
REWARD_OBJECTIVES = ("bradley_terry", "regression", "ranking")
CONTRASTIVE_OBJECTIVES = ("dpo", "cdpo", "robust", "ipo", "hinge", "simpo", "cpo", "orpo", "kto", "infonce")
RL_ALGORITHMS = ("ppo", "rloo", "grpo", "reinforce_pp", "online_dpo")
GRPO_LOSSES = ("grpo", "dr_grpo", "dapo")  # grpo's loss variants; dr_grpo and dapo are registry entries of their own
RL_TOKEN_ADVANTAGES = ("ppo", "reinforce_pp")  # algorithms whose advantage differs token by token
POLICY_LOSSES = ("clip", "gspo", "cispo")  # rlhf.policy_loss: prefcli/algos/rlhf/loss.py POLICY_LOSSES
IS_CORRECTIONS = ("none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
# objectives of the contrastive registry that online_dpo can apply (the paired ones)
ONLINE_OBJECTIVES = ("dpo", "cdpo", "robust", "ipo", "hinge", "simpo", "cpo", "orpo")
REWARD_COMBINE = ("mean", "min", "mean_minus_std")  # how a reward ensemble combines its members
EVAL_METRICS = (
    "perplexity", "bleu", "rouge", "reward", "win_rate", "kl", "distinct", "length", "preference_accuracy", "env",
)  # fmt: skip
# data.format: the row shapes each kind of data is read in (prefcli's own, and the formats people already have:
# prefcli/engine/formats.py reads sharegpt, alpaca and openai into prefcli's own)
SFT_FORMATS = ("auto", "text", "prompt_completion", "messages", "openai", "sharegpt", "alpaca")
PAIR_FORMATS = ("auto", "plain", "chat", "openai", "sharegpt", "alpaca")
