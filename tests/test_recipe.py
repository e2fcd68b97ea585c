"""Recipe schemas and error messages: file, line, dotted field, what was expected, did-you-mean."""

from pathlib import Path

import pytest
import yaml

from prefcli.errors import RecipeError, UsageError
from prefcli.recipe import dump_recipe, load_recipe

from .conftest import TOKENIZER, sft_recipe_dict


def problems(path, **kw) -> list[str]:
    with pytest.raises(RecipeError) as e:
        load_recipe(path, **kw)
    return e.value.problems


def test_valid_recipe_resolves_relative_paths(tmp_path, write_recipe):
    d = sft_recipe_dict()
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "rows.jsonl").write_text('{"text": "a"}\n')
    d["data"]["train"]["path"] = "sub/rows.jsonl"
    d["output"]["dir"] = "out/run1"
    loaded = load_recipe(write_recipe(d))
    assert loaded.recipe.data.train.path == str((tmp_path / "sub" / "rows.jsonl").resolve())
    assert loaded.recipe.output.dir == str((tmp_path / "out" / "run1").resolve())
    assert loaded.recipe.train.lr == 1e-3


def test_unknown_field_names_line_and_suggests(tmp_path):
    p = tmp_path / "r.yaml"
    text = yaml.safe_dump(sft_recipe_dict(), sort_keys=False).replace("  lr: 0.001", "  learning_rate: 0.001")
    text = text.replace("  max_length: 48", "  max_lenght: 48")
    p.write_text(text)
    probs = problems(p)
    lines = text.splitlines()
    lr_line = next(i for i, x in enumerate(lines, 1) if "learning_rate" in x)
    ml_line = next(i for i, x in enumerate(lines, 1) if "max_lenght" in x)
    assert f"{p}:{lr_line}: train.learning_rate: unknown field (did you mean 'lr'?)" in probs
    assert f"{p}:{ml_line}: data.max_lenght: unknown field (did you mean 'max_length'?)" in probs


def test_wrong_type_and_literal_typo(write_recipe):
    d = sft_recipe_dict()
    d["data"]["max_length"] = "long"
    d["train"]["lr_schedule"] = "cosin"
    probs = problems(write_recipe(d))
    assert any("data.max_length: Input should be a valid integer" in x and "'long'" in x for x in probs)
    assert any("train.lr_schedule:" in x and "did you mean 'cosine'?" in x for x in probs)


def test_missing_required_and_exclusive_model_fields(write_recipe):
    d = sft_recipe_dict()
    del d["data"]["train"]
    d["model"]["path"] = str(TOKENIZER)  # both path and init
    probs = problems(write_recipe(d))
    assert any(x.endswith("data.train: required field is missing") for x in probs)
    assert any("model: set exactly one of model.path" in x for x in probs)


def test_missing_file_is_reported_with_absolute_path(write_recipe, tmp_path):
    d = sft_recipe_dict()
    d["data"]["train"]["path"] = "nope/rows.jsonl"
    probs = problems(write_recipe(d))
    assert any(f"data.train.path: no such file or folder: {tmp_path}/nope/rows.jsonl" in x for x in probs)


