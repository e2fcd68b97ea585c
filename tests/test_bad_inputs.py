"""The bad-input contract (docs/cli.md), one table of bad inputs run through the real entry point in this
process: recipe YAML, --set, CLI usage, data files (JSONL, JSON, CSV, TSV, Parquet, folders), model
folders, reward sources, output folders and resume states.

Every case asserts: the exit code; one JSON object as the last stdout line, with its status and code;
no traceback on stderr; a message that names the file, field or row and says what to do (`says`: every
substring must appear, `{dir}` standing for the case's folder); and that no file in the case's folder
(recipe, data, run folder) was created, removed or changed. Cases accepted with a warning (code 0)
assert the warning, on stderr and in the summary's `warnings`, instead.

Paths that need a real process (signals, kill -9, ulimit, capabilities) are in tests/test_faults.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from .conftest import DATA, TINY_INIT, TOKENIZER, deep_update, sft_recipe_dict

TINY = DATA / "tiny"


# ------------------------------------------------------------------------------------------- runner


def invoke(argv: list[str], stdin: bytes | None = None) -> tuple[int, str, str]:
    """`prefcli ARGV` through the console entry point, in this process: (exit code, stdout, stderr). `stdin`: the
    bytes on its standard input (a text stream over a byte buffer, as a real stdin is)."""
    import sys

    from prefcli.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    old_stdin = sys.stdin
    if stdin is not None:
        sys.stdin = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8", errors="surrogateescape")
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main([str(a) for a in argv])
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.stdin = old_stdin
    return code, out.getvalue(), err.getvalue()


def snapshot(root: Path) -> dict[str, str]:
    """Every file under `root` (hidden ones included) with a hash of its content."""
    return {
        str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


class Env:
    """A case's own folder, and helpers that write recipes and data files into it."""

    def __init__(self, root: Path, shared: dict):
        self.dir = root
        self.run = root / "run"
        self.shared = shared  # session-wide inputs: a finished run folder, model folders

    def p(self, name: str) -> Path:
        return self.dir / name

    def write(self, name: str, content: str | bytes) -> str:
        path = self.p(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        return str(path)

    def rows(self, name: str, rows: list) -> str:
        return self.write(name, "".join(json.dumps(r) + "\n" for r in rows))

    def recipe(self, d: dict, name: str = "recipe.yaml") -> str:
        return self.write(name, yaml.safe_dump(d, sort_keys=False))

    def cmd(self, command: str, d: dict, *extra: str) -> list[str]:
        """`prefcli COMMAND recipe.yaml -o run -q EXTRA...`"""
        return [command, self.recipe(d), "-o", str(self.run), "-q", *extra]

    def finished_run(self) -> None:
        """A finished sft run (checkpoints step-1, step-2, final/) copied into ./run."""
        shutil.copytree(self.shared["run"], self.run)


@dataclass(frozen=True)
class Case:
    id: str
    argv: Callable[[Env], list[str]]
    says: tuple[str, ...] = ()  # substrings of the error message (or of the warnings, for code 0)
    code: int = 2
    setup: Callable[[Env], None] | None = None
    json_on_stdout: bool = True  # False only for generate: its stdout is data
    stdin: bytes | None = None  # what the command reads on its standard input


# ------------------------------------------------------------------------------------ base recipes


def tiny_init() -> dict:
    return json.loads(json.dumps(TINY_INIT))


def sft(**upd) -> dict:
    return sft_recipe_dict(**deep_update({"train": {"max_steps": 1}, "data": {"eval": None}}, upd))


def sft_rows(e: Env, rows: list, name: str = "rows.jsonl", **upd) -> list[str]:
    d = sft(**upd)
    d["data"]["train"] = {"path": e.rows(name, rows)}
    return e.cmd("sft", d)


def sft_file(e: Env, name: str, content: str | bytes, **upd) -> list[str]:
    d = sft(**upd)
    d["data"]["train"] = {"path": e.write(name, content)}
    return e.cmd("sft", d)


def pref(command: str, **upd) -> dict:
    d = {
        "command": command,
        "model": {"init": tiny_init(), "tokenizer": str(TOKENIZER)},
        "data": {"train": {"path": str(TINY / "pref_train.jsonl"), "max_rows": 16}, "max_length": 64},
        "train": {"max_steps": 1, "batch_size": 4, "lr": 1e-3},
        "output": {"plot": False},
    }
    return deep_update(d, upd)


def pref_rows(e: Env, command: str, rows: list, **upd) -> list[str]:
    d = pref(command, **upd)
    d["data"]["train"] = {"path": e.rows("pairs.jsonl", rows)}
    return e.cmd(command, d)


def rlhf(**upd) -> dict:
    d = {
        "command": "rlhf",
        "model": {"init": tiny_init(), "tokenizer": str(TOKENIZER)},
        "data": {"train": {"path": str(TINY / "prompts.jsonl"), "max_rows": 8}, "max_prompt_length": 16},
        "rewards": [{"kind": "length", "target": 4}],
        "generation": {"max_new_tokens": 4},
        "rlhf": {"algorithm": "grpo", "num_generations": 2, "prompts_per_rollout": 2},
        "train": {"max_steps": 1, "batch_size": 4, "lr": 1e-3},
        "output": {"plot": False},
    }
    return deep_update(d, upd)


def rlhf_env(**upd) -> dict:
    """rlhf in an environment: the bundled guess-the-number game, no prompt data."""
    env_upd = upd.pop("env_upd", {})
    d = rlhf(**upd)
    d.pop("data")
    d["rewards"] = []
    d["env"] = {"kind": "python", "path": "prefcli.envs.bundled.guess:GuessNumber", "max_episode_tokens": 64}
    return deep_update(d, env_upd)


def with_env(env: dict, files: dict[str, str] | None = None) -> Callable[[Env], list[str]]:
    """An rlhf recipe whose env section is `env` (merged into the base's), with `files` written beside it."""

    def argv(e: Env) -> list[str]:
        for name, text in (files or {}).items():
            e.write(name, text)
        d = rlhf_env(env_upd={"env": env})
        d["env"] = {k: v for k, v in d["env"].items() if v is not None}
        return e.cmd("rlhf", d)

    return argv


ENV_OK = "from prefcli.envs import Observation\n"
ENV_GAME = (
    ENV_OK + "class Game:\n    def reset(self, seed=None):\n        return Observation(text='hi')\n"
    "    def step(self, action):\n        return Observation(done=True, reward=1.0)\n"
)
TOOL_DOC = '        """Peek.\n\n        Args:\n            x: What.\n        """\n'


def gan(**upd) -> dict:
    d = {
        "command": "gan",
        "model": {"init": tiny_init(), "tokenizer": str(TOKENIZER)},
        "data": {"train": {"path": str(TINY / "prompt_completion.jsonl"), "max_rows": 8}, "max_prompt_length": 16},
        "generation": {"max_new_tokens": 4},
        "rlhf": {"algorithm": "rloo", "num_generations": 2, "prompts_per_rollout": 2},
        "gan": {"disc_warmup_steps": 1},
        "discriminator": {"batch_size": 4},
        "train": {"max_steps": 1, "batch_size": 4, "lr": 1e-3},
        "output": {"plot": False},
    }
    return deep_update(d, upd)


def evalr(**upd) -> dict:
    d = {
        "command": "eval",
        "models": [{"name": "m", "init": tiny_init(), "tokenizer": str(TOKENIZER)}],
        "data": {"text": {"path": str(TINY / "text_eval.jsonl"), "max_rows": 4}},
        "metrics": ["perplexity"],
    }
    return deep_update(d, upd)


def replace_init(d: dict, architecture: str, **config) -> dict:
    """`d` with model.init replaced (not merged): a small model of another architecture."""
    base = {"hidden_size": 32, "num_hidden_layers": 1}
    d["model"]["init"] = {"architecture": architecture, "config": {**base, **config}}
    return d


def with_reward(spec: dict) -> Callable[[Env], list[str]]:
    return lambda e: e.cmd("rlhf", rlhf(rewards=[spec]))


def model_dir(e: Env, damage: Callable[[Path], None] | None = None) -> str:
    """A copy of the session's tiny model folder in the case folder, damaged by `damage`."""
    dst = e.p("model")
    shutil.copytree(e.shared["model"], dst)
    if damage is not None:
        damage(dst)
    return str(dst)


def sft_model(e: Env, damage: Callable[[Path], None] | None = None, **upd) -> list[str]:
    d = sft(**upd)
    d["model"] = {"path": model_dir(e, damage)}
    return e.cmd("sft", d)


# A checkpoint's model and optimizer state, as one process writes them (torch.distributed.checkpoint's
# Hugging Face writer: one file per process in model-<group>/ and optim-<group>/).
MODEL_FILE = "model-policy/shard-00001-model-00001-of-00001.safetensors"
OPTIM_FILE = "optim-policy/shard-00001-model-00001-of-00001.safetensors"


def truncate(name: str, keep: float = 0.5) -> Callable[[Path], None]:
    def f(root: Path) -> None:
        p = root / name
        p.write_bytes(p.read_bytes()[: int(p.stat().st_size * keep)])

    return f


def overwrite_file(name: str, content: bytes) -> Callable[[Path], None]:
    return lambda root: (root / name).write_bytes(content)


def remove(name: str) -> Callable[[Path], None]:
    return lambda root: (root / name).unlink()


def resume_with(**upd) -> Callable[[Env], list[str]]:
    """--resume of ./run (a finished 2-step sft run) with the recipe that made it, changed by `upd`."""
    return lambda e: e.cmd("sft", deep_update(run_recipe(), upd), "--resume")


def run_recipe() -> dict:
    return sft_recipe_dict(train={"max_steps": 2, "save_every_steps": 1, "keep_checkpoints": 2}, data={"eval": None})


def damage_checkpoints(*steps: int, how: Callable[[Path], None]) -> Callable[[Env], None]:
    def setup(e: Env) -> None:
        e.finished_run()
        for s in steps:
            how(e.run / "checkpoints" / f"step-{s}")

    return setup


def text_rows(n: int = 8) -> list[dict]:
    return [{"text": f"In the beginning was the word number {i}."} for i in range(n)]


def pairs(n: int = 8, **upd) -> list[dict]:
    return [{"prompt": f"Say {i}", "chosen": f" yes {i}", "rejected": f" no {i}", **upd} for i in range(n)]


def parquet(rows: list[dict]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows) if rows else pa.table({"text": pa.array([], pa.string())}), buf)
    return buf.getvalue()


def saved_dataset(rows: list[dict], split: str | None = None) -> Callable[[Env], list[str]]:
    """A folder written by datasets' save_to_disk (a DatasetDict with `split` when given)."""

    def argv(e: Env) -> list[str]:
        import datasets

        ds = datasets.Dataset.from_list(rows)
        (datasets.DatasetDict({split: ds}) if split else ds).save_to_disk(str(e.p("saved")))
        d = sft()
        d["data"]["train"] = {"path": str(e.p("saved"))}
        return e.cmd("sft", d)

    return argv


# -------------------------------------------------------------------------------------------- cases

CASES: list[Case] = []


def case(id: str, argv, says=(), code=2, setup=None, json_on_stdout=True, stdin=None) -> None:
    CASES.append(Case(id, argv, tuple(says), code, setup, json_on_stdout, stdin))


