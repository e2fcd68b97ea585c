"""Batched sampling with output control, on Hugging Face `generate`.

Prompts are left-padded (transformers derives the position ids from the attention mask and
keeps a KV cache). What transformers offers is used as is:

- length limits: `GenerationConfig(max_new_tokens, min_new_tokens)` (min_new_tokens blocks EOS);
- stop strings: `StopStringCriteria` (`generate(stop_strings=..., tokenizer=...)`), the text then
  cut before the first stop string;
- control codes (Korbak et al. 2023, conditional training): the code is put before the prompt, and
  when it is a token of the vocabulary it is banned from the output with `bad_words_ids`, as in
  their code; the pad token is banned the same way (it is never a valid output);
- sampling: temperature, top-k, top-p.

Two controls are written here as `LogitsProcessor`s (transformers' own extension point), because
what transformers has does not do the job:

- **banned words** (`BannedWordsProcessor`). `bad_words_ids` bans exact token sequences, but a word
  has many tokenizations ("dark"+"ness", " Dark", "DARK", " d"+"ark"), and banning the token
  " dark" would also forbid "darkness". The processor checks text instead: at every step it bans
  each token that would complete a banned word as a whole word (case-insensitive) in the
  completion, whatever the tokenization, so a banned word never appears.
- **required keywords** (`RequiredWordsProcessor`). Constrained beam search (`force_words_ids`,
  `constraints`) left transformers 5 for the hub repo transformers-community/constrained-beam-search,
  which needs network access and `trust_remote_code` (tested: transformers 5.24 raises
  "Constrained Beam Search requires `trust_remote_code=True`"). The approach here works with
  sampling and offline: sample freely; block EOS while a keyword is missing; and when the tokens
  left equal the tokens the missing keywords need, write the next missing keyword out (its
  tokens are forced one by one), followed by a word boundary. Stop strings wait for the keywords
  (`KeywordGatedStop`). Keywords therefore appear late when the model does not produce them on
  its own; a budget too small for them is reported per completion (`missing`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from transformers import GenerationConfig

from ..engine.sampling import HFSampler, SamplingConfig, left_pad
from ..engine.tokenizer import text_ids
from ..errors import UsageError
from ..recipe.commands import GenerationSection
from .control import BannedWordsProcessor, KeywordGatedStop, RequiredWordsProcessor, cut_at_stop, token_strings
from .metrics import contains_word


@dataclass
class Generation:
    prompt: str
    completion: str  # decoded, cut before a stop string
    prompt_ids: list[int]  # what the model was conditioned on (control code and chat template included)
    token_ids: list[int]  # the sampled tokens, EOS included when generated, no padding
    finish_reason: str  # "eos" | "stop" | "length"
    missing: list[str] = field(default_factory=list)  # required keywords absent from the completion
    n_tokens: int | None = None  # completions given to `prefcli eval` (no token ids): their token count

    @property
    def tokens(self) -> int:
        return self.n_tokens if self.n_tokens is not None else len(self.token_ids)


class Generator:
    """Samples completions for batches of prompts with a GenerationSection's settings."""

    def __init__(self, lm, tok, cfg: GenerationSection, device, autocast=None, warn=None, users=None):
        """`users`: a personalised policy's {user: token text} (engine.personal.policy_users): `generate(...,
        users=...)` puts each prompt's user's token first; an unknown user gets none (the generic policy), with a
        warning."""
        self.lm, self.tok, self.cfg, self.device = lm, tok, cfg, device
        self.users = dict(users or {})
        self._unknown: set[str] = set()
        self.autocast = autocast
        self.warn = warn or (lambda text: print(f"warning: {text}", file=sys.stderr))
        self.eos_ids = {tok.eos_token_id}
        gen_eos = getattr(lm.generation_config, "eos_token_id", None)
        if isinstance(gen_eos, int):
            self.eos_ids.add(gen_eos)
        elif isinstance(gen_eos, (list, tuple)):
            self.eos_ids.update(gen_eos)
        self.pad_id = tok.pad_token_id
        # Sampling follows this recipe alone: a checkpoint's generation_config.json (e.g. top_p 0.8,
        # repetition_penalty 1.05) would otherwise fill every setting left unset, and KL to the
        # reference would no longer describe what was sampled.
        lm.generation_config = GenerationConfig(
            eos_token_id=sorted(self.eos_ids), pad_token_id=self.pad_id, bos_token_id=tok.bos_token_id
        )
        self.vocab_size = lm.get_output_embeddings().weight.shape[0]
        from ..engine.models import position_limit

        self.positions = position_limit(lm)  # GPT-2's n_positions and the like; None for rotary positions
        if cfg.chat and not tok.chat_template:
            raise UsageError("generation.chat needs a chat template, and this tokenizer has none")
        self.bad_words = [[self.pad_id]]
        for t in self.users.values():  # a user token conditions the policy; it is never generated
            self.bad_words.append([tok.convert_tokens_to_ids(t)])
        cc = cfg.control_code
        if cc:
            cc_ids = tok(cc, add_special_tokens=False)["input_ids"]
            if len(cc_ids) == 1:
                self.bad_words.append(cc_ids)
            else:
                self.warn(
                    f"control code {cc!r} is not a single token of the tokenizer ({len(cc_ids)} tokens); it is "
                    "put before each prompt as plain text. Conditional training adds control codes as "
                    "special tokens."
                )
        self._strings = token_strings(tok, self.vocab_size) if (cfg.ban or cfg.require) else None
        if cfg.require:
            need = sum(
                max(
                    len(tok(" " + w, add_special_tokens=False)["input_ids"]),
                    len(tok(w, add_special_tokens=False)["input_ids"]),
                )
                for w in cfg.require
            )
            if need > cfg.max_new_tokens:
                self.warn(
                    f"the required keywords need {need} tokens but max_new_tokens is {cfg.max_new_tokens}; "
                    "some will be missing (reported per completion)"
                )
        self.sampler = HFSampler(lm, autocast)  # transformers' generate: the controls below are logits processors
        self._stop_inner = None
        if cfg.stop and cfg.require:
            from transformers.generation.stopping_criteria import StopStringCriteria

            self._stop_inner = StopStringCriteria(tokenizer=tok, stop_strings=list(cfg.stop))

    def prompt_text(self, prompt: str) -> str:
        text = prompt
        if self.cfg.chat:
            text = self.tok.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        return (self.cfg.control_code or "") + text

    def encode(self, prompt: str, user: str | None = None) -> list[int]:
        text = self.prompt_text(prompt)
        ids = self.tok(text, add_special_tokens=False)["input_ids"] if self.cfg.chat else text_ids(self.tok, text)
        if not ids:  # an empty prompt: start from BOS (or EOS, the usual start-of-text of BOS-less models)
            ids = [self.tok.bos_token_id if self.tok.bos_token_id is not None else self.tok.eos_token_id]
        if user is not None and self.users:
            from ..engine.personal import with_user

            token = self.users.get(user)
            if token is None:
                if user not in self._unknown:
                    self._unknown.add(user)
                    self.warn(
                        f"user '{user}' is not a user of this personalised policy; served by the generic policy (no "
                        f"user token), the fallback for an unknown user (its users: {', '.join(sorted(self.users))})"
                    )
            else:
                ids = with_user(ids, self.tok.convert_tokens_to_ids(token), self.tok.bos_token_id)
        return list(ids)

    def _config(self) -> GenerationConfig:
        c = self.cfg
        kw = dict(
            max_new_tokens=c.max_new_tokens,
            min_new_tokens=c.min_new_tokens or None,
            do_sample=c.do_sample,
            pad_token_id=self.pad_id,
            eos_token_id=sorted(self.eos_ids),
            bad_words_ids=self.bad_words,
        )
        if c.do_sample:
            kw.update(temperature=c.temperature, top_p=c.top_p, top_k=c.top_k)
        if c.stop and not c.require:
            kw["stop_strings"] = list(c.stop)
        return GenerationConfig(**kw)

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], users: Sequence[str | None] | None = None) -> list[Generation]:
        """Completions of `prompts`; `users`: whom each is for (a personalised policy's user tokens)."""
        out: list[Generation] = []
        bs = self.cfg.batch_size
        for s in range(0, len(prompts), bs):
            who = list(users[s : s + bs]) if users is not None else None
            out.extend(self._batch(list(prompts[s : s + bs]), who))
        return out

    def _batch(self, prompts: list[str], users: list[str | None] | None = None) -> list[Generation]:
        from transformers import LogitsProcessorList, StoppingCriteriaList

        c = self.cfg
        enc = [self.encode(p, users[k] if users is not None else None) for k, p in enumerate(prompts)]
        for p, e in zip(prompts, enc):
            if self.positions is not None and len(e) + c.max_new_tokens > self.positions:
                from ..errors import DataError

                raise DataError(
                    f"the prompt {p[:40]!r}{'...' if len(p) > 40 else ''} is {len(e)} tokens; with max_new_tokens "
                    f"{c.max_new_tokens} that exceeds the {self.positions} positions of the model's learned position "
                    "table (n_positions / max_position_embeddings): shorten the prompt or lower max_new_tokens "
                    "(--max-new-tokens)"
                )
        ids, mask = left_pad(enc, self.pad_id, "cpu")
        P = ids.shape[1]
        procs = LogitsProcessorList()
        if c.ban:
            procs.append(
                BannedWordsProcessor(
                    self.tok, c.ban, P, c.max_new_tokens, self.vocab_size, self.eos_ids, self.pad_id, self._strings
                )
            )
        if c.require:
            procs.append(
                RequiredWordsProcessor(
                    self.tok, c.require, P, c.max_new_tokens, self.eos_ids, self.pad_id, self._strings
                )
            )
        stops = StoppingCriteriaList()
        if self._stop_inner is not None:
            stops.append(KeywordGatedStop(self._stop_inner, self.tok, c.require, c.stop, P))
        self.lm.eval()
        r = self.sampler.sample(
            ids.to(self.device),
            mask.to(self.device),
            SamplingConfig(
                max_new_tokens=c.max_new_tokens, stop_token_ids=sorted(self.eos_ids), pad_token_id=self.pad_id
            ),
            generation_config=self._config(),
            logits_processor=procs,
            stopping_criteria=stops,
            tokenizer=self.tok if c.stop else None,
        )
        results = []
        for i, p in enumerate(prompts):
            toks = r.completion_ids[i, : int(r.lengths[i])].tolist()
            finish = "eos" if bool(r.finished[i]) else "length"
            if finish == "length":  # a stop string ended the row early: generate padded after it
                while toks and toks[-1] == self.pad_id:
                    toks.pop()
            text = self.tok.decode(toks, skip_special_tokens=True)
            if c.stop:
                text, cut = cut_at_stop(text, c.stop, c.require)
                if cut:
                    finish = "stop"
            missing = [w for w in c.require if not contains_word(text, w)]
            results.append(
                Generation(
                    prompt=p, completion=text, prompt_ids=enc[i], token_ids=toks, finish_reason=finish, missing=missing
                )
            )
        return results


