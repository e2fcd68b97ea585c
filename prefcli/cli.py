"""The `prefcli` command line. Each command: load recipe -> build run -> engine.

stdout carries exactly one JSON object (the run summary) as its last line; progress, tables and
logs go to stderr. (`generate` is the exception: its stdout is the data, one JSON object per prompt.) Exit codes: 0 done; 2 bad recipe, data or usage; 1 failure during training;
130 interrupted after writing a checkpoint. torch and transformers are imported only inside the
commands that need them, so `prefcli --help` and `prefcli validate` answer at once.

Failures that never reach a command's own handler (usage errors found by click before the command
runs, and unexpected exceptions) go through `PrefcliGroup.main`, which prints the same failure object,
so `prefcli ... | jq .status` prints something on every path (docs/cli.md, "Output streams").
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperGroup

from . import __version__
from .errors import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_USAGE, PrefcliError, UsageError

_STATUS = {EXIT_USAGE: "invalid", EXIT_INTERRUPTED: "interrupted"}  # any other non-zero code: "failed"
_stdout_json = {"written": False}  # whether this invocation has printed its JSON object yet
_DATA_ON_STDOUT = {"generate"}  # commands whose stdout is data: no failure object is added to it


def emit_json(obj: dict) -> None:
    """The one JSON object of an invocation, as the last line of stdout."""
    print(json.dumps(obj, default=str), flush=True)
    _stdout_json["written"] = True


class PrefcliGroup(TyperGroup):
    """The command group, run in non-standalone mode so that every way out of the CLI keeps the stdout
    contract: click's usage errors (unknown option or command, missing or extra argument, an option without
    its value), an interrupt outside a command's handler, and unexpected exceptions all print the failure
    object `{"command", "status", "exit_code", "error"}` on stdout (not for `generate`, whose stdout is data),
    the message on stderr without a traceback (PREFCLI_DEBUG=1 shows it), and exit with the documented code."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        args = list(sys.argv[1:] if args is None else args)
        command = next((a for a in args if not a.startswith("-")), None)
        command = command if command in self.commands else None
        _stdout_json["written"] = False
        try:
            if not args:  # `prefcli` alone: the help, on stderr (stdout keeps only the failure object)
                with contextlib.redirect_stdout(sys.stderr):
                    rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            else:
                rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            code = rv if isinstance(rv, int) else 0
            if code and not _stdout_json["written"]:  # e.g. an interrupt while the command was starting
                self._failure(command, code, "interrupted" if code == EXIT_INTERRUPTED else f"exit code {code}")
        except Exception as e:
            if _is_click_error(e):  # usage errors, found before any command body ran
                if not args:
                    with contextlib.redirect_stdout(sys.stderr):
                        e.show()
                    text = "no command given; the commands are listed on stderr (prefcli -h)"
                else:
                    e.show()
                    text = e.format_message().strip()
                code = e.exit_code
                self._failure(command, code, text.splitlines()[0] if text else "")
            elif type(e).__name__ == "Abort":  # click's Ctrl-C / end of input inside a prompt
                code = EXIT_INTERRUPTED
                self._failure(command, code, "aborted")
            else:  # a bug: say so plainly, exit 1
                if os.environ.get("PREFCLI_DEBUG"):
                    import traceback

                    traceback.print_exc()
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                msg = f"unexpected {type(e).__name__}: {first}"
                typer.echo(f"error: {msg} (a bug in prefcli: please report it; PREFCLI_DEBUG=1 shows where)", err=True)
                code = EXIT_FAILURE
                self._failure(command, code, msg)
        if standalone_mode:
            sys.exit(code)
        return code

    @staticmethod
    def _failure(command: str | None, code: int, error: str) -> None:
        if command in _DATA_ON_STDOUT or _stdout_json["written"]:
            return
        emit_json({"command": command, "status": _STATUS.get(code, "failed"), "exit_code": code, "error": error})


def _is_click_error(e: BaseException) -> bool:
    """click's ClickException (usage errors and the like), whichever click typer runs on (typer 0.2x vendors its
    own copy, older releases use the click package): it shows itself and carries its exit code."""
    return (
        callable(getattr(e, "show", None))
        and callable(getattr(e, "format_message", None))
        and isinstance(getattr(e, "exit_code", None), int)
    )