# --- CLI usage: click finds these before any command runs
case("usage-unknown-option", lambda e: ["sft", e.recipe(sft()), "--frobnicate"], ["No such option: --frobnicate"])
case("usage-missing-recipe", lambda e: ["sft"], ["Missing argument"])
case("usage-unknown-command", lambda e: ["stf", "x.yaml"], ["No such command 'stf'", "Did you mean 'sft'"])
case(
    "usage-extra-argument",
    lambda e: ["sft", e.recipe(sft()), "extra.yaml"],
    ["unexpected extra argument", "extra.yaml"],
)
case("usage-set-without-value", lambda e: ["sft", e.recipe(sft()), "--set"], ["'--set' requires an argument"])
case("usage-output-dir-without-value", lambda e: ["sft", e.recipe(sft()), "-o"], ["'-o' requires an argument"])
case("usage-no-command", lambda e: [], ["no command given"])
case("usage-validate-without-files", lambda e: ["validate"], ["Missing argument"])
case("usage-plot-without-runs", lambda e: ["plot"], ["Missing argument"])
case("usage-eval-unknown-option", lambda e: ["eval", e.recipe(evalr()), "--resume"], ["No such option: --resume"])
case("usage-bad-option-type", lambda e: ["label", "--scale", "many"], ["Invalid value for '--scale'", "valid integer"])
case(
    "usage-generate-unknown-option",
    lambda e: ["generate", str(TINY), "--frobnicate"],
    ["No such option: --frobnicate"],
    json_on_stdout=False,
)
case(
    "usage-resume-and-overwrite",
    lambda e: e.cmd("sft", sft(), "--resume", "--overwrite"),
    ["--resume and --overwrite contradict each other", "pick one"],
)
case("usage-recipe-missing", lambda e: ["sft", str(e.p("nope.yaml"))], ["recipe not found", "nope.yaml"])
case("usage-recipe-is-a-folder", lambda e: ["sft", str(e.dir)], ["is a folder", "give a recipe .yaml file"])
case(
    "usage-plot-run-without-metrics",
    lambda e: ["plot", e.write("empty-run/recipe.yaml", "command: sft\n") and str(e.p("empty-run"))],
    ["empty-run", "metrics.jsonl"],
)
case("usage-label-without-input", lambda e: ["label"], ["give an input JSONL", "--model DIR with --prompts FILE"])

# --- recipe files
case(
    "yaml-syntax-error",
    lambda e: ["sft", e.write("r.yaml", "command: sft\nmodel: {init: [\n")],
    ["r.yaml:", "YAML syntax error"],
)
case("yaml-empty-file", lambda e: ["sft", e.write("r.yaml", "")], ["r.yaml:1", "the file is empty", "command: sft"])
case("yaml-top-level-list", lambda e: ["sft", e.write("r.yaml", "- a\n- b\n")], ["r.yaml:1", "a recipe is a mapping"])
case(
    "yaml-top-level-scalar", lambda e: ["sft", e.write("r.yaml", "just words\n")], ["r.yaml:1", "a recipe is a mapping"]
)
case(
    "yaml-duplicate-key",
    lambda e: ["sft", e.write("r.yaml", "command: sft\ntrain:\n  lr: 1\n  lr: 2\n")],
    ["r.yaml:4", "train.lr: key given twice"],
)
case(
    "yaml-not-utf8",
    lambda e: ["sft", e.write("r.yaml", b"command: sft\n# caf\xe9\n")],
    ["r.yaml:2:6", "not UTF-8", "save the recipe as UTF-8"],
)
case(
    "yaml-tab-indentation",
    lambda e: ["sft", e.write("r.yaml", "command: sft\ntrain:\n\tlr: 1\n")],
    ["r.yaml:3", "YAML syntax error"],
)
case(
    "recipe-command-key-misspelt",
    lambda e: [
        "validate",
        e.write("r.yaml", yaml.safe_dump({"comand": "sft", **{k: v for k, v in sft().items() if k != "command"}})),
    ],
    ["r.yaml:", "comand: unknown key", "did you mean 'command'"],
)
case(
    "recipe-command-missing",
    lambda e: ["validate", e.write("r.yaml", "train: {lr: 1}\n")],
    ["command: missing", "command: sft"],
)
case(
    "recipe-command-missing-fragment-hint",
    lambda e: ["validate", e.write("model.yaml", "model: {path: x}\n")],
    ["command: missing", "name it with a leading '_' (_model.yaml)"],
)
case(  # a fragment (_*.yaml): what it sets is checked against every command; nothing it leaves out is asked for
    "recipe-fragment-bad-value",
    lambda e: ["validate", e.write("_train.yaml", "train:\n  lr: -1\n")],
    ["_train.yaml:2: train.lr", "greater than 0"],
)
case(
    "recipe-fragment-unknown-key",
    lambda e: ["validate", e.write("_train.yaml", "train:\n  learning_rate: 1.0e-4\n")],
    ["_train.yaml:2: train.learning_rate: unknown field", "did you mean 'lr'"],
)
case(
    "recipe-command-unknown",
    lambda e: ["validate", e.recipe(sft(command="stf"))],
    ["command: unknown command 'stf'", "did you mean 'sft'"],
)
case(
    "recipe-for-another-command",
    lambda e: e.cmd("reward", sft()),
    ["this recipe is for `prefcli sft`, not `prefcli reward`"],
)
case("recipe-unknown-section", lambda e: e.cmd("sft", sft(trainer={"lr": 1})), ["trainer: unknown field"])
case(
    "recipe-unknown-field-alias",
    lambda e: e.cmd("sft", sft(train={"learning_rate": 1e-3})),
    ["train.learning_rate: unknown field (did you mean 'lr'?)"],
)
case(
    "recipe-unknown-field-typo",
    lambda e: e.cmd("sft", sft(data={"max_lenght": 8})),
    ["data.max_lenght: unknown field (did you mean 'max_length'?)"],
)
case(
    "recipe-wrong-type",
    lambda e: e.cmd("sft", sft(data={"max_length": "long"})),
    ["data.max_length", "valid integer", "'long'"],
)
case(
    "recipe-literal-typo",
    lambda e: e.cmd("sft", sft(train={"lr_schedule": "cosin"})),
    ["train.lr_schedule", "did you mean 'cosine'"],
)
case(
    "recipe-missing-data-train",
    lambda e: e.cmd("sft", {k: v for k, v in sft().items() if k != "data"} | {"data": {"max_length": 8}}),
    ["data.train: required field is missing"],
)
case(
    "recipe-missing-model",
    lambda e: e.cmd("sft", {k: v for k, v in sft().items() if k != "model"}),
    ["model: required field is missing"],
)
case(
    "recipe-model-path-and-init",
    lambda e: e.cmd("sft", sft(model={"path": str(TOKENIZER)})),
    ["set exactly one of model.path", "model.init"],
)
case(
    "recipe-init-without-tokenizer",
    lambda e: e.cmd("sft", sft(model={"tokenizer": None})),
    ["model.init needs model.tokenizer"],
)
case(
    "recipe-init-bad-architecture",
    lambda e: e.cmd("sft", sft(model={"init": {"architecture": "gtp2"}})),
    ["model.init.architecture", "did you mean 'gpt2'"],
)
case(
    "recipe-init-config-typo",
    lambda e: e.cmd("sft", sft(model={"init": {"config": {"hidden_sise": 8}}})),
    ["model.init.config.hidden_sise", "did you mean 'hidden_size'"],
)
case(
    "recipe-init-vocab-too-small",
    lambda e: e.cmd("sft", sft(model={"init": {"config": {"vocab_size": 10}}})),
    ["model.init.config.vocab_size (10)", "smaller than the tokenizer"],
)
case("recipe-lr-zero", lambda e: e.cmd("sft", sft(train={"lr": 0})), ["train.lr", "greater than 0"])
case("recipe-lr-negative", lambda e: e.cmd("sft", sft(train={"lr": -1e-4})), ["train.lr", "greater than 0"])
case(
    "recipe-batch-size-zero",
    lambda e: e.cmd("sft", sft(train={"batch_size": 0})),
    ["train.batch_size", "greater than 0"],
)
case(
    "recipe-max-steps-negative",
    lambda e: e.cmd("sft", sft(train={"max_steps": -3})),
    ["train.max_steps", "greater than 0"],
)
case(
    "recipe-warmup-over-max-steps",
    lambda e: e.cmd("sft", sft(train={"warmup_steps": 5})),
    ["warmup_steps (5) exceeds max_steps (1)"],
)
case(
    "recipe-warmup-ratio-one",
    lambda e: e.cmd("sft", sft(train={"warmup_ratio": 1.0})),
    ["train.warmup_ratio", "less than 1"],
)
case(
    "recipe-adam-betas-one-value",
    lambda e: e.cmd("sft", sft(train={"adam_betas": [0.9]})),
    ["train.adam_betas: expected 2 values, got 1", "[0.9, 0.999]"],
)
case(
    "recipe-adam-betas-three-values",
    lambda e: e.cmd("sft", sft(train={"adam_betas": [0.9, 0.99, 0.9]})),
    ["train.adam_betas", "at most 2 items"],
)
case(
    "recipe-adam-betas-text",
    lambda e: e.cmd("sft", sft(train={"adam_betas": "fast"})),
    ["train.adam_betas", "valid tuple"],
)
case(
    "recipe-keep-checkpoints-zero",
    lambda e: e.cmd("sft", sft(train={"keep_checkpoints": 0})),
    ["train.keep_checkpoints", "greater than 0"],
)
case(
    "recipe-eval-and-eval-fraction",
    lambda e: e.cmd("sft", sft(data={"eval": {"path": str(TINY / "text_eval.jsonl")}, "eval_fraction": 0.1})),
    ["set data.eval or data.eval_fraction, not both"],
)
case(
    "recipe-eval-fraction-one",
    lambda e: e.cmd("sft", sft(data={"eval_fraction": 1.0})),
    ["data.eval_fraction", "less than 1"],
)
case("recipe-format-typo", lambda e: e.cmd("sft", sft(data={"format": "txt"})), ["data.format", "did you mean 'text'"])
case(
    "recipe-max-length-one", lambda e: e.cmd("sft", sft(data={"max_length": 1})), ["data.max_length", "greater than 1"]
)
case("recipe-lora-rank-zero", lambda e: e.cmd("sft", sft(model={"lora": {"r": 0}})), ["model.lora.r", "greater than 0"])
case(
    "recipe-lora-dropout-one",
    lambda e: e.cmd("sft", sft(model={"lora": {"dropout": 1.0}})),
    ["model.lora.dropout", "less than 1"],
)
case(
    "recipe-precision-typo", lambda e: e.cmd("sft", sft(runtime={"precision": "bf61"})), ["runtime.precision", "'bf61'"]
)
case(
    "recipe-data-path-missing",
    lambda e: e.cmd("sft", sft(data={"train": {"path": "nope/rows.jsonl"}})),
    ["data.train.path: no such file or folder", "nope/rows.jsonl"],
)
case(
    "recipe-tokenizer-path-missing",
    lambda e: e.cmd("sft", sft(model={"tokenizer": "./no-tokenizer"})),
    ["model.tokenizer: no such file or folder", "no-tokenizer"],
)
case(
    "recipe-output-dir-is-a-file",
    lambda e: e.cmd("sft", sft(output={"dir": e.write("taken", "x")})),
    ["output.dir", "exists and is not a folder"],
)
case(
    "recipe-objective-needs-scorer",
    lambda e: e.cmd("sft", sft(sft={"objective": "filter"})),
    ["objective 'filter' needs a scorer", "sft.rewards"],
)
case(
    "recipe-knob-of-another-objective",
    lambda e: e.cmd("sft", sft(sft={"beta": 3.0})),
    ["sft.beta applies to objective rwr or awr only"],
)
case(
    "recipe-conditional-with-lora",
    lambda e: e.cmd("sft", sft(model={"lora": {"r": 4}}, sft={"objective": "conditional", "score_column": "s"})),
    ["conditional", "Remove model.lora"],
)
case(
    "recipe-grpo-one-generation",
    lambda e: e.cmd("rlhf", rlhf(rlhf={"num_generations": 1})),
    ["num_generations must be >= 2"],
)
case(
    "recipe-rlhf-grad-accum",
    lambda e: e.cmd("rlhf", rlhf(train={"grad_accum_steps": 2})),
    ["train.grad_accum_steps does not apply to rlhf"],
)
case("recipe-rlhf-no-rewards", lambda e: e.cmd("rlhf", rlhf(rewards=[])), ["rewards", "at least 1 item"])
case(
    "recipe-rlhf-min-over-max-tokens",
    lambda e: e.cmd("rlhf", rlhf(generation={"min_new_tokens": 9})),
    ["min_new_tokens (9) exceeds max_new_tokens (4)"],
)
case(
    "recipe-rlhf-algorithm-typo",
    lambda e: e.cmd("rlhf", rlhf(rlhf={"algorithm": "gpro"})),
    ["rlhf.algorithm", "did you mean 'grpo'"],
)
# --- rlhf in an environment (docs/environments.md): the recipe, then the class, checked before training
case(
    "env-path-does-not-import",
    with_env({"path": "env.py:Game"}, {"env.py": "raise RuntimeError('broken on import')\n"}),
    ["env.path", "{dir}/env.py:Game'", "importing", "RuntimeError: broken on import", "shows the traceback"],
)
case(
    "env-module-missing",
    with_env({"path": "no_such_env_module_xyz:Game"}),
    ["env.path", "'no_such_env_module_xyz:Game'", "ModuleNotFoundError"],
)
case("env-class-missing", with_env({"path": "env.py:Nope"}, {"env.py": ENV_GAME}), ["env.path", "has no 'Nope'"])
case(
    "env-class-missing-step",
    with_env(
        {"path": "env.py:Half"}, {"env.py": ENV_OK + "class Half:\n    def reset(self, seed=None):\n        pass\n"}
    ),
    ["env.path", "Half has no step method", "reset(seed) -> Observation and step(action) -> Observation"],
)
case(
    "env-class-missing-reset-and-step",
    with_env({"path": "env.py:Empty"}, {"env.py": "class Empty:\n    pass\n"}),
    ["env.path", "Empty has no reset or step method"],
)
case(
    "env-not-a-class",
    with_env({"path": "env.py:game"}, {"env.py": "def game():\n    pass\n"}),
    ["env.path", "is a function, not a class"],
)
case(
    "env-args-not-accepted",
    with_env({"path": "env.py:Game", "args": {"size": 3}}, {"env.py": ENV_GAME}),
    ["env.args", "Game() does not accept {'size': 3}", "unexpected keyword argument 'size'"],
)
case(
    "env-args-rejected-by-the-constructor",
    with_env({"args": {"low": 9, "high": 2}}),
    ["env.args", "making the environment prefcli.envs.bundled.guess:GuessNumber failed", "low (9) must be below"],
)
case(
    "env-tool-without-docstring",
    with_env(
        {"path": "env.py:Tooled"},
        {"env.py": ENV_GAME + "class Tooled(Game):\n    def peek(self) -> str:\n        return 'x'\n"},
    ),
    ["env.path", "Tooled.peek is a public method, so a tool, but has no docstring", "make it private (_peek)"],
)
case(
    "env-tool-unsupported-annotation",
    with_env(
        {"path": "env.py:Tooled"},
        {
            "env.py": ENV_GAME
            + "class Tooled(Game):\n    def peek(self, x: Game) -> str:\n"
            + TOOL_DOC
            + "        return 'x'\n"
        },
    ),
    ["env.path", "Tooled.peek cannot be a tool", "Couldn't convert the type hint"],
)
case(
    "env-tool-argument-undescribed",
    with_env(
        {"path": "env.py:Tooled"},
        {
            "env.py": ENV_GAME
            + "class Tooled(Game):\n    def peek(self, n: int) -> str:\n        'Peek.'\n        return 'x'\n"
        },
    ),
    ["env.path", "Tooled.peek cannot be a tool"],
)
case(
    "env-path-no-colon", with_env({"path": "prefcli.envs.bundled.guess"}), ["env.path", "must look like 'module:Class'"]
)
case("env-path-file-missing", with_env({"path": "nope.py:Game"}), ["env.path", "no such file", "nope.py"])
case("env-kind-typo", with_env({"kind": "pyhton"}), ["env", "'pyhton'"])
case("env-tool-format-typo", with_env({"tool_format": "hermse"}), ["env.tool_format", "did you mean 'hermes'"])
case(
    "env-eval-seeds-overlap-training",
    with_env({"num_tasks": 100, "eval_seed": 50}),
    ["env", "eval_seed (50) is below num_tasks (100)"],
)
case(
    "env-openenv-url-scheme",
    with_env({"kind": "openenv", "url": "localhost:8000", "path": None}),
    ["env.url", "must start with http://"],
)
case(
    "env-and-data-both",
    lambda e: e.cmd("rlhf", {**rlhf_env(), "data": rlhf()["data"]}),
    ["data", "not used with env"],
)
case(
    "env-turn-budget-over-the-cap",
    lambda e: e.cmd("rlhf", rlhf_env(generation={"max_new_tokens": 64})),
    ["generation.max_new_tokens", "per-turn budget (64) must be below env.max_episode_tokens (64)"],
)
case(
    "rlhf-neither-data-nor-env",
    lambda e: e.cmd("rlhf", {k: v for k, v in rlhf().items() if k != "data"}),
    ["data", "required field is missing"],
)
case(
    "eval-env-metric-without-env", lambda e: e.cmd("eval", evalr(metrics=["env"], data={})), ["metric 'env' needs env"]
)
case(
    "recipe-gan-bt-weight-without-pairs",
    lambda e: e.cmd("gan", gan(gan={"bt_weight": 1.0})),
    ["gan.bt_weight needs data.pairs"],
)
case(
    "recipe-gan-discriminator-path-and-init",
    lambda e: e.cmd("gan", gan(discriminator={"path": str(TOKENIZER), "init": tiny_init()})),
    ["set discriminator.path or discriminator.init, not both"],
)
case(
    "recipe-contrastive-objective-typo",
    lambda e: e.cmd("contrastive", pref("contrastive", contrastive={"objective": "dop"})),
    ["contrastive.objective", "did you mean 'dpo'"],
)
case(
    "recipe-contrastive-label-smoothing-half",
    lambda e: e.cmd("contrastive", pref("contrastive", contrastive={"label_smoothing": 0.5})),
    ["contrastive.label_smoothing", "less than 0.5"],
)
case(
    "recipe-reward-objective-typo",
    lambda e: e.cmd("reward", pref("reward", reward={"objective": "bradley-terry"})),
    ["reward.objective", "did you mean 'bradley_terry'"],
)


