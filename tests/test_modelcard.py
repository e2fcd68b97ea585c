"""The model card (README.md) in final/ and best/: front matter the Hub reads (parsed back with huggingface_hub's own
ModelCard), the base model's licence copied from its card or config (local folder or hub cache, never fetched), and
a body with the base model, data, command, metrics and prefcli version."""

from __future__ import annotations

import json
import shutil

import yaml
from huggingface_hub import ModelCard

from prefcli import __version__
from prefcli.engine.modelcard import base_license, command_line, model_card
from prefcli.runner import RunOptions, run_training

from .conftest import DATA, ROOT, read_metrics, sft_recipe_dict
from .test_ci_smoke import fill_hub_cache


def test_the_base_models_licence_comes_from_its_card_or_config(tmp_path, monkeypatch):
    from huggingface_hub import constants

    card = tmp_path / "with-card"
    card.mkdir()
    (card / "README.md").write_text("---\nlicense: other\nlicense_name: kjv-terms\nlicense_link: LICENSE\n---\n# m\n")
    (card / "config.json").write_text(json.dumps({"license": "mit"}))  # the card wins
    assert base_license(str(card)) == {"license": "other", "license_name": "kjv-terms", "license_link": "LICENSE"}
    cfg = tmp_path / "with-config"
    cfg.mkdir()
    (cfg / "README.md").write_text("# no front matter\n")
    (cfg / "config.json").write_text(json.dumps({"license": "mit", "model_type": "llama"}))
    assert base_license(str(cfg)) == {"license": "mit"}
    assert base_license(str(tmp_path)) == {} and base_license(None) == {}
    assert base_license(str(ROOT / "prefcli" / "assets" / "kjv-base")) == {"license": "apache-2.0"}
    # a hub id: its README.md from the hub cache, nothing fetched (offline, empty cache: nothing found)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert base_license("Qwen/Qwen2.5-0.5B") == {}
    fill_hub_cache(tmp_path / "hub")
    snap = next((tmp_path / "hub").rglob("snapshots/*"))
    (snap / "README.md").write_text("---\nlicense: apache-2.0\nlibrary_name: transformers\n---\n# Qwen2.5-0.5B\n")
    assert base_license("Qwen/Qwen2.5-0.5B") == {"license": "apache-2.0"}


def test_a_hub_base_model_and_hub_data_are_named_in_the_front_matter(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    fill_hub_cache(tmp_path / "hub")
    snap = next((tmp_path / "hub").rglob("snapshots/*"))
    (snap / "README.md").write_text("---\nlicense: apache-2.0\n---\n")
    final = tmp_path / "run" / "final"
    final.mkdir(parents=True)
    (final / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForSequenceClassification"]}))
    config = {
        "command": "reward",
        "model": {"path": "Qwen/Qwen2.5-0.5B", "revision": None, "lora": None},
        "data": {"train": [{"path": "org/prefs", "weight": 1}, {"path": str(DATA / "tiny" / "pref_train.jsonl")}],
                 "eval": {"path": "org/prefs-test"}},
        "reward": {"objective": "bradley_terry"},
    }  # fmt: skip
    cmd = command_line("reward", "r.yaml", ["train.lr=1e-5", "log.tags=[a, b]"])
    assert cmd == "prefcli reward r.yaml --set train.lr=1e-5 --set 'log.tags=[a, b]'"
    text = model_card(final, config, "command: reward\n", "reward", cmd, 7, {"eval/accuracy": 0.75}, "x.", None, final)
    (final / "README.md").write_text(text)
    data = ModelCard.load(final / "README.md").data.to_dict()
    assert data == {
        "library_name": "transformers", "pipeline_tag": "text-classification",
        "tags": ["prefcli", "reward", "bradley_terry"], "base_model": "Qwen/Qwen2.5-0.5B",
        "base_model_relation": "finetune", "datasets": ["org/prefs", "org/prefs-test"], "license": "apache-2.0",
    }  # fmt: skip
    assert "AutoModelForSequenceClassification.from_pretrained" in text and "| `eval/accuracy` | 0.75 |" in text


def test_final_and_best_get_a_model_card(tmp_path, tiny_model_dir):
    """A run from a local base model whose card says `license: mit`, keeping its best evaluation (output.final:
    best): final/README.md and best/README.md, each parsed back with huggingface_hub."""
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    (base / "README.md").write_text("---\nlicense: mit\n---\n# a base model\n")
    d = sft_recipe_dict(
        model={"init": None, "path": str(base), "tokenizer": None},
        train={"max_steps": 4, "eval_every_steps": 2, "keep_best": {"metric": "eval/loss", "mode": "min"}},
        output={"final": "best", "plot": False},
    )
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(yaml.safe_dump(d))
    run = tmp_path / "run"
    s = run_training("sft", recipe, RunOptions(output_dir=str(run), quiet=True, overrides=["train.lr=2e-3"]))
    evals = {r["step"]: r for r in read_metrics(run) if "eval/loss" in r}
    best = s["best"]
    assert best["value"] == min(r["eval/loss"] for r in evals.values())
    for folder in ("final", "best"):
        text = (run / folder / "README.md").read_text()
        data = ModelCard.load(run / folder / "README.md").data.to_dict()
        assert data == {
            "library_name": "transformers", "pipeline_tag": "text-generation", "tags": ["prefcli", "sft", "mle"],
            "license": "mit",
        }, folder  # fmt: skip
        assert f"- **Base model**: `{base}`" in text and "- **Licence**: mit (copied from the base model)" in text
        assert f"- **prefcli**: {__version__}" in text and "- **Training**: `prefcli sft`, mle, 4 steps" in text
        assert f"- **Data**: `{DATA / 'tiny' / 'text.jsonl'}`; held out: `{DATA / 'tiny' / 'text_eval.jsonl'}`" in text
        assert f"prefcli sft {recipe} --set train.lr=2e-3" in text
        assert f"## Metrics at the best evaluation (step {best['step']}, `eval/loss`)" in text
        assert f"| `eval/loss` | {evals[best['step']]['eval/loss']:.6g} |" in text
        assert "lr: 0.002" in text  # the resolved recipe, with the override
    assert f'AutoModelForCausalLM.from_pretrained("{run / "final"}")' in (run / "final" / "README.md").read_text()
    assert "prefcli's checkpoint format" in (run / "best" / "README.md").read_text()
