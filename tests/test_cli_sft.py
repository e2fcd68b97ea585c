"""`prefcli sft` through the CLI: the stdout/exit-code contract, the saved model, bad input."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .conftest import DATA, ROOT, last_json, losses, read_metrics, run_subprocess, sft_recipe_dict


@pytest.mark.slow
def test_sft_end_to_end_subprocess(tmp_path, write_recipe):
    """The real entry point: one JSON object on stdout, progress lines on stderr, every artifact."""
    p = write_recipe(sft_recipe_dict(train={"max_steps": 6, "eval_every_steps": 3}, output={"plot": True}))
    out = tmp_path / "run"
    res = run_subprocess("sft", p, "-o", out)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1
    s = json.loads(lines[0])
    assert s["status"] == "completed" and s["steps"] == 6 and s["exit_code"] == 0
    assert set(s["final"]) >= {"loss/sft", "eval/loss", "eval/ppl", "lr", "perf/tokens_per_s"}
    assert s["data"]["train_rows"] == 64 and s["data"]["eval_examples"] == 16
    assert "step 6/6" in res.stderr and "eval @ step 3" in res.stderr
    for name in (
        "recipe.yaml",
        "metrics.jsonl",
        "summary.json",
        "final/config.json",
        "final/model.safetensors",
        "final/tokenizer.json",
        "curves.png",
    ):
        assert (out / name).exists(), name
    assert json.loads((out / "summary.json").read_text())["final"] == s["final"]
    assert (out / "curves.png").stat().st_size > 5000


def _direct_perplexity(model_dir, texts, max_length):
    """Perplexity with transformers alone (no prefcli code): full logits, token-weighted sums."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    nll, n = 0.0, 0
    with torch.no_grad():
        for t in texts:
            ids = (tok(t)["input_ids"] + [tok.eos_token_id])[:max_length]
            x = torch.tensor([ids])
            logits = model(input_ids=x).logits[0, :-1].double()
            nll += torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum").item()
            n += len(ids) - 1
    return math.exp(nll / n)


@pytest.mark.slow
def test_final_model_reloads_and_matches_direct_perplexity(tmp_path, write_recipe, cli):
    p = write_recipe(sft_recipe_dict(train={"max_steps": 5}))
    code, stdout, stderr = cli("sft", p, "-o", tmp_path / "run", "-q")
    assert code == 0, stderr
    assert "step " not in stderr and all(x.startswith("warning:") for x in stderr.splitlines())  # --quiet
    s = last_json(stdout)
    texts = [json.loads(x)["text"] for x in (DATA / "tiny" / "text_eval.jsonl").read_text().splitlines()[:16]]
    ppl = _direct_perplexity(tmp_path / "run" / "final", texts, 48)
    assert s["final"]["eval/ppl"] == pytest.approx(ppl, rel=1e-4)
    card = (tmp_path / "run" / "final" / "README.md").read_text()  # the model card: the metrics at the end
    assert "## Metrics at the end" in card and f"| `eval/ppl` | {s['final']['eval/ppl']:.6g} |" in card
    assert "none: a random initialisation of a `qwen2` config (`model.init`)" in card
    assert "- **Licence**: none found" in card and "license:" not in card.split("---")[1]


@pytest.mark.slow
def test_smoke_swaps_in_a_tiny_model_of_the_same_family(tmp_path, write_recipe, cli, tiny_model_dir):
    d = sft_recipe_dict(train={"max_steps": 50, "batch_size": 8})
    d["model"] = {"path": str(tiny_model_dir)}
    d["data"]["train"] = {"path": str(DATA / "tiny" / "prompt_completion.jsonl")}
    d["data"]["eval"] = None
    d["data"]["eval_fraction"] = 0.1
    code, stdout, stderr = cli("sft", write_recipe(d), "--smoke", "-o", tmp_path / "smoke", "-q")
    assert code == 0, stderr
    s = last_json(stdout)
    assert s["smoke"] is True and s["steps"] == 3 and s["data"]["train_rows"] + s["data"]["eval_examples"] == 16
    cfg = json.loads((tmp_path / "smoke" / "final" / "config.json").read_text())
    assert cfg["model_type"] == "qwen2" and cfg["hidden_size"] == 64 and cfg["num_hidden_layers"] == 2
    saved = (tmp_path / "smoke" / "recipe.yaml").read_text()
    assert "max_steps: 3" in saved and "max_rows: 16" in saved


@pytest.mark.slow
def test_gpt2_family_and_lora(tmp_path, write_recipe, cli):
    d = sft_recipe_dict()
    d["model"]["init"] = {
        "architecture": "gpt2",
        "config": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 128},
    }
    code, stdout, stderr = cli("sft", write_recipe(d), "-o", tmp_path / "g", "-q")
    assert code == 0, stderr
    assert json.loads((tmp_path / "g" / "final" / "config.json").read_text())["model_type"] == "gpt2"
    code, stdout, stderr = cli(
        "sft", write_recipe(sft_recipe_dict()), "-o", tmp_path / "l", "-q", "--set", "model.lora.r=4"
    )
    assert code == 0, stderr
    s = last_json(stdout)
    assert 0 < s["model"]["trainable_parameters"] < s["model"]["parameters"] / 4
    assert (tmp_path / "l" / "final" / "adapter" / "adapter_config.json").exists()
    AutoModelForCausalLM.from_pretrained(tmp_path / "l" / "final")  # merged: loads without peft