# ------------------------------------------------------------------- prompt streams


def read_prompts(lines: Iterable[str | bytes], fmt: str, source: str) -> Iterator[tuple[str, dict]]:
    """Prompts from lines (bytes, decoded here as UTF-8, or text), lazily (so a pipeline answers as prompts arrive).

    fmt 'lines': one prompt per line (the newline removed; blank lines skipped).
    fmt 'jsonl': one JSON object per line with a 'prompt' string; its other fields are passed
    through to the output row. Errors name the source and the line; stdin and a file fail alike."""
    from ..engine.datacheck import parse_json_row, text_line
    from ..errors import DataError

    for n, line in enumerate(lines, 1):
        raw = text_line(line, f"{source}:{n}").rstrip("\r\n")
        if not raw.strip():
            continue
        if fmt == "lines":
            yield raw, {}
            continue
        obj = parse_json_row(raw, f"{source}:{n}", "use --format lines for plain-text prompts")
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
            raise DataError(f"{source}:{n}: expected an object with a 'prompt' string")
        extra = {k: v for k, v in obj.items() if k != "prompt"}
        yield obj["prompt"], extra


# ------------------------------------------------------------------ prefcli generate


@dataclass
class GenerateOptions:
    model_dir: str | None = None
    recipe: str | None = None
    model_name: str | None = None
    prompts: str | None = None  # a file; None reads stdin
    episodes: int | None = None  # play the recipe's environment instead of reading prompts
    fmt: str | None = None  # lines | jsonl; default: jsonl for a .jsonl file, else lines
    settings: dict = field(default_factory=dict)  # GenerationSection fields given on the command line
    seed: int | None = None
    device: str = "auto"
    quiet: bool = False
    user: str | None = None  # --user: generate for this user (a personalised policy)
    # ModelSection fields given on the command line (--trust-remote-code, --pad-token, --attn-implementation)
    model: dict = field(default_factory=dict)


