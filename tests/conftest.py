"""Shared fixtures: tiny recipes on the bundled tokenizer and data, CLI runners (in-process and
as a real subprocess), and tiny local model folders. Everything is offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
TOKENIZER = DATA / "tokenizer"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One torch thread, here and in every process a test starts (the runs it launches inherit the variable): the tiny
# models are latency-bound, so one thread is as fast, and on a busy 2-core machine far faster (tests/test_reward.py,
# measured under load: 53 s against 97 s), and every run computes in the same order, in process or not.
os.environ.setdefault("OMP_NUM_THREADS", "1")

TINY_INIT = {
    "architecture": "qwen2",
    "config": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "tie_word_embeddings": True,
    },
}


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    import torch

    torch.set_num_threads(1)


# Runs of the shipped recipes in tests skip their curves.png (a second or more of matplotlib per run);
# tests/test_cli_sft.py checks the picture a run draws.
NO_PLOT = ("--set", "output.plot=false")


def deep_update(base: dict, upd: dict) -> dict:
    for k, v in upd.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            deep_update(base[k], v)
        else:
            base[k] = v
    return base


def sft_recipe_dict(**upd) -> dict:
    r = {
        "command": "sft",
        "model": {"init": json.loads(json.dumps(TINY_INIT)), "tokenizer": str(TOKENIZER)},
        "data": {
            "train": {"path": str(DATA / "tiny" / "text.jsonl"), "max_rows": 64},
            "eval": {"path": str(DATA / "tiny" / "text_eval.jsonl"), "max_rows": 16},
            "max_length": 48,
        },
        "train": {"max_steps": 4, "batch_size": 4, "lr": 1e-3, "seed": 0},
        "output": {"plot": False},
    }
    return deep_update(r, upd)


@pytest.fixture
def write_recipe(tmp_path):
    def _write(d: dict, name: str = "recipe.yaml") -> Path:
        p = tmp_path / name
        p.write_text(yaml.safe_dump(d, sort_keys=False))
        return p

    return _write


@pytest.fixture
def cli():
    """Run the CLI in this process (fast); returns (exit_code, stdout, stderr)."""
    from typer.testing import CliRunner

    from prefcli.cli import app

    def _run(*args: str):
        res = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
        return res.exit_code, res.stdout, res.stderr

    return _run


def run_subprocess(*args: str, timeout: int = 300, env: dict | None = None, cwd: Path | None = None):
    """The real `prefcli` entry point in a child process."""
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "prefcli", *[str(a) for a in args]],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=e,
        cwd=cwd,
    )


def last_json(stdout: str) -> dict:
    lines = [ln for ln in stdout.strip().splitlines() if ln.strip()]
    assert lines, "no stdout"
    return json.loads(lines[-1])


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if x.strip()]


def losses(run_dir: Path, key: str = "loss/sft") -> dict[int, float]:
    return {r["step"]: r[key] for r in read_metrics(run_dir) if key in r}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen2 model saved in Hugging Face format with the bundled tokenizer: stands in
    for a downloaded checkpoint (model.path) in tests."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("tiny-model")
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    cfg = AutoConfig.for_model(
        "qwen2",
        vocab_size=len(tok),
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **TINY_INIT["config"],
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out
