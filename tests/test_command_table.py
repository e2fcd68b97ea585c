"""The command table (prefcli.recipe.COMMANDS), what is derived from it (the schemas, the CLI commands, the
tasks), the bundled recipes and the registries agree."""

import importlib

import yaml

from prefcli.cli import app
from prefcli.recipe import COMMANDS, SCHEMAS, RecipeBase, load_recipe

from .conftest import ROOT


def cli_commands() -> set[str]:
    import typer.main

    return set(typer.main.get_command(app).commands)


def test_every_row_is_a_cli_command_and_a_training_row_has_a_task():
    import typer.main

    assert SCHEMAS == {name: row.schema for name, row in COMMANDS.items()}
    assert set(COMMANDS) <= cli_commands()
    group = typer.main.get_command(app)
    for command, row in COMMANDS.items():
        assert row.help.split(".")[0] in " ".join((group.commands[command].help or "").split()), command
        if row.task is not None:
            assert callable(importlib.import_module(row.task).build), command
            assert issubclass(row.schema, RecipeBase), f"training recipe {command} lacks the shared sections"
        else:
            assert not issubclass(row.schema, RecipeBase), f"{command} trains nothing; it has no train section"


def test_every_command_has_a_tiny_recipe_that_validates():
    for command in SCHEMAS:
        tiny = sorted((ROOT / "recipes" / "tiny").glob(f"{command}*.yaml"))
        assert tiny, f"no recipes/tiny/{command}*.yaml"
        for p in tiny:
            assert load_recipe(p).command == command


def test_bundled_recipes_name_their_command():
    for p in sorted(ROOT.glob("recipes/**/*.yaml")):
        data = yaml.safe_load(p.read_text())
        assert data.get("command") in SCHEMAS, p


def test_each_registry_has_exactly_the_names_the_schema_offers():
    """The names of objectives and algorithms are written once (prefcli/recipe/commands/names.py): every
    name a recipe accepts has an implementation, and every implementation can be chosen in a recipe."""
    from prefcli.algos.contrastive import OBJECTIVES as CONTRASTIVE
    from prefcli.algos.reward_model import OBJECTIVES as REWARD
    from prefcli.algos.rlhf.advantages import ALGORITHMS, algorithm_key
    from prefcli.algos.sft import OBJECTIVES as SFT
    from prefcli.recipe.commands import names
    from prefcli.recipe.commands.rl import RLHFSection

    assert set(SFT) == set(names.SFT_OBJECTIVES)
    assert set(REWARD) == set(names.REWARD_OBJECTIVES)
    assert set(CONTRASTIVE) == set(names.CONTRASTIVE_OBJECTIVES)
    keys = {algorithm_key(RLHFSection(algorithm=a)) for a in names.RL_ALGORITHMS}
    keys |= {algorithm_key(RLHFSection(algorithm="grpo", grpo_loss=g)) for g in names.GRPO_LOSSES}
    assert keys == set(ALGORITHMS)
    from prefcli.engine.chat_templates import TEMPLATES

    assert tuple(TEMPLATES) == names.CHAT_TEMPLATES  # model.chat_template's names, in the order the docs list them


def test_rl_choice_registries_have_exactly_the_names_the_schema_offers():
    """issue 15's choices: policy losses, importance-sampling corrections, online objectives, ensemble
    combiners; and which algorithms have token-level advantages (gspo refuses them)."""
    import typing

    from prefcli.algos.contrastive import OBJECTIVES
    from prefcli.algos.rlhf.advantages import ALGORITHMS
    from prefcli.algos.rlhf.correction import IS_CORRECTIONS
    from prefcli.algos.rlhf.loss import POLICY_LOSSES
    from prefcli.recipe.commands import names
    from prefcli.recipe.reward_specs import EnsembleReward
    from prefcli.reward_sources import COMBINERS

    assert set(POLICY_LOSSES) == set(names.POLICY_LOSSES)
    assert set(IS_CORRECTIONS) | {"none"} == set(names.IS_CORRECTIONS)
    assert set(names.ONLINE_OBJECTIVES) == {k for k, o in OBJECTIVES.items() if o.rows == "pairs"}
    combine = typing.get_args(EnsembleReward.model_fields["combine"].annotation)
    assert set(COMBINERS) == set(names.REWARD_COMBINE) == set(combine)
    token_level = {k for k, a in ALGORITHMS.items() if not a.sequence_advantages}
    assert token_level == set(names.RL_TOKEN_ADVANTAGES)