# --- personalisation (reward.personalisation, the user column)
def personal(**p) -> dict:
    return pref("reward", reward={"personalisation": {"kind": "user_embedding", **p}})


case(
    "recipe-personalisation-kind-typo",
    lambda e: e.cmd("reward", pref("reward", reward={"personalisation": {"kind": "user_embeding"}})),
    ["reward.personalisation", "user_embeding", "user_embedding"],
)
case(
    "recipe-personalisation-generic-weight",
    lambda e: e.cmd("reward", personal(generic_weight=1.5)),
    ["reward.personalisation.generic_weight", "less than or equal to 1"],
)
case(
    "recipe-personalisation-latent-dim",
    lambda e: e.cmd("reward", pref("reward", reward={"personalisation": {"kind": "latent", "latent_dim": 0}})),
    ["reward.personalisation.latent_dim", "greater than 0"],
)
case(
    "recipe-personalisation-context-pairs",
    lambda e: e.cmd(
        "reward",
        pref("reward", reward={"personalisation": {"kind": "latent", "context_pairs": 4, "min_context_pairs": 8}}),
    ),
    ["reward.personalisation.latent", "min_context_pairs (8) exceeds context_pairs (4)"],
)
case(
    "recipe-personalisation-lowrank-rank",
    lambda e: e.cmd("reward", pref("reward", reward={"personalisation": {"kind": "lowrank", "rank": -1}})),
    ["reward.personalisation.rank", "greater than 0"],
)
case(
    "recipe-personalisation-new-user-labels",
    lambda e: e.cmd("reward", personal(new_user_labels=[0, 5, 5])),
    ["new_user_labels", "listed twice"],
)
case(
    "recipe-personalisation-not-pairs",
    lambda e: e.cmd(
        "reward", pref("reward", reward={"objective": "regression", "personalisation": {"kind": "latent"}})
    ),
    ["reward.personalisation needs pairs", "objective 'regression'"],
)
case(
    "recipe-eval-users-and-fraction",
    lambda e: e.cmd("reward", pref("reward", data={"eval_users": ["a"], "eval_user_fraction": 0.2})),
    ["data.eval_users or data.eval_user_fraction, not both"],
)
case(
    "data-personalisation-without-user-column",
    lambda e: e.cmd("reward", personal()),
    ["data.train", "pref_train.jsonl", "reward.personalisation needs a user column", "rater", "data.user_column"],
)
case(
    "data-user-column-named-but-absent",
    lambda e: pref_rows(e, "reward", pairs(8, rater="a"), data={"user_column": "annotator"}),
    ["data.train", "data.user_column needs column 'annotator'", "columns: prompt, chosen, rejected, rater"],
)
case(
    "data-user-id-not-a-string",
    lambda e: pref_rows(e, "reward", pairs(8, rater=[1, 2]), reward={"personalisation": {"kind": "latent"}}),
    ["data.train", "row 1: user 'rater' is [1, 2]", "a string or an integer"],
)
case(
    "data-held-out-user-absent",
    lambda e: pref_rows(e, "reward", pairs(8, rater="a"), data={"eval_users": ["zed"]}),
    ["data.eval_users: zed never appear", "users: a"],
)
case(
    "data-held-out-users-leave-nothing",
    lambda e: pref_rows(e, "reward", pairs(8, rater="a"), data={"eval_users": ["a"]}),
    ["holding out a leaves no training row"],
)
case(
    "reward-model-user-and-context",
    with_reward({"kind": "model", "path": str(TOKENIZER), "user": "a", "context": str(TINY / "pref_train.jsonl")}),
    ["rewards[0]", "give user (a user seen in training) or context (a new user's pairs), not both"],
)
case(
    "reward-model-user-without-personalisation",
    lambda e: e.cmd("rlhf", rlhf(rewards=[{"kind": "model", "path": model_dir(e), "user": "a"}])),
    ["rewards: `user` needs a personalised reward model", "no personalisation/ folder"],
)
case(
    "recipe-eval-empty-user",
    lambda e: e.cmd("eval", evalr(user=" ")),
    ["user: an empty user id"],
)
case(
    "recipe-personalisation-user-embedding-dim",
    lambda e: e.cmd("reward", personal(dim=0)),
    ["recipe.yaml:", "reward.personalisation.dim", "greater than 0"],
)
case(
    "recipe-policy-personalisation-generic-fraction",
    lambda e: e.cmd("contrastive", pref("contrastive", contrastive={"personalisation": {"generic_fraction": 1.0}})),
    ["contrastive.personalisation.generic_fraction", "less than 1"],
)
case(
    "recipe-policy-personalisation-kind",
    lambda e: e.cmd("rlhf", rlhf(rlhf={"personalisation": {"kind": "soft_prefix"}})),
    ["rlhf.personalisation.kind", "user_token"],
)
case(
    "recipe-policy-personalisation-unpaired-objective",
    lambda e: e.cmd(
        "contrastive", pref("contrastive", contrastive={"objective": "kto", "personalisation": {"kind": "user_token"}})
    ),
    ["contrastive.personalisation needs a paired objective", "'kto'"],
)
case(
    "recipe-policy-personalisation-with-lora",
    lambda e: e.cmd("rlhf", rlhf(rlhf={"personalisation": {}}, model={"lora": {"r": 4}})),
    ["rlhf.personalisation", "does not work with model.lora"],
)
case(
    "recipe-policy-personalisation-with-env",
    lambda e: e.cmd("rlhf", rlhf_env(rlhf={"personalisation": {}})),
    ["rlhf.personalisation", "not with env", "data.user_column"],
)
case(
    "recipe-policy-personalisation-in-gan",
    lambda e: e.cmd("gan", gan(rlhf={"personalisation": {}})),
    ["rlhf.personalisation", "applies to prefcli rlhf, not gan"],
)
case(
    "data-policy-personalisation-without-user-column",
    lambda e: e.cmd("contrastive", pref("contrastive", contrastive={"personalisation": {}})),
    ["data.train", "pref_train.jsonl", "needs a user column", "data.user_column"],
)
case(
    "generate-user-of-a-policy-that-is-not-personalised",
    lambda e: ["generate", model_dir(e), "-q", "--user", "a"],
    ["--user:", "is not a personalised policy", "contrastive.personalisation or rlhf.personalisation"],
    json_on_stdout=False,
    stdin=b"In the beginning\n",
)
case("recipe-eval-no-models", lambda e: e.cmd("eval", evalr(models=[])), ["models"])
case(
    "recipe-eval-ban-and-require",
    lambda e: e.cmd(
        "eval",
        evalr(
            metrics=["length"],
            data={"prompts": {"path": str(TINY / "prompts.jsonl")}},
            generation={"ban": ["LORD"], "require": ["lord"]},
        ),
    ),
    ["both banned and required: lord"],
)
case("recipe-eval-empty-stop", lambda e: e.cmd("eval", evalr(generation={"stop": [""]})), ["empty stop string"])
case(
    "recipe-eval-metric-typo",
    lambda e: e.cmd("eval", evalr(metrics=["perplexty"])),
    ["metrics[0]", "did you mean 'perplexity'"],
)
case(
    "recipe-chat-template-unknown-name",
    lambda e: e.cmd("sft", sft(model={"chat_template": "chatlm"})),
    ["model.chat_template", "unknown chat template 'chatlm'", "did you mean 'chatml'", "or a Jinja template string"],
)
case(  # the template's end-of-turn token becomes the EOS: it cannot be the pad token
    "recipe-chat-template-stop-is-pad",
    lambda e: e.cmd("sft", sft(model={"chat_template": "llama3", "pad_token": "<|eot_id|>"})),
    ["model.chat_template llama3", "<|eot_id|> becomes the EOS", "set model.pad_token to another token"],
)
case(  # data.format sharegpt/alpaca/openai read preference pairs: KTO's rows are not pairs
    "recipe-outside-format-unpaired",
    lambda e: e.cmd("contrastive", pref("contrastive", contrastive={"objective": "kto"}, data={"format": "sharegpt"})),
    ["data.format 'sharegpt' reads preference pairs", "objective 'kto' reads other rows"],
)
case(
    "recipe-sft-format-typo",
    lambda e: e.cmd("sft", sft(data={"format": "sharegtp"})),
    ["data.format", "'sharegtp'", "sharegpt"],
)
case(
    "recipe-pad-token-is-eos",
    lambda e: e.cmd("sft", sft(model={"pad_token": "<|im_end|>"})),
    ["model.pad_token", "is the EOS token", "pick a different token"],
)
if not __import__("torch").cuda.is_available():  # on a GPU machine the recipe is valid
    case(
        "recipe-device-cuda-without-gpu",
        lambda e: e.cmd("sft", sft(runtime={"device": "cuda"})),
        ["runtime.device is 'cuda' but no CUDA GPU", "use 'auto' or 'cpu'"],
    )