def generation_settings(base: GenerationSection, given: dict) -> GenerationSection:
    from pydantic import ValidationError

    data = base.model_dump()
    data.update({k: v for k, v in given.items() if v is not None and v != []})
    try:
        return GenerationSection.model_validate(data)
    except ValidationError as e:
        msgs = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"])
            msgs.append(
                f"{'--' + loc.replace('_', '-') + ': ' if loc else ''}{err['msg'].removeprefix('Value error, ')}"
            )
        raise UsageError("invalid generation settings: " + "; ".join(msgs)) from None


def resolve_generate_model(opts: GenerateOptions):
    """(ModelSection, generation defaults, seed, runtime settings) from a model folder or a recipe; the model
    options given on the command line (`opts.model`) win over the recipe's."""
    from pydantic import ValidationError

    from ..recipe import load_recipe
    from ..recipe.sections import ModelSection
    from .loading import model_section, trained_model_dir

    given = {k: v for k, v in opts.model.items() if v is not None}

    def section(base: dict) -> ModelSection:
        try:
            return ModelSection(**{**base, **given})
        except ValidationError as e:
            err = e.errors()[0]
            name = ".".join(str(x) for x in err["loc"])
            where = f"--{name.replace('_', '-')}" if name in given else f"model {base.get('path')}"
            raise UsageError(f"{where}: {err['msg'].removeprefix('Value error, ')}") from None

    if (opts.model_dir is None) == (opts.recipe is None):
        raise UsageError("give a model folder or --recipe RECIPE.yaml (one of them)")
    if opts.model_dir is not None:
        if opts.model_name:
            raise UsageError("--model picks one of an eval recipe's models; it needs --recipe")
        return section({"path": str(opts.model_dir)}), GenerationSection(), 0, ("auto", "auto", 4096)
    loaded = load_recipe(opts.recipe)
    r = loaded.recipe
    if loaded.command == "eval":
        candidates = list(r.models) + ([r.baseline] if r.baseline is not None else [])
        if opts.model_name:
            found = [m for m in candidates if m.display_name() == opts.model_name]
            if not found:
                raise UsageError(
                    f"--model {opts.model_name}: {opts.recipe} has no model of that name (models: "
                    f"{', '.join(m.display_name() for m in candidates)})"
                )
            spec = found[0]
        else:
            spec = candidates[0]
        rt = r.runtime
        return (
            section(model_section(spec, spec.display_name()).model_dump(exclude_unset=True)),
            r.generation,
            r.seed,
            (rt.device, rt.precision, rt.loss_chunk_tokens),
        )
    if opts.model_name:
        raise UsageError("--model picks one of an eval recipe's models; a training recipe has one")
    final = trained_model_dir(opts.recipe)
    if not (final / "config.json").exists():
        raise UsageError(
            f"{opts.recipe}: no trained model at {final}; run `prefcli {loaded.command} {opts.recipe}` "
            "first (from this folder)"
        )
    m = r.model
    return (
        section(
            {"path": str(final), "trust_remote_code": m.trust_remote_code, "attn_implementation": m.attn_implementation}
        ),
        GenerationSection(),
        r.train.seed,
        (r.runtime.device, r.runtime.precision, r.runtime.loss_chunk_tokens),
    )