# ------------------------------------------------------------------------------ bad input


def _bad(cli, tmp_path, recipe_path, *extra, match):
    code, stdout, stderr = cli("sft", recipe_path, "-o", tmp_path / "never", "-q", *extra)
    assert code == 2, stderr
    assert match in stderr, stderr
    s = last_json(stdout)
    assert s["status"] == "invalid" and s["exit_code"] == 2
    assert not (tmp_path / "never").exists()  # nothing written
    return stderr


def test_bad_recipes_exit_2(tmp_path, write_recipe, cli):
    bad = tmp_path / "bad.yaml"
    bad.write_text("command: sft\nmodel: {init: {architecture: qwen2}\n")
    _bad(cli, tmp_path, bad, match="YAML syntax error")
    d = sft_recipe_dict()
    d["train"]["learning_rate"] = 1
    _bad(cli, tmp_path, write_recipe(d), match="train.learning_rate: unknown field (did you mean 'lr'?)")
    d = sft_recipe_dict()
    d["data"]["train"]["path"] = "missing.jsonl"
    _bad(cli, tmp_path, write_recipe(d), match="no such file or folder")
    d = sft_recipe_dict()
    d["model"]["init"]["config"]["hidden_sise"] = 8
    _bad(
        cli,
        tmp_path,
        write_recipe(d),
        match="model.init.config.hidden_sise: not a field of the qwen2 config (did you mean 'hidden_size'?)",
    )
    _bad(cli, tmp_path, tmp_path / "nope.yaml", match="recipe not found")


def test_bad_data_exit_2(tmp_path, write_recipe, cli):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    d = sft_recipe_dict()
    d["data"]["train"] = {"path": str(empty)}
    _bad(cli, tmp_path, write_recipe(d), match="empty.jsonl")
    d = sft_recipe_dict()
    d["data"]["train"]["columns"] = {"text": "body"}
    _bad(cli, tmp_path, write_recipe(d), match="maps 'text' to column 'body', which is not in the data")
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"question": "a"}\n')
    d = sft_recipe_dict()
    d["data"]["train"] = {"path": str(rows)}
    d["data"]["eval"] = None
    _bad(cli, tmp_path, write_recipe(d), match="cannot tell the row format")
    d = sft_recipe_dict()
    d["data"]["max_length"] = 2
    d["data"]["train"] = {"path": str(DATA / "tiny" / "prompt_completion.jsonl"), "max_rows": 4}
    d["data"]["eval"] = None
    _bad(cli, tmp_path, write_recipe(d), match="no example has a token to train on")


@pytest.mark.slow
def test_tokenizer_without_pad_token(tmp_path, write_recipe, cli):
    tok = AutoTokenizer.from_pretrained(ROOT / "data" / "tokenizer")
    tok.pad_token = None
    tok.save_pretrained(tmp_path / "nopad")
    d = sft_recipe_dict()
    d["model"]["tokenizer"] = str(tmp_path / "nopad")
    err = _bad(cli, tmp_path, write_recipe(d), match="has no pad token")
    assert "pad_token" in err
    code, stdout, stderr = cli(
        "sft", write_recipe(d), "-o", tmp_path / "fixed", "-q", "--set", "model.pad_token=<|newpad|>"
    )
    assert code == 0, stderr


@pytest.mark.slow
def test_output_dir_with_another_run_is_refused_and_untouched(tmp_path, write_recipe, cli):
    p = write_recipe(sft_recipe_dict(train={"max_steps": 2}))
    out = tmp_path / "run"
    assert cli("sft", p, "-o", out, "-q")[0] == 0
    before = (out / "metrics.jsonl").read_text()
    code, stdout, stderr = cli("sft", p, "-o", out, "-q")
    assert code == 2 and "holds another run" in stderr and "--overwrite" in stderr
    assert (out / "metrics.jsonl").read_text() == before
    code, stdout, stderr = cli("sft", p, "-o", out, "-q", "--resume")
    assert code == 2 and "no checkpoint" in stderr
    code, stdout, stderr = cli("sft", p, "-o", out, "-q", "--overwrite", "--set", "train.max_steps=3")
    assert code == 0 and len(read_metrics(out)) == 4  # 3 steps + final eval, the old lines are gone


@pytest.mark.slow
def test_sigint_writes_a_checkpoint_exits_130_and_resumes(tmp_path, write_recipe):
    p = write_recipe(sft_recipe_dict(train={"max_steps": 100000, "eval_every_steps": None}, data={"eval": None}))
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefcli", "sft", str(p), "-o", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "metrics.jsonl").exists():
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    s = last_json(stdout)
    assert s["status"] == "interrupted" and "--resume" in s["error"]
    cps = sorted((out / "checkpoints").glob("step-*"))
    assert len(cps) == 1
    stopped_at = int(cps[0].name.split("-")[1])
    res = run_subprocess("sft", p, "-o", out, "-q", "--resume", "--set", f"train.max_steps={stopped_at + 3}")
    assert res.returncode == 0, res.stderr
    s2 = last_json(res.stdout)
    assert s2["steps"] == stopped_at + 3 and s2["resumed_from"].endswith(cps[0].name)
    assert sorted(losses(out))[-3:] == [stopped_at + 1, stopped_at + 2, stopped_at + 3]
