"""Recipe sections shared by every command: model, data source, train, runtime, output, log.

Rules (docs/recipes.md): every field has a description (the recipe reference is generated from
them), unknown keys are errors, choices are Literals, units are in the names. Validators check;
they never rewrite a value, except that relative paths are resolved against the recipe's folder.
This module imports only pydantic: `prefcli validate` must not pay for torch.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

from .. import SEED_MAX
from .paths import OutputPath, PathOrHubId

# log.report_to: the experiment trackers prefcli can also report to, each through its own library (an extra)
TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")
# model.chat_template: the bundled named templates (prefcli/engine/chat_templates.py TEMPLATES has these keys)
CHAT_TEMPLATES = ("chatml", "qwen", "llama3", "gemma", "phi3", "zephyr", "alpaca")


class Section(BaseModel):
    # allow_inf_nan=False: a float field takes finite numbers only ('.inf', 'nan' strings included)
    model_config = ConfigDict(extra="forbid", frozen=False, protected_namespaces=(), allow_inf_nan=False)


ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral", "gpt2", "gpt_neox")


class ModelInit(Section):
    """A randomly initialised model built from an architecture config: pretraining from scratch,
    tests, and smoke runs."""

    architecture: Literal["llama", "qwen2", "qwen3", "mistral", "gpt2", "gpt_neox"] = Field(
        description="Model family (a transformers `model_type`) whose config class builds the model."
    )
    config: dict[str, Any] = Field(
        default_factory=dict,
        description="Overrides of the architecture's default config, e.g. hidden_size, "
        "num_hidden_layers, num_attention_heads, intermediate_size, max_position_embeddings. "
        "vocab_size and the special-token ids come from the tokenizer.",
    )


class LoraSection(Section):
    """Low-rank adapters through peft. The base weights stay frozen; `final/` holds the merged model
    (loadable without peft) and `final/adapter/` the adapter alone."""

    r: int = Field(16, gt=0, description="Adapter rank.")
    alpha: float = Field(32.0, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt, or 'all-linear' for every linear layer but the output head."
    )


class ModelSection(Section):
    path: PathOrHubId | None = Field(
        None,
        description="A local Hugging Face model folder (relative to the recipe) or a hub id such as "
        "'Qwen/Qwen2.5-0.5B' (needs network or a filled cache). Exactly one of path and init.",
    )
    init: ModelInit | None = Field(
        None, description="Random initialisation from an architecture config instead of `path`."
    )
    tokenizer: PathOrHubId | None = Field(
        None,
        description="Tokenizer folder, tokenizer.json file or hub id. Defaults to model.path; required with model.init.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) for hub ids.")
    trust_remote_code: bool = Field(
        False, description="Run model/tokenizer code shipped with a hub repo. Off unless you trust the repo."
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flex_attention"] | None = Field(
        None,
        description="Attention kernel. Unset: transformers' choice for the family ('sdpa', PyTorch's fused "
        "attention, where the family supports it; 'eager' for Gemma 2, whose attention soft-caps its scores).",
    )
    pad_token: str | None = Field(
        None,
        description="Use this token for padding (added to the vocabulary, and the embeddings resized, if new). "
        "Needed only when the tokenizer has no pad token; it must differ from the EOS token.",
    )
    chat_template: str | None = Field(
        None,
        description="The chat template for chat-message data, replacing the tokenizer's own: a bundled one by name "
        f"({', '.join(CHAT_TEMPLATES)}; for a model that ships none, as LLaMA-Factory's template: does; its "
        "end-of-turn token becomes the EOS and its special tokens are added when missing), or a Jinja template "
        "string.",
    )
    on_mismatch: Literal["error", "fallback"] = Field(
        "error",
        description="When prefcli's own log-prob kernels or fast sampler disagree with the model's own forward "
        "beyond the start-up guard's tolerance (docs/families.md): 'error' stops with exit 2 naming what differs; "
        "'fallback' computes log-probs with the model's own forward (full logits: more memory) and samples with "
        "transformers generate (slower), with a warning.",
    )
    lora: LoraSection | None = Field(None, description="Train LoRA adapters instead of all weights.")

    @field_validator("chat_template")
    @classmethod
    def _template(cls, v: str | None) -> str | None:
        if v is None or v in CHAT_TEMPLATES or "{{" in v or "{%" in v:
            return v
        import difflib

        close = difflib.get_close_matches(v, CHAT_TEMPLATES, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ValueError(
            f"unknown chat template {v!r}{hint}: give one of {', '.join(CHAT_TEMPLATES)}, or a Jinja template string "
            "(with {{ ... }} or {% ... %})"
        )

    @model_validator(mode="after")
    def _one_source(self):
        if (self.path is None) == (self.init is None):
            raise ValueError("set exactly one of model.path (a pretrained model) and model.init (a random init)")
        if self.init is not None and self.tokenizer is None:
            raise ValueError("model.init needs model.tokenizer (a tokenizer folder, tokenizer.json or hub id)")
        return self


class DataSource(Section):
    """One dataset: a local file (JSONL, JSON, CSV, Parquet), a folder saved with
    `datasets.save_to_disk`, a folder of such files, or a hub dataset name."""

    path: PathOrHubId = Field(
        description="File, folder or hub dataset name; relative paths resolve against the recipe."
    )
    split: str = Field("train", description="Split to read (files have a single 'train' split).")
    subset: str | None = Field(None, description="Hub dataset configuration name.")
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Column mapping {expected name: name in your data}, e.g. {prompt: question, completion: answer}.",
    )
    max_rows: int | None = Field(None, gt=0, description="Use only the first N rows.")


class MixtureSource(DataSource):
    """One source of a data mixture: a DataSource with a sampling weight."""

    weight: float = Field(
        1.0, ge=0, description="Relative sampling weight; the weights of a mixture are normalised to sum to 1."
    )


class DataMixture(Section):
    """Several sources interleaved into one training set (`datasets.interleave_datasets`): each row is drawn
    from source i with probability weight_i / sum(weights), in an order fixed by `seed`, so a resumed run
    sees the same rows. Written as a list of sources under `data.train`; every source must have the same
    columns (after its `columns` mapping)."""

    sources: list[MixtureSource] = Field(min_length=1, description="The sources and their weights.")
    stopping: Literal["first_exhausted", "all_exhausted"] = Field(
        "first_exhausted",
        description="'first_exhausted': the mixture ends when one source runs out (no row repeats); "
        "'all_exhausted': sources that run out start over until every source has been used whole.",
    )
    seed: int = Field(0, ge=0, le=SEED_MAX, description="Seed of the order in which the sources are drawn.")

    @model_validator(mode="before")
    @classmethod
    def _from_list(cls, data: Any) -> Any:
        return {"sources": data} if isinstance(data, list) else data  # `train: [...]` is the usual spelling

    @model_validator(mode="after")
    def _check(self):
        total = sum(s.weight for s in self.sources)
        if not total > 0:
            raise ValueError(
                f"the weights of the mixture's sources sum to {total:g}; they must sum to a positive number"
            )
        return self

    @property
    def path(self) -> str:
        """How messages name this source: the mixture's files."""
        return "mixture of " + ", ".join(f"{s.path} (weight {s.weight:g})" for s in self.sources)