# --- non-finite numbers, in the file (.inf, .nan, -.inf) and through --set, in typed and free-form fields
NON_FINITE = [
    ("sft", "train.lr", ".inf"),
    ("sft", "train.weight_decay", ".nan"),
    ("sft", "train.adam_eps", ".inf"),
    ("sft", "train.min_lr_ratio", ".nan"),
    ("sft", "train.max_grad_norm", ".inf"),
    ("sft", "train.adam_betas", "[.nan, 0.999]"),
    ("sft", "data.eval_fraction", ".nan"),
    ("sft", "model.lora.alpha", ".inf"),
    ("sft", "model.init.config.rope_theta", ".inf"),
    ("contrastive", "contrastive.beta", ".inf"),
    ("reward", "reward.center_rewards_coefficient", ".nan"),
    ("rlhf", "rlhf.kl_coef", ".inf"),
    ("rlhf", "generation.temperature", ".nan"),
    ("rlhf", "rewards", "[{kind: length, target: 4, weight: -.inf}]"),
    ("rlhf", "rewards", "[{kind: function, function: 'json:dumps', kwargs: {scale: .nan}}]"),
    ("gan", "discriminator.lr", ".inf"),
]
BASES = {
    "sft": sft,
    "contrastive": lambda: pref("contrastive"),
    "reward": lambda: pref("reward"),
    "rlhf": rlhf,
    "gan": gan,
}


def _set_in(d: dict, dotted: str, value) -> dict:
    parts = dotted.split(".")
    cur = d
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return d


for command, field, text in NON_FINITE:
    value = yaml.safe_load(text)
    shown = field + ("[0].weight" if "weight" in text else "[0].kwargs.scale" if "kwargs" in text else "")
    shown = shown + ("[0]" if field == "train.adam_betas" else "")
    case(
        f"non-finite-file-{command}-{shown}",
        lambda e, c=command, f=field, v=value: e.cmd(c, _set_in(BASES[c](), f, v)),
        ["recipe.yaml:", shown, "is not a finite number", "give a finite value"],
    )
for command, field, text in NON_FINITE[:6]:
    case(
        f"non-finite-set-{command}-{field}",
        lambda e, c=command, f=field, t=text: e.cmd(c, BASES[c](), "--set", f"{f}={t}"),
        [f"(--set {field}={text})", "is not a finite number"],
    )
case(
    "non-finite-set-string-inf",
    lambda e: e.cmd("sft", sft(), "--set", "train.lr=inf"),
    ["(--set train.lr=inf)", "train.lr", "finite number"],
)
case(
    "non-finite-file-string-nan",
    lambda e: e.cmd("sft", sft(train={"weight_decay": "NaN"})),
    ["recipe.yaml:", "train.weight_decay", "finite number"],
)

# --- --set
case(
    "set-unknown-key",
    lambda e: e.cmd("sft", sft(), "--set", "train.max_step=3"),
    ["(--set train.max_step=3)", "did you mean 'max_steps'"],
)
case(
    "set-unknown-section",
    lambda e: e.cmd("sft", sft(), "--set", "trian.lr=1e-4"),
    ["(--set trian.lr=1e-4)", "trian: unknown field", "did you mean 'train'"],
)
case(
    "set-not-a-section",
    lambda e: e.cmd("sft", sft(), "--set", "train.lr.peak=1"),
    ["--set train.lr.peak=1", "'train.lr' is not a section"],
)
case("set-no-equals", lambda e: e.cmd("sft", sft(), "--set", "train.lr"), ["--set expects key.path=value", "train.lr"])
case("set-empty-key", lambda e: e.cmd("sft", sft(), "--set", "=5"), ["--set expects key.path=value", "'=5'"])
case(
    "set-bad-yaml",
    lambda e: e.cmd("sft", sft(), "--set", "train.adam_betas=[0.9"),
    ["--set train.adam_betas=[0.9", "not valid YAML"],
)
case(
    "set-wrong-type",
    lambda e: e.cmd("sft", sft(), "--set", "train.batch_size=many"),
    ["(--set train.batch_size=many)", "train.batch_size", "valid integer"],
)
case(
    "set-section-to-scalar",
    lambda e: e.cmd("sft", sft(), "--set", "train=5"),
    ["(--set train=5)", "train", "valid dictionary"],
)
case(
    "set-missing-data-file",
    lambda e: e.cmd("sft", sft(), "--set", "data.train.path=./missing.jsonl"),
    ["(--set data.train.path=./missing.jsonl)", "no such file or folder", "missing.jsonl"],
)
case(
    "set-command-mismatch",
    lambda e: e.cmd("sft", sft(), "--set", "command=reward"),
    ["this recipe is for `prefcli reward`, not `prefcli sft`"],
)
case(
    "set-unknown-reward-kind",
    lambda e: e.cmd("rlhf", rlhf(), "--set", "rewards=[{kind: magic}]"),
    ["(--set rewards=[{kind: magic}])", "rewards[0]", "magic"],
)
case(
    "set-adam-betas-short",
    lambda e: e.cmd("sft", sft(), "--set", "train.adam_betas=[0.9]"),
    ["(--set train.adam_betas=[0.9])", "expected 2 values, got 1"],
)
case(
    "set-validate-bad-value",
    lambda e: ["validate", e.recipe(sft()), "--set", "train.epochs=-1"],
    ["(--set train.epochs=-1)", "train.epochs", "greater than 0"],
)

