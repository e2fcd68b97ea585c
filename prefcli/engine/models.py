"""Load or initialise models and tokenizers; LoRA; the log-prob forward the loop trains through.

Weights are read and written as safetensors only (`use_safetensors=True`); `trust_remote_code` is
passed through from the recipe and is off by default.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..errors import UsageError
from ..recipe.paths import is_local
from ..recipe.sections import ModelSection
from .dist import Runtime
from .families import MASK_IGNORES_POSITION_IDS, logit_transform, packed_mask
from .logprobs import cross_entropy_sum, logits_logprobs, positions_of, token_logprobs

# Sizes of the random model `--smoke` swaps in: same family, same tokenizer, tiny dimensions.
SMOKE_DIMS = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128
)


def quiet_transformers():
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notices are not the user's
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def origin(value: str) -> str:
    return f"local folder {value}" if is_local(value) else f"hub id '{value}'"


def load_errors() -> tuple[type[BaseException], ...]:
    """What loading a model folder raises when the folder is bad (missing or damaged files, a config that is not
    JSON, a safetensors file cut off or not safetensors at all)."""
    from safetensors import SafetensorError

    return (OSError, ValueError, ImportError, KeyError, SafetensorError)


def load_failure(what: str, src: str, e: BaseException) -> str:
    """A one-line message for a model folder that failed to load, with what to do."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    from safetensors import SafetensorError

    if isinstance(e, SafetensorError):
        return (
            f"could not load {what} from {src}: its weights file is damaged or not safetensors ({first}); "
            "save or download the model again"
        )
    low = first.lower()
    if "attention implementation" in low or "attn_implementation" in low:
        return (
            f"could not load {what} from {src}: {first}; set model.attn_implementation (prefcli generate: "
            "--attn-implementation) to one the family supports, or leave it unset: transformers picks one"
        )
    if "trust_remote_code" in low or "custom code" in low:
        return (
            f"could not load {what} from {src}: it ships its own modelling code ({first}); set "
            "model.trust_remote_code: true (prefcli generate: --trust-remote-code) if you trust it"
        )
    return f"could not load {what} from {src}: {first}; check that it is a Hugging Face model folder"


def position_limit(module: nn.Module) -> int | None:
    """The longest sequence a model with a learned absolute position table takes (GPT-2's `wpe`: n_positions;
    OPT's `embed_positions` less its offset), or None for models without one (rotary positions)."""
    for name, m in module.named_modules():
        if isinstance(m, nn.Embedding) and name.rsplit(".", 1)[-1] in ("wpe", "embed_positions", "position_embeddings"):
            return m.num_embeddings - int(getattr(m, "offset", 0) or 0)
    return None


# -------------------------------------------------------------------------------------- model


def _check_config_keys(arch: str, overrides: dict) -> None:
    from transformers import AutoConfig

    base = AutoConfig.for_model(arch)
    known = set(base.to_dict()) | set(getattr(type(base), "attribute_map", {}))
    for key in overrides:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UsageError(f"model.init.config.{key}: not a field of the {arch} config{hint}")


def init_config(arch: str, overrides: dict, tok):
    from transformers import AutoConfig

    _check_config_keys(arch, overrides)
    kw = dict(overrides)
    kw.setdefault("vocab_size", len(tok))
    if kw["vocab_size"] < len(tok):
        raise UsageError(
            f"model.init.config.vocab_size ({kw['vocab_size']}) is smaller than the tokenizer ({len(tok)} tokens)"
        )
    for name in ("bos", "eos", "pad"):
        tid = getattr(tok, f"{name}_token_id")
        if tid is not None:
            kw.setdefault(f"{name}_token_id", tid)
    cfg = AutoConfig.for_model(arch, **kw)
    _check_heads(cfg, arch, overrides)
    return cfg


