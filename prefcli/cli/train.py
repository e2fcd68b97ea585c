"""The training commands: sft, reward, contrastive, rlhf and gan, each a recipe run by prefcli.runner."""

from __future__ import annotations

from . import (
    EXAMPLES,
    OutOpt,
    OverwriteOpt,
    QuietOpt,
    RecipeArg,
    ResumeOpt,
    SetOpt,
    SmokeOpt,
    app,
    train_command,
)


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
    train_command("sft", recipe, set_, output_dir, resume, overwrite, quiet, smoke)


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
    train_command("rlhf", recipe, set_, output_dir, resume, overwrite, quiet, smoke)


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
    train_command("reward", recipe, set_, output_dir, resume, overwrite, quiet, smoke)


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
    train_command("contrastive", recipe, set_, output_dir, resume, overwrite, quiet, smoke)


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
    train_command("gan", recipe, set_, output_dir, resume, overwrite, quiet, smoke)
