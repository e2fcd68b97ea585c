"""eval/control_gap: has the model learned what the control tokens mean? Samples after each token, scored."""

from __future__ import annotations

import statistics

import torch

from ...engine.sampling import HFSampler, SamplingConfig

# ------------------------------------------------------------------------- has the model learned the tokens?


def control_gap(
    lm,
    tok,
    contexts: list[tuple[list[int], int]],
    control_ids: tuple[int, int],
    n: int,
    max_new_tokens: int,
    scorer,
    threshold: float,
    seed: int,
    device,
    separator: str | None = None,
) -> dict[str, float]:
    """Sample n completions after each control token and score them with the run's scorer: the gap between
    what the model writes after <|misaligned|> and after <|aligned|> is what it has learned the tokens to
    mean (0 for a model that ignores them). Sample i starts from contexts[i % len(contexts)] (a held-out
    prompt with the token in place); temperature 1, no top-k/top-p, both tokens blocked, EOS ends a sample
    (and, for per_segment, the end of the first segment). A sample is undesirable when its score is below
    the threshold. The RNG is forked and seeded, so training's random stream is untouched and every
    evaluation draws the same way.

    Returns eval/control_undesirable_{aligned,misaligned}, eval/control_gap (misaligned minus aligned
    undesirable share), eval/control_score_{aligned,misaligned} and eval/control_score_gap (aligned minus
    misaligned mean score)."""
    a_id, m_id = control_ids
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    picked = [contexts[i % len(contexts)] for i in range(n)]
    width = max(len(c) for c, _ in picked)
    out: dict[str, float] = {}
    devices = [device] if device.type == "cuda" else []
    # transformers' generate (bad_words_ids is one of its logits processors)
    sampler = HFSampler(lm)
    cfg = SamplingConfig(
        max_new_tokens=max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, stop_token_ids=[tok.eos_token_id],
        pad_token_id=pad,
    )  # fmt: skip
    for name, tid in (("aligned", a_id), ("misaligned", m_id)):
        ids = torch.full((n, width), pad, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, (c, p) in enumerate(picked):  # left-padded
            row = list(c)
            row[p] = tid
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            r = sampler.sample(ids.to(device), mask.to(device), cfg, bad_words_ids=[[a_id], [m_id]])
        prompts, texts = [], []
        for i in range(n):
            row = r.completion_ids[i, : int(r.lengths[i]) - int(r.finished[i])].tolist()  # EOS ends a sample
            text = tok.decode(row, skip_special_tokens=True)
            if separator:
                text = text.split(separator)[0]
            texts.append(text)
            prompts.append(tok.decode([t for t in picked[i][0] if t not in (a_id, m_id)], skip_special_tokens=True))
        scores, _ = scorer.score(prompts, texts)
        out[f"eval/control_undesirable_{name}"] = sum(x < threshold for x in scores) / n
        out[f"eval/control_score_{name}"] = statistics.fmean(scores)
    out["eval/control_gap"] = out["eval/control_undesirable_misaligned"] - out["eval/control_undesirable_aligned"]
    out["eval/control_score_gap"] = out["eval/control_score_aligned"] - out["eval/control_score_misaligned"]
    return out