app = typer.Typer(
    cls=PrefcliGroup,
    name="prefcli",
    help="Train language models on human preferences. Each command reads a YAML recipe; "
    "`prefcli validate` checks recipes without running them. `prefcli COMMAND --help` shows a command's options "
    "and examples; the full manual is docs/index.md in the prefcli source repository.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # plain help: rich markup would eat '[a, b]' in help texts and show a '<bool>' value after every flag
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _examples(*lines: str) -> str:
    """A help epilog of example command lines, kept as written (click rewraps paragraphs unless marked \\b)."""
    return "Examples:\n\n\b\n" + "\n".join(f"  {x}" for x in lines)


EXAMPLES = {
    "sft": _examples(
        "prefcli sft recipes/tiny/sft.yaml --set train.lr=1e-3 -o runs/lr1e-3",
        "prefcli sft recipes/gpu/sft-qwen2.5-0.5b.yaml --smoke      # prove a recipe on a laptop",
        "prefcli sft recipes/tiny/sft.yaml -q | jq -e '.status == \"completed\"'",
    ),
    "reward": _examples(
        "prefcli reward recipes/tiny/reward.yaml",
        "prefcli reward recipes/quickstart/reward.yaml --set train.max_steps=100 -o runs/rm",
    ),
    "rlhf": _examples(
        "prefcli rlhf recipes/quickstart/rlhf.yaml",
        "prefcli rlhf recipes/tiny/rlhf-grpo.yaml --set 'rewards=[{kind: model, path: runs/rm/final}]'",
        "prefcli rlhf recipes/tiny/rlhf-grpo.yaml --resume          # after Ctrl-C",
    ),
    "gan": _examples(
        "prefcli gan recipes/tiny/gan.yaml",
        "prefcli gan recipes/gpu/gan-qwen2.5-0.5b.yaml --smoke",
    ),
    "contrastive": _examples(
        "prefcli contrastive recipes/tiny/contrastive-dpo.yaml",
        "prefcli contrastive recipes/tiny/contrastive-dpo.yaml --set contrastive.objective=ipo -o runs/ipo",
    ),
    "eval": _examples(
        "prefcli eval recipes/tiny/eval.yaml                       # after prefcli sft recipes/tiny/sft.yaml",
        "prefcli generate prefcli/assets/kjv-base < prompts.txt | prefcli eval recipes/tiny/eval-completions.yaml "
        "--completions -",
    ),
    "generate": _examples(
        "printf 'And the LORD said\\n' | prefcli generate prefcli/assets/kjv-base --ban wrath",
        "prefcli generate runs/sft-sft/final --prompts prompts.jsonl --greedy > completions.jsonl",
    ),
    "label": _examples(
        "prefcli label pairs.jsonl -o answers.jsonl",
        "prefcli label --model prefcli/assets/kjv-base --prompts data/tiny/prompts.jsonl -o answers.jsonl",
    ),
    "plot": _examples(
        "prefcli plot runs/sft-sft",
        "prefcli plot runs/lr1e-3 runs/lr3e-3 --metric loss --metric eval -o lr.png",
    ),
    "explain": _examples(
        'prefcli explain runs/quickstart/reward/final --prompt "And the people" --text " rejoiced with gladness"',
        "prefcli explain runs/quickstart/reward/final --pairs data/quickstart/preferences_eval.jsonl --html e.html",
        'prefcli explain MODEL --text "..." -q | head -n -1 | jq -c "select(.score > 0.5)"   # the per-token rows',
    ),
    "data inspect": _examples(
        "prefcli data inspect data/quickstart/preferences.jsonl --eval data/quickstart/preferences_eval.jsonl",
        "prefcli data inspect recipes/quickstart/reward.yaml --plots inspect/    # the data as the recipe reads it",
    ),
    "validate": _examples(
        "prefcli validate recipes/*/*.yaml",
        "prefcli validate --resolved recipes/tiny/contrastive-ipo.yaml     # the recipe with its base merged",
    ),
}

RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-s",
        metavar="KEY=VALUE",
        help="Override a recipe field, e.g. --set train.lr=1e-4 (repeatable; validated like the file).",
    ),
]
OutOpt = Annotated[
    Path | None,
    typer.Option(
        "--output-dir", "-o", help="Run folder (default: the recipe's output.dir, else runs/<command>-<recipe>)."
    ),
]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue from the newest checkpoint in the run folder.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace a previous run in the run folder.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress output; errors and the JSON summary only.")]
SmokeOpt = Annotated[
    bool,
    typer.Option(
        "--smoke",
        help="A few steps on a few rows with a tiny random model of the same architecture and the real "
        "tokenizer (CPU when there is no GPU): proves a recipe, its data and its pipeline fit together.",
    ),
]


