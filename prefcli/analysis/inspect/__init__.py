"""`prefcli data inspect DATA_OR_RECIPE`: what a preference data set teaches besides the preference.

    prefcli data inspect data/quickstart/preferences.jsonl --eval data/quickstart/preferences_eval.jsonl
    prefcli data inspect recipes/quickstart/reward.yaml --plots runs/inspect | jq .baselines

Given a recipe, the data is read exactly as the training command reads it (column mapping, held-out
split, the recipe's tokenizer and max_length); given a data file, the row kind is told from its
columns. Reported (docs/commands/data.md):

- hygiene: counts, exact and near duplicates (`engine.debias.normalize_text`), chosen == rejected,
  empty answers, conflicting labels, rows truncated under max_length and the tokens cut;
- length bias: how often the chosen answer is longer, mean token lengths, and the held-out accuracy
  of a length-only baseline ("pick the longer answer", its direction fitted on the training rows);
- other shallow predictors: position (when rows record where the chosen answer was shown), a
  bag-of-words baseline (binarized naive Bayes log-count ratios, Wang & Manning 2012), the words
  most associated with chosen and rejected answers;
- leakage: prompts shared by the training and held-out rows;
- raters (a `rater` column): per-rater label balance, Cohen's kappa and Krippendorff's alpha on
  items several raters labelled, and agreement with a reward source (`--reward`).

Baselines are held out: fitted on the training rows and scored on the held-out rows when there are
some, else by k-fold cross-validation. A baseline at or above `LOUD` accuracy is reported as a
warning: a model can reach that accuracy without learning the preference.

Output: the report on stderr (rich tables), the figures as one JSON object on stdout, PNG plots
with `--plots DIR`.
"""

from .checks import length_rule, nb_weights, pair_baselines
from .report import loud_findings, print_report, run_inspect
from .sources import InspectOptions

__all__ = [
    "InspectOptions",
    "length_rule",
    "loud_findings",
    "nb_weights",
    "pair_baselines",
    "print_report",
    "run_inspect",
]
