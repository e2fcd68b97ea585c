"""Pipelines that work: every shell block of docs/pipelines.md runs as written; `prefcli eval --completions`
scores what `prefcli generate` writes, computing every metric that needs no sampling."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from .conftest import DATA, ROOT, last_json

DOC = ROOT / "docs" / "pipelines.md"


def shell_blocks(path) -> list[str]:
    return re.findall(r"```sh\n(.*?)```", path.read_text(), re.S)


def repo_shell(tmp_path):
    """A fresh folder that looks like the repository root (data, recipes, the bundled model), with `prefcli` on
    PATH as this checkout's entry point, so the docs' commands run as written and write their runs/ here."""
    for name in ("data", "recipes", "prefcli"):
        (tmp_path / name).symlink_to(ROOT / name)
    bin_dir = tmp_path / ".bin"
    bin_dir.mkdir()
    exe = bin_dir / "prefcli"
    exe.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m prefcli "$@"\n')
    exe.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return env


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("jq") is None, reason="the documented pipelines use jq (apt-get install jq)")
def test_every_shell_block_in_docs_pipelines_runs(tmp_path):
    blocks = shell_blocks(DOC)
    assert len(blocks) == 3  # generate | eval, the sweep through jq -e, what pipefail catches
    text = DOC.read_text()
    assert "set -o pipefail" in text and "jq -e" in text
    env = repo_shell(tmp_path)
    for block in blocks:
        res = subprocess.run(["bash", "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, f"block failed ({res.returncode}):\n{block}\nstderr:\n{res.stderr[-3000:]}"
    assert json.loads((tmp_path / "runs" / "pipeline-eval" / "summary.json").read_text())["models"]["completions"]
    assert len(json.loads((tmp_path / "runs" / "sweep.json").read_text())) == 2


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_eval_scores_given_completions(tmp_path, cli):
    rows = [
        {"index": 0, "prompt": "And God said", "completion": " Let there be light", "reference": " Let there be light",
         "finish_reason": "eos", "tokens": 5},
        {"index": 1, "prompt": "In the beginning", "completion": " God created", "reference": " God created the heaven",
         "finish_reason": "length", "tokens": 3},
    ]  # fmt: skip
    f = write_jsonl(tmp_path / "out.jsonl", rows)
    recipe = ROOT / "recipes" / "tiny" / "eval-completions.yaml"
    code, stdout, stderr = cli(
        "eval", recipe, "--completions", f, "-o", tmp_path / "ev", "-q", "--set", "log.report_to=[tensorboard]"
    )
    assert code == 0, stderr
    s = last_json(stdout)
    m = s["models"]["completions"]  # the same key as for stdin; 'source' names the file
    assert m["source"] == str(f)
    import sacrebleu

    want = sacrebleu.corpus_bleu([r["completion"] for r in rows], [[r["reference"] for r in rows]]).score
    assert m["role"] == "completions" and m["bleu"]["score"] == pytest.approx(want)
    assert m["length"]["tokens"]["mean"] == 4.0 and m["length"]["finish_reason"] == {"eos": 1, "length": 1}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tmp_path / "ev" / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()  # the trackers got the results and the completions
    assert ea.Scalars("completions/bleu/score")[0].value == pytest.approx(want)
    table = ea.Tensors("completions/completions/text_summary")[0].tensor_proto.string_val[0].decode()
    assert table.startswith("| prompt | completion | reference | reward | tokens |") and "Let there be light" in table
    assert m["reward"]["mean"] == pytest.approx(
        sum(json.loads(x)["reward"] for x in (tmp_path / "ev" / "examples.jsonl").read_text().splitlines()) / 2
    )

    # the same rows on stdin, with a recipe that also samples (data.prompts, kl): nothing is sampled, kl is skipped
    from typer.testing import CliRunner

    from prefcli.cli import app

    res = CliRunner().invoke(
        app,
        ["eval", str(recipe), "--completions", "-", "-o", str(tmp_path / "ev2"), "-q", "--set",
         "metrics=[bleu, distinct, kl]", "--set", f"reference={{path: {ROOT / 'prefcli' / 'assets' / 'kjv-base'}}}",
         "--set", f"data.prompts={{path: {DATA / 'tiny' / 'prompts_eval.jsonl'}}}"],
        input=f.read_text(),
    )  # fmt: skip
    assert res.exit_code == 0, res.stderr
    s2 = json.loads(res.stdout.strip().splitlines()[-1])
    assert (
        s2["models"]["completions"]["bleu"]["score"] == pytest.approx(want) and "kl" not in s2["models"]["completions"]
    )
    assert any("kl needs completions sampled from the models; skipped" in w for w in s2["warnings"])
    assert s2["skipped_metrics"] == ["kl"] and s2["metrics"] == ["bleu", "distinct"]
    # corr(reward, tokens) of given completions: their own token counts (the rows' 'tokens'), by hand
    r = m["reward"]["length_correlation"]
    rewards = [json.loads(x)["reward"] for x in (tmp_path / "ev" / "examples.jsonl").read_text().splitlines()]
    assert r["n"] == 2 and r["pearson"] == pytest.approx(1.0 if rewards[0] > rewards[1] else -1.0)  # 5 vs 3 tokens


def test_the_eval_help_pipeline_runs_on_plain_prompts_without_references(tmp_path):
    """`prefcli generate MODEL < prompts.txt | prefcli eval recipes/tiny/eval-completions.yaml --completions -` (the
    example of `eval --help`): generate's rows carry no 'reference', so BLEU and ROUGE are skipped with a warning
    (as kl and win_rate are) and the rest is measured; the reward's length correlation counts the completions'
    tokens (given by generate, or counted by the model's tokenizer when a row has none)."""
    from typer.testing import CliRunner

    from prefcli.cli import app
    from prefcli.recipe import COMMANDS

    assert any(
        "< prompts.txt | prefcli eval recipes/tiny/eval-completions.yaml --completions -" in x
        for x in COMMANDS["eval"].examples
    )
    rows = [
        {"index": 0, "prompt": "And God said", "completion": " Let there be light, and there was light",
         "finish_reason": "eos", "tokens": 9},
        {"index": 1, "prompt": "In the beginning", "completion": " God", "finish_reason": "eos", "tokens": 2},
        {"index": 2, "prompt": "The LORD is", "completion": " my shepherd; I shall not want", "finish_reason": "eos"},
    ]  # fmt: skip
    recipe = ROOT / "recipes" / "tiny" / "eval-completions.yaml"
    res = CliRunner().invoke(
        app, ["eval", str(recipe), "--completions", "-", "-o", str(tmp_path / "ev"), "-q"],
        input="".join(json.dumps(r) + "\n" for r in rows),
    )  # fmt: skip
    assert res.exit_code == 0, res.stderr
    s = json.loads(res.stdout.strip().splitlines()[-1])
    m = s["models"]["completions"]
    assert s["skipped_metrics"] == ["bleu", "rouge"] and "bleu" not in m and "rouge" not in m
    assert s["metrics"] == ["reward", "distinct", "length"]
    assert any("bleu needs a 'reference' in the rows of data.completions (<stdin>)" in w for w in s["warnings"])
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ROOT / "prefcli" / "assets" / "kjv-base")
    tokens = [9, 2, len(tok(rows[2]["completion"], add_special_tokens=False)["input_ids"])]
    assert m["length"]["tokens"]["mean"] == pytest.approx(sum(tokens) / 3)
    ex = [json.loads(x) for x in (tmp_path / "ev" / "examples.jsonl").read_text().splitlines()]
    from prefcli.evaluate.metrics import pearson

    got = m["reward"]["length_correlation"]
    assert got["pearson"] is not None and got["pearson"] == pytest.approx(pearson([x["reward"] for x in ex], tokens))
    rank = lambda v: [sorted(v).index(x) for x in v]  # noqa: E731 (no ties here)
    assert got["spearman"] == pytest.approx(pearson(rank([x["reward"] for x in ex]), rank(tokens)))
    assert yaml.safe_load((tmp_path / "ev" / "recipe.yaml").read_text())["metrics"][:2] == ["bleu", "rouge"]


def test_given_completions_bad_input_is_exit_2(tmp_path, cli):
    recipe = ROOT / "recipes" / "tiny" / "eval-completions.yaml"
    f = write_jsonl(tmp_path / "noref.jsonl", [{"prompt": "a", "completion": "b"}])
    code, stdout, stderr = cli("eval", recipe, "--completions", f, "-o", tmp_path / "ev", "--set", "metrics=[bleu]")
    assert code == 2 and "data.completions" in stderr and "missing column(s) reference" in stderr
    assert "passes one through from a JSONL prompts file" in stderr and not (tmp_path / "ev").exists()
    code, stdout, stderr = cli("eval", recipe, "--completions", tmp_path / "nothing.jsonl", "-o", tmp_path / "ev")
    assert code == 2 and "--completions: no such file" in stderr