def _fail(command: str, err: BaseException, code: int, status: str) -> None:
    typer.echo(f"error: {err}", err=True)
    out = {"command": command, "status": status, "exit_code": code, "error": str(err)}
    if getattr(err, "checkpoint", None):
        out["checkpoint"] = err.checkpoint  # the last good checkpoint (failures and interrupts during training)
    emit_json(out)
    raise typer.Exit(code)


def _train(
    command: str,
    recipe: Path,
    set_: list[str] | None,
    output_dir: Path | None,
    resume: bool,
    overwrite: bool,
    quiet: bool,
    smoke: bool,
) -> None:
    from .runner import RunOptions, run_training

    opts = RunOptions(
        overrides=list(set_ or []),
        output_dir=str(output_dir) if output_dir else None,
        resume=resume,
        overwrite=overwrite,
        quiet=quiet,
        smoke=smoke,
    )
    try:
        summary = run_training(command, recipe, opts)
    except PrefcliError as e:
        _fail(command, e, e.exit_code, _STATUS.get(e.exit_code, "failed"))
    except KeyboardInterrupt:
        _fail(
            command,
            RuntimeError("interrupted before training started; nothing was written"),
            EXIT_INTERRUPTED,
            "interrupted",
        )
    if int(os.environ.get("RANK", "0")) == 0:
        emit_json(summary)


@app.command(epilog=EXAMPLES["sft"])
def sft(
    recipe: RecipeArg,
    set_: SetOpt = None,
    output_dir: OutOpt = None,
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
    smoke: SmokeOpt = False,
) -> None:
    """Supervised fine-tuning, and pretraining from scratch (model.init). Logs held-out perplexity."""
    _train("sft", recipe, set_, output_dir, resume, overwrite, quiet, smoke)


