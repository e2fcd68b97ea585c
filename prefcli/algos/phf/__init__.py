"""Pretraining with human preferences (Korbak et al. 2023, "Pretraining Language Models with Human
Preferences", ICML; tomekkorbak/pretraining-with-human-feedback, apo/objectives.py): the five objectives
`prefcli sft` offers beside plain MLE, and what they need from the data (a score per row, a threshold,
control tokens). One row = one segment. x_t is a target token, N the number of target tokens in the whole
accumulated global batch (the loop divides by it), R the score of the row (segment) that x_t belongs to,
t the threshold (aligned = R >= t):

- `filter`       MLE on aligned rows only (rows with R < t are dropped before training)
- `conditional`  MLE on rows prefixed with <|aligned|> (R >= t) or <|misaligned|> (R < t); a fraction of
                 rows (1%) gets no token; generation starts after <|aligned|> and both control tokens are
                 blocked (bad_words_ids in the saved generation_config)
- `unlikelihood` L = (1/N) sum_t [ 1{R>=t} (-log p(x_t)) + alpha 1{R<t} (-log(1 - p(x_t))) ]
                 (Welleck et al. 2020), alpha = 1
- `rwr`          L = (1/N) sum_t exp(R/beta) (-log p(x_t)), beta = 10
                 (reward-weighted regression, Peters & Schaal 2007)
- `awr`          L = (1/N) sum_t [ alpha min(exp((R - V_t)/beta), 1000) (-log p(x_t))
                                   + (1 - alpha) (V_t - R)^2 ],  alpha = 0.5, beta = 10
                 (advantage-weighted regression, Peng et al. 2019); V_t is a linear value head on the
                 hidden state that predicts x_t, trained by the MSE term; the weight uses it detached.

Each objective is a function (model, batch) -> (loss summed over target tokens, metrics); the registry of
all SFT objectives (with `mle`) is `prefcli.algos.sft.OBJECTIVES`. docs/algorithms.md, section sft.
"""

from .control import (  # noqa: F401
    RowLRScale,
    add_control_tokens,
    control_context,
    control_index,
    encode_segments,
    init_control_embeddings,
    prefix_control,
    split_segments,
)
from .gap import control_gap  # noqa: F401
from .objectives import (  # noqa: F401
    PHF_OBJECTIVES,
    SFTObjective,
    ValuePolicy,
    awr_loss,
    awr_terms,
    conditional_loss,
    filter_loss,
    rwr_loss,
    rwr_terms,
    unlikelihood_loss,
    unlikelihood_terms,
)
from .prepare import (  # noqa: F401
    GAP_CONTEXTS,
    PHFData,
    prepare,
    prepare_segments,
    segment_rows,
    subset,
)
from .scoring import (  # noqa: F401
    SCORE_COLUMN,
    SCORE_VERSION,
    pick_threshold,
    row_texts,
    score_rows,
    scorer_fingerprint,
    unit_hash,
)
