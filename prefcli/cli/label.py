"""`prefcli label`: human preferences, from one rater in a terminal (`prefcli label FILE -o OUT`, the
`terminal` subcommand) or from a team in a browser (`serve`, with `invite`, `stats`, `export`, `import`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperGroup

from .. import SEED_MAX
from ..errors import EXIT_INTERRUPTED, EXIT_USAGE, PrefcliError
from ..recipe.commands import COMMANDS
from .base import SetOpt, app, emit_json, examples, fail


class LabelGroup(TyperGroup):
    """`prefcli label ARGS` without a subcommand name runs the terminal tool, as it did before `serve` existed:
    `prefcli label pairs.jsonl -o out.jsonl` is `prefcli label terminal pairs.jsonl -o out.jsonl`."""

    def parse_args(self, ctx, args):
        if not args or (args[0] not in self.commands and args[0] not in ctx.help_option_names):
            args = ["terminal", *args]
        return super().parse_args(ctx, args)


label_app = typer.Typer(
    cls=LabelGroup,
    help=COMMANDS["label"].help,
    epilog=examples(*COMMANDS["label"].examples),
    no_args_is_help=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(label_app, name="label")

TaskArg = Annotated[Path, typer.Argument(help="The task file (a recipe with command: label).", show_default=False)]


def _run(command: str, fn, *args) -> None:
    try:
        summary = fn(*args)
    except PrefcliError as e:
        fail(command, e, e.exit_code, {EXIT_USAGE: "invalid"}.get(e.exit_code, "failed"))
    except KeyboardInterrupt:
        fail(command, RuntimeError("interrupted"), EXIT_INTERRUPTED, "interrupted")
    emit_json(summary)


@label_app.command(
    "serve",
    epilog=examples(
        "prefcli label serve recipes/tiny/label-task.yaml",
        "prefcli label serve recipes/tiny/label-task.yaml --host 0.0.0.0 --port 8080   # behind a TLS proxy",
    ),
)
def serve(
    task: TaskArg,
    set_: SetOpt = None,
    host: Annotated[str | None, typer.Option(help="Interface to listen on (default: the task's server.host).")] = None,
    port: Annotated[int | None, typer.Option(help="TCP port (default: the task's server.port; 0 = any free).")] = None,
) -> None:
    """Serve a labelling task to a team in the browser until Ctrl-C: rater pages, the owner's dashboard.

    Needs `pip install 'prefcli[label]'`. Prints the dashboard's owner link the first time."""
    from ..label.serve import ServeOptions
    from ..label.serve import serve as run

    _run("label serve", run, task, ServeOptions(overrides=list(set_ or []), host=host, port=port))


@label_app.command(
    "invite",
    epilog=examples(
        "prefcli label invite recipes/tiny/label-task.yaml --rater ann",
        "prefcli label invite recipes/tiny/label-task.yaml --owner 2>/dev/null | jq -r .link",
    ),
)
def invite(
    task: TaskArg,
    rater: Annotated[str | None, typer.Option(help="The rater's name: prints their personal link.")] = None,
    owner: Annotated[bool, typer.Option("--owner", help="Print a new owner link (the dashboard).")] = False,
    url: Annotated[
        str | None, typer.Option(help="Base URL in the link (default: the task's server.public_url or host:port).")
    ] = None,
    set_: SetOpt = None,
) -> None:
    """A rater's personal link (a new random token; an older link of theirs stops working), on stderr and in
    the JSON summary."""
    from ..label.serve import invite as run

    _run("label invite", run, task, list(set_ or []), rater, owner, url)


@label_app.command(
    "stats",
    epilog=examples(
        "prefcli label stats recipes/tiny/label-task.yaml | jq .agreement",
    ),
)
def stats(task: TaskArg, set_: SetOpt = None) -> None:
    """The dashboard's figures as one JSON line: progress, agreement (Cohen's and Fleiss' kappa, Krippendorff's
    alpha), gold accuracy, position bias, time per item, flagged raters."""
    from ..label.serve import stats as run

    _run("label stats", run, task, list(set_ or []))


@label_app.command(
    "export",
    epilog=examples(
        "prefcli label export recipes/tiny/label-task.yaml -o prefs.jsonl",
        "prefcli label export recipes/tiny/label-task.yaml --all -o every-answer.jsonl",
    ),
)
def export(
    task: TaskArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="The JSONL file to write (replaced).")],
    all_: Annotated[
        bool,
        typer.Option("--all", help="Every answer (ties, skips, gold) with its raw fields, not the training shape."),
    ] = False,
    gold: Annotated[bool, typer.Option("--gold", help="Include the answers to gold items.")] = False,
    set_: SetOpt = None,
) -> None:
    """The answers as JSONL that `prefcli reward`, `contrastive` and the human_scores reward read, one row per
    answer with its rater, shown position, time spent and timestamps."""
    from ..label.serve import export as run

    _run("label export", run, task, list(set_ or []), out, all_, gold)