def _source_kind(v: Any) -> str:
    if isinstance(v, (list, DataMixture)) or (isinstance(v, dict) and "sources" in v):
        return "mixture"
    return "source"


# data.train of sft, reward, contrastive and rlhf: one source, or a list of weighted sources (a mixture)
TrainSource = Annotated[
    Annotated[DataSource, Tag("source")] | Annotated[DataMixture, Tag("mixture")],
    Discriminator(_source_kind),
]


class HeldOut(Section):
    """Base of data sections with an optional `eval` set or an `eval_fraction` of the training rows."""

    @model_validator(mode="after")
    def _one_held_out(self):
        if getattr(self, "eval", None) is not None and getattr(self, "eval_fraction", 0) > 0:
            raise ValueError("set data.eval or data.eval_fraction, not both")
        debias = getattr(self, "debias", None)
        if debias is not None and debias.drop_eval_prompts and getattr(self, "eval", None) is None:
            if not getattr(self, "eval_fraction", 0) > 0:
                raise ValueError(
                    "data.debias.drop_eval_prompts needs a held-out set: set data.eval or data.eval_fraction"
                )
        return self


class EvalMonitor(Section):
    """An evaluation metric to watch, and which way is better."""

    metric: str = Field(
        description="A metric the command logs at each evaluation, e.g. eval/loss (sft: eval/loss, eval/ppl; "
        "reward: eval/accuracy; rlhf: eval/reward); the error for an unknown one lists them."
    )
    mode: Literal["min", "max"] = Field(description="'min': lower is better (losses); 'max': higher is better.")