# --- data files
case("data-empty-jsonl", lambda e: sft_file(e, "rows.jsonl", ""), ["rows.jsonl is empty", "data.train.path"])
case("data-whitespace-file", lambda e: sft_file(e, "rows.jsonl", "\n  \n"), ["rows.jsonl is empty", "data.train.path"])
case(  # a ShareGPT speaker prefcli does not read: the row and the field
    "data-sharegpt-unknown-speaker",
    lambda e: sft_rows(e, [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "Hello"}]}]),
    ["rows.jsonl: row 1 (sharegpt)", "'conversations[1].from' is 'bot'", "human"],
)
case(
    "data-alpaca-named-without-its-columns",
    lambda e: sft_rows(e, [{"text": "a verse"}], data={"format": "alpaca"}),
    ["format 'alpaca' needs column(s) instruction, output", "columns: text"],
)
case(
    "data-openai-pairs-without-messages",
    lambda e: pref_rows(e, "contrastive", [{"input": {"messages": []}, "preferred_output": [{"role": "assistant",
        "content": "a"}], "non_preferred_output": [{"role": "assistant", "content": "b"}]}]),
    ["pairs.jsonl: row 1 (openai)", "'input.messages' is an empty list"],
)  # fmt: skip
case(
    "data-not-utf8-jsonl",
    lambda e: sft_file(e, "rows.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n'),
    ["rows.jsonl", "line 2 is not UTF-8", "byte 0xe9", "Save the file as UTF-8"],
)
case(
    "data-not-utf8-csv",
    lambda e: sft_file(e, "rows.csv", b"text\nok\ncaf\xe9\n"),
    ["rows.csv", "line 3 is not UTF-8", "Save the file as UTF-8"],
)
case(
    "data-not-utf8-chat",
    lambda e: sft_file(
        e,
        "rows.jsonl",
        b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "caf\xe9"}]}\n',
    ),
    ["rows.jsonl", "line 1 is not UTF-8"],
)
case(
    "data-bad-json-line",
    lambda e: sft_file(e, "rows.jsonl", '{"text": "a"}\n{"text": \n'),
    ["data.train: could not read file", "rows.jsonl", "line 2 is not valid JSON (Expecting value at column 10)"],
)
case(  # pyarrow's own message: "JSON parse error: ... Trailing data at position 14", no line
    "data-json-line-trailing-text",
    lambda e: sft_file(e, "rows.jsonl", '{"text": "a"}\n{"text": "b"}\n{"text": "c"} and more\n'),
    ["rows.jsonl", "line 3 is not valid JSON (Extra data at column 15)", "one JSON object per line"],
)
case(
    "data-json-document-bad",
    lambda e: sft_file(e, "rows.json", '[\n  {"text": "a"},\n  {"text": "b"} x\n]\n'),
    ["rows.json", "line 3 is not valid JSON", "column 17"],
)
case(  # pyarrow's JSON reader crashed the process (a segmentation fault) on a line nested this deep
    "data-row-nested-too-deep",
    lambda e: sft_file(e, "rows.jsonl", '{"text": "a"}\n{"text": "b", "x": ' + "[" * 200_000 + "]" * 200_000 + "}\n"),
    ["data.train", "rows.jsonl: line 2", "nested 200,001 levels deep", "at most 100 levels"],
)
case(
    "data-row-nested-too-deep-gz",
    lambda e: sft_file(e, "rows.jsonl.gz", __import__("gzip").compress(b'{"x": ' + b"[" * 5000 + b"]" * 5000 + b"}\n")),
    ["rows.jsonl.gz: line 1", "nested 5,001 levels deep", "at most 100 levels"],
)
case("data-json-empty-array", lambda e: sft_file(e, "rows.json", "[]"), ["rows.json", "no rows"])
case("data-json-not-rows", lambda e: sft_file(e, "rows.json", '"just a string"'), ["rows.json", "could not read"])
case("data-csv-header-only", lambda e: sft_file(e, "rows.csv", "text\n"), ["rows.csv", "no rows"])
case(
    "data-csv-wrong-columns",
    lambda e: sft_file(e, "rows.csv", "body,score\nhello,1\n"),
    ["cannot tell the row format", "body, score", "data.train.columns"],
)
case(
    "data-tsv-wrong-columns",
    lambda e: sft_file(e, "rows.tsv", "body\tscore\nhello\t1\n"),
    ["cannot tell the row format", "body, score"],
)
case(
    "data-parquet-garbage",
    lambda e: sft_file(e, "rows.parquet", b"PAR1 this is not parquet"),
    ["rows.parquet", "could not read"],
)
case("data-parquet-no-rows", lambda e: sft_file(e, "rows.parquet", parquet([])), ["rows.parquet", "no rows"])
case(
    "data-parquet-number-text",
    lambda e: sft_file(e, "rows.parquet", parquet([{"text": 1.5}, {"text": 2.5}])),
    ["rows.parquet", "row 1", "'text' is float (1.5)", "expected text"],
)
case(
    "data-gz-not-gzip",
    lambda e: sft_file(e, "rows.jsonl.gz", b'{"text": "not compressed"}\n'),
    ["rows.jsonl.gz", "could not read"],
)
case(
    "data-unknown-extension",
    lambda e: sft_file(e, "rows.xlsx", "text\nhello\n"),
    ["rows.xlsx", "unknown file type", ".jsonl"],
)
case(
    "data-text-is-number",
    lambda e: sft_rows(e, [{"text": 5}] * 4),
    ["data.train", "rows.jsonl", "row 1", "'text' is int (5)", "write it in quotes"],
)
case(
    "data-text-is-null",
    lambda e: sft_rows(e, [{"text": "ok"}, {"text": None}]),
    ["rows.jsonl", "row 2", "empty or missing 'text'", "fill it or remove the row"],
)
case(
    "data-text-is-empty",
    lambda e: sft_rows(e, [{"text": ""}, {"text": "ok"}]),
    ["rows.jsonl", "row 1", "empty or missing 'text'"],
)
case(
    "data-text-is-list",
    lambda e: sft_rows(e, [{"text": ["a", "b"]}]),
    ["rows.jsonl", "row 1", "'text' is a list of str", "expected text"],
)
case(
    "data-prompt-is-number",
    lambda e: sft_rows(e, [{"prompt": 3, "completion": "x"}]),
    ["rows.jsonl", "row 1", "'prompt' is int (3)"],
)
case(
    "data-messages-is-text",
    lambda e: sft_rows(e, [{"messages": "hello"}], data={"format": "messages"}),
    ["rows.jsonl", "row 1", "'messages' is a string", "{role, content}"],
)
case(
    "data-messages-list-of-text",
    lambda e: sft_rows(e, [{"messages": ["hi", "there"]}]),
    ["rows.jsonl", "row 1", "'messages' is a list of str", "{role, content}"],
)
case(
    "data-messages-without-role",
    lambda e: sft_rows(e, [{"messages": [{"text": "hi"}]}]),
    ["rows.jsonl", "row 1", "without 'role' and 'content'"],
)
case(
    "data-no-known-columns",
    lambda e: sft_rows(e, [{"question": "a"}]),
    ["cannot tell the row format", "question", "data.train.columns"],
)
case(
    "data-columns-map-to-missing",
    lambda e: e.cmd("sft", sft(data={"train": {"path": str(TINY / "text.jsonl"), "columns": {"text": "body"}}})),
    ["maps 'text' to column 'body'", "text.jsonl", "columns: text"],
)
case(
    "data-format-needs-columns",
    lambda e: sft_rows(e, text_rows(), data={"format": "prompt_completion"}),
    ["format 'prompt_completion' needs column(s) prompt, completion", "rows.jsonl"],
)
case(
    "data-eval-missing-column",
    lambda e: e.cmd(
        "sft",
        sft(data={"train": {"path": str(TINY / "text.jsonl")}, "eval": {"path": e.rows("ev.jsonl", [{"body": "x"}])}}),
    ),
    ["data.eval", "ev.jsonl", "missing column(s) text"],
)
case(
    "data-eval-fraction-leaves-nothing",
    lambda e: sft_rows(e, text_rows(1), data={"eval_fraction": 0.5}),
    ["data.eval_fraction 0.5 leaves no training rows", "1 rows"],
)
case(
    "data-max-length-leaves-no-target",
    lambda e: e.cmd(
        "sft", sft(data={"max_length": 2, "train": {"path": str(TINY / "prompt_completion.jsonl"), "max_rows": 4}})
    ),
    ["no example has a token to train on", "max_length=2"],
)
case(
    "data-folder-empty",
    lambda e: (
        e.write("folder/.keep", "")
        and e.cmd("sft", deep_update(sft(), {"data": {"train": {"path": str(e.p("folder"))}}}))
    ),
    ["folder is a folder without data files", "save_to_disk", "point data.train.path at a data file"],
)
case(
    "data-saved-dataset-wrong-split",
    saved_dataset(text_rows(), split="validation"),
    ["saved", "has no split 'train'", "validation"],
)
case("data-saved-dataset-number-text", saved_dataset([{"text": 7}] * 3), ["saved", "row 1", "'text' is int (7)"])
case(
    "data-max-rows-zero",
    lambda e: e.cmd("sft", sft(data={"train": {"path": str(TINY / "text.jsonl"), "max_rows": 0}})),
    ["data.train.max_rows", "greater than 0"],
)
case(
    "pref-missing-rejected",
    lambda e: pref_rows(e, "contrastive", [{"prompt": "p", "chosen": "a"}] * 4),
    ["pairs.jsonl", "missing column(s) rejected", "columns"],
)
case(
    "pref-chosen-is-a-list",
    lambda e: pref_rows(e, "contrastive", [{"prompt": "p", "chosen": ["a"], "rejected": "b"}] * 4),
    ["pairs.jsonl", "row 1", "'prompt' is a string, 'chosen' is a list of str", "fix the row"],
)
case(
    "pref-chat-without-role",
    lambda e: pref_rows(e, "contrastive", [{"chosen": [{"text": "a"}], "rejected": [{"text": "b"}]}] * 4),
    ["pairs.jsonl", "row 1", "without 'role' and 'content'"],
)
case(
    "pref-all-identical",
    lambda e: pref_rows(e, "contrastive", [{"prompt": "p", "chosen": " a", "rejected": " a"}] * 4),
    ["pairs.jsonl", "no usable row left of 4", "chosen identical to rejected"],
)
case(
    "pref-all-empty-chosen",
    lambda e: pref_rows(e, "contrastive", [{"prompt": "p", "chosen": "   ", "rejected": " b"}] * 4),
    ["pairs.jsonl", "no usable row left", "missing or empty"],
)
case(
    "pref-chosen-is-number",
    lambda e: pref_rows(e, "reward", [{"prompt": "p", "chosen": 1, "rejected": "b"}] * 4),
    ["pairs.jsonl", "row 1", "'chosen' is int (1)"],
)
case(
    "pref-kto-missing-label",
    lambda e: pref_rows(e, "contrastive", [{"prompt": "p", "completion": "c"}] * 4, contrastive={"objective": "kto"}),
    ["pairs.jsonl", "missing column(s) label"],
)
case(
    "pref-regression-missing-score",
    lambda e: pref_rows(e, "reward", text_rows(4), reward={"objective": "regression"}),
    ["pairs.jsonl", "score"],
)
case(
    "pref-ranking-missing-completions",
    lambda e: pref_rows(e, "reward", pairs(4), reward={"objective": "ranking"}),
    ["pairs.jsonl", "completions"],
)
case(
    "pref-eval-file-empty",
    lambda e: e.cmd("contrastive", pref("contrastive", data={"eval": {"path": e.write("ev.jsonl", "")}})),
    ["data.eval", "ev.jsonl is empty"],
)
case(
    "rlhf-prompts-missing-column",
    lambda e: e.cmd("rlhf", rlhf(data={"train": {"path": e.rows("p.jsonl", [{"question": "a"}] * 4)}})),
    ["data.train", "p.jsonl", "need a 'prompt' or 'messages' column", "data.train.columns"],
)
case(
    "rlhf-prompts-empty-file",
    lambda e: e.cmd("rlhf", rlhf(data={"train": {"path": e.write("p.jsonl", "")}})),
    ["p.jsonl is empty"],
)
case(
    "rlhf-prompts-not-utf8",
    lambda e: e.cmd("rlhf", rlhf(data={"train": {"path": e.write("p.jsonl", b'{"prompt": "\xff"}\n')}})),
    ["p.jsonl", "line 1 is not UTF-8"],
)
case(
    "gan-missing-completion",
    lambda e: e.cmd("gan", gan(data={"train": {"path": str(TINY / "prompts.jsonl")}})),
    ["prompts.jsonl", "completion"],
)

