"""`base:` composition: deep merge in order, own keys last, paths relative to the file that wrote them, errors
that name the file and line a value came from, cycles refused; `prefcli validate --resolved`."""

from __future__ import annotations

import json

import yaml

from prefcli.recipe import dump_recipe, load_recipe

from .conftest import DATA, ROOT, TINY_INIT


def write(path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def base_text(train_path: str = "../data/text.jsonl") -> str:
    init = json.dumps(TINY_INIT)
    return f"""command: sft
model:
  init: {init}
  tokenizer: {DATA / "tokenizer"}
data:
  train: {{path: {train_path}, max_rows: 8}}
  max_length: 48
train:
  max_steps: 4
  lr: 1.0e-3
  batch_size: 4
"""


def test_bases_merge_in_order_and_own_keys_win(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "text.jsonl").write_text('{"text": "a b c"}\n')
    write(tmp_path / "shared" / "base.yaml", base_text())
    write(tmp_path / "shared" / "fast.yaml", "train: {lr: 3.0e-3, warmup_steps: 1}\n")
    r = write(
        tmp_path / "exp" / "run.yaml",
        "base: [../shared/base.yaml, ../shared/fast.yaml]\ntrain: {max_steps: 2}\ndata: {max_length: 32}\n",
    )
    rec = load_recipe(r).recipe
    assert rec.train.max_steps == 2 and rec.train.lr == 3.0e-3 and rec.train.warmup_steps == 1  # merged, in order
    assert rec.train.batch_size == 4 and rec.data.max_length == 32
    # the base's relative data path is relative to the base's folder (shared/../data), not to exp/
    assert rec.data.train.path == str((tmp_path / "data" / "text.jsonl").resolve())


def test_an_error_names_the_base_file_and_line(tmp_path):
    write(tmp_path / "base.yaml", base_text("text.jsonl").replace("lr: 1.0e-3", "lr: fast"))
    (tmp_path / "text.jsonl").write_text('{"text": "a"}\n')
    r = write(tmp_path / "run.yaml", "base: base.yaml\ntrain: {bach_size: 2}\n")
    try:
        load_recipe(r)
        raise AssertionError("expected an error")
    except Exception as e:
        text = str(e)
    lines = base_text("text.jsonl").splitlines()
    lr_line = next(i for i, x in enumerate(lines, 1) if "lr:" in x)
    assert f"{tmp_path / 'base.yaml'}:{lr_line}: train.lr:" in text  # the value came from the base
    assert f"{r}:2: train.bach_size: unknown field (did you mean 'batch_size'?)" in text  # this one from the recipe


def test_missing_and_cyclic_bases_are_exit_2_naming_the_line(tmp_path, cli):
    r = write(tmp_path / "run.yaml", "command: sft\nbase: [nowhere.yaml]\n")
    code, stdout, stderr = cli("validate", r)
    assert code == 2 and f"{r}:2: base: no such file: {tmp_path / 'nowhere.yaml'}" in stderr
    write(tmp_path / "a.yaml", "command: sft\nbase: b.yaml\n")
    write(tmp_path / "b.yaml", "base: c.yaml\n")
    write(tmp_path / "c.yaml", "base: a.yaml\n")
    code, stdout, stderr = cli("validate", tmp_path / "a.yaml")
    assert code == 2 and "base: a cycle:" in stderr
    assert f"{tmp_path / 'a.yaml'} -> {tmp_path / 'b.yaml'} -> {tmp_path / 'c.yaml'} -> {tmp_path / 'a.yaml'}" in stderr
    code, stdout, stderr = cli("validate", write(tmp_path / "bad.yaml", "command: sft\nbase: {x: 1}\n"))
    assert code == 2 and "bad.yaml:2: base: expected a recipe file name or a list of them" in stderr


def test_validate_resolved_prints_the_merged_recipe(tmp_path, cli):
    code, stdout, stderr = cli("validate", "--resolved", ROOT / "recipes" / "tiny" / "contrastive-ipo.yaml")
    assert code == 0, stderr
    docs = [d for d in yaml.safe_load_all(stdout)]
    assert len(docs) == 1 and docs[0]["contrastive"]["objective"] == "ipo" and "base" not in docs[0]
    assert docs[0]["train"]["max_steps"] == 30 and docs[0]["data"]["train"]["path"] == str(
        DATA / "tiny" / "pref_train.jsonl"
    )  # from the base, absolute
    assert docs[0] == yaml.safe_load(
        dump_recipe(load_recipe(ROOT / "recipes" / "tiny" / "contrastive-ipo.yaml").recipe)
    )


def test_the_tiny_contrastive_recipes_share_a_base():
    recipes = sorted((ROOT / "recipes" / "tiny").glob("contrastive-*.yaml"))
    assert len(recipes) == 11
    for p in recipes:
        assert yaml.safe_load(p.read_text())["base"] == "_contrastive.yaml", p
        assert load_recipe(p).recipe.train.max_steps == 30


def test_validate_checks_fragments_named_with_a_leading_underscore(tmp_path, cli):
    """`prefcli validate recipes/*.yaml` with a `base:` fragment among the recipes: the fragment (no command of its
    own, no data) is checked for what it sets, the recipe built on it as a whole; a fragment that is a whole recipe
    too (recipes/tiny/_contrastive.yaml) says so. The CI example smokes only what is not a fragment."""
    model = {"model": {"init": TINY_INIT, "tokenizer": str(DATA / "tokenizer")}, "train": {"lr": 1e-3}}
    write(tmp_path / "_model.yaml", yaml.safe_dump(model))
    write(
        tmp_path / "sft.yaml",
        f"base: _model.yaml\ncommand: sft\ndata:\n  train: {{path: {DATA / 'tiny' / 'text.jsonl'}}}\n",
    )
    write(tmp_path / "_data.yaml", f"data:\n  train: {{path: {DATA / 'tiny' / 'text.jsonl'}, max_rows: 8}}\n")
    code, stdout, stderr = cli(
        "validate", tmp_path / "_data.yaml", tmp_path / "_model.yaml", tmp_path / "sft.yaml",
        ROOT / "recipes" / "tiny" / "_contrastive.yaml",
    )  # fmt: skip
    assert code == 0, stderr
    got = {r["recipe"].rsplit("/", 1)[-1]: r for r in json.loads(stdout)["recipes"]}
    assert got["_model.yaml"] == {
        "recipe": str(tmp_path / "_model.yaml"), "valid": True, "fragment": True, "command": None,
        "fits": ["sft", "reward", "rlhf", "gan", "contrastive"],
    }  # fmt: skip
    assert got["_data.yaml"]["fits"] == ["sft", "reward", "rlhf", "gan", "contrastive"]  # a source: any trainer
    assert got["sft.yaml"] == {"recipe": str(tmp_path / "sft.yaml"), "valid": True, "command": "sft"}
    assert got["_contrastive.yaml"]["command"] == "contrastive" and got["_contrastive.yaml"]["fragment"] is True
    assert "_model.yaml (fragment: fits sft, reward, rlhf, gan, contrastive)" in stderr
    # what a fragment sets is checked, and --set with it; eval (no model section) is not among its fits
    write(tmp_path / "_typo.yaml", "model:\n  pth: x\n")
    code, stdout, stderr = cli("validate", tmp_path / "_typo.yaml")
    assert code == 2 and "_typo.yaml:2: model.pth: unknown field (did you mean 'path'?)" in stderr
    code, stdout, stderr = cli("validate", tmp_path / "_model.yaml", "--set", "train.batch_size=0")
    assert code == 2 and "train.batch_size" in stderr
    code, stdout, stderr = cli("validate", tmp_path / "_model.yaml", "--command", "eval")
    assert code == 2 and "model: unknown field" in stderr