@app.command("eval", epilog=EXAMPLES["eval"])
def eval_(
    recipe: RecipeArg,
    set_: SetOpt = None,
    output_dir: Annotated[
        Path | None,
        typer.Option(
            "--output-dir", "-o", help="Results folder (default: the recipe's output.dir, else runs/eval-<recipe>)."
        ),
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace previous results in the folder.")] = False,
    quiet: QuietOpt = False,
    completions: Annotated[
        str | None,
        typer.Option(
            "--completions",
            "-c",
            metavar="FILE|-",
            help="Score these completions instead of sampling: JSONL rows with prompt, completion (and reference), "
            "as `prefcli generate` writes them; - reads stdin. Every metric that needs no sampling is computed.",
        ),
    ] = None,
) -> None:
    """Measure models: perplexity, BLEU, ROUGE, reward, win rate, KL, distinct-n, lengths, preference accuracy.

    A table on stderr, the JSON summary on stdout, per-example rows in examples.jsonl."""
    from .evaluate.eval import EvalOptions, run

    try:
        summary = run(
            recipe,
            EvalOptions(
                overrides=list(set_ or []),
                output_dir=str(output_dir) if output_dir else None,
                overwrite=overwrite,
                quiet=quiet,
                completions=completions,
            ),
        )
    except PrefcliError as e:
        _fail("eval", e, e.exit_code, {EXIT_USAGE: "invalid"}.get(e.exit_code, "failed"))
    except KeyboardInterrupt:
        _fail("eval", RuntimeError("interrupted; no results were written"), EXIT_INTERRUPTED, "interrupted")
    emit_json(summary)


@app.command(epilog=EXAMPLES["generate"])
def generate(
    model_dir: Annotated[
        Path | None, typer.Argument(help="Model folder (Hugging Face format) or hub id.", show_default=False)
    ] = None,
    recipe: Annotated[
        Path | None,
        typer.Option(
            "--recipe",
            "-r",
            help=(
                "Sample from a recipe's model instead: an eval recipe's first model (or --model NAME) with its generation "
                "settings, or the model a training recipe wrote to its run folder."
            ),
        ),
    ] = None,
    model_name: Annotated[str | None, typer.Option("--model", help="With an eval recipe: the model to use.")] = None,
    prompts: Annotated[Path | None, typer.Option("--prompts", "-p", help="Prompts file; - or none: stdin.")] = None,
    fmt: Annotated[
        str | None,
        typer.Option(
            "--format",
            "-f",
            help=(
                "Input format: 'lines' (one prompt per line) or 'jsonl' (objects with 'prompt'; other fields are passed "
                "through). Default: jsonl for a .jsonl file, else lines."
            ),
        ),
    ] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="At most this many new tokens.")] = None,
    min_new_tokens: Annotated[int | None, typer.Option(help="No EOS before this many new tokens.")] = None,
    temperature: Annotated[float | None, typer.Option(help="Sampling temperature.")] = None,
    top_p: Annotated[float | None, typer.Option(help="Nucleus sampling mass (1 = off).")] = None,
    top_k: Annotated[int | None, typer.Option(help="Keep the k most likely tokens (0 = off).")] = None,
    greedy: Annotated[bool, typer.Option("--greedy", help="Greedy decoding instead of sampling.")] = False,
    ban: Annotated[
        list[str] | None,
        typer.Option(
            "--ban", metavar="WORD", help=("A word or phrase that never appears (whole word, any case; repeatable).")
        ),
    ] = None,
    require: Annotated[
        list[str] | None,
        typer.Option(
            "--require",
            metavar="WORD",
            help=("A keyword every completion contains (repeatable; written out when the token budget runs low)."),
        ),
    ] = None,
    stop: Annotated[
        list[str] | None,
        typer.Option(
            "--stop", metavar="STR", help=("Stop at this string; the completion ends before it (repeatable).")
        ),
    ] = None,
    control_code: Annotated[str | None, typer.Option(help="Text put before every prompt, e.g. '<|aligned|>'.")] = None,
    chat: Annotated[bool, typer.Option("--chat", help="Wrap each prompt in the chat template as a user turn.")] = False,
    batch_size: Annotated[
        int | None,
        typer.Option(help=("Prompts per generate call (default 8). 1 answers each prompt as soon as it is read.")),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Sampling seed (default: the recipe's, else 0).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No closing line on stderr; stdout (the completions) is unchanged.")
    ] = False,
) -> None:
    """Sample completions: prompts from a file or stdin, one JSON line per prompt on stdout.

    Rows are flushed as each batch is done (shell pipelines); errors go to stderr and the exit code."""
    from .evaluate.generation import GenerateOptions, run_generate

    settings = dict(
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        ban=ban,
        require=require,
        stop=stop,
        control_code=control_code,
        batch_size=batch_size,
    )
    if greedy:
        settings["do_sample"] = False
    if chat:
        settings["chat"] = True
    opts = GenerateOptions(
        model_dir=str(model_dir) if model_dir else None,
        recipe=str(recipe) if recipe else None,
        model_name=model_name,
        prompts=str(prompts) if prompts else None,
        fmt=fmt,
        settings=settings,
        seed=seed,
        device=device,
        quiet=quiet,
    )
    try:
        run_generate(opts)
    except PrefcliError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except BrokenPipeError:  # the reader went away (`| head -1`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(0) from None


@app.command(epilog=EXAMPLES["label"])
def label(
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
    seed: Annotated[int, typer.Option(help="Seed for the A/B order and for sampling candidates.")] = 0,
    rater: Annotated[
        str | None,
        typer.Option(help="Your rater id, recorded in every row (default: $PREFCLI_RATER, else your login name)."),
    ] = None,
) -> None:
    """Collect human preferences in the terminal: pick A or B (or tie / skip), or rate completions.

    Keys: a, b, t (tie), s (skip) or 1-N; u undoes, q quits. Resumable: Ctrl-C loses no answer."""
    from .evaluate.label import LabelOptions, run_label

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
        _fail("label", e, e.exit_code, {EXIT_USAGE: "invalid"}.get(e.exit_code, "failed"))
    except KeyboardInterrupt:
        _fail("label", RuntimeError("interrupted; every answer given is saved"), EXIT_INTERRUPTED, "interrupted")
    emit_json(summary)
    if summary["exit_code"]:
        raise typer.Exit(summary["exit_code"])


