"""The embedded default: the bundled base model is a trained model, and the quickstart recipes
run (smoke) as shipped."""

import json
import math

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from .conftest import NO_PLOT, ROOT, last_json

BASE = ROOT / "prefcli" / "assets" / "kjv-base"


@pytest.mark.slow
def test_bundled_base_model_is_trained():
    """Held-out perplexity with transformers alone: trained (README: 42.5 on 400 verses), not random
    (a random model scores about the vocabulary size, 4,096)."""
    tok = AutoTokenizer.from_pretrained(BASE)
    lm = AutoModelForCausalLM.from_pretrained(BASE).eval()
    import gzip

    with gzip.open(ROOT / "data" / "kjv" / "test.jsonl.gz", "rt") as f:
        texts = [json.loads(x)["text"] for _, x in zip(range(40), f)]
    nll, n = 0.0, 0
    with torch.no_grad():
        for t in texts:
            ids = torch.tensor([tok(t)["input_ids"] + [tok.eos_token_id]])
            logits = lm(input_ids=ids).logits[0, :-1]
            nll += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            n += ids.shape[1] - 1
    assert math.exp(nll / n) < 80
    assert sum(p.numel() for p in lm.parameters()) < 10_000_000  # a few tens of MB at most


@pytest.mark.slow
@pytest.mark.parametrize("command,recipe", [("rlhf", "rlhf"), ("gan", "gan"), ("contrastive", "contrastive")])
def test_quickstart_recipes_smoke(command, recipe, tmp_path, cli):
    code, stdout, stderr = cli(
        command, ROOT / "recipes" / "quickstart" / f"{recipe}.yaml", "--smoke", "-o", tmp_path / recipe, "-q", *NO_PLOT
    )
    assert code == 0, stderr
    s = last_json(stdout)
    assert s["status"] == "completed" and s["smoke"] is True and s["steps"] == 3  # docs/cli.md: 3 steps, gan too


@pytest.mark.slow
def test_quickstart_phf_conditional_recipe_smoke(tmp_path, cli):
    """The finetuning-setting recipe of docs/phf-experiment.md runs as shipped (smoke): scored rows, control
    tokens, and eval/control_gap logged at the end."""
    code, stdout, stderr = cli(
        "sft",
        ROOT / "recipes" / "quickstart" / "phf-conditional.yaml",
        "--smoke",
        "-o",
        tmp_path / "phf",
        "-q",
        *NO_PLOT,
    )
    assert code == 0, stderr
    s = last_json(stdout)
    assert s["status"] == "completed" and s["smoke"] is True
    assert s["data"]["phf"]["objective"] == "conditional" and s["data"]["phf"]["control_position"] == "start"
    assert -1.0 <= s["final"]["eval/control_gap"] <= 1.0


def test_quickstart_phf_pii_recipe_smoke(tmp_path, cli):
    """The PII-task recipe of docs/phf-experiment.md runs as shipped (smoke): the scrubadub scorer marks the
    verses with PII misaligned (a quarter of data/pii/, so a smoke's rows hold both kinds), and
    eval/control_gap is logged at the end."""
    code, stdout, stderr = cli(
        "sft", ROOT / "recipes" / "quickstart" / "phf-pii.yaml", "--smoke", "-o", tmp_path / "pii", "-q"
    )
    assert code == 0, stderr
    s = last_json(stdout)
    assert s["status"] == "completed" and s["smoke"] is True
    phf = s["data"]["phf"]
    assert phf["objective"] == "conditional" and phf["scorer"] == "1*function"
    assert phf["rows_misaligned"] > 0 and phf["rows_aligned"] > phf["rows_misaligned"]
    assert -1.0 <= s["final"]["eval/control_gap"] <= 1.0
    ran = yaml.safe_load((tmp_path / "pii" / "recipe.yaml").read_text())["sft"]  # the smoke's few short gap samples
    assert ran["control_gap_samples"] == 4 and ran["control_gap_max_new_tokens"] == 16


PERSONAL = sorted(p for p in (ROOT / "recipes" / "quickstart" / "personal").glob("*.yaml") if p.stem != "eval")


@pytest.mark.slow
@pytest.mark.parametrize("path", PERSONAL, ids=[p.stem for p in PERSONAL])
def test_personalisation_recipes_smoke(path, tmp_path, cli):
    """Every training recipe of the multi-rater task runs as shipped (smoke): the pooled and personalised reward
    models, the pooled policy and the one conditioned on the rater, and RLHF with each rater's own taste
    (tastes.py) as the reward. (eval.yaml reads the trained policies; tests/test_startup.py validates it.)"""
    command = yaml.safe_load(path.read_text())["command"]
    code, stdout, stderr = cli(command, path, "--smoke", "-o", tmp_path / path.stem, "-q")
    assert code == 0, stderr
    s = last_json(stdout)
    assert s["status"] == "completed" and s["smoke"] is True and s["steps"] == 3
    personal = (tmp_path / path.stem / "final" / "personalisation" / "config.json").exists()
    assert personal == ("pooled" not in path.stem), path.stem
    if command == "reward":  # every reward model reports each rater and the worst one
        assert "eval/accuracy_worst_user" in s["final"] and "eval/accuracy/negative-1" in s["final"]
