"""The commands around training: eval, generate, plot and validate (label is in label.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from .. import SEED_MAX
from ..errors import EXIT_INTERRUPTED, EXIT_USAGE, PrefcliError
from ..recipe.commands import COMMANDS
from .base import QuietOpt, RecipeArg, SetOpt, app, emit_json, examples, fail


@app.command("eval", help=COMMANDS["eval"].help, epilog=examples(*COMMANDS["eval"].examples))
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
    from ..evaluate.eval import EvalOptions, run

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
        fail("eval", e, e.exit_code, {EXIT_USAGE: "invalid"}.get(e.exit_code, "failed"))
    except KeyboardInterrupt:
        fail("eval", RuntimeError("interrupted; no results were written"), EXIT_INTERRUPTED, "interrupted")
    emit_json(summary)


@app.command(
    epilog=examples(
        "printf 'And the LORD said\\n' | prefcli generate prefcli/assets/kjv-base --ban wrath",
        "prefcli generate runs/sft-sft/final --prompts prompts.jsonl --greedy > completions.jsonl",
        "prefcli generate --recipe recipes/tiny/eval-env.yaml --model rl --episodes 4    # episode transcripts",
    )
)
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
    episodes: Annotated[
        int | None,
        typer.Option(
            "--episodes",
            help="With a recipe that has an env: play this many episodes (seeds env.eval_seed, ...) and print each "
            "one's transcript, instead of reading prompts.",
        ),
    ] = None,
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
    seed: Annotated[
        int | None, typer.Option(min=0, max=SEED_MAX, help="Sampling seed (default: the recipe's, else 0).")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    user: Annotated[
        str | None,
        typer.Option(
            "--user",
            metavar="ID",
            help="A personalised policy (trained with a user column): generate for this user (their user token "
            "before every prompt). An id the policy does not know gets the generic policy, with a warning.",
        ),
    ] = None,
    trust_remote_code: Annotated[
        bool,
        typer.Option(
            "--trust-remote-code", help="Run modelling code shipped with the model (model.trust_remote_code)."
        ),
    ] = False,
    pad_token: Annotated[
        str | None,
        typer.Option(
            help="Pad token for a tokenizer that has none, e.g. a base GPT-2 or Llama 3 checkpoint (model.pad_token)."
        ),
    ] = None,
    attn_implementation: Annotated[
        str | None,
        typer.Option(help="sdpa, eager, flash_attention_2 or flex_attention (default: transformers' choice)."),
    ] = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No closing line on stderr; stdout (the completions) is unchanged.")
    ] = False,
) -> None:
    """Sample completions: prompts from a file or stdin, one JSON line per prompt on stdout.

    Rows are flushed as each batch is done (shell pipelines); errors go to stderr and the exit code."""
    from ..evaluate.generation import GenerateOptions, run_generate

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
        episodes=episodes,
        fmt=fmt,
        settings=settings,
        seed=seed,
        device=device,
        quiet=quiet,
        user=user,
        model={
            "trust_remote_code": trust_remote_code or None,
            "pad_token": pad_token,
            "attn_implementation": attn_implementation,
        },
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


@app.command(
    epilog=examples(
        "prefcli plot runs/sft-sft",
        "prefcli plot runs/lr1e-3 runs/lr3e-3 --metric loss --metric eval -o lr.png",
    )
)
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
    from ..engine.plots import plot_run_dirs

    out = output or (run_dirs[0] / "curves.png" if len(run_dirs) == 1 and run_dirs[0].is_dir() else Path("curves.png"))
    try:
        drawn = plot_run_dirs(run_dirs, out, list(metric or []) or None, title=title)
    except (ValueError, OSError) as e:
        fail("plot", e, EXIT_USAGE, "invalid")
    typer.echo(f"wrote {out}: {', '.join(drawn['metrics'])}", err=True)
    emit_json({"command": "plot", "status": "completed", "exit_code": 0, **drawn})


@app.command(
    epilog=examples(
        "prefcli validate recipes/*/*.yaml",
        "prefcli validate --resolved recipes/tiny/contrastive-ipo.yaml     # the recipe with its base merged",
    )
)
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
    """Check recipes without running them: schema, types, paths. Exit 2 if any is invalid.

    A file named _*.yaml is a fragment (the base: of other recipes): what it sets is checked, what it leaves out is
    not asked for; with a command: line it is checked as a whole recipe too."""
    from ..recipe import dump_recipe, load_recipe
    from ..recipe.loader import check_fragment, is_fragment

    results = []
    bad = 0
    for i, path in enumerate(recipes):
        try:
            if is_fragment(path):
                fits = check_fragment(path, command, list(set_ or []))
                whole = None
                if len(fits) == 1:
                    try:  # some fragments are whole recipes too (recipes/tiny/_contrastive.yaml)
                        whole = load_recipe(path, fits[0], list(set_ or []))
                    except PrefcliError:
                        pass  # incomplete on its own: the recipes that name it as base: complete it
                what = f"whole {whole.command} recipe too" if whole else f"fits {', '.join(fits)}"
                typer.echo(f"ok       {path} (fragment: {what})", err=True)
                results.append(
                    {"recipe": str(path), "valid": True, "fragment": True, "fits": fits,
                     "command": whole.command if whole else None}
                )  # fmt: skip
                if resolved and whole:
                    print(("---\n" if i else "") + f"# {path}\n" + dump_recipe(whole.recipe), end="", flush=True)
                continue
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