@app.command(epilog=EXAMPLES["plot"])
def plot(
    run_dirs: Annotated[list[Path], typer.Argument(help="Run folders (each with metrics.jsonl).", show_default=False)],
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help=("PNG to write (default: RUN_DIR/curves.png for one run, curves.png here for several)."),
        ),
    ] = None,
    metric: Annotated[
        list[str] | None,
        typer.Option(
            "--metric",
            "-m",
            help=("Plot only this metric, or a group such as 'loss' or 'eval' (repeatable). Default: the main ones."),
        ),
    ] = None,
    title: Annotated[str | None, typer.Option(help="Figure title.")] = None,
) -> None:
    """Training curves (loss, reward, KL, ...) of one or several runs in one PNG."""
    from .engine.plots import plot_run_dirs

    out = output or (run_dirs[0] / "curves.png" if len(run_dirs) == 1 and run_dirs[0].is_dir() else Path("curves.png"))
    try:
        drawn = plot_run_dirs(run_dirs, out, list(metric or []) or None, title=title)
    except (ValueError, OSError) as e:
        _fail("plot", e, EXIT_USAGE, "invalid")
    typer.echo(f"wrote {out}: {', '.join(drawn['metrics'])}", err=True)
    emit_json({"command": "plot", "status": "completed", "exit_code": 0, **drawn})


@app.command(epilog=EXAMPLES["rlhf"])
def rlhf(
    recipe: RecipeArg,
    set_: SetOpt = None,
    output_dir: OutOpt = None,
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
    smoke: SmokeOpt = False,
) -> None:
    """Reinforcement learning from a reward (a reward model, human scores, a rule, your function): PPO, RLOO,
    GRPO, REINFORCE++."""
    _train("rlhf", recipe, set_, output_dir, resume, overwrite, quiet, smoke)


@app.command(epilog=EXAMPLES["reward"])
def reward(
    recipe: RecipeArg,
    set_: SetOpt = None,
    output_dir: OutOpt = None,
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
    smoke: SmokeOpt = False,
) -> None:
    """Reward model (a scalar head at the last real token) from preference pairs (Bradley-Terry), human
    scores or rankings. Logs held-out pairwise accuracy, margin and calibration."""
    _train("reward", recipe, set_, output_dir, resume, overwrite, quiet, smoke)


@app.command(epilog=EXAMPLES["contrastive"])
def contrastive(
    recipe: RecipeArg,
    set_: SetOpt = None,
    output_dir: OutOpt = None,
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
    smoke: SmokeOpt = False,
) -> None:
    """Policy from preferences (dpo, cdpo, robust, ipo, hinge, simpo, cpo, orpo, kto) or an InfoNCE
    preference encoder (infonce). Logs preference accuracy, rewards, margins and log-probs."""
    _train("contrastive", recipe, set_, output_dir, resume, overwrite, quiet, smoke)


@app.command(epilog=EXAMPLES["gan"])
def gan(
    recipe: RecipeArg,
    set_: SetOpt = None,
    output_dir: OutOpt = None,
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
    smoke: SmokeOpt = False,
) -> None:
    """Adversarial training: a discriminator learns to tell human/gold completions from generated ones, the
    generator learns by policy gradient to pass as human."""
    _train("gan", recipe, set_, output_dir, resume, overwrite, quiet, smoke)


@app.command(epilog=EXAMPLES["validate"])
def validate(
    recipes: Annotated[list[Path], typer.Argument(help="Recipe files to check.", show_default=False)],
    command: Annotated[
        str | None,
        typer.Option(
            "--command", "-c", help="Validate as this command's recipe (default: each recipe's own 'command:')."
        ),
    ] = None,
    set_: SetOpt = None,
    resolved: Annotated[
        bool,
        typer.Option(
            "--resolved",
            help="Print each recipe as it runs, as YAML on stdout (its base: recipes merged, --set applied, every "
            "default written out, paths absolute) instead of the JSON verdict.",
        ),
    ] = False,
) -> None:
    """Check recipes without running them: schema, types, paths. Exit 2 if any is invalid."""
    from .recipe import dump_recipe, load_recipe

    results = []
    bad = 0
    for i, path in enumerate(recipes):
        try:
            loaded = load_recipe(path, command, list(set_ or []))
            typer.echo(f"ok       {path} ({loaded.command})", err=True)
            results.append({"recipe": str(path), "valid": True, "command": loaded.command})
            if resolved:
                print(("---\n" if i else "") + f"# {path}\n" + dump_recipe(loaded.recipe), end="", flush=True)
        except PrefcliError as e:
            bad += 1
            typer.echo(f"invalid  {e}", err=True)
            results.append({"recipe": str(path), "valid": False, "error": str(e)})
    status, code = ("invalid", EXIT_USAGE) if bad else ("valid", 0)
    if not resolved:  # --resolved: stdout is the YAML
        emit_json({"command": "validate", "status": status, "exit_code": code, "invalid": bad, "recipes": results})
    if bad:
        raise typer.Exit(EXIT_USAGE)