def _check_heads(cfg, arch: str, overrides: dict) -> None:
    """Attention shapes that transformers accepts in a config but that fail in the first forward pass."""
    hidden = getattr(cfg, "hidden_size", None)
    heads = getattr(cfg, "num_attention_heads", None)
    kv = getattr(cfg, "num_key_value_heads", None)
    head_dim = overrides.get("head_dim")
    where = f"model.init.config ({arch})"
    if hidden and heads and head_dim is None and hidden % heads:
        raise UsageError(
            f"{where}: hidden_size ({hidden}) is not a multiple of num_attention_heads ({heads}); change one of them"
        )
    if heads and kv and heads % kv:
        raise UsageError(
            f"{where}: num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv}); change one of them"
        )


def shrink_config(cfg):
    """A tiny config of the same family (for --smoke): same vocabulary, small dimensions."""
    d = cfg.to_dict()
    for k in ("layer_types", "head_dim", "n_inner", "architectures", "transformers_version"):
        d.pop(k, None)
    rev = {v: k for k, v in getattr(type(cfg), "attribute_map", {}).items()}
    for k, v in SMOKE_DIMS.items():
        name = rev.get(k, k) if k not in d else k
        if k in d or name in d:
            d[name] = v
    if "num_key_value_heads" in d and d.get("num_key_value_heads") is None:
        d["num_key_value_heads"] = SMOKE_DIMS["num_key_value_heads"]
    new = type(cfg).from_dict(d)
    if hasattr(new, "head_dim") and getattr(cfg, "head_dim", None) is not None:
        new.head_dim = SMOKE_DIMS["hidden_size"] // SMOKE_DIMS["num_attention_heads"]
    return new


def random_init_config(m: ModelSection, tok, smoke: bool):
    """The config a randomly initialised model is built from: model.init's architecture, or (smoke)
    model.path's own config; with smoke, shrunk to a tiny model of the same family."""
    from transformers import AutoConfig

    if m.init is not None:
        cfg = init_config(m.init.architecture, m.init.config, tok)
    else:
        cfg = AutoConfig.from_pretrained(m.path, revision=m.revision, trust_remote_code=m.trust_remote_code)
        cfg.vocab_size = max(cfg.vocab_size, len(tok))
    return shrink_config(cfg) if smoke else cfg


def build_causal_lm(m: ModelSection, tok, rt: Runtime, seed: int, smoke: bool = False):
    """The policy: loaded from model.path, or random from model.init (or, with smoke, random and
    tiny of the same family as model.path). Returns a transformers PreTrainedModel on rt.device."""
    quiet_transformers()
    from transformers import AutoModelForCausalLM

    dtype = rt.param_dtype
    common = dict(attn_implementation=m.attn_implementation, trust_remote_code=m.trust_remote_code)
    try:
        if m.init is not None or smoke:
            cfg = random_init_config(m, tok, smoke)
            torch.manual_seed(seed)
            # initialise where the model will live: on a GPU a 0.5B model initialises in a moment,
            # not in the tens of seconds the CPU takes (the random values differ between devices)
            with torch.device(rt.device):
                lm = AutoModelForCausalLM.from_config(cfg, dtype=dtype, **common)
        else:
            lm = AutoModelForCausalLM.from_pretrained(
                m.path, revision=m.revision, dtype=dtype, use_safetensors=True, **common
            )
    except UsageError:
        raise
    except load_errors() as e:
        src = m.path or m.init.architecture
        raise UsageError(load_failure("the model", origin(src) if m.path else src, e)) from None
    if len(tok) > lm.get_input_embeddings().weight.shape[0]:
        lm.resize_token_embeddings(len(tok))
    for name in ("pad", "eos", "bos"):
        tid = getattr(tok, f"{name}_token_id")
        if tid is not None:
            setattr(lm.config, f"{name}_token_id", tid)
            if lm.generation_config is not None:
                setattr(lm.generation_config, f"{name}_token_id", tid)
    lm.to(rt.device)
    return lm


