"""CI smoke without the hub: --smoke says at once what it needs from the hub when it is not there, needs nothing
more than a local tokenizer, and the example GitHub Actions workflow's commands run on this repository's recipes
with a filled hub cache and no network."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import pytest
import yaml

from .conftest import DATA, ROOT, last_json
from .test_pipelines import repo_shell

GPU_SFT = ROOT / "recipes" / "gpu" / "sft-qwen2.5-0.5b.yaml"
WORKFLOW = ROOT / "docs" / "examples" / "prefcli-ci.yml"


def test_smoke_offline_without_the_hub_files_fails_at_once_saying_what_to_do(tmp_path, cli, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    t0 = time.perf_counter()
    code, stdout, stderr = cli("sft", GPU_SFT, "--smoke", "-o", tmp_path / "run")
    assert code == 2 and time.perf_counter() - t0 < 30
    assert "--smoke needs, from the Hugging Face hub, the tokenizer and config.json of 'Qwen/Qwen2.5-0.5B'" in stderr
    assert "HF_HUB_OFFLINE is set" in stderr and "docs/ci.md" in stderr and "--set model.tokenizer=" in stderr
    assert last_json(stdout)["status"] == "invalid" and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_smoke_with_a_local_tokenizer_needs_nothing_else(tmp_path, cli, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    code, stdout, stderr = cli(
        "sft", GPU_SFT, "--smoke", "-q", "-o", tmp_path / "run", "--set", f"model.tokenizer={DATA / 'tokenizer'}",
        "--set", "data.max_length=128",
    )  # fmt: skip
    assert code == 0, stderr
    assert "the tiny random model is a llama" in stderr
    s = last_json(stdout)
    assert s["status"] == "completed" and s["steps"] == 3
    assert any("the tiny random model is a llama" in w for w in s["warnings"])  # in the summary too
    ran = yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())["model"]
    assert ran["init"]["architecture"] == "llama" and ran["path"] is None  # the recipe shows what ran


def fill_hub_cache(cache, repo: str = "Qwen/Qwen2.5-0.5B"):
    """What the workflow's cache step restores: a hub model's tokenizer and config.json in the hub cache layout
    (here the bundled tokenizer and a Qwen2 config stand in for the downloaded files)."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    snap = folder / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("0" * 40)
    for f in (DATA / "tokenizer").iterdir():
        shutil.copy(f, snap / f.name)
    cfg = {
        "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 896, "intermediate_size": 4864,
        "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 4096,
        "max_position_embeddings": 32768, "tie_word_embeddings": True,
    }  # fmt: skip
    (snap / "config.json").write_text(json.dumps(cfg))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("jq") is None, reason="the workflow reads prefcli's JSON with jq (apt-get install jq)")
def test_the_example_workflow_runs_on_this_repositorys_recipes(tmp_path):
    steps = yaml.safe_load(WORKFLOW.read_text())["jobs"]["recipes"]["steps"]
    names = [s.get("name", s.get("uses")) for s in steps]
    cache = next(s for s in steps if s.get("uses", "").startswith("actions/cache"))
    assert cache["with"]["path"] == "~/.cache/huggingface/hub"
    run = [s for s in steps if s.get("name", "").startswith(("Validate", "Smoke"))]
    assert [s["name"] for s in run] == ["Validate every recipe", "Smoke every training recipe"], names
    env = repo_shell(tmp_path)
    fill_hub_cache(tmp_path / "hub")
    env.update(HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1")
    # every recipe of the repository is validated; the smoke step runs on a GPU recipe whose model is a hub id
    # (each command's own tests smoke its tiny and quickstart recipes)
    for step, recipes in (
        (run[0], "recipes/*/*.yaml"),
        (run[1], f"{GPU_SFT.relative_to(ROOT)} recipes/tiny/eval.yaml"),
    ):
        res = subprocess.run(
            ["bash", "-c", step["run"]], cwd=tmp_path, env=dict(env, RECIPES=recipes), capture_output=True,
            text=True, timeout=900,
        )  # fmt: skip
        assert res.returncode == 0, f"{step['name']}:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    s = json.loads((tmp_path / "runs" / "smoke" / "sft-qwen2.5-0.5b" / "summary.json").read_text())
    assert s["smoke"] is True and s["steps"] == 3
    assert sorted(p.name for p in (tmp_path / "runs" / "smoke").iterdir()) == ["sft-qwen2.5-0.5b"]  # eval: no smoke
    assert os.path.exists(tmp_path / "hub" / "models--Qwen--Qwen2.5-0.5B")


def test_the_example_workflow_installs_prefcli_from_where_the_user_says_never_from_pypi_by_name(tmp_path):
    """`pip install prefcli` would install whatever someone registers under that name on PyPI: the workflow installs
    from PREFCLI_SOURCE (a git URL pinned to a tag, or a wheel), and without it stops before installing anything."""
    workflow = yaml.safe_load(WORKFLOW.read_text())["jobs"]["recipes"]
    assert workflow["env"]["PREFCLI_SOURCE"] == "${{ vars.PREFCLI_SOURCE }}"
    (install,) = [s for s in workflow["steps"] if s.get("name", "").startswith("Install prefcli")]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "pip.log"
    shim = bin_dir / "pip"  # records what the step asks pip for, installs nothing
    shim.write_text(f'#!/bin/sh\necho "$@" >> "{log}"\n')
    shim.chmod(0o755)

    def step(source: str):
        env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PREFCLI_SOURCE=source)
        return subprocess.run(["bash", "-e", "-c", install["run"]], env=env, capture_output=True, text=True)

    wheel = "wheels/prefcli-0.2.0-py3-none-any.whl"
    res = step(wheel)
    assert res.returncode == 0, res.stderr
    calls = log.read_text().splitlines()
    assert calls == ["install torch --index-url https://download.pytorch.org/whl/cpu", f"install {wheel}"], calls
    log.unlink()
    res = step("")
    assert res.returncode == 1 and "PREFCLI_SOURCE" in res.stdout and not log.exists()
    text = WORKFLOW.read_text()
    assert "pip install prefcli" not in text and "not on PyPI" in text