# ------------------------------------------------------------------------------- data inspect

data_app = typer.Typer(
    help="Look at preference data before training on it: `prefcli data inspect DATA_OR_RECIPE`.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(data_app, name="data")


def _key_values(items: list[str] | None, option: str) -> dict[str, str]:
    out = {}
    for it in items or []:
        k, sep, v = it.partition("=")
        if not sep or not k.strip() or not v.strip():
            raise UsageError(f"{option} expects NAME=COLUMN, got {it!r}")
        out[k.strip()] = v.strip()
    return out


@data_app.command("inspect", epilog=EXAMPLES["data inspect"])
def data_inspect(
    source: Annotated[
        str,
        typer.Argument(
            help="A data file (JSONL, JSON, CSV, Parquet), a saved dataset folder or hub dataset, or a recipe "
            "(its data read as training reads it).",
            show_default=False,
        ),
    ],
    eval_: Annotated[
        str | None, typer.Option("--eval", help="Held-out rows (a data file) for leakage and held-out baselines.")
    ] = None,
    kind: Annotated[
        str,
        typer.Option(help="Row kind: auto (from the columns), pairs, unpaired, scores, rankings, sft or prompts."),
    ] = "auto",
    columns: Annotated[
        list[str] | None,
        typer.Option("--columns", "-c", metavar="NAME=COLUMN", help="Column mapping, e.g. chosen=good (repeatable)."),
    ] = None,
    tokenizer: Annotated[
        str | None,
        typer.Option(help="Tokenizer for token lengths (default: the bundled kjv-base tokenizer; a recipe: its own)."),
    ] = None,
    max_length: Annotated[
        int | None, typer.Option(help="Count the rows a training max_length would truncate (a recipe: its own).")
    ] = None,
    reward: Annotated[
        str | None,
        typer.Option(
            help="A reward source to compare the labels with: a reward-model folder, or a recipe reward entry "
            "in YAML, e.g. '{kind: sentiment}'."
        ),
    ] = None,
    plots: Annotated[
        Path | None, typer.Option(help="Write PNG histograms (lengths, length differences, raters) here.")
    ] = None,
    max_rows: Annotated[int | None, typer.Option(help="Read only the first N rows of each file.")] = None,
    folds: Annotated[int, typer.Option(help="Cross-validation folds when there are no held-out rows.")] = 5,
    top_words: Annotated[int, typer.Option(help="Words listed per side.")] = 10,
    seed: Annotated[int, typer.Option(help="Seed of the cross-validation folds and the debias subsample.")] = 0,
    quiet: QuietOpt = False,
) -> None:
    """Counts, duplicates, truncation, length bias, shallow baselines, leakage and rater agreement of a
    preference data set. A report on stderr, the figures as one JSON line on stdout."""
    if max_rows is not None and max_rows <= 0:
        _fail("data inspect", ValueError("--max-rows must be positive"), EXIT_USAGE, "invalid")
    if max_length is not None and max_length <= 1:
        _fail("data inspect", ValueError("--max-length must be at least 2"), EXIT_USAGE, "invalid")
    try:
        from .analysis.inspect import InspectOptions, print_report, run_inspect

        opts = InspectOptions(
            source=source,
            eval=eval_,
            kind=kind,
            columns=_key_values(columns, "--columns"),
            tokenizer=tokenizer,
            max_length=max_length,
            reward=reward,
            plots=str(plots) if plots else None,
            max_rows=max_rows,
            seed=seed,
            folds=folds,
            top_words=top_words,
            quiet=quiet,
        )
        summary = run_inspect(opts)
    except PrefcliError as e:
        _fail("data inspect", e, e.exit_code, {EXIT_USAGE: "invalid"}.get(e.exit_code, "failed"))
    if not quiet:
        from rich.console import Console

        print_report(summary, Console(stderr=True, highlight=False))
    else:
        for w in summary["warnings"]:
            typer.echo(f"warning: {w}", err=True)
    print(json.dumps(_finite(summary)), flush=True)


def _finite(v):
    """JSON has no NaN: written as null."""
    import math

    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


# ------------------------------------------------------------------------------------ explain


@app.command(epilog=EXAMPLES["explain"])
def explain(
    model: Annotated[
        Path,
        typer.Argument(
            help="A reward model (from `prefcli reward`) or a tuned policy (from `prefcli contrastive` / `rlhf`).",
            show_default=False,
        ),
    ],
    text: Annotated[
        list[str] | None, typer.Option("--text", "-t", help="A completion to explain (repeatable).")
    ] = None,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The prompt before every --text.")] = "",
    pairs: Annotated[
        Path | None,
        typer.Option(help="JSONL of preference pairs (prompt, chosen, rejected): which tokens drive each preference."),
    ] = None,
    max_rows: Annotated[int, typer.Option(help="At most this many rows of --pairs.")] = 20,
    method: Annotated[
        str,
        typer.Option(
            help="auto (ig for a reward model, implicit for a policy), ig (integrated gradients, needs captum), "
            "prefix (prefix-score differences), implicit (beta log pi/pi_ref per token)."
        ),
    ] = "auto",
    reference: Annotated[
        Path | None,
        typer.Option(help="The reference (base) model of a policy (default: the model.path of the run's recipe.yaml)."),
    ] = None,
    beta: Annotated[
        float | None, typer.Option(help="beta of the implicit reward (default: the run's recipe, else 0.1).")
    ] = None,
    steps: Annotated[int, typer.Option(help="Integration steps of integrated gradients.")] = 64,
    plots: Annotated[
        Path | None, typer.Option(help="Write attention heatmaps and per-token bar charts (PNG) here.")
    ] = None,
    layer: Annotated[
        int | None, typer.Option(help="Attention layer to draw (0-based; default: the mean over layers).")
    ] = None,
    head: Annotated[int | None, typer.Option(help="Attention head to draw (default: the mean over heads).")] = None,
    html: Annotated[Path | None, typer.Option(help="Write a self-contained HTML page of the coloured tokens.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    quiet: QuietOpt = False,
) -> None:
    """See inside a model: per-token attribution of a reward model's score (integrated gradients, prefix
    scores), a policy's per-token implicit reward beta log pi/pi_ref, attention maps.

    Per-token JSONL rows on stdout, the summary as the last line; coloured tokens on stderr."""
    try:
        from .analysis.explain import ExplainOptions, run_explain

        opts = ExplainOptions(
            model=str(model),
            texts=list(text or []),
            prompt=prompt,
            pairs=str(pairs) if pairs else None,
            max_rows=max_rows,
            method=method,
            reference=str(reference) if reference else None,
            beta=beta,
            steps=steps,
            plots=str(plots) if plots else None,
            layer=layer,
            head=head,
            html=str(html) if html else None,
            device=device,
            quiet=quiet,
        )
        summary = run_explain(opts, emit=lambda row: print(json.dumps(_finite(row), ensure_ascii=False), flush=True))
    except PrefcliError as e:
        _fail("explain", e, e.exit_code, {EXIT_USAGE: "invalid"}.get(e.exit_code, "failed"))
    except KeyboardInterrupt:
        _fail("explain", RuntimeError("interrupted"), EXIT_INTERRUPTED, "interrupted")
    print(json.dumps(_finite(summary), ensure_ascii=False), flush=True)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"prefcli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    pass


def main(argv: list[str] | None = None) -> None:
    """The console entry point (`prefcli`). Exits with the command's code (docs/cli.md)."""
    import signal

    if hasattr(signal, "SIGXFSZ"):  # `ulimit -f`: a write past the limit fails with EFBIG, reported as such,
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # instead of the signal killing the process
    app(args=argv)


if __name__ == "__main__":
    main()
