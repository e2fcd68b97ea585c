"""`prefcli explain MODEL --text ... | --pairs FILE`: which tokens earn a reward, where a tuned policy
departs from its base, and what the model attends to.

    prefcli explain runs/quickstart/reward/final --prompt "And the LORD said" --text " blessed be thy name"
    prefcli explain runs/quickstart/dpo/final --pairs data/quickstart/preferences_eval.jsonl --html dpo.html

A reward model (AutoModelForSequenceClassification, one label, as `prefcli reward` writes it) scores
the string prompt + completion at its last token, exactly as training and `prefcli.reward_sources` do.
Per-token attribution of that score:

- `ig`: integrated gradients (Sundararajan et al. 2017, "Axiomatic Attribution for Deep Networks"),
  captum's `LayerIntegratedGradients` over the input embeddings, from a baseline that puts one
  neutral token at every position: the pad token, or EOS when the pad token's embedding is zero (as
  in models trained with a padding_idx, e.g. every reward model prefcli trains from scratch). A zero
  baseline would break integrated gradients on RMSNorm/LayerNorm models: they see only the direction
  of an embedding, so the score jumps at the very start of the path from zero, where the integral
  cannot see it. Completeness: the attributions sum to r(x) - r(baseline) up to the integration
  error (reported as `convergence_delta`; a warning asks for more --steps when it is over 5%).
- `prefix`: the score of each prefix minus the score of the one before, a_t = r(x_≤t) - r(x_<t)
  (a_1 = r(x_1)); they sum to r(x). One forward pass gives every prefix score: the head is applied
  to the hidden state of every position (causal attention: position t sees only x_≤t).

A policy with a reference (a DPO or PPO output and its base): the per-token implicit reward
β (log π(y_t | x, y_<t) - log π_ref(y_t | x, y_<t)) over the completion tokens (EOS included, as
training encodes them); its sum is the sequence implicit reward β log π(y|x)/π_ref(y|x) that
`prefcli contrastive` logs as reward/chosen and reward/rejected.

For a pair, both completions are explained and aligned (difflib on token ids): tokens the two share
in the same order are "shared"; `differing_mass` is the share of the absolute attribution that sits
on the tokens that differ (for shared tokens, the difference of their two attributions counts).

Attention maps (`--plots DIR`): the model reloaded with eager attention, one heatmap per text, for
`--layer`/`--head` or averaged. Output: coloured tokens on stderr (rich), one JSON row per token on
stdout and the summary as the last line, a self-contained HTML page with `--html`.
"""

from .attribution import attention_map, ig_attribution, implicit_rewards, position_scores, prefix_attribution
from .driver import run_explain
from .inputs import ExplainOptions

__all__ = [
    "ExplainOptions",
    "attention_map",
    "ig_attribution",
    "implicit_rewards",
    "position_scores",
    "prefix_attribution",
    "run_explain",
]