@label_app.command(
    "import",
    epilog=examples(
        "prefcli label import recipes/tiny/label-task.yaml answers.jsonl     # from `prefcli label FILE -o answers.jsonl`",
    ),
)
def import_(
    task: TaskArg,
    answers: Annotated[Path, typer.Argument(help="The terminal tool's answers file (its --out).", show_default=False)],
    log: Annotated[Path | None, typer.Option(help="Its journal (default: <answers>.log.jsonl when present).")] = None,
    rater: Annotated[str | None, typer.Option(help="Who answered, when the files do not say.")] = None,
    set_: SetOpt = None,
) -> None:
    """Add the answers of a terminal session (`prefcli label FILE -o OUT`) to a task, for the items it has.
    Not while the task is being served."""
    from ..label.serve import import_ as run

    _run("label import", run, task, list(set_ or []), answers, log, rater)


@label_app.command(
    "terminal",
    epilog=examples(
        "prefcli label terminal pairs.jsonl -o answers.jsonl        # the same as: prefcli label pairs.jsonl ...",
        "prefcli label --model prefcli/assets/kjv-base --prompts data/tiny/prompts.jsonl -o answers.jsonl",
    ),
)
def terminal(
    input: Annotated[
        Path | None,
        typer.Argument(
            help=(
                "JSONL of prompts with candidates: {prompt, completions: [a, b]} for pairs, {prompt, completion} to rate."
            ),
            show_default=False,
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help=(
                "Answers file (JSONL; appended, resumable): pairs as {prompt, chosen, rejected}, ratings as "
                "{prompt, completion, score}."
            ),
        ),
    ] = None,
    model_dir: Annotated[Path | None, typer.Option("--model", help="Sample the candidates from this model.")] = None,
    prompts: Annotated[Path | None, typer.Option("--prompts", "-p", help="Prompts for --model.")] = None,
    mode: Annotated[
        str | None,
        typer.Option(
            help="'pair' (choose A/B/tie) or 'rate' (a score); default: from the input rows (pair with --model)."
        ),
    ] = None,
    scale: Annotated[int, typer.Option(help="Ratings go from 1 to this.")] = 5,
    shuffle: Annotated[
        bool,
        typer.Option(
            "--shuffle/--no-shuffle",
            help=("Show each pair's completions in a random (seeded, stable) order, against position bias."),
        ),
    ] = True,
    log: Annotated[Path | None, typer.Option("--log", help="Journal file (default: <out>.log.jsonl).")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="With --model: new tokens per candidate.")] = None,
    temperature: Annotated[float | None, typer.Option(help="With --model: sampling temperature.")] = None,
    seed: Annotated[
        int, typer.Option(min=0, max=SEED_MAX, help="Seed for the A/B order and for sampling candidates.")
    ] = 0,
    rater: Annotated[
        str | None,
        typer.Option(help="Your rater id, recorded in every row (default: $PREFCLI_RATER, else your login name)."),
    ] = None,
) -> None:
    """One rater in the terminal (the default: `prefcli label FILE -o OUT`): pick A or B (or tie / skip), or rate.

    Keys: a, b, t (tie), s (skip) or 1-N; u undoes, q quits. Resumable: Ctrl-C loses no answer."""
    from ..label.terminal import LabelOptions, run_label

    opts = LabelOptions(
        input=str(input) if input else None,
        model_dir=str(model_dir) if model_dir else None,
        prompts=str(prompts) if prompts else None,
        out=str(out) if out else "",
        log=str(log) if log else None,
        mode=mode,
        scale=scale,
        shuffle=shuffle,
        seed=seed,
        settings=dict(max_new_tokens=max_new_tokens, temperature=temperature),
        rater=rater,
    )
    try:
        summary = run_label(opts)
    except PrefcliError as e:
        fail("label", e, e.exit_code, {EXIT_USAGE: "invalid"}.get(e.exit_code, "failed"))
    except KeyboardInterrupt:
        fail("label", RuntimeError("interrupted; every answer given is saved"), EXIT_INTERRUPTED, "interrupted")
    emit_json(summary)
    if summary["exit_code"]:
        raise typer.Exit(summary["exit_code"])