# --- model folders
case(
    "model-folder-empty",
    lambda e: (
        e.write("empty/.keep", "")
        and e.cmd("sft", deep_update(sft(), {"model": {"path": str(e.p("empty")), "init": None}}))
    ),
    ["could not load the model", "empty", "check that it is a Hugging Face model folder"],
)
case(
    "model-config-not-json",
    lambda e: sft_model(e, overwrite_file("config.json", b"{not json")),
    ["could not load the tokenizer", "model/config.json", "not a valid JSON", "point model.tokenizer"],
)
case(
    "model-safetensors-truncated",
    lambda e: sft_model(e, truncate("model.safetensors")),
    ["could not load the model", "weights file is damaged", "save or download the model again"],
)
case(
    "model-safetensors-garbage",
    lambda e: sft_model(e, overwrite_file("model.safetensors", b"\x00" * 64)),
    ["could not load the model", "weights file is damaged"],
)
case(
    "model-safetensors-missing",
    lambda e: sft_model(e, remove("model.safetensors")),
    ["could not load the model", "model"],
)
case(
    "model-tokenizer-json-garbage",
    lambda e: sft_model(e, overwrite_file("tokenizer.json", b"{]")),
    ["could not load the tokenizer", "model"],
)
case("model-tokenizer-without-pad", lambda e: sft_model(e, lambda r: _drop_pad(r)), ["has no pad token", "pad_token"])
case(
    "model-gpt2-positions-too-few",
    lambda e: e.cmd("sft", replace_init(sft(data={"packing": True}), "gpt2", n_positions=16, num_attention_heads=4)),
    ["data.max_length (48) exceeds the 16 positions", "lower data.max_length to at most 16"],
)
case(
    "model-heads-do-not-divide",
    lambda e: e.cmd("sft", sft(model={"init": {"config": {"hidden_size": 30}}})),
    ["model.init.config (qwen2): hidden_size (30) is not a multiple of num_attention_heads (4)", "change one"],
)
case(
    "model-path-is-a-file",
    lambda e: e.cmd("sft", deep_update(sft(), {"model": {"path": str(TINY / "text.jsonl"), "init": None}})),
    ["text.jsonl", "could not load"],
)


def _set_config(**kw) -> Callable[[Path], None]:
    """Damage for model_dir: keys added to config.json."""

    def f(root: Path) -> None:
        cfg = json.loads((root / "config.json").read_text())
        cfg.update(kw)
        (root / "config.json").write_text(json.dumps(cfg))

    return f


