"""The model card (README.md) of a run's final/ (and of best/): what the Hugging Face Hub shows for a model, as
transformers' and TRL's trainers write one.

YAML front matter the Hub reads (written by huggingface_hub's `ModelCardData`): `library_name`, `pipeline_tag`
(from the saved config's architecture), `tags` (prefcli, the command, its objective or algorithm), `base_model`
and `base_model_relation` (when model.path is a hub id), `datasets` (the data sources that are hub datasets) and
`license`, copied from the base model's own card (README.md front matter) or config.json when either is at hand: a
local folder, or the hub cache (never fetched). Then the body: base model, data, the command, the final metrics,
the prefcli version and the resolved recipe.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import Any

from .. import __version__
from ..recipe.paths import is_local

CARD = "README.md"
LICENSE_KEYS = ("license", "license_name", "license_link")  # the Hub's licence fields ('other' needs the other two)


def base_license(path: str | None, revision: str | None = None) -> dict[str, str]:
    """The licence fields of the base model's card (its README.md front matter), else of its config.json, read from
    a local folder or from the hub cache; {} when neither says or neither is at hand."""
    if not path:
        return {}
    files: dict[str, str | None] = {}
    for name in (CARD, "config.json"):
        if is_local(path):
            f = os.path.join(path, name)
            files[name] = f if os.path.isfile(f) else None
        else:
            from huggingface_hub import try_to_load_from_cache

            try:
                got = try_to_load_from_cache(path, name, revision=revision)
            except Exception:  # a value that is not a repo id: nothing cached under it
                got = None
            files[name] = got if isinstance(got, str) else None
    found: dict[str, str] = {}
    if files[CARD]:
        from huggingface_hub import ModelCard

        try:
            data = ModelCard.load(files[CARD]).data.to_dict()
        except Exception:  # a README without (valid) front matter
            data = {}
        found = {k: str(data[k]) for k in LICENSE_KEYS if data.get(k)}
    if not found and files["config.json"]:
        try:
            cfg = json.loads(Path(files["config.json"]).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            cfg = {}
        if isinstance(cfg, dict):
            found = {k: str(cfg[k]) for k in LICENSE_KEYS if isinstance(cfg.get(k), str) and cfg[k]}
    return found


def _sources(section: Any) -> list[dict]:
    """The data sources of one data field (a source, a list of sources, or a mixture {sources: [...]})."""
    if isinstance(section, dict) and "sources" in section:
        section = section["sources"]
    if isinstance(section, dict) and section.get("path"):
        return [section]
    if isinstance(section, list):
        return [s for s in section if isinstance(s, dict) and s.get("path")]
    return []


def _pipeline_tag(folder: Path) -> str | None:
    """What the saved model does, from its config's architecture: a causal LM generates text, a one-label
    sequence classifier (a reward model) classifies it, a bare body (an InfoNCE encoder) gives features."""
    try:
        arch = (json.loads((folder / "config.json").read_text()).get("architectures") or [""])[0]
    except (OSError, ValueError):
        return None
    if arch.endswith("ForCausalLM"):
        return "text-generation"
    if arch.endswith("ForSequenceClassification"):
        return "text-classification"
    return "feature-extraction" if arch.endswith("Model") else None


def _metrics_table(metrics: dict) -> list[str]:
    rows = [
        (k, v)
        for k, v in metrics.items()
        if isinstance(v, (int, float))
        and not isinstance(v, bool)
        and not k.startswith("perf/")
        and k not in ("time_s", "step")
    ]
    rows.sort(key=lambda kv: (not kv[0].startswith("eval/"), kv[0]))
    if not rows:
        return ["(no metrics were logged)"]
    out = ["| metric | value |", "|---|---|"]
    out += [f"| `{k}` | {v:.6g} |" if isinstance(v, float) else f"| `{k}` | {v} |" for k, v in rows]
    return out


def command_line(command: str, recipe_path: str, overrides: list[str], smoke: bool = False) -> str:
    """The command that trained the run, as it can be typed again."""
    parts = ["prefcli", command, str(recipe_path)]
    for item in overrides:
        parts += ["--set", item]
    if smoke:
        parts.append("--smoke")
    return " ".join(shlex.quote(p) for p in parts)


LOADERS = {
    "text-generation": "AutoModelForCausalLM",
    "text-classification": "AutoModelForSequenceClassification",
    "feature-extraction": "AutoModel",
}


def model_card(
    shown: Path,
    config: dict,
    recipe_yaml: str,
    command: str,
    cmdline: str,
    steps: int,
    metrics: dict,
    what: str,
    best: dict | None = None,
    model_dir: Path | None = None,
) -> str:
    """The card of `shown`, a run folder's final/ or best/ (where it is when the run is over). `model_dir` holds the
    saved Hugging Face model whose config.json gives the pipeline tag (final/ while it is written, under its
    temporary name); `config`: the resolved recipe as JSON; `metrics`: the numbers to report (the last step's and
    evaluation's, or the best evaluation's); `what`: what the folder holds, in a sentence or two."""
    model = config.get("model") or {}
    section = config.get(command) if isinstance(config.get(command), dict) else {}
    kind = section.get("objective") or section.get("algorithm") or (config.get("rlhf") or {}).get("algorithm")
    data = config.get("data") or {}
    train = _sources(data.get("train"))
    held = _sources(data.get("eval"))
    pipeline = _pipeline_tag(Path(model_dir)) if model_dir is not None else None
    card = _hub_metadata(model, command, kind, train + held, pipeline)
    how = f"`prefcli {command}`" + (f", {kind}" if kind and kind != command else "") + f", {steps} steps"
    lines = ["---", card.to_yaml(), "---", "", f"# {shown.parent.name}", "", what, ""]
    lines += _facts(model, how, train, held, card.license)
    lines += ["## Command", "", "```", cmdline, "```", ""]
    if pipeline is not None and shown.name == "final":
        lines += [
            "## Use",
            "",
            "```python",
            f"from transformers import {LOADERS[pipeline]}, AutoTokenizer",
            "",
            f'model = {LOADERS[pipeline]}.from_pretrained("{shown}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{shown}")',
            "```",
            "",
        ]
    if best:
        lines += [f"## Metrics at the best evaluation (step {best.get('step')}, `{best.get('metric')}`)", ""]
    else:
        lines += ["## Metrics at the end", ""]
    lines += _metrics_table(metrics)
    lines += ["", "## Recipe (resolved: every default written out, paths absolute)", "", "```yaml"]
    lines += [recipe_yaml.rstrip("\n"), "```", ""]
    return "\n".join(lines)


def _hub_metadata(model: dict, command: str, kind, sources: list[dict], pipeline: str | None):
    """The card's YAML front matter for the Hub: tags, the base model (when it is on the Hub), the Hub datasets,
    the pipeline tag and the base model's licence."""
    from huggingface_hub import ModelCardData

    base = model.get("path")
    hub_base = base if base and not is_local(base) else None
    tags = ["prefcli", command] + ([str(kind)] if kind and kind != command else [])
    if model.get("lora"):
        tags.append("lora")
    hub_data = sorted({s["path"] for s in sources if not is_local(s["path"]) and s["path"] != "-"})
    return ModelCardData(
        library_name="transformers",
        pipeline_tag=pipeline,
        tags=tags,
        base_model=hub_base,
        base_model_relation="finetune" if hub_base else None,
        datasets=hub_data or None,
        **base_license(base, model.get("revision")),
    )


def _facts(model: dict, how: str, train: list[dict], held: list[dict], lic) -> list[str]:
    """The card's bulleted facts: base model, training, data, licence, prefcli version."""
    base = model.get("path")
    if base:
        base_line = f"`{base}`" + (f" (revision `{model['revision']}`)" if model.get("revision") else "")
    else:
        init = model.get("init") or {}
        base_line = f"none: a random initialisation of a `{init.get('architecture')}` config (`model.init`)"
    train_list = ", ".join(f"`{s['path']}`" for s in train) or "(none)"
    held_list = ", ".join(f"`{s['path']}`" for s in held)
    return [
        f"- **Base model**: {base_line}",
        f"- **Training**: {how}",
        f"- **Data**: {train_list}" + (f"; held out: {held_list}" if held_list else ""),
        f"- **Licence**: {lic} (copied from the base model)"
        if lic
        else "- **Licence**: none found in the base model's card or config; check the base model's and the data's "
        "terms before sharing this model",
        f"- **prefcli**: {__version__}",
        "",
    ]


def write_card(folder: Path, text: str) -> None:
    (Path(folder) / CARD).write_text(text, encoding="utf-8")
