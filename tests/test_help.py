"""What a newcomer reads first: every command's --help shows real examples, nothing is lost to markup, flags show
no value placeholder, and no help promises what the command does not do."""

from __future__ import annotations

import re

import pytest

from prefcli.cli import app

COMMANDS = ["sft", "reward", "rlhf", "gan", "contrastive", "eval", "generate", "plot", "validate", "explain"]
LABEL = ["label terminal", "label serve", "label invite", "label stats", "label export", "label import"]
SUBCOMMANDS = ["data inspect", "label", *LABEL]


def help_text(cli, *args) -> str:
    code, stdout, stderr = cli(*args, "--help")
    assert code == 0, stderr
    return " ".join(stdout.split())  # the width wraps lines; compare words


@pytest.mark.parametrize("command", COMMANDS + SUBCOMMANDS)
def test_every_command_help_shows_examples_and_no_bool_placeholder(cli, command):
    text = help_text(cli, *command.split())
    assert "Examples:" in text and f"prefcli {command}" in text.split("Examples:")[1]
    assert "<bool>" not in text and "[default: False]" not in text


def epilogs() -> dict[str, str]:
    """Every command's and subcommand's examples, as the CLI shows them."""
    import typer.main

    def walk(group, prefix):
        for name, c in group.commands.items():
            yield f"{prefix}{name}", c.epilog or ""
            if hasattr(c, "commands"):
                yield from walk(c, f"{prefix}{name} ")

    return dict(walk(typer.main.get_command(app), ""))


def test_every_example_names_files_that_exist():
    from .conftest import ROOT

    registered = {c.name or c.callback.__name__ for c in app.registered_commands}
    assert registered == set(COMMANDS)
    shown = epilogs()
    assert set(shown) == set(COMMANDS + SUBCOMMANDS + ["data"])
    for command, text in shown.items():
        for path in re.findall(r"(?:recipes|prefcli/assets|data)/[\w./-]+", text):
            assert (ROOT / path).exists(), (command, path)


def test_help_texts_keep_brackets_and_say_true_things(cli):
    assert "{prompt, completions: [a, b]}" in help_text(cli, "label")
    assert "{prompt, completions: [a, b]}" in help_text(cli, "label", "terminal")
    assert "pip install 'prefcli[label]'" in help_text(cli, "label", "serve")
    gen = help_text(cli, "generate")
    assert "JSON summary" not in gen and "stdout (the completions) is unchanged" in gen
    root = help_text(cli)
    assert "docs/index.md in the prefcli source repository" in root
    assert "--completions FILE|-" in help_text(cli, "eval") and "--resolved" in help_text(cli, "validate")