def family_dir(e: Env, arch: str, **config) -> str:
    """A tiny random model folder of another family (with the bundled tokenizer) in the case folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    dims = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    cfg = AutoConfig.for_model(arch, vocab_size=len(tok), pad_token_id=tok.pad_token_id, **dims, **config)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(e.p(arch))
    tok.save_pretrained(e.p(arch))
    return str(e.p(arch))


def _remote_code_dir(root: Path) -> None:
    """A model folder whose architecture lives in its own code (config auto_map), as hub repos ship it."""
    cfg = json.loads((root / "config.json").read_text())
    cfg.update(model_type="prefcli_custom", auto_map={"AutoConfig": "modeling_custom.CustomConfig",
                                                      "AutoModelForCausalLM": "modeling_custom.CustomLM"})  # fmt: skip
    (root / "config.json").write_text(json.dumps(cfg))
    (root / "modeling_custom.py").write_text("raise RuntimeError('remote code ran')\n")


# --- model families and the start-up guard (docs/families.md)
case(
    "guard-kernel-differs-from-the-model",  # a logit scale prefcli believes in (config) that the model ignores
    lambda e: sft_model(e, _set_config(logits_scaling=4.0)),
    ["qwen2: prefcli's log-prob kernel differs from the model's own forward", "nats", "first batch",
     "model.on_mismatch: fallback"],
)  # fmt: skip
case(
    "model-attn-implementation-unsupported",  # transformers refuses sdpa for Gemma 2 (soft-capped scores)
    lambda e: e.cmd("sft", deep_update(sft(), {"model": {"path": family_dir(e, "gemma2", head_dim=8), "init": None,
                                                          "attn_implementation": "sdpa"}})),
    ["could not load the model", "model.attn_implementation", "leave it unset"],
)  # fmt: skip
case(
    "generate-remote-code-not-trusted",
    lambda e: ["generate", model_dir(e, _remote_code_dir), "-p", e.write("p.txt", "hi\n")],
    ["its own", "--trust-remote-code"],
    json_on_stdout=False,
)


def _drop_pad(root: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(root)
    tok.pad_token = None
    tok.save_pretrained(root)


# --- reward sources
case(
    "reward-model-not-a-model",
    lambda e: e.cmd("rlhf", rlhf(rewards=[{"kind": "model", "path": str(TOKENIZER)}])),
    ["rewards: could not load the reward model", "tokenizer"],
)
case(
    "reward-model-damaged",
    lambda e: e.cmd("rlhf", rlhf(rewards=[{"kind": "model", "path": model_dir(e, truncate("model.safetensors"))}])),
    ["rewards: could not load the reward model", "weights file is damaged"],
)
case(
    "reward-function-no-colon",
    with_reward({"kind": "function", "function": "rules"}),
    ["rewards[0].function", "must look like 'module:function'"],
)
case(
    "reward-function-file-missing",
    with_reward({"kind": "function", "function": "nope.py:score"}),
    ["rewards[0].function", "no such file", "nope.py"],
)
case(
    "reward-function-import-fails",
    lambda e: (
        e.write("bad.py", "raise RuntimeError('broken on import')\n")
        and e.cmd("rlhf", rlhf(rewards=[{"kind": "function", "function": "bad.py:score"}]))
    ),
    ["{dir}/bad.py:score'", "importing", "RuntimeError: broken on import", "shows the traceback"],
)
case(
    "reward-function-syntax-error",
    lambda e: (
        e.write("syn.py", "def score(:\n")
        and e.cmd("rlhf", rlhf(rewards=[{"kind": "function", "function": "syn.py:score"}]))
    ),
    ["{dir}/syn.py:score'", "SyntaxError", "shows the traceback"],
)
case(  # sys.exit at import ended the run with the module's exit code and no JSON object
    "reward-function-exits-on-import",
    lambda e: (
        e.write("quits.py", "import sys\nsys.exit(0)\ndef score(p, c):\n    return [0.0] * len(c)\n")
        and e.cmd("rlhf", rlhf(rewards=[{"kind": "function", "function": "quits.py:score"}]))
    ),
    ["reward function '{dir}/quits.py:score': importing {dir}/quits.py called sys.exit(0)", "remove the exit"],
)
case(
    "reward-function-missing-name",
    lambda e: (
        e.write("ok.py", "def other(p, c):\n    return [0.0] * len(c)\n")
        and e.cmd("rlhf", rlhf(rewards=[{"kind": "function", "function": "ok.py:score"}]))
    ),
    ["{dir}/ok.py:score'", "has no callable 'score'", "check the name after the colon"],
)
case(
    "reward-function-module-missing",
    with_reward({"kind": "function", "function": "no_such_module_xyz:score"}),
    ["reward function 'no_such_module_xyz:score'", "ModuleNotFoundError", "shows the traceback"],
)
case("reward-kind-unknown", with_reward({"kind": "magic"}), ["rewards[0]", "'magic'"])
case("reward-length-target-zero", with_reward({"kind": "length", "target": 0}), ["rewards[0].target", "greater than 0"])
case("reward-keyword-empty", with_reward({"kind": "keyword"}), ["rewards[0]", "give keywords, regex, or both"])
case(
    "reward-keyword-bad-regex",
    with_reward({"kind": "keyword", "regex": "(unclosed"}),
    ["rewards[0]", "regex does not compile"],
)
case(
    "reward-sentiment-target-typo",
    with_reward({"kind": "sentiment", "target": "postive"}),
    ["rewards[0].target", "did you mean 'positive'"],
)
case(
    "reward-human-scores-missing-file",
    with_reward({"kind": "human_scores", "path": "scores.jsonl"}),
    ["rewards[0].path: no such file or folder", "scores.jsonl"],
)
case(
    "reward-human-scores-missing-column",
    lambda e: e.cmd(
        "rlhf",
        rlhf(rewards=[{"kind": "human_scores", "path": e.rows("s.jsonl", [{"prompt": "p", "completion": "c"}])}]),
    ),
    ["human_scores", "s.jsonl", "missing column(s) score"],
)
case(
    "reward-human-scores-not-a-number",
    lambda e: e.cmd(
        "rlhf",
        rlhf(
            rewards=[
                {
                    "kind": "human_scores",
                    "path": e.rows("s.jsonl", [{"prompt": "p", "completion": "c", "score": "high"}]),
                }
            ]
        ),
    ),
    ["human_scores", "s.jsonl", "row 1", "score 'high' is not a number"],
)
case(
    "reward-human-scores-empty",
    lambda e: e.cmd("rlhf", rlhf(rewards=[{"kind": "human_scores", "path": e.write("s.jsonl", "")}])),
    ["human_scores", "s.jsonl is empty"],
)
case(
    "reward-sft-scorer-missing-column",
    lambda e: e.cmd(
        "sft",
        sft(
            data={"train": {"path": str(TINY / "text.jsonl"), "max_rows": 8}},
            sft={"objective": "filter", "score_column": "rating"},
        ),
    ),
    ["rating"],
)

# --- output folders
case(
    "output-holds-another-run",
    lambda e: e.cmd("sft", sft()),
    ["holds another run", "--resume", "--overwrite", "--output-dir"],
    setup=Env.finished_run,
)
case(
    "output-in-use",
    lambda e: e.cmd("sft", sft(), "--overwrite"),
    ["is in use by another prefcli run", "pid", "--output-dir"],
    setup=lambda e: _hold_lock(e),
)
case(
    "output-in-use-resume",
    resume_with(),
    ["is in use by another prefcli run"],
    setup=lambda e: (e.finished_run(), _hold_lock(e)),
)
case(
    "output-is-a-file",
    lambda e: ["sft", e.recipe(sft()), "-o", e.write("afile", "x")],
    ["exists and is not a folder", "--output-dir"],
)
case(
    "output-parent-is-a-file",
    lambda e: ["sft", e.recipe(sft()), "-o", str(Path(e.write("afile", "x")) / "run")],
    ["afile is not a folder", "--output-dir"],
)
case(
    "resume-empty-folder",
    lambda e: e.run.mkdir() or e.cmd("sft", sft(), "--resume"),
    ["--resume: no checkpoint", "save_every_steps"],
)
case(
    "resume-missing-folder", lambda e: e.cmd("sft", sft(), "--resume"), ["--resume: no checkpoint", "save_every_steps"]
)
case(
    "resume-run-without-checkpoints",
    lambda e: e.cmd("sft", sft(), "--resume"),
    ["--resume: no checkpoint"],
    setup=lambda e: (e.finished_run(), shutil.rmtree(e.run / "checkpoints")),
)

# --- resume states (./run: a finished 2-step run with checkpoints step-1 and step-2)
case(
    "resume-all-truncated",
    resume_with(),
    ["no complete checkpoint", f"step-2: {MODEL_FILE} has", "step-1:", "--overwrite"],
    setup=damage_checkpoints(1, 2, how=truncate(MODEL_FILE)),
)
case(
    "resume-all-unmarked",
    resume_with(),
    ["no complete checkpoint", "complete.json", "never completed"],
    setup=damage_checkpoints(1, 2, how=remove("complete.json")),
)
case(
    "resume-all-state-corrupt",
    resume_with(),
    ["no complete checkpoint", "state.json"],
    setup=damage_checkpoints(1, 2, how=overwrite_file("state.json", b"{")),
)
case(
    "resume-all-optimizer-missing",
    resume_with(),
    ["no complete checkpoint", f"{OPTIM_FILE} is missing"],
    setup=damage_checkpoints(1, 2, how=remove(OPTIM_FILE)),
)
case(
    "resume-all-marker-garbage",
    resume_with(),
    ["no complete checkpoint", "complete.json is damaged"],
    setup=damage_checkpoints(1, 2, how=overwrite_file("complete.json", b"\x00\x01")),
)
case(
    "resume-changed-model-shape",
    resume_with(model={"init": {"config": {"hidden_size": 64}}}),
    ["--resume", "step-2 does not fit this recipe", "the run folder's recipe.yaml"],
    setup=Env.finished_run,
)
case(
    "resume-added-lora",
    resume_with(model={"lora": {"r": 4}}),
    ["--resume", "does not match the model 'policy'", "LoRA settings changed", "recipe.yaml"],
    setup=Env.finished_run,
)
case(
    "resume-other-command",
    lambda e: e.cmd("contrastive", pref("contrastive"), "--resume"),
    ["holds a `prefcli sft` run", "`prefcli sft --resume`"],
    setup=Env.finished_run,
)
case(
    "resume-other-architecture",
    resume_with(model={"init": {"architecture": "llama", "config": {"num_key_value_heads": 2}}}),
    ["--resume", "does not match the model 'policy'", "recipe.yaml"],
    setup=Env.finished_run,
)


# --- limits: inputs that asked for unbounded work (recipe/bounded.py, engine/datacheck.py MAX_ROW_DEPTH)
BOMB = "command: sft\n" + "".join(
    f"{c}: &{c} [{', '.join([f'*{p}'] * 9 if p else ['x'] * 9)}]\n" for p, c in zip(["", *"abcdef"], "abcdefg")
)  # 1 KB of aliases that stand for 9^7 = 4.8 million values
case(
    "limit-yaml-alias-bomb",
    lambda e: ["validate", e.write("r.yaml", BOMB)],
    ["r.yaml:", "aliases expand to more than 100,000 values", "prefcli's limit", "use fewer aliases"],
)
case(
    "limit-yaml-self-referencing-alias",
    lambda e: ["sft", e.write("r.yaml", "command: sft\nx: &r [1, *r]\n")],
    ["r.yaml:2", "x[1]: an alias that contains itself"],
)
case(
    "limit-yaml-nested-too-deep",
    lambda e: ["validate", e.write("r.yaml", "command: sft\nx: " + "[" * 100 + "]" * 100 + "\n")],
    ["r.yaml:2", "nested deeper than 64 levels"],
)
case(  # past PyYAML's own stack: its composer recursed until RecursionError
    "limit-yaml-nested-past-the-parser",
    lambda e: ["validate", e.write("r.yaml", "command: sft\nx: " + "[" * 700 + "]" * 700 + "\n")],
    ["r.yaml", "nested deeper than 64 levels"],
)
case(
    "limit-recipe-dev-zero",
    lambda e: ["validate", "/dev/zero"],
    ["/dev/zero", "larger than 1,048,576 bytes (not a regular file)", "prefcli's limit for a recipe"],
)
case(
    "limit-recipe-too-large",
    lambda e: ["sft", e.write("r.yaml", "command: sft\n" + "# padding\n" * 120_000)],
    ["r.yaml", "larger than 1,048,576 bytes", "check that this is the recipe you meant"],
)
case(
    "limit-set-key-too-deep",
    lambda e: e.cmd("sft", sft(), "--set", ".".join(["a"] * 3000) + "=1"),
    ["--set a.a.a", "the key has 3,000 parts", "at most 64 levels"],
)
case(
    "limit-set-value-self-referencing",
    lambda e: e.cmd("sft", sft(), "--set", "train.x=&r [1, *r]"),
    ["--set train.x=&r [1, *r]", "an alias that contains itself"],
)
case(
    "limit-set-value-nested-too-deep",
    lambda e: e.cmd("sft", sft(), "--set", "train.x=" + "[" * 700),
    ["--set train.x=[[[", "nested deeper than 64 levels"],
)
case(
    "limit-stdin-row-nested-too-deep",
    lambda e: ["eval", e.recipe(completions_recipe()), "--completions", "-"],
    ["data.completions: <stdin>:1", "nested 3,001 levels deep", "at most 100 levels"],
    stdin=b'{"prompt": "p", "completion": "c", "x": ' + b"[" * 3000 + b"]" * 3000 + b"}\n",
)


def completions_recipe() -> dict:
    return {
        "command": "eval",
        "models": [{"name": "m", "init": tiny_init(), "tokenizer": str(TOKENIZER)}],
        "data": {"completions": {"path": "-"}},
        "metrics": ["length"],
    }


# --- stdin is named stdin, and fails like a file
case(
    "eval-completions-stdin-not-utf8",
    lambda e: ["eval", e.recipe(completions_recipe()), "--completions", "-"],
    ["data.completions: <stdin>:2", "not UTF-8 text (byte 0xe9 at column 35)", "save the input as UTF-8"],
    stdin=b'{"prompt": "p", "completion": "c"}\n{"prompt": "p", "completion": "caf\xe9"}\n',
)
case(
    "eval-completions-stdin-mixed-types",
    lambda e: ["eval", e.recipe(completions_recipe()), "--completions", "-"],
    ["data.completions: could not read the rows on stdin", "values of one type"],
    stdin=b'{"prompt": "p", "completion": "c"}\n{"prompt": "p", "completion": 5}\n',
)
case(
    "eval-completions-stdin-missing-column",
    lambda e: ["eval", e.recipe(completions_recipe()), "--completions", "-"],
    ["data.completions: stdin: missing column(s) completion"],
    stdin=b'{"prompt": "p"}\n',
)
case(
    "generate-stdin-not-utf8",
    lambda e: ["generate", model_dir(e), "-q"],
    ["<stdin>:2: not UTF-8 text (byte 0xe9 at column 4)", "save the input as UTF-8"],
    json_on_stdout=False,
    stdin=b"\ncaf\xe9\n",
)
case(
    "generate-file-not-utf8",
    lambda e: ["generate", model_dir(e), "-q", "--prompts", e.write("p.txt", b"\ncaf\xe9\n")],
    ["p.txt:2: not UTF-8 text (byte 0xe9 at column 4)", "save the input as UTF-8"],
    json_on_stdout=False,
)
case(
    "generate-prompt-past-learned-positions",
    lambda e: ["generate", gpt2_dir(e, 16), "-q", "--prompts", e.write("p.txt", "word " * 40 + "\n")],
    ["the prompt 'word word", "exceeds the 16 positions", "shorten the prompt or lower max_new_tokens"],
    json_on_stdout=False,
)


def gpt2_dir(e: Env, positions: int) -> str:
    """A tiny GPT-2 (a learned position table of `positions`) with the bundled tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    cfg = AutoConfig.for_model(
        "gpt2", n_embd=32, n_layer=1, n_head=4, n_positions=positions, vocab_size=len(tok),
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    out = e.p("gpt2")
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


# --- a model folder without tokenizer files: transformers 5 builds a one-token tokenizer from config.json
def _drop_tokenizer(root: Path) -> None:
    for p in root.iterdir():
        if p.name not in ("config.json", "model.safetensors", "generation_config.json"):
            p.unlink()


case(
    "tokenizer-degenerate-sft",
    lambda e: sft_model(e, _drop_tokenizer),
    ["the tokenizer from local folder {dir}/model is empty (1 token", "no tokenizer files", "point model.tokenizer"],
)
case(
    "tokenizer-degenerate-generate",
    lambda e: ["generate", model_dir(e, _drop_tokenizer), "-q"],
    ["the tokenizer from local folder {dir}/model is empty", "no tokenizer files"],
    json_on_stdout=False,
    stdin=b"And the LORD\n",
)
case(
    "tokenizer-degenerate-explain",
    lambda e: [
        "explain",
        model_dir(e, _drop_tokenizer),
        "--reference",
        e.shared["model"],
        "--text",
        "hi",
        "-q",
    ],  # fmt: skip
    ["the tokenizer from local folder {dir}/model is empty", "no tokenizer files"],
)
case(
    "tokenizer-degenerate-reward-model",
    lambda e: e.cmd("rlhf", rlhf(rewards=[{"kind": "model", "path": model_dir(e, _drop_tokenizer)}])),
    ["rewards", "the tokenizer from local folder {dir}/model is empty"],
)

# --- exit 2, not 1
case(
    "output-symlink-loop",
    lambda e: ["sft", e.recipe(sft()), "-o", e.p("loop"), "-q"],
    ["--output-dir", "a symlink loop", "remove the link or choose another"],
    setup=lambda e: (e.p("loop").symlink_to(e.p("loop2")), e.p("loop2").symlink_to(e.p("loop"))),
)
case(
    "output-name-too-long",
    lambda e: ["sft", e.recipe(sft()), "-o", e.p("x" * 300), "-q"],
    ["--output-dir", "is 300 bytes, longer than the 255 bytes", "NAME_MAX"],
)
case(
    "recipe-output-dir-name-too-long",
    lambda e: e.cmd("sft", sft(output={"dir": str(e.p("y" * 300))})),
    ["output.dir", "NAME_MAX"],
)
case(
    "recipe-seed-past-64-bits",
    lambda e: e.cmd("sft", sft(train={"seed": 2**64})),
    ["train.seed", "less than or equal to 4294967295"],
)
case(
    "recipe-seed-negative",
    lambda e: e.cmd("sft", sft(train={"seed": -1})),
    ["train.seed", "greater than or equal to 0"],
)
case(
    "usage-generate-seed-past-64-bits",
    lambda e: ["generate", str(TINY), "--seed", str(2**64)],
    ["Invalid value for '--seed'", "4294967295"],
    json_on_stdout=False,
)
case(
    "recipe-chat-template-sandbox-escape",
    lambda e: e.cmd("sft", sft(model={"chat_template": "{{ ''.__class__.__mro__[1].__subclasses__() }}"})),
    ["model.chat_template", "Jinja's sandbox forbids", "__class__"],
)
case(
    "recipe-chat-template-not-jinja",
    lambda e: e.cmd("sft", sft(model={"chat_template": "{% for m in messages %}{{ m.content "})),
    ["model.chat_template: not a valid Jinja template", "template line 1"],
)
case(
    "plot-metrics-not-utf8",
    lambda e: (
        e.write("r/metrics.jsonl", b'{"step": 1, "loss/sft": 1.0}\n{"step": 2, "x": "caf\xe9"}\n')
        and ["plot", e.p("r")]
    ),
    ["r/metrics.jsonl:2: not UTF-8 text (byte 0xe9", "damaged or is not a metrics file"],
)


# --- prefcli label serve and its commands (tests/label_tasks.py: the tiny task). serve checks everything before it
# listens or writes: a case that failed to fail would serve forever, so each names a port nobody uses.
def label_task(e: Env, name: str = "task.yaml", **upd) -> str:
    from .label_tasks import task_dict

    d = task_dict(**upd)
    d.setdefault("server", {})["port"] = 0
    return e.recipe(d, name)


def label_items(e: Env, rows: list, **upd) -> str:
    return label_task(e, items={"path": e.rows("items.jsonl", rows)}, **upd)


def _label_store(e: Env, **upd) -> None:
    """The task's store, made by `invite` (as for another task when `upd` changes its items)."""
    from .label_tasks import make_task

    other = make_task(e.dir / "other", **upd)
    code, out, err = invoke(["label", "invite", other, "--rater", "ann"])
    assert code == 0, err
    shutil.move(str(e.dir / "other" / "task.db"), e.p("task.db"))
    shutil.rmtree(e.dir / "other")


class _Held:
    """Something the case holds until its end (the env fixture calls release())."""

    def __init__(self, *things):
        self.things = things

    def release(self) -> None:
        for t in self.things:
            t.close()


def _port_in_use(e: Env) -> None:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    e.shared["port"] = s.getsockname()[1]
    e.shared.setdefault("locks", []).append(_Held(s))


def _store_locked(e: Env) -> None:
    """Another process's transaction holds the store (SQLite locks it for writing)."""
    import sqlite3

    _label_store(e)
    c = sqlite3.connect(e.p("task.db"), isolation_level=None)
    c.execute("BEGIN EXCLUSIVE")
    e.shared.setdefault("locks", []).append(_Held(c))


def _store_served(e: Env) -> None:
    """Another `prefcli label serve` holds the store."""
    import fcntl

    _label_store(e)
    f = open(e.p("task.db"), "rb")  # noqa: SIM115 - held until the case ends
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    e.shared.setdefault("locks", []).append(_Held(f))


case(
    "label-task-unknown-key",
    lambda e: ["label", "serve", label_task(e, colour="red")],
    ["task.yaml", "colour: unknown field"],
)
case(
    "label-task-no-items",
    lambda e: ["label", "serve", label_task(e, items={"path": None})],
    ["items", "set exactly one of path (item files) and model"],
)
case(
    "label-items-without-completions",
    lambda e: ["label", "serve", label_items(e, [{"prompt": "p", "answer": "x"}])],
    ["items.jsonl:1", "no completions", "'completions' (a list)", "the row has: answer, prompt"],
)
case(
    "label-items-without-prompt",
    lambda e: ["label", "serve", label_items(e, [{"text": "p", "completions": ["a", "b"]}])],
    ["items.jsonl:1", "expected an object with a 'prompt' string"],
)
case(
    "label-items-pair-of-three",
    lambda e: ["label", "serve", label_items(e, [{"prompt": "p", "completions": ["a", "b", "c"]}])],
    ["items.jsonl:1", "a pair needs exactly 2 completions, got 3"],
)
case(
    "label-items-repeated",
    lambda e: ["label", "serve", label_items(e, [{"prompt": "p", "completions": ["a", "b"]}] * 2)],
    ["items.jsonl:2", "the same item as", "items.jsonl:1"],
)
case(
    "label-gold-without-answer",
    lambda e: [
        "label",
        "serve",
        label_task(e, gold={"path": e.rows("gold.jsonl", [{"prompt": "g", "completions": ["a", "b"]}])}),
    ],
    ["gold.jsonl:1", "a gold item needs a 'gold' answer"],
)
case(
    "label-gold-bad-answer",
    lambda e: [
        "label",
        "serve",
        label_task(e, gold={"path": e.rows("gold.jsonl", [{"prompt": "g", "completions": ["a", "b"], "gold": 2}])}),
    ],
    ["gold.jsonl:1", "gold: expected 0 or 1", "got 2"],
)
case(
    "label-port-in-use",
    lambda e: ["label", "serve", label_task(e), "--port", str(e.shared["port"])],
    ["port", "on 127.0.0.1 is in use", "--port"],
    setup=_port_in_use,
)
case(
    "label-store-of-another-task",
    lambda e: ["label", "serve", label_task(e)],
    ["task.db was made for another task", "nothing was changed"],
    setup=lambda e: _label_store(e, mode="rate", gold=None),
)
case(
    "label-store-other-items",
    lambda e: ["label", "serve", label_items(e, [{"prompt": "p", "completions": ["a", "b"]}], gold=None)],
    ["task.db was made for another task", "13 of its 13 items are not in this task's items"],
    setup=lambda e: _label_store(e, gold=None),
)
case(
    "label-store-not-a-store",
    lambda e: ["label", "serve", label_task(e)],
    ["task.db is not a prefcli labelling store", "move it aside"],
    setup=lambda e: e.write("task.db", "these are notes, not a database\n" * 100),
)
case(
    "label-store-locked",
    lambda e: ["label", "serve", label_task(e)],
    ["task.db is locked by another process", "nothing was changed"],
    setup=_store_locked,
)
case(
    "label-store-served",
    lambda e: ["label", "serve", label_task(e)],
    ["task.db is in use by another `prefcli label serve`"],
    setup=_store_served,
)
case("label-stats-before-serving", lambda e: ["label", "stats", label_task(e)], ["no store yet", "task.db"])
case(
    "label-export-to-a-folder",
    lambda e: ["label", "export", label_task(e), "-o", str(e.dir)],
    ["is a folder; give a .jsonl file name"],
    setup=_label_store,
)
case("label-invite-nobody", lambda e: ["label", "invite", label_task(e)], ["give --rater NAME", "--owner"])
case("label-serve-without-task", lambda e: ["label", "serve"], ["Missing argument"])


def _hold_lock(e: Env) -> None:
    """Another live prefcli run holds the folder: this process takes its lock (released at the case's end)."""
    from prefcli.engine.runfolder import RunLock

    lock = RunLock(e.run)
    lock.acquire()
    e.shared.setdefault("locks", []).append(lock)


# --- accepted with a warning (code 0): the run trains, and says what it noticed
WARNED: list[Case] = []


def warned(id: str, argv, says, setup=None) -> None:
    WARNED.append(Case(id, argv, tuple(says), 0, setup))


warned(
    "warn-whitespace-texts",
    lambda e: sft_rows(e, [{"text": "   "}] * 3 + text_rows(5)),
    ["data.train", "rows.jsonl", "3 rows hold only whitespace", "row 1", "remove them"],
)
warned(
    "warn-batch-larger-than-data",
    lambda e: sft_rows(e, text_rows(6), train={"batch_size": 1000000000000}),
    ["train.batch_size", "1000000000000 is more than the 6 training examples", "Lower train.batch_size"],
)
warned(
    "warn-resume-skips-damaged",
    resume_with(train={"max_steps": 3}),
    ["--resume: skipped", "step-2", f"{MODEL_FILE} has", "resuming from step-1"],
    setup=damage_checkpoints(2, how=truncate(MODEL_FILE)),
)
warned(
    "warn-pairs-skipped",
    lambda e: pref_rows(e, "contrastive", pairs(6) + [{"prompt": "p", "chosen": " same", "rejected": " same"}] * 2),
    ["pairs.jsonl", "skipped 2 of 8 rows", "chosen identical to rejected"],
)
warned(
    "warn-guard-fallback-to-the-models-own-forward",
    lambda e: e.cmd(
        "sft",
        deep_update(
            sft(),
            {"model": {"path": model_dir(e, _set_config(logits_scaling=4.0)), "init": None, "on_mismatch": "fallback"}},
        ),
    ),
    ["qwen2: prefcli's log-prob kernel differs", "model.on_mismatch is fallback", "the model's own forward"],
)
warned(
    "warn-truncated-rows",
    lambda e: sft_rows(e, [{"text": "word " * 200}] + text_rows(3), data={"max_length": 16}),
    ["data.train", "1 of 4 examples were longer than max_length=16", "truncated"],
)


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def shared(tmp_path_factory, tiny_model_dir) -> dict:
    """A finished 2-step sft run with checkpoints (resume states), and the tiny model folder."""
    root = tmp_path_factory.mktemp("bad-inputs-shared")
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(run_recipe(), sort_keys=False))
    code, out, err = invoke(["sft", recipe, "-o", root / "run", "-q"])
    assert code == 0, err
    return {"run": root / "run", "model": tiny_model_dir, "locks": []}


