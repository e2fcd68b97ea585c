"""What `prefcli explain` reads: the model (a reward model, or a policy and its reference), the texts or pairs, and the tokens they become."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import DataError, UsageError

METHODS = ("auto", "ig", "prefix", "implicit")
DEFAULT_BETA = 0.1


@dataclass
class ExplainOptions:
    model: str
    texts: list[str] = field(default_factory=list)
    prompt: str = ""
    pairs: str | None = None
    max_rows: int = 20
    method: str = "auto"
    reference: str | None = None
    beta: float | None = None
    steps: int = 64
    plots: str | None = None
    layer: int | None = None
    head: int | None = None
    html: str | None = None
    device: str = "auto"
    quiet: bool = False


@dataclass
class Explained:
    """One text's per-token scores."""

    ids: list[int]
    tokens: list[str]
    scores: list[float | None]  # None: not scored (prompt tokens of a policy, the first token without context)
    prompt_len: int  # tokens of the prompt at the start of ids
    info: dict
    flipped: bool = False  # scores negated (a pair's rejected side: contributions to the margin chosen - rejected)


# ------------------------------------------------------------------------------------ models


def model_kind(path: str) -> tuple[str, dict]:
    """'reward' (a sequence classifier with one label) or 'policy' (a causal LM), from config.json."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise UsageError(
            f"{path}: not a model folder (no config.json); give the final/ folder of a prefcli run or any Hugging "
            "Face model folder"
        )
    cfg = json.loads(cfg_file.read_text())
    archs = cfg.get("architectures") or []
    if any(a.endswith("ForSequenceClassification") for a in archs):
        n = cfg.get("num_labels", len(cfg.get("id2label") or {}) or 2)
        if n != 1:
            raise UsageError(
                f"{path} is a sequence classifier with {n} labels, not a reward model (one score); reward "
                "attribution needs a model with a single output, as `prefcli reward` writes"
            )
        return "reward", cfg
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "policy", cfg
    raise UsageError(f"{path}: architecture {archs or 'unknown'} is neither a reward model nor a causal LM")


def resolve_device(name: str):
    """--device as a torch device (auto, cpu or cuda)."""
    from ...engine.dist import resolve_device

    if name not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device must be auto, cpu or cuda, got {name!r}")
    return resolve_device(name, "--device")


def load_reward_model(path: str, device, eager: bool):
    """The reward model in float32 (the attributions are gradients), with eager attention for --plots."""
    import torch

    from ...reward_sources import load_reward_model

    return load_reward_model(path, device, dtype=torch.float32, attn_implementation="eager" if eager else None)


def load_policy(path: str, device, eager: bool):
    """(causal LM in eval mode, tokenizer, runtime) in float32, with eager attention for --plots."""
    from ...evaluate.loading import load_lm, make_runtime
    from ...recipe.sections import ModelSection

    rt = make_runtime(str(device.type), "fp32")
    lm, tok = load_lm(ModelSection(path=path, attn_implementation="eager" if eager else None), rt)
    return lm, tok, rt


def run_defaults(model: str) -> dict:
    """beta and reference from the recipe.yaml of the run whose final/ folder `model` is."""
    import yaml

    p = Path(os.path.abspath(model))  # not resolve(): a final/ that is a link still finds its run
    recipe = p.parent / "recipe.yaml" if p.name == "final" else p / "recipe.yaml"
    if not recipe.is_file():
        return {}
    try:
        r = yaml.safe_load(recipe.read_text()) or {}
    except yaml.YAMLError:
        return {}
    out: dict[str, Any] = {"recipe": str(recipe), "command": r.get("command")}
    model = r.get("model") or {}
    if model.get("path"):
        out["reference"] = model["path"]
    elif isinstance(model.get("init"), dict):  # trained from a random initialisation: no saved model to compare to
        out["init"] = model["init"].get("architecture") or "a random initialisation"
    if r.get("command") == "contrastive":
        c = r.get("contrastive") or {}
        from ...algos.contrastive import OBJECTIVES

        obj = c.get("objective", "dpo")
        out["objective"] = obj
        out["beta"] = c.get("beta") if c.get("beta") is not None else OBJECTIVES[obj].default_beta
        out["needs_ref"] = OBJECTIVES[obj].needs_ref
    elif r.get("command") == "rlhf":
        out["beta"] = (r.get("rlhf") or {}).get("kl_coef")
    return out


# ------------------------------------------------------------------------------------ inputs


@dataclass
class Item:
    kind: str  # 'text' | 'pair'
    prompt: str
    sides: dict[str, str]  # {'text': ...} or {'chosen': ..., 'rejected': ...}
    row: int | None = None


def read_items(opts: ExplainOptions) -> list[Item]:
    items = [Item("text", opts.prompt, {"text": t}) for t in opts.texts]
    if opts.pairs:
        from ...engine.data import load_rows
        from ...recipe.sections import DataSource

        if not os.path.exists(opts.pairs):
            raise DataError(f"--pairs: no such file: {opts.pairs}")
        if opts.max_rows <= 0:
            raise UsageError("--max-rows must be positive")
        ds = load_rows(
            DataSource(path=opts.pairs, max_rows=opts.max_rows), required=("chosen", "rejected"), what="--pairs"
        )
        for i, row in enumerate(ds.to_list()):
            p, c, r = row.get("prompt") or "", row.get("chosen"), row.get("rejected")
            if not all(isinstance(x, str) for x in (p, c, r)):
                raise DataError(
                    f"--pairs {opts.pairs}: row {i + 1}: prompt/chosen/rejected must be text, not chat messages"
                )
            items.append(Item("pair", p, {"chosen": c, "rejected": r}, row=i + 1))
    if not items:
        raise UsageError("nothing to explain: give --text TEXT (with --prompt) or --pairs FILE")
    for it in items:
        for side, t in it.sides.items():
            if not t:
                raise UsageError(f"item {it.row or ''} {side}: an empty text has no token to explain")
    return items


def token_strings(tok, ids: list[int]) -> list[str]:
    return [tok.decode([i]) for i in ids]


def _check_length(ids: list[int], limit: int | None, what: str) -> None:
    if limit is not None and len(ids) > limit:
        raise UsageError(
            f"{what} is {len(ids)} tokens, longer than the model's context of {limit} tokens "
            "(max_position_embeddings); shorten the text"
        )