def run_generate(opts: GenerateOptions, out=None, err=None) -> int:
    """Read prompts lazily, write one JSON object per prompt to `out` (stdout), flushed as each batch is
    done. Returns the number of completions written."""
    import time

    from .loading import load_lm, make_runtime

    out = out or sys.stdout
    err = err or sys.stderr
    section, base, seed, (device, precision, chunk) = resolve_generate_model(opts)
    cfg = generation_settings(base, opts.settings)
    if opts.episodes is not None:
        from .env import print_episodes

        rt = make_runtime(opts.device if opts.device != "auto" else device, precision, chunk)
        return print_episodes(opts, section, cfg, opts.seed if opts.seed is not None else seed, rt, out, err)
    stream, source, fmt = _prompt_stream(opts)
    users = _personal_users(opts, section)
    rt = make_runtime(opts.device if opts.device != "auto" else device, precision, chunk)
    lm, tok = load_lm(section, rt)

    def warn(text: str) -> None:
        print(f"warning: {text}", file=err, flush=True)

    gen = Generator(lm, tok, cfg, rt.device, autocast=rt.autocast, warn=warn, users=users)
    torch.manual_seed(opts.seed if opts.seed is not None else seed)
    t0 = time.perf_counter()
    n = _write_completions(gen, cfg, opts.user, stream, fmt, source, out)
    if not opts.quiet:
        print(
            f"generated {n} completion{'s' if n != 1 else ''} in {time.perf_counter() - t0:.1f} s", file=err, flush=True
        )
    return n