def test_yaml_syntax_error_has_line_and_column(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("command: sft\nmodel:\n  path: [unclosed\ntrain: {}\n")
    probs = problems(p)
    assert len(probs) == 1 and probs[0].startswith(f"{p}:") and "YAML syntax error" in probs[0]


def test_duplicate_key_is_an_error(tmp_path):
    p = tmp_path / "dup.yaml"
    p.write_text("command: sft\ntrain:\n  lr: 1\n  lr: 2\n")
    assert problems(p) == [f"{p}:4: train.lr: key given twice"]


def test_empty_and_non_mapping_files(tmp_path):
    p = tmp_path / "e.yaml"
    p.write_text("")
    assert "the file is empty" in problems(p)[0]
    p.write_text("- a\n- b\n")
    assert "a recipe is a mapping" in problems(p)[0]
    with pytest.raises(UsageError, match="recipe not found"):
        load_recipe(tmp_path / "missing.yaml")


def test_command_mismatch_and_unknown_command(write_recipe):
    p = write_recipe(sft_recipe_dict())
    with pytest.raises(RecipeError, match="this recipe is for `prefcli sft`, not `prefcli reward`"):
        load_recipe(p, command="reward")
    d = sft_recipe_dict(command="stf")
    with pytest.raises(RecipeError, match="did you mean 'sft'"):
        load_recipe(write_recipe(d))


def test_set_overrides_are_validated_and_named(write_recipe):
    p = write_recipe(sft_recipe_dict())
    loaded = load_recipe(p, overrides=["train.lr=2e-4", "train.max_steps=7", "model.lora.r=4"])
    assert loaded.recipe.train.lr == 2e-4 and loaded.recipe.train.max_steps == 7
    assert loaded.recipe.model.lora.r == 4
    probs = problems(p, overrides=["train.batch_size=many"])
    assert probs[0].startswith("(--set train.batch_size=many): train.batch_size:")
    probs = problems(p, overrides=["train.max_step=3"])
    assert probs[0] == "(--set train.max_step=3): train.max_step: unknown field (did you mean 'max_steps'?)"
    with pytest.raises(UsageError, match="expects key.path=value"):
        load_recipe(p, overrides=["train.lr"])


def test_set_paths_resolve_against_the_current_directory(tmp_path, write_recipe, monkeypatch):
    """In the recipe file a relative path is relative to the file; typed with --set it means what
    the shell means: relative to where the command runs."""
    d = sft_recipe_dict()
    d["data"]["train"]["path"] = "in-recipe-dir.jsonl"
    (tmp_path / "in-recipe-dir.jsonl").write_text('{"text": "a"}\n')
    p = write_recipe(d)
    here = tmp_path / "elsewhere"
    (here / "data").mkdir(parents=True)
    (here / "data" / "rows.jsonl").write_text('{"text": "b"}\n')
    monkeypatch.chdir(here)
    plain = load_recipe(p)
    assert plain.recipe.data.train.path == str((tmp_path / "in-recipe-dir.jsonl").resolve())
    loaded = load_recipe(
        p, overrides=["data.train.path=data/rows.jsonl", "output.dir=runs/x", "model.tokenizer=" + str(TOKENIZER)]
    )
    assert loaded.recipe.data.train.path == str((here / "data" / "rows.jsonl").resolve())
    assert loaded.recipe.output.dir == str((here / "runs" / "x").resolve())
    # a hub id is not a path here and stays a hub id; a path that exists nowhere is named
    assert load_recipe(p, overrides=["model.tokenizer=Qwen/Qwen2.5-0.5B"]).recipe.model.tokenizer == "Qwen/Qwen2.5-0.5B"
    probs = problems(p, overrides=["data.train.path=data/missing.jsonl"])
    assert str(here / "data" / "missing.jsonl") in probs[0]
    # inside a list of mappings (rlhf's rewards), and a function in a file
    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)
    rl = load_recipe(
        repo / "recipes" / "tiny" / "rlhf-grpo.yaml",
        overrides=[
            "rewards=[{kind: model, path: prefcli/assets/kjv-base}, {kind: function, function: recipes/tiny/rules.py:real_word_fraction}]"
        ],
    )
    assert rl.recipe.rewards[0].path == str(repo / "prefcli" / "assets" / "kjv-base")
    assert rl.recipe.rewards[1].function == f"{repo / 'recipes' / 'tiny' / 'rules.py'}:real_word_fraction"


def test_resolved_recipe_round_trips(write_recipe, tmp_path):
    loaded = load_recipe(write_recipe(sft_recipe_dict()), overrides=["train.lr=5e-4"])
    out = tmp_path / "elsewhere" / "recipe.yaml"
    out.parent.mkdir()
    out.write_text(dump_recipe(loaded.recipe))
    again = load_recipe(out)
    assert again.recipe == loaded.recipe


def test_bundled_recipes_validate():
    recipes = sorted(Path(__file__).resolve().parents[1].glob("recipes/**/*.yaml"))
    assert recipes
    for p in recipes:
        load_recipe(p)