@pytest.fixture
def env(tmp_path, shared, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths in --set resolve here; nothing lands in the repository
    yield Env(tmp_path, shared)
    for lock in shared.pop("locks", []):
        lock.release()
    shared["locks"] = []


# ------------------------------------------------------------------------------------------- tests


def test_the_table_is_large_and_distinct():
    ids = [c.id for c in CASES + WARNED]
    assert len(ids) == len(set(ids))
    assert len(CASES) + len(WARNED) >= 150


def _check_message(c: Case, text: str, env: Env) -> None:
    for s in c.says:
        assert s.replace("{dir}", str(env.dir)) in text, f"{c.id}: {s!r} not in:\n{text}"


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_bad_input(c: Case, env: Env):
    if c.setup is not None:
        c.setup(env)
    argv = c.argv(env)
    before = snapshot(env.dir)
    code, out, err = invoke(argv, c.stdin)
    assert code == c.code, f"{c.id}: exit {code}\nstdout: {out}\nstderr: {err}"
    assert "Traceback" not in err, err
    lines = [x for x in out.splitlines() if x.strip()]
    if c.json_on_stdout:
        assert len(lines) == 1, f"{c.id}: stdout should be one JSON object, got:\n{out}"
        obj = json.loads(lines[-1])
        assert obj["status"] == ("invalid" if c.code == 2 else "failed") and obj["exit_code"] == c.code, obj
        message = obj.get("error") or json.dumps(obj.get("recipes"))
        assert message, obj
        _check_message(c, message, env)
    else:
        assert not lines, f"{c.id}: stdout is data only: {out}"
        _check_message(c, err, env)
    assert err.strip(), f"{c.id}: nothing on stderr for the person at the terminal"
    assert snapshot(env.dir) == before, f"{c.id}: the case's folder changed"


@pytest.mark.slow
@pytest.mark.parametrize("c", WARNED, ids=[c.id for c in WARNED])
def test_accepted_with_a_warning(c: Case, env: Env):
    if c.setup is not None:
        c.setup(env)
    code, out, err = invoke(c.argv(env))
    assert code == 0, f"{c.id}: exit {code}\nstdout: {out}\nstderr: {err}"
    assert "Traceback" not in err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["status"] == "completed"
    warnings = "\n".join(summary["warnings"])
    _check_message(c, warnings, env)
    _check_message(c, err, env)


def test_bases_are_valid(tmp_path):
    """Every case changes one thing of a recipe that is valid as it stands."""
    from prefcli.recipe import load_recipe

    for name, make in {**BASES, "eval": evalr, "run": run_recipe}.items():
        p = tmp_path / f"{name}.yaml"
        p.write_text(yaml.safe_dump(make(), sort_keys=False))
        load_recipe(p)


def test_stdout_is_empty_of_anything_but_the_object_for_generate_usage(env):
    """generate's stdout is data: a usage error leaves it empty (docs/cli.md) and says why on stderr."""
    code, out, err = invoke(["generate", "--top-k", "many"])
    assert code == 2 and out == "" and "Invalid value for '--top-k'" in err


def test_help_and_version_are_not_failures(env):
    from prefcli import __version__

    assert invoke(["--version"]) == (0, f"prefcli {__version__}\n", "")
    code, out, err = invoke(["sft", "--help"])
    assert code == 0 and "--resume" in out