class EarlyStopping(EvalMonitor):
    """End the run when the metric has not improved for `patience` evaluations in a row."""

    patience: int = Field(3, gt=0, description="Evaluations in a row without improvement before the run stops.")
    min_delta: float = Field(
        0.0, ge=0, description="An improvement smaller than this (in the metric's units) does not count."
    )


class TrainSection(Section):
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps to run. Overrides epochs when both are set.")
    epochs: float | None = Field(
        None, gt=0, description="Passes over the training data when max_steps is not set (default 1)."
    )
    batch_size: int = Field(8, gt=0, description="Examples per device per micro-batch.")
    grad_accum_steps: int = Field(
        1,
        gt=0,
        description="Micro-batches per optimizer step. Losses are token-weighted over the whole accumulated global batch.",
    )
    lr: float = Field(1e-5, gt=0, description="Peak learning rate.")
    lr_schedule: Literal["constant", "linear", "cosine"] = Field("cosine", description="Decay after warmup.")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Fraction of max steps spent warming up linearly from 0.")
    warmup_steps: int | None = Field(None, ge=0, description="Warmup length in steps; overrides warmup_ratio.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Final learning rate as a fraction of lr (linear/cosine).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (not applied to biases and norms).")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    adam_eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the global gradient norm to this; null disables.")
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward: less memory, ~30% slower."
    )
    seed: int = Field(0, ge=0, le=SEED_MAX, description="Seed for initialisation, data order, dropout and sampling.")
    eval_every_steps: int | None = Field(
        None, gt=0, description="Evaluate on held-out data every N steps (and at the end)."
    )
    eval_max_batches: int | None = Field(None, gt=0, description="Cap on held-out batches per evaluation.")
    eval_on_start: bool = Field(
        False,
        description="Also evaluate before the first step (step 0): the baseline the run's held-out metrics move from.",
    )
    save_every_steps: int | None = Field(None, gt=0, description="Write a resumable checkpoint every N steps.")
    keep_checkpoints: int = Field(2, gt=0, description="Keep only the newest N checkpoints.")
    keep_best: EvalMonitor | None = Field(
        None,
        description="Also keep the checkpoint of the best evaluation by this metric in checkpoints/best/ "
        "(overwritten when an evaluation beats it); output.final: best writes final/ from it.",
    )
    early_stopping: EarlyStopping | None = Field(
        None,
        description="Stop when an evaluation metric stops improving (needs held-out data and eval_every_steps). "
        "The run ends with exit 0; the summary's `stopped_early` says when and why.",
    )

    @model_validator(mode="after")
    def _check(self):
        if self.warmup_steps is not None and self.max_steps is not None and self.warmup_steps > self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) exceeds max_steps ({self.max_steps})")
        return self


class FSDPSection(Section):
    """FSDP2 (torch.distributed.fsdp.fully_shard) settings; see docs/scaling.md."""

    reshard_after_forward: bool = Field(
        True,
        description="Free each layer's gathered parameters after its forward and gather them again in backward "
        "(least memory). false keeps them gathered from forward to backward: one all-gather less per layer and "
        "step, at the cost of the whole model's parameters held in full during the step.",
    )
    cpu_offload: bool = Field(
        False,
        description="Keep the sharded parameters, gradients and optimizer state in CPU memory and run the "
        "optimizer step on the CPU (torch CPUOffloadPolicy): fits larger models on fewer GPUs, much slower. "
        "GPU only (on a CPU device there is nothing to offload).",
    )