def _prompt_stream(opts: GenerateOptions):
    """(the prompt stream as bytes, its name for errors, its format): --prompts FILE, else stdin; the format
    from --format, else jsonl for a .jsonl file and lines otherwise."""
    fmt = opts.fmt or ("jsonl" if opts.prompts and str(opts.prompts).endswith(".jsonl") else "lines")  # '-': lines
    if fmt not in ("lines", "jsonl"):
        raise UsageError(f"--format must be 'lines' or 'jsonl', got {fmt!r}")
    if opts.prompts is not None and str(opts.prompts) != "-":
        from pathlib import Path

        if not Path(opts.prompts).is_file():
            raise UsageError(f"--prompts: no such file: {opts.prompts}")
        stream = open(opts.prompts, "rb")  # bytes: read_prompts decodes, naming a line that is not UTF-8
        return stream, str(opts.prompts), fmt
    return getattr(sys.stdin, "buffer", sys.stdin), "<stdin>", fmt


def _personal_users(opts: GenerateOptions, section):
    """The personalised policy's users (None for an ordinary policy); --user on an ordinary one is a usage error."""
    from ..engine.personal import policy_users

    users = policy_users(section.path) if section.path and os.path.isdir(section.path) else None
    if opts.user is not None and users is None:
        raise UsageError(
            f"--user: {section.path or 'the model'} is not a personalised policy (no personalisation/config.json of "
            "kind user_token; train one with contrastive.personalisation or rlhf.personalisation)"
        )
    return users


def _write_completions(gen: Generator, cfg: GenerationSection, user, stream, fmt: str, source: str, out) -> int:
    """Sample the prompts in batches of cfg.batch_size, one JSON row per prompt to `out`, flushed per batch;
    on a bad prompt line, the rows read before it are answered first. Returns the rows written."""
    import json

    from ..errors import DataError

    n = 0
    batch: list[tuple[str, dict]] = []

    def flush() -> None:
        nonlocal n
        who = [user] * len(batch) if user is not None else None
        for (prompt, extra), g in zip(batch, gen.generate([p for p, _ in batch], users=who)):
            row = {
                **extra,
                "index": n,
                "prompt": prompt,
                "completion": g.completion,
                "finish_reason": g.finish_reason,
                "tokens": len(g.token_ids),
            }
            if cfg.require:
                row["missing"] = g.missing
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
        out.flush()
        batch.clear()

    try:
        for item in read_prompts(iter(stream.readline, stream.read(0)), fmt, source):
            batch.append(item)
            if len(batch) >= cfg.batch_size:
                flush()
        if batch:
            flush()
    except DataError:
        if batch:  # answer what was read before the bad line, then report it
            flush()
        raise
    finally:
        if source != "<stdin>":
            stream.close()
    return n
