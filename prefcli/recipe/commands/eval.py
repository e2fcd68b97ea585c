"""`prefcli eval` recipes. eval trains nothing: its recipe has no model/train sections (it names several
models), and `prefcli eval` runs it through prefcli.evaluate.eval, not the engine (its row of the command table
has no task)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ..envs import EnvSpec
from ..paths import DataPath, LocalPath, OutputPath, PathOrHubId
from ..reward_specs import RewardSpec
from ..sections import (
    SEED_MAX,
    DataSource,
    ModelInit,
    Section,
    TrackingSection,
)
from .names import EVAL_METRICS


class GenerationSection(Section):
    """How completions are sampled (shared by `prefcli eval` and the options of `prefcli generate`).
    Output control: length limits, banned words, required keywords, stop strings, control codes."""

    max_new_tokens: int = Field(64, gt=0, description="At most this many new tokens per completion.")
    min_new_tokens: int = Field(0, ge=0, description="EOS is blocked until this many new tokens exist.")
    do_sample: bool = Field(True, description="Sample (true) or decode greedily (false).")
    temperature: float = Field(
        1.0, gt=0, description="Softmax temperature for sampling; KL to the reference is computed at this temperature."
    )
    top_p: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Nucleus sampling: keep the smallest set of tokens with this much probability (1 = off).",
    )
    top_k: int = Field(0, ge=0, description="Keep only the k most likely tokens (0 = off).")
    ban: list[str] = Field(
        default_factory=list,
        description="Words or phrases that never appear in a completion: whole "
        "words, any letter case, however they are tokenized.",
    )
    require: list[str] = Field(
        default_factory=list,
        description="Keywords every completion contains (whole word, any "
        "case): EOS and stop strings wait for them, and a missing one is written out when the "
        "token budget runs low.",
    )
    stop: list[str] = Field(
        default_factory=list,
        description="Stop strings: generation ends when one appears; the completion is cut before it.",
    )
    control_code: str | None = Field(
        None,
        description="Text put before every prompt, e.g. a control token such as "
        "'<|aligned|>' learned in conditional training; it is never generated.",
    )
    chat: bool = Field(
        False,
        description="Render each prompt as a user turn with the tokenizer's chat template "
        "(and the assistant header) before generating.",
    )
    batch_size: int = Field(8, gt=0, description="Prompts per generate call (left-padded).")

    @model_validator(mode="after")
    def _check(self):
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens ({self.min_new_tokens}) exceeds max_new_tokens ({self.max_new_tokens})")
        for name in ("ban", "require"):
            if any(not w.strip() for w in getattr(self, name)):
                raise ValueError(f"{name}: empty or blank words are not allowed")
        if any(s == "" for s in self.stop):
            raise ValueError("stop: an empty stop string would stop at once")
        both = {w.lower() for w in self.ban} & {w.lower() for w in self.require}
        if both:
            raise ValueError(f"these words are both banned and required: {', '.join(sorted(both))}")
        return self


class EvalModel(Section):
    """A model to evaluate: a folder or hub id (`path`), the model a training recipe wrote (`from_recipe`), or a
    random initialisation (`init`: a floor to compare against, and offline tests)."""

    name: str | None = Field(
        None,
        description="Label in the table, the summary and examples.jsonl. Default: the "
        "folder name (path; the parent's name for a folder called 'final'), the recipe's "
        "file name without .yaml (from_recipe), or 'init'.",
    )
    path: PathOrHubId | None = Field(
        None, description="A Hugging Face model folder (relative to the recipe) or hub id."
    )
    from_recipe: LocalPath | None = Field(
        None,
        description="A training recipe (e.g. sft.yaml, relative to this recipe): evaluate `final/` in that "
        "recipe's run folder, i.e. its output.dir, else runs/<command>-<recipe name> under the current directory, "
        "exactly where the training command wrote it. It must have been trained first.",
    )
    init: ModelInit | None = Field(None, description="A random initialisation from an architecture config.")
    tokenizer: PathOrHubId | None = Field(
        None, description="Tokenizer folder or hub id; defaults to the model's own (required with init)."
    )
    seed: int = Field(0, ge=0, le=SEED_MAX, description="Seed of the random initialisation (init only).")
    revision: str | None = Field(None, description="Hub revision for hub ids.")
    trust_remote_code: bool = Field(False, description="Run code shipped with a hub repo. Off unless you trust it.")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flex_attention"] | None = Field(
        None, description="Attention kernel (as model.attn_implementation). Unset: transformers' choice for the family."
    )
    pad_token: str | None = Field(
        None,
        description="A pad token for a tokenizer that has none (base GPT-2, Llama 3, Mistral checkpoints), as "
        "model.pad_token. Prefer a token of the vocabulary: a new one adds an embedding row (the mean of the others).",
    )
    on_mismatch: Literal["error", "fallback"] = Field(
        "error", description="As model.on_mismatch: what the start-up guard does when prefcli's kernels disagree."
    )

    @model_validator(mode="after")
    def _one_source(self):
        given = [k for k in ("path", "from_recipe", "init") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "set exactly one of path, from_recipe and init" + (f" (got {', '.join(given)})" if given else "")
            )
        if self.init is not None and self.tokenizer is None:
            raise ValueError("init needs tokenizer (a tokenizer folder or hub id)")
        if "seed" in self.model_fields_set and self.init is None:
            raise ValueError("seed applies to init only")
        return self

    def display_name(self) -> str:
        import os

        if self.name:
            return self.name
        if self.path is not None:
            p = self.path.rstrip("/")
            base = os.path.basename(p)
            if base == "final" and os.path.dirname(p):
                base = os.path.basename(os.path.dirname(p))
            return base or p
        if self.from_recipe is not None:
            return os.path.splitext(os.path.basename(self.from_recipe))[0]
        return "init"


class EvalSource(DataSource):
    """A data source of `prefcli eval`: a file, folder or hub dataset, or `-` for JSONL rows on stdin."""

    path: DataPath = Field(
        description="File, folder or hub dataset name (relative paths resolve against the recipe), or '-': JSONL "
        "rows on stdin (one source at a time)."
    )


class EvalData(Section):
    text: EvalSource | None = Field(
        None,
        description="Rows for perplexity: 'text' rows (every token), 'prompt'+'completion' rows (completion "
        "tokens, given the prompt) or chat 'messages' (assistant turns).",
    )
    text_format: Literal["auto", "text", "prompt_completion", "messages"] = Field(
        "auto", description="Row shape of data.text; 'auto' picks by the columns present."
    )
    add_eos: bool = Field(
        True,
        description="Score an EOS token at the end of every data.text example, as `prefcli sft` "
        "trains it (its eval/ppl is the same number).",
    )
    prompts: EvalSource | None = Field(
        None,
        description="Prompts to sample completions from (column 'prompt'), with a 'reference' column for BLEU and "
        "ROUGE. Map other names with columns: {reference: answer}.",
    )
    pairs: EvalSource | None = Field(
        None, description="Preference pairs (columns prompt, chosen, rejected) for the rewards' preference accuracy."
    )
    completions: EvalSource | None = Field(
        None,
        description="Completions to score as given instead of sampling (columns prompt, completion, and reference "
        "for BLEU/ROUGE): what `prefcli generate` writes; `prefcli eval --completions FILE|-` sets it. Nothing is "
        "sampled, so kl and win_rate (which need samples of the models) are skipped, and data.prompts is not read.",
    )
    user_column: str | None = Field(
        None,
        description="The column of data.prompts, data.pairs and data.completions naming each row's user: a "
        "personalised policy generates for that user, personalised reward models score for that user, and reward, "
        "win_rate and preference_accuracy are reported per user with the worst user beside the mean. null = "
        "'rater' when the rows have it, else 'user_id', else none.",
    )

    @model_validator(mode="after")
    def _one_stdin(self):
        stdin = [
            n for n in ("text", "prompts", "pairs", "completions") if getattr(self, n) and getattr(self, n).path == "-"
        ]
        if len(stdin) > 1:
            raise ValueError(f"only one source can read stdin ('-'); {', '.join('data.' + n for n in stdin)} all do")
        return self


class PerplexityOptions(Section):
    """Token-weighted perplexity with a sliding window (Hugging Face, "Perplexity of fixed-length models")."""

    window_tokens: int | None = Field(
        None,
        gt=1,
        description="Tokens the model sees at once. Default: the model's max_position_embeddings, at most "
        "2048. Longer examples are scored in overlapping windows.",
    )
    stride_tokens: int | None = Field(
        None,
        gt=0,
        description="Step between windows; each token is scored once, with at least window - stride "
        "tokens of context once the first window is passed (stride = window: no overlap, and the first token of "
        "each later window goes unscored). Default: half the window.",
    )
    batch_size: int = Field(8, gt=0, description="Windows per forward pass.")

    @model_validator(mode="after")
    def _check(self):
        if (
            self.window_tokens is not None
            and self.stride_tokens is not None
            and self.stride_tokens > self.window_tokens
        ):
            raise ValueError(f"stride_tokens ({self.stride_tokens}) exceeds window_tokens ({self.window_tokens})")
        return self


class WinRateOptions(Section):
    bootstrap_samples: int = Field(
        1000,
        ge=10,
        description="Resamples of the prompts for the percentile bootstrap confidence interval (seeded by `seed`).",
    )
    confidence: float = Field(0.95, gt=0, lt=1, description="Coverage of the confidence interval.")


class DistinctOptions(Section):
    n: list[int] = Field(
        default_factory=lambda: [1, 2],
        min_length=1,
        description="n-gram orders for distinct-n (unique / total whitespace-token n-grams).",
    )

    @model_validator(mode="after")
    def _check(self):
        if any(k < 1 for k in self.n):
            raise ValueError("n-gram orders must be >= 1")
        return self


class RougeOptions(Section):
    tokenizer: Literal["default", "whitespace"] = Field(
        "default",
        description="'default': rouge-score's own (lowercases, keeps only [a-z0-9], so non-Latin text scores "
        "0); 'whitespace': lowercase and split on whitespace (any script).",
    )


class EvalRuntime(Section):
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="'auto' takes CUDA when present, else CPU.")
    precision: Literal["auto", "fp32", "bf16-mixed", "bf16"] = Field(
        "auto", description="'auto' = bf16-mixed on a GPU with bf16 support, fp32 on CPU."
    )
    loss_chunk_tokens: int = Field(
        4096, gt=0, description="Tokens per chunk when computing log-probs from hidden states."
    )


class EvalOutput(Section):
    dir: OutputPath | None = Field(
        None,
        description="Where recipe.yaml, summary.json and examples.jsonl go (relative to the recipe). Default: "
        "runs/eval-<recipe name> under the current directory.",
    )


# What each metric needs from the recipe: data sources, a baseline/reference, rewards.
_NEEDS = {
    "perplexity": ("data.text",),
    "bleu": ("data.prompts",),
    "rouge": ("data.prompts",),
    "reward": ("data.prompts", "rewards"),
    "win_rate": ("data.prompts", "rewards", "baseline"),
    "kl": ("data.prompts", "reference"),
    "distinct": ("data.prompts",),
    "length": ("data.prompts",),
    "preference_accuracy": ("data.pairs", "rewards"),
    "env": ("env",),
}


# Metrics that need completions sampled from the models (with data.completions they are skipped), and those that
# read completions, sampled from data.prompts or given as data.completions.
SAMPLED_METRICS = ("kl", "win_rate")
COMPLETION_METRICS = ("bleu", "rouge", "reward", "distinct", "length")


class EvalRecipe(Section):
    """`prefcli eval`: measure models (and a baseline) on held-out data; see docs/commands/eval.md."""

    command: Literal["eval"] = Field("eval", description="Always 'eval' for this schema.")
    models: list[EvalModel] = Field(min_length=1, description="The models to evaluate.")
    baseline: EvalModel | None = Field(
        None, description="Evaluated like the models; win_rate compares every model with it on the same prompts."
    )
    reference: EvalModel | None = Field(
        None, description="The frozen reference for kl (e.g. the SFT model an RLHF run started from)."
    )
    data: EvalData = Field(default_factory=EvalData, description="Where the texts, prompts and pairs come from.")
    env: EnvSpec | None = Field(
        None,
        description="An environment as a benchmark (metric env): env.eval_episodes episodes from seeds env.eval_seed, "
        "... per model; success rate, mean reward, turns, tool calls and tool errors (docs/environments.md). "
        "generation sets each turn's sampling; `rewards:` are added on the final transcripts.",
    )
    metrics: list[Literal[EVAL_METRICS]] = Field(
        min_length=1, description="Metrics to compute; each needs parts of the recipe (see docs/commands/eval.md)."
    )
    generation: GenerationSection = Field(
        default_factory=GenerationSection, description="Sampling of completions from data.prompts."
    )
    rewards: list[RewardSpec] = Field(
        default_factory=list,
        description="Reward sources for reward, win_rate and preference_accuracy; several are summed by weight.",
    )
    perplexity: PerplexityOptions = Field(default_factory=PerplexityOptions, description="Sliding-window perplexity.")
    win_rate: WinRateOptions = Field(default_factory=WinRateOptions, description="Bootstrap confidence interval.")
    distinct: DistinctOptions = Field(default_factory=DistinctOptions, description="distinct-n orders.")
    rouge: RougeOptions = Field(default_factory=RougeOptions, description="ROUGE tokenization.")
    user: str | None = Field(
        None,
        description="Serve every prompt and pair for this one user: personalised policies generate for them and "
        "personalised reward models score for them (instead of each row's own user). Models that are not "
        "personalised are evaluated as they are.",
    )
    seed: int = Field(
        0, ge=0, le=SEED_MAX, description="Seed for sampling (reset before each model) and the bootstrap."
    )
    runtime: EvalRuntime = Field(default_factory=EvalRuntime, description="Device and precision.")
    output: EvalOutput = Field(default_factory=EvalOutput, description="Where results are written.")
    log: TrackingSection = Field(
        default_factory=TrackingSection,
        description="Experiment trackers that also get the results (every metric, the completions as tables).",
    )

    @model_validator(mode="after")
    def _check(self):
        dup = sorted({m for m in self.metrics if self.metrics.count(m) > 1})
        if dup:
            raise ValueError(f"metrics: listed twice: {', '.join(dup)}")
        have = {
            "data.text": self.data.text,
            "data.prompts": self.data.prompts,
            "data.pairs": self.data.pairs,
            "data.completions": self.data.completions,
            "rewards": self.rewards or None,
            "baseline": self.baseline,
            "reference": self.reference,
            "env": self.env,
        }
        problems = []
        given = self.data.completions is not None
        for m in self.metrics:
            missing = [
                n
                for n in _NEEDS[m]
                if have[n] is None and not (given and n == "data.prompts" and m in COMPLETION_METRICS)
            ]
            if missing:
                problems.append(f"metric '{m}' needs {' and '.join(missing)}")
        used = {n for m in self.metrics for n in _NEEDS[m]}
        for n in ("data.text", "data.prompts", "data.pairs", "reference", "env"):
            if have[n] is not None and n not in used:
                readers = [m for m, needs in _NEEDS.items() if n in needs]
                problems.append(f"{n} is given but no listed metric reads it (add one of: {', '.join(readers)})")
        if given and not any(m in COMPLETION_METRICS for m in self.metrics):
            problems.append(
                f"data.completions is given but no listed metric reads it (add one of: {', '.join(COMPLETION_METRICS)})"
            )
        names = [m.display_name() for m in self.models] + [x.display_name() for x in (self.baseline,) if x is not None]
        same = sorted({n for n in names if names.count(n) > 1})
        if same:
            problems.append(
                f"models: two models are named {', '.join(repr(s) for s in same)}; give each a distinct name"
            )
        if self.user is not None and not self.user.strip():
            problems.append("user: an empty user id")
        if problems:
            raise ValueError("; ".join(problems))
        return self
