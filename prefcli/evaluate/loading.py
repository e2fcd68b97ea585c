"""Models for eval, generate and label: a runtime without training, and model references resolved to
loadable models (a folder or hub id, a training recipe's trained model, a random init)."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UsageError
from ..recipe.commands import EvalModel
from ..recipe.sections import ModelSection


def make_runtime(device: str = "auto", precision: str = "auto", loss_chunk_tokens: int = 4096):
    """A single-process Runtime (no torch.distributed: nothing here trains)."""
    from ..engine.dist import Runtime, resolve_device, resolve_precision

    dev = resolve_device(device)
    return Runtime(device=dev, precision=resolve_precision(precision, dev), loss_chunk_tokens=loss_chunk_tokens)


def trained_model_dir(recipe_path: str) -> Path:
    """Where the training command of `recipe_path` wrote its model: <run folder>/final, with the run
    folder chosen as the training command chooses it (output.dir, else runs/<command>-<stem> under
    the current directory)."""
    from ..engine.runfolder import default_run_dir
    from ..recipe import load_recipe

    loaded = load_recipe(recipe_path)
    if loaded.command == "eval":
        raise UsageError(f"from_recipe: {recipe_path} is an eval recipe; name a training recipe (sft, ...)")
    r = loaded.recipe
    run_dir = Path(r.output.dir) if r.output.dir else default_run_dir(loaded.command, Path(recipe_path))
    return run_dir / "final"


def model_section(spec: EvalModel, what: str) -> ModelSection:
    """An EvalModel as the engine's ModelSection (paths are already absolute)."""
    if spec.from_recipe is not None:
        final = trained_model_dir(spec.from_recipe)
        if not (final / "config.json").exists():
            raise UsageError(
                f"{what}: from_recipe {spec.from_recipe}: no trained model at {final}. Train it first "
                f"(prefcli <command> {os.path.relpath(spec.from_recipe)}, from this folder), or give "
                "path: instead"
            )
        path = str(final)
        return ModelSection(path=path, tokenizer=spec.tokenizer, revision=spec.revision, **_shared(spec))
    return ModelSection(
        path=spec.path, init=spec.init, tokenizer=spec.tokenizer, revision=spec.revision, **_shared(spec)
    )


def _shared(spec: EvalModel) -> dict:
    """The fields an eval model entry passes on to the engine's ModelSection unchanged."""
    return {k: getattr(spec, k) for k in ("trust_remote_code", "attn_implementation", "pad_token", "on_mismatch")}


def load_lm(m: ModelSection, rt, seed: int = 0):
    """(causal LM in eval mode on rt.device, tokenizer), through the engine's loaders (safetensors
    only; pad/EOS checked)."""
    from ..engine.models import build_causal_lm
    from ..engine.tokenizer import load_tokenizer

    tok = load_tokenizer(m)
    lm = build_causal_lm(m, tok, rt, seed=seed)
    lm.eval()
    return lm, tok