def init_score_head(model) -> None:
    """The scalar head ~ N(0, 1/(d+1)) (Huang et al. 2023, "The N Implementation Details of RLHF
    with PPO": initial scores have unit-order variance), bias 0."""
    head = getattr(model, "score", None) or getattr(model, "classifier", None)
    if head is None or not hasattr(head, "weight"):
        raise UsageError(f"{type(model).__name__} has no 'score' head to initialise")
    d = head.weight.shape[-1]
    with torch.no_grad():
        head.weight.normal_(0.0, 1.0 / math.sqrt(d + 1))
        if getattr(head, "bias", None) is not None:
            head.bias.zero_()


def build_score_model(m: ModelSection, tok, rt: Runtime, seed: int, smoke: bool = False):
    """A reward model or discriminator: AutoModelForSequenceClassification with one label, read at the
    last real token. From model.path (a causal LM gets a new head, initialised by `init_score_head`), or
    random from model.init (or, with smoke, tiny and random of model.path's family)."""
    quiet_transformers()
    from transformers import AutoModelForSequenceClassification

    common = dict(attn_implementation=m.attn_implementation, trust_remote_code=m.trust_remote_code)
    new_head = True
    try:
        if m.init is not None or smoke:
            cfg = random_init_config(m, tok, smoke)
            cfg.num_labels = 1
            torch.manual_seed(seed)
            model = AutoModelForSequenceClassification.from_config(cfg, dtype=rt.param_dtype, **common)
        else:
            model, info = AutoModelForSequenceClassification.from_pretrained(
                m.path,
                revision=m.revision,
                num_labels=1,
                dtype=rt.param_dtype,
                use_safetensors=True,
                output_loading_info=True,
                **common,
            )
            new_head = any(k.split(".")[0] in ("score", "classifier") for k in info.get("missing_keys", []))
    except UsageError:
        raise
    except load_errors() as e:
        src = m.path or m.init.architecture
        raise UsageError(load_failure("a reward model", origin(src) if m.path else src, e)) from None
    if len(tok) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tok))
    model.config.pad_token_id = tok.pad_token_id  # where the score is read: the last non-pad token
    for name in ("eos", "bos"):
        tid = getattr(tok, f"{name}_token_id")
        if tid is not None:
            setattr(model.config, f"{name}_token_id", tid)
    if new_head:
        torch.manual_seed(seed + 1)
        init_score_head(model)
    return model.to(rt.device)