class RuntimeSection(Section):
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="'auto' takes CUDA when present, else CPU.")
    precision: Literal["auto", "fp32", "bf16-mixed", "bf16", "fp16-mixed"] = Field(
        "auto",
        description="'auto' = bf16-mixed on a GPU with bf16 support, fp32 on CPU. 'bf16-mixed': fp32 master "
        "weights, bf16 compute. 'bf16': weights and optimizer state in bf16 (fastest, least memory, "
        "small updates can round away).",
    )
    compile: bool = Field(False, description="torch.compile the transformer body (GPU; first steps are slower).")
    loss_chunk_tokens: int = Field(
        2048,
        gt=0,
        description="Tokens per chunk when computing log-probs/cross-entropy from hidden states; "
        "the full fp32 logits are never materialised.",
    )
    dist_backend: Literal["auto", "nccl", "gloo"] = Field(
        "auto", description="torch.distributed backend under torchrun: 'auto' = nccl on GPU, gloo on CPU."
    )
    parallel: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="How several processes share the training. 'ddp': every process holds the whole model, its "
        "gradients and optimizer state (fastest while it fits). 'fsdp': FSDP2 shards parameters, gradients and "
        "optimizer state over the processes (each holds 1/N), one unit per decoder layer plus the root; without "
        "torchrun it runs as a single-process shard (same code path; docs/scaling.md).",
    )
    fsdp: FSDPSection = Field(
        default_factory=lambda: FSDPSection(), description="FSDP2 options (only with parallel: fsdp)."
    )
    timeout_s: float = Field(
        1800.0,
        gt=0,
        description="Collective timeout in seconds: when a process dies or stalls, the others stop within this "
        "time with exit 1 instead of hanging. Must exceed the longest stretch one process works alone (rank 0 "
        "writing final/, scoring rows for the cache).",
    )

    @model_validator(mode="after")
    def _fsdp_only_with_fsdp(self):
        # by value, not by the fields written: a saved recipe.yaml spells out every default
        changed = [k for k, f in FSDPSection.model_fields.items() if getattr(self.fsdp, k) != f.default]
        if self.parallel != "fsdp" and changed:
            keys = ", ".join(f"runtime.fsdp.{k}" for k in changed)
            raise ValueError(
                f"{keys} only applies to sharded training, but runtime.parallel is '{self.parallel}'; "
                "set runtime.parallel: fsdp (or remove it)"
            )
        return self


class OutputSection(Section):
    dir: OutputPath | None = Field(
        None,
        description="Run folder (relative to the recipe). Default: runs/<command>-<recipe name> under the current directory.",
    )
    save_final: bool = Field(True, description="Write final/ in Hugging Face format at the end.")
    plot: bool = Field(True, description="Write curves.png (training curves) at the end.")
    final: Literal["last", "best"] = Field(
        "last",
        description="What final/ holds: the weights after the last step, or those of the best evaluation "
        "(needs train.keep_best).",
    )


class TrackingSection(Section):
    """Experiment trackers that get the run besides metrics.jsonl (which stays the record)."""

    report_to: list[Literal[TRACKERS]] = Field(
        default_factory=list,
        description="Experiment trackers to report to, any of tensorboard, wandb, mlflow, trackio; each needs its "
        "extra (pip install 'prefcli[wandb]', or 'prefcli[trackers]' for all). They get every step's metrics, every "
        "evaluation, the resolved recipe as config, sampled completions as tables and the summary. A tracker that "
        "fails to start or dies mid-run is a warning, never a failed run.",
    )
    run_name: str | None = Field(None, description="The run's name in the trackers (default: the run folder's name).")
    project: str | None = Field(None, description="W&B and trackio project, MLflow experiment (default 'prefcli').")
    tags: list[str] = Field(default_factory=list, description="Tags of the run in the trackers.")

    @model_validator(mode="after")
    def _check_trackers(self):
        dup = sorted({t for t in self.report_to if self.report_to.count(t) > 1})
        if dup:
            raise ValueError(f"report_to: listed twice: {', '.join(dup)}")
        return self


class LogSection(TrackingSection):
    every_steps: int = Field(10, gt=0, description="Write a progress line every N steps when stderr is not a terminal.")
    metrics_every_steps: int = Field(1, gt=0, description="Append to metrics.jsonl every N steps.")
