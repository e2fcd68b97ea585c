"""The recipe reference is generated from the schemas and must not go stale."""

from pydantic import BaseModel

from prefcli.recipe import SCHEMAS
from prefcli.recipe.docs import _models_in, render

from .conftest import ROOT


def test_recipe_reference_is_up_to_date():
    committed = (ROOT / "docs" / "recipe-reference.md").read_text()
    assert committed == render(), "docs/recipe-reference.md is stale: run `make docs`"


def test_every_field_has_a_description():
    models: list[type[BaseModel]] = []
    for schema in SCHEMAS.values():
        _models_in(schema, models)
    missing = [f"{m.__name__}.{n}" for m in models for n, f in m.model_fields.items() if not f.description]
    assert not missing, missing


def test_every_command_has_a_doc_page():
    for command in SCHEMAS:
        assert (ROOT / "docs" / "commands" / f"{command}.md").exists(), command


def test_every_documented_torchrun_form_is_a_tested_one():
    """`torchrun ... prefcli` hands torchrun a script path (no such file outside a checkout). The docs use the
    two forms the distributed tests run: `-m prefcli` (tests/test_fsdp.py, tests/test_contrastive.py) and the
    installed script through `--no-python prefcli` (tests/test_fsdp.py, node 1 of the two-node run)."""
    import re

    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    found = 0
    for page in pages:
        for line in page.read_text().replace("\\\n", " ").splitlines():  # shell continuation lines joined
            if not re.search(r"(^|[\s`/])torchrun\s", line) or "prefcli" not in line:
                continue
            found += 1
            launched = re.search(r"(-m prefcli|--no-python prefcli|\.\.\. prefcli)", line)
            assert launched, f"{page.name}: {line.strip()}"
            if launched.group(1) == "... prefcli":  # prose naming the form that does not work, as such
                assert "script path" in line or "script path" in page.read_text(), f"{page.name}: {line.strip()}"
    assert found >= 6