def apply_lora(model, lora, task_type: str = "CAUSAL_LM"):
    """LoRA adapters through peft. task_type SEQ_CLS also trains a score head fully."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type=task_type,
    )
    return get_peft_model(model, cfg)


def build_trained_model(
    m: ModelSection,
    tok,
    rt: Runtime,
    gradient_checkpointing: bool,
    seed: int,
    smoke: bool = False,
    head: str = "lm",
    dropout: bool = False,
):
    """The one place a model that will be trained is made, for every command:

    1. loaded from model.path or initialised from model.init (--smoke: tiny and random, same family);
       head 'lm' gives a causal LM, head 'score' a one-label sequence classifier (reward model,
       discriminator);
    2. dropout off (TRL's disable_dropout) unless `dropout`: RL compares log-probs of the same function at
       sampling and update time, preference losses compare the policy with its reference;
    3. the KV cache off (training forwards never reuse it; `save_hf` turns it back on for the saved model);
    4. gradient checkpointing (non-reentrant) when asked;
    5. LoRA adapters when model.lora is set."""
    if head == "lm":
        model = build_causal_lm(m, tok, rt, seed=seed, smoke=smoke)
    elif head == "score":
        model = build_score_model(m, tok, rt, seed=seed, smoke=smoke)
    else:  # pragma: no cover - callers pass a literal
        raise ValueError(f"unknown head {head!r}")
    if not dropout:
        disable_dropout(model)
    model.config.use_cache = False
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if m.lora is not None:
        model = apply_lora(model, m.lora, "CAUSAL_LM" if head == "lm" else "SEQ_CLS")
    return model


def frozen_copy(model, dtype: torch.dtype):
    """A copy that is never trained (the RL reference): eval mode, no gradients, in `dtype`."""
    ref = copy.deepcopy(model).to(dtype).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def is_peft(model) -> bool:
    # any class of the MRO: FSDP2 turns a sharded root into a subclass of its own (FSDPPeftModel...)
    if not any(c.__module__.startswith("peft") for c in type(model).__mro__):
        return False  # avoids importing peft for plain models
    from peft import PeftModel

    return isinstance(model, PeftModel)


def unwrap_lm(lm):
    """The transformers CausalLM inside a peft wrapper (LoRA layers stay injected)."""
    return lm.get_base_model() if is_peft(lm) else lm


@contextmanager
def reference_mode(lm):
    """Run the frozen reference: with LoRA, the same weights with adapters off."""
    if is_peft(lm):
        with lm.disable_adapter():
            yield
    else:
        yield


def disable_dropout(model: nn.Module) -> None:
    """Dropout off everywhere (TRL's disable_dropout): RL compares log-probs at sampling and update time,
    preference losses compare two sequences and policy vs. reference; dropout noise would bias both."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if hasattr(m, "attention_dropout") and isinstance(m.attention_dropout, float):
            m.attention_dropout = 0.0
    cfg = getattr(model, "config", None)
    for name in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if cfg is not None and isinstance(getattr(cfg, name, None), float):
            setattr(cfg, name, 0.0)


def trainable_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------- forward


class PolicyLM(nn.Module):
    """A causal LM as the training loop sees it: the forward pass returns per-token log-probs of
    given targets (or the summed cross-entropy), computed in chunks from the hidden states.

    Wrapping the whole computation in one module keeps DDP's gradient hooks on every parameter,
    and `torch.compile` can take the transformer body alone. Call it through its forward (also from a
    module that wraps it, with `return_hidden` for extra heads): under runtime.parallel fsdp a PolicyLM is
    an FSDP unit of its own, and its forward is what gathers its embeddings and output head.

    The family's logit scaling or soft-cap (`families.logit_transform`) is applied in the kernels; packed rows of
    a family whose mask ignores position ids get a block-diagonal mask (`families.packed_mask`). With
    `own_forward` (the start-up guard's fallback, guard.py) log-probs come from the model's own forward and its
    full logits instead of the kernels."""

    fsdp_unit = True  # engine.dist.shard: its own FSDP unit when nested in a larger trained module

    def __init__(self, lm, rt: Runtime):
        super().__init__()
        self.lm = lm
        inner = unwrap_lm(lm)
        # aliases into self.lm, kept out of the module tree so that each parameter has one name (state dicts,
        # sharded checkpoints): plain attributes, not registered submodules
        self.__dict__["_head"] = inner.get_output_embeddings()
        self.__dict__["_body"] = inner.base_model
        self.family = getattr(inner.config, "model_type", "") or type(inner).__name__
        self.transform = logit_transform(inner.config)
        self.mask_packed = self.family in MASK_IGNORES_POSITION_IDS
        self.attn_implementation = getattr(inner.config, "_attn_implementation", None) or "sdpa"
        self.own_forward = False
        self.chunk = rt.loss_chunk_tokens
        self.compute_dtype = rt.compute_dtype
        self.autocast = rt.autocast
        self.__dict__["body_fn"] = self._body
        if rt.compile:
            # one decoder layer at a time: every layer runs the same code on same-shaped weights, so
            # one compiled graph serves all of them (compile time of one layer, not of the model)
            for layer in getattr(self._body, "layers", []):
                layer.compile(dynamic=False)
            if not hasattr(self._body, "layers"):
                self.__dict__["body_fn"] = torch.compile(self._body, dynamic=False)

    def _mask(self, attention_mask, position_ids):
        """Packed rows (no mask, position ids restarting at 0) of a family whose mask ignores position ids: the
        block-diagonal causal mask itself (transformers builds it from the position ids for the others)."""
        if self.mask_packed and attention_mask is None and position_ids is not None:
            if self.attn_implementation.startswith("flash"):
                raise UsageError(
                    f"data.packing on {self.family} needs a block-diagonal attention mask, which "
                    f"model.attn_implementation {self.attn_implementation} does not take; use sdpa or eager, or "
                    "set data.packing: false"
                )
            return packed_mask(position_ids, self.compute_dtype, self.attn_implementation)
        return attention_mask

    def hidden(self, input_ids, attention_mask=None, position_ids=None):
        """Last hidden states. Pass attention_mask=None (and position_ids=None) for batches without
        padding: SDPA then takes its fastest causal kernel (callers decide on the host, so the
        check costs no GPU sync)."""
        with self.autocast():
            out = self.body_fn(
                input_ids=input_ids,
                attention_mask=self._mask(attention_mask, position_ids),
                position_ids=position_ids,
                use_cache=False,
            )
        return out.last_hidden_state

    def model_logits(self, input_ids, attention_mask=None, position_ids=None, keep_hidden: bool = False):
        """The model's own forward (`model(...).logits`, float32; every position), and with `keep_hidden` its
        body's last hidden states (read by a hook, not recomputed)."""
        seen = {}
        hook = None
        if keep_hidden:
            hook = self._body.register_forward_hook(lambda m, a, out: seen.__setitem__("h", out.last_hidden_state))
        try:
            with self.autocast():
                out = self.lm(
                    input_ids=input_ids,
                    attention_mask=self._mask(attention_mask, position_ids),
                    position_ids=position_ids,
                    use_cache=False,
                )
        finally:
            if hook is not None:
                hook.remove()
        return out.logits.float(), seen.get("h")

    def forward(
        self,
        input_ids,
        targets,
        attention_mask=None,
        position_ids=None,
        mode: str = "logprobs",
        temperature: float = 1.0,
        start: int = 0,
        return_hidden: bool = False,
    ):
        """mode 'ce': summed cross-entropy over targets != -100 (float32 scalar).
        mode 'logprobs': (log p(target) per position, entropy per position), float32, 0 at ignored positions.
        mode 'logits': the model's own forward, float32 logits [B, T, V] (`targets` unused; the start-up guard).
        `start` skips the output layer for earlier positions (e.g. a prompt shared by the whole batch): the
        results then cover positions start..T-1 and `targets` may be given for those positions only.
        `return_hidden` appends the last hidden states (all positions) to the result, for a module that
        puts another head on them (a value head)."""
        if mode == "logits":
            return self.model_logits(input_ids, attention_mask, position_ids)[0]
        if self.own_forward:
            logits, h = self.model_logits(input_ids, attention_mask, position_ids, keep_hidden=return_hidden)
            out = logits_logprobs(logits, targets, mode, temperature, start)
        else:
            h = self.hidden(input_ids, attention_mask, position_ids)
            out = self.head_logprobs(h, targets, mode, temperature, start)
        if return_hidden:
            return (*out, h) if isinstance(out, tuple) else (out, h)
        return out

    def head_logprobs(self, h, targets, mode: str = "logprobs", temperature: float = 1.0, start: int = 0):
        """The output layer on hidden states `h` (see forward). Targets either span every position, or
        (narrower) the positions start .. start + targets.shape[1] - 1."""
        h, targets = positions_of(h, targets, start)
        w, b = self._head.weight, getattr(self._head, "bias", None)
        if mode == "ce":
            return cross_entropy_sum(h, w, b, targets, self.chunk, self.compute_dtype, self.transform)
        return token_logprobs(h, w, b, targets, self.chunk, self.compute_dtype, temperature, self.transform)


def whole(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor shard (a collective: every process calls it), or `t` itself."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def whole_state(module: nn.Module, rt: Runtime) -> dict[str, torch.Tensor] | None:
    """`module.state_dict()` as whole CPU tensors on rank 0 (None elsewhere); every process calls it. For
    small modules (a value head); models go through `save_hf`."""
    out = {k: whole(v).detach().cpu().contiguous() for k, v in module.state_dict().items()}
    return out if rt.is_main else None


def save_hf(lm, tok, out_dir: Path, rt: Runtime, select=None) -> None:
    """Hugging Face format (`from_pretrained` loads it without prefcli). LoRA: the merged model in
    out_dir, the adapter alone in out_dir/adapter. `select` picks the part to save (an encoder's body).

    Every process calls it; rank 0 writes. Sharded (fsdp), the weights are gathered one tensor at a time
    and written in files of at most 2 GiB, so no process ever holds the whole model (`_save_sharded`)."""
    if not rt.sharded and not rt.is_main:
        return
    out_dir = Path(out_dir)
    if rt.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    model = lm
    if is_peft(lm):
        if rt.sharded:  # the adapter's weights gathered (small), handed to peft's own writer
            adapter = {n: whole(p).detach().cpu() for n, p in lm.named_parameters() if p.requires_grad}
            if rt.is_main:
                lm.save_pretrained(out_dir / "adapter", state_dict=adapter)
        else:
            lm.save_pretrained(out_dir / "adapter")
        model = lm.merge_and_unload()  # sharded: merged shard by shard (DTensor arithmetic), nothing gathered
    if select is not None:
        model = select(model)
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = True  # off while training; on for whoever generates with the saved model
    if rt.sharded:
        _save_sharded(model, out_dir, rt)
    else:
        model.save_pretrained(out_dir)
    if rt.is_main:
        tok.save_pretrained(out_dir)


SHARD_BYTES = 2 * 2**30  # largest safetensors file of a sharded export


def _save_sharded(model, out_dir: Path, rt: Runtime, shard_bytes: int = SHARD_BYTES) -> None:
    """A sharded transformers model as `save_pretrained` would write it (config, generation config, weights
    as model.safetensors or model-0000i-of-0000n.safetensors + model.safetensors.index.json), gathering one
    tensor at a time: rank 0 holds at most one file's worth (shard_bytes) of whole tensors. Written by hand
    because save_pretrained needs the whole state dict in one process."""
    from torch.distributed.fsdp import FSDPModule

    # tied weights (embeddings = output head): one parameter under two names; save_pretrained keeps the first
    seen: set[int] = set()
    tied: set[str] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
        seen.add(id(p))
    parts: list[dict[str, int]] = []  # per written file: name -> bytes
    buf: dict[str, torch.Tensor] = {}
    size = 0
    dtype = None

    def flush():
        nonlocal buf, size
        if buf:
            save_file(buf, str(out_dir / f".part-{len(parts)}.safetensors"), metadata={"format": "pt"})
            parts.append({k: v.numel() * v.element_size() for k, v in buf.items()})
        buf, size = {}, 0

    for name, value in model.state_dict().items():
        if name in tied:
            continue
        t = whole(value)  # a collective: every rank walks the same names in the same order
        dtype = dtype or t.dtype
        if rt.is_main:
            nbytes = t.numel() * t.element_size()
            if size and size + nbytes > shard_bytes:
                flush()
            buf[name] = t.detach().to("cpu", copy=True).contiguous()
            size += nbytes
        del t
    if not rt.is_main:
        return
    flush()
    n = len(parts)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for i, fname in enumerate(names):
        os.replace(out_dir / f".part-{i}.safetensors", out_dir / fname)
    if n > 1:
        weight_map = {k: fname for fname, part in zip(names, parts) for k in part}
        index = {"metadata": {"total_size": sum(sum(p.values()) for p in parts)}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    hf_class = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))  # not FSDP's subclass
    model.config.architectures = [hf_class.__name__]
    if dtype is not None:
        model.config.dtype = str(dtype).split(".")[-1]
    model.config.save_pretrained(out_dir)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(out_dir)
