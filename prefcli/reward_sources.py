"""Reward sources at run time: score (prompt, completion) pairs, several sources summed by weight.

    rs = build_rewards(recipe.rewards, base_dir=..., device=...)
    total, parts = rs.score(prompts, completions)      # list[float], {name: list[float]}

A source that raises, returns the wrong number of values, or returns NaN/inf stops the run with
a TrainingError naming the source (the training loop keeps its last checkpoint).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
import sys
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import DataError, TrainingError, UsageError
from .interrupts import user_code
from .recipe.reward_specs import (
    EnsembleReward,
    FunctionReward,
    HumanScoreReward,
    JudgeReward,
    KeywordReward,
    LengthReward,
    ModelReward,
    SentimentReward,
)


class RewardSource:
    name: str
    weight: float

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        raise NotImplementedError


def load_function(spec: str, base_dir: str | Path | None = None) -> Callable:
    """'pkg.module:fn' or 'path/to/file.py:fn' (relative to base_dir)."""
    mod_name, _, attr = spec.rpartition(":")
    try:
        if mod_name.endswith(".py"):
            path = Path(mod_name)
            if not path.is_absolute() and base_dir is not None:
                path = Path(base_dir) / path
            if not path.exists():
                raise UsageError(f"reward function '{spec}': no such file {path}")
            unique = f"prefcli_user_{abs(hash(str(path.resolve())))}"
            s = importlib.util.spec_from_file_location(unique, path)
            module = importlib.util.module_from_spec(s)
            sys.modules[unique] = module
            with user_code(f"reward function '{spec}': importing {mod_name}", UsageError):
                s.loader.exec_module(module)
        else:
            with user_code(f"reward function '{spec}': importing {mod_name}", UsageError):
                module = importlib.import_module(mod_name)
    except UsageError:
        raise
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        run = f"python {mod_name}" if mod_name.endswith(".py") else f"python -c 'import {mod_name}'"
        raise UsageError(
            f"reward function '{spec}': importing {mod_name} failed: {type(e).__name__}: {first}; fix it "
            f"(`{run}` shows the traceback)"
        ) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UsageError(
            f"reward function '{spec}': {mod_name} has no callable '{attr}'; check the name after the colon"
        )
    return fn


class FunctionSource(RewardSource):
    """Your function fn(prompts, completions, **kwargs) -> floats. A function with a `users` parameter also gets
    whom each completion is for (a list of user ids or None, from the caller's user column): a reward that
    differs by user."""

    def __init__(self, cfg: FunctionReward, base_dir=None):
        import inspect

        self.fn = load_function(cfg.function, base_dir)
        self.kwargs = cfg.kwargs
        self.name = cfg.name or cfg.function.rpartition(":")[2]
        self.label = cfg.function
        try:
            self.accepts_users = "users" in inspect.signature(self.fn).parameters
        except (TypeError, ValueError):  # a builtin without a signature
            self.accepts_users = False

    def __call__(self, prompts, completions, users=None):
        with user_code(f"reward function '{self.label}'", TrainingError):
            if self.accepts_users:
                return list(self.fn(list(prompts), list(completions), users=users, **self.kwargs))
            return list(self.fn(list(prompts), list(completions), **self.kwargs))


class LengthSource(RewardSource):
    def __init__(self, cfg: LengthReward, tokenizer=None):
        self.cfg, self.tok = cfg, tokenizer
        self.name = cfg.name or "length"
        if cfg.unit == "tokens" and tokenizer is None:
            raise UsageError("a length reward with unit: tokens needs the policy's tokenizer")

    def _len(self, text: str) -> int:
        if self.cfg.unit == "words":
            return len(text.split())
        if self.cfg.unit == "chars":
            return len(text)
        return len(self.tok(text, add_special_tokens=False)["input_ids"])

    def __call__(self, prompts, completions):
        t = self.cfg.target
        return [-abs(self._len(c) - t) / t for c in completions]


class KeywordSource(RewardSource):
    def __init__(self, cfg: KeywordReward):
        self.cfg = cfg
        self.name = cfg.name or "keyword"
        flags = 0 if cfg.case_sensitive else re.IGNORECASE
        self.patterns = [re.compile(r"(?<!\w)" + re.escape(k) + r"(?!\w)", flags) for k in cfg.keywords]
        self.regex = re.compile(cfg.regex, flags) if cfg.regex else None

    def score_one(self, text: str) -> float:
        parts = []
        if self.patterns:
            parts.append(sum(1 for p in self.patterns if p.search(text)) / len(self.patterns))
        if self.regex is not None:
            parts.append(1.0 if self.regex.search(text) else 0.0)
        s = sum(parts) / len(parts)
        return -s if self.cfg.mode == "penalty" else s

    def __call__(self, prompts, completions):
        return [self.score_one(c) for c in completions]


_VADER = None


def vader_compound(texts: Sequence[str]) -> list[float]:
    """VADER compound sentiment in [-1, 1] (Hutto & Gilbert 2014)."""
    global _VADER
    if _VADER is None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        _VADER = SentimentIntensityAnalyzer()
    return [_VADER.polarity_scores(t)["compound"] for t in texts]


class SentimentSource(RewardSource):
    def __init__(self, cfg: SentimentReward):
        self.sign = 1.0 if cfg.target == "positive" else -1.0
        self.name = cfg.name or "sentiment"

    def __call__(self, prompts, completions):
        return [self.sign * s for s in vader_compound(completions)]


class HumanScoreSource(RewardSource):
    def __init__(self, cfg: HumanScoreReward):
        from .engine.data import load_rows
        from .recipe.sections import DataSource

        ds = load_rows(
            DataSource(path=cfg.path, columns=cfg.columns),
            required=["prompt", "completion", "score"],
            what="human_scores",
        )
        self.table: dict[tuple[str, str], float] = {}
        for i, (p, c, s) in enumerate(zip(ds["prompt"], ds["completion"], ds["score"])):
            try:
                self.table[(p, c)] = float(s)
            except (TypeError, ValueError):
                raise DataError(f"human_scores: {cfg.path}: row {i + 1}: score {s!r} is not a number") from None
        self.cfg = cfg
        self.name = cfg.name or "human_scores"

    def __call__(self, prompts, completions):
        out = []
        for p, c in zip(prompts, completions):
            v = self.table.get((p, c))
            if v is None:
                if self.cfg.missing == "error":
                    raise TrainingError(
                        f"human_scores: no score in {self.cfg.path} for the pair (prompt {p[:40]!r}, "
                        f"completion {c[:40]!r}); set missing: default to score unseen pairs"
                    )
                v = self.cfg.default
            out.append(v)
        return out


def load_reward_model(path: str, device, what: str | None = None, dtype=None, attn_implementation: str | None = None):
    """(a trained reward model in eval mode on `device`, its tokenizer) to score with: a sequence classifier with
    one label, as `prefcli reward` writes it (the score is read at the last non-pad token); for `rewards:
    [{kind: model}]` and `prefcli explain`. `what` starts the error messages (the recipe field, e.g. 'rewards');
    `dtype` and `attn_implementation` are transformers' defaults unless given."""
    from .engine.models import load_errors, load_failure, quiet_transformers
    from .engine.tokenizer import open_tokenizer

    quiet_transformers()
    from transformers import AutoModelForSequenceClassification

    prefix = f"{what}: " if what else ""
    kw = {k: v for k, v in (("dtype", dtype), ("attn_implementation", attn_implementation)) if v is not None}
    try:
        tok = open_tokenizer(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, use_safetensors=True, **kw)
    except load_errors() as e:
        raise UsageError(prefix + load_failure("the reward model", path, e)) from None
    except UsageError as e:  # a degenerate tokenizer (open_tokenizer)
        raise UsageError(f"{prefix}{e}") from None
    if tok.pad_token_id is None:
        raise UsageError(f"the reward model's tokenizer at {path} has no pad token")
    model.config.pad_token_id = tok.pad_token_id
    return model.to(device).eval(), tok


class ModelSource(RewardSource):
    """A sequence-classification reward model; the score of prompt + completion at the last real token.

    A personalised reward model (`prefcli reward` with `reward.personalisation`; its user part in
    final/personalisation/, prefcli/engine/personal.py) scores each completion for a user: the shared score plus
    the user's head offset on the same hidden state. Whose: `user` (a user seen in training), `context` (a new
    user fitted from their labelled pairs when the model loads), else each row's own user as the caller passes
    them (`users`); an unknown user, or none, gets the shared part, with a warning naming unknown ids once."""

    accepts_users = True

    def __init__(self, cfg: ModelReward, device=None):
        import torch

        from .engine import personal

        self.device = device or torch.device("cpu")
        self.model, self.tok = load_reward_model(cfg.path, self.device, "rewards")
        self.cfg = cfg
        self.name = cfg.name or "model"
        self.warnings: list[str] = []
        self._unknown: set[str] = set()
        self.personal = None
        self.fixed = None  # the head offset every completion gets (cfg.user, cfg.context)
        if Path(cfg.path).is_dir() and personal.is_personalised(cfg.path):
            try:
                self.personal = personal.load(cfg.path)
            except (OSError, ValueError, KeyError, RuntimeError) as e:
                raise UsageError(
                    f"rewards: {cfg.path}/{personal.FOLDER}: could not load the user part: {str(e).splitlines()[0]}"
                ) from None
            self.personal.cond.to(self.device)
            if cfg.user is not None:
                i = self.personal.index.get(cfg.user)
                if i is None:
                    raise UsageError(
                        f"rewards: user '{cfg.user}' is not a user of the reward model {cfg.path} (its users: "
                        f"{', '.join(self.personal.cond.users[:20])}); give a new user's pairs with `context:` instead"
                    )
                self.fixed = self.personal.offsets[i].to(self.device)
            elif cfg.context is not None:
                self.fixed = self._fit_context(cfg.context)
        elif cfg.user is not None or cfg.context is not None:
            raise UsageError(
                f"rewards: `{'user' if cfg.user is not None else 'context'}` needs a personalised reward model "
                f"(prefcli reward with reward.personalisation), and {cfg.path} has no {personal.FOLDER}/ folder"
            )

    def _encode(self, prompts, completions):
        """Prompt + completion texts as the model reads them: BOS once (a chat-rendered prompt may carry its own),
        cut from the left to max_length, padded on the right."""
        from .engine.tokenizer import text_ids

        tok = self.tok
        tok.padding_side = "right"
        ids = [text_ids(tok, p + c)[-self.cfg.max_length :] for p, c in zip(prompts, completions)]
        return tok.pad({"input_ids": ids}, return_tensors="pt", padding=True)

    def hidden_and_shared(self, prompts, completions):
        """(hidden states [n, d] the head reads, shared scores [n]) of prompt + completion texts, batched."""
        import torch

        from .engine.personal import last_hidden, shared_score

        hs, ss = [], []
        bs = self.cfg.batch_size
        for s in range(0, len(prompts), bs):
            enc = self._encode(prompts[s : s + bs], completions[s : s + bs])
            enc = {k: v.to(self.device) for k, v in enc.items()}
            with torch.no_grad():
                h = last_hidden(self.model, enc["input_ids"], enc["attention_mask"])
                hs.append(h)
                ss.append(shared_score(self.model, h))
        if not hs:
            return torch.zeros(0, 1, device=self.device), torch.zeros(0, device=self.device)
        return torch.cat(hs), torch.cat(ss)

    def _fit_context(self, path: str):
        """A new user's head offset, fitted from their labelled pairs in `path` (engine.personal: Conditioner.fit)."""
        from .engine.data import check_values, load_rows
        from .recipe.sections import DataSource

        ds = load_rows(DataSource(path=path), required=["chosen", "rejected"], what="rewards.context")
        check_values(ds, ["chosen", "rejected"], path, what="rewards.context")
        prompts = [
            str(p) if p is not None else "" for p in (ds["prompt"] if "prompt" in ds.column_names else [""] * len(ds))
        ]
        hc, sc = self.hidden_and_shared(prompts, [str(c) for c in ds["chosen"]])
        hr, sr = self.hidden_and_shared(prompts, [str(c) for c in ds["rejected"]])
        cond = self.personal.cond
        state = cond.fit(hc.float().cpu(), hr.float().cpu(), (sc - sr).float().cpu())
        return cond.offsets(state[None].to(self.device))[0].detach()

    def __call__(self, prompts, completions, users=None):
        import torch

        if self.personal is None:
            scores: list[float] = []
            for s in range(0, len(prompts), self.cfg.batch_size):
                enc = self._encode(prompts[s : s + self.cfg.batch_size], completions[s : s + self.cfg.batch_size])
                with torch.no_grad():
                    out = self.model(**{k: v.to(self.device) for k, v in enc.items()}).logits[:, 0]
                scores.extend(out.float().tolist())
            return scores
        h, shared = self.hidden_and_shared(list(prompts), list(completions))
        if self.fixed is not None:
            offsets = self.fixed[None].expand(h.shape[0], -1)
        else:
            offsets = torch.zeros_like(h)
            for j, u in enumerate(users if users is not None else [None] * h.shape[0]):
                i = self.personal.index.get(u) if u is not None else None
                if i is not None:
                    offsets[j] = self.personal.offsets[i].to(h.device)
                elif u is not None and u not in self._unknown:
                    self._unknown.add(u)
                    self.warnings.append(
                        f"reward '{self.name}': user '{u}' is not a user of {self.cfg.path}; scored by the shared part "
                        "(the fallback for an unknown user); give their labelled pairs as `context:` to personalise"
                    )
        return (shared + (h * offsets.float()).sum(-1)).float().tolist()


def _mean(v):
    return v.mean(0)


def _min(v):
    return v.min(0).values


def _mean_minus_std(v, k):
    return v.mean(0) - k * v.std(0)


# How an ensemble's members [M, n] become one score [n] (Coste et al. 2023, "Reward Model Ensembles Help
# Mitigate Overoptimization", arXiv 2310.02743: mean, worst case, uncertainty-weighted)
COMBINERS = {
    "mean": lambda v, k: _mean(v),
    "min": lambda v, k: _min(v),
    "mean_minus_std": _mean_minus_std,
}


class EnsembleSource(RewardSource):
    """Several reward models scoring the same texts, combined (`COMBINERS`): the mean, the minimum, or the
    mean minus k standard deviations (the sample standard deviation over members). Each member is first
    standardised with its own mean and standard deviation on the first batch it scores (`normalize`), so
    reward models trained apart, whose Bradley-Terry scores have arbitrary offsets, share one scale. The
    per-completion spread (standard deviation over members, after normalisation) is reported as
    `<name>_spread` next to the score."""

    def __init__(self, cfg: EnsembleReward, base_dir=None, tokenizer=None, device=None, field: str = "rewards"):
        self.cfg = cfg
        self.name = cfg.name or "ensemble"
        self.members = [
            build_source(m, base_dir, tokenizer, device, f"{field}.members[{j}]") for j, m in enumerate(cfg.members)
        ]
        self.stats: list[tuple[float, float]] | None = None  # per member (mean, std) of its first batch
        self.last_spread: list[float] = []

    def state_dict(self) -> dict:
        return {"stats": self.stats}

    def load_state_dict(self, state: dict) -> None:
        self.stats = [tuple(x) for x in state["stats"]] if state.get("stats") else None

    def __call__(self, prompts, completions):
        import torch

        v = torch.tensor([m(prompts, completions) for m in self.members], dtype=torch.float64)  # [M, n]
        if self.cfg.normalize:
            if self.stats is None:
                self.stats = [(float(r.mean()), float(r.std()) if r.numel() > 1 else 1.0) for r in v]
            mu = torch.tensor([m for m, _ in self.stats], dtype=torch.float64)[:, None]
            sd = torch.tensor([max(s, 1e-6) for _, s in self.stats], dtype=torch.float64)[:, None]
            v = (v - mu) / sd
        self.last_spread = v.std(0).tolist()
        return COMBINERS[self.cfg.combine](v, self.cfg.std_coef).tolist()


class RewardSet:
    """Weighted sum of sources, with the per-source values for logging. `warn` gets what a source has to say
    (a personalised reward model asked about a user it does not know); default: stderr."""

    def __init__(self, sources: list[RewardSource], warn: Callable[[str], None] | None = None, empty_ok: bool = False):
        if not sources and not empty_ok:  # empty_ok: rlhf in an environment, whose own reward may be the only one
            raise UsageError("no reward source given: add at least one entry under `rewards:`")
        self.sources = sources
        self.warn = warn or (lambda m: print(f"warning: {m}", file=sys.stderr))
        names = [s.name for s in sources]
        for i, s in enumerate(sources):  # keep metric names unique
            if names.count(s.name) > 1:
                s.name = f"{s.name}{i}"

    def state_dict(self) -> dict:
        """What sources learned while scoring (an ensemble's member normalisation), for checkpoints."""
        return {s.name: s.state_dict() for s in self.sources if hasattr(s, "state_dict")}

    def load_state_dict(self, state: dict) -> None:
        for s in self.sources:
            if hasattr(s, "load_state_dict") and s.name in state:
                s.load_state_dict(state[s.name])

    def score(
        self, prompts: Sequence[str], completions: Sequence[str], users: Sequence[str | None] | None = None
    ) -> tuple[list[float], dict[str, list[float]]]:
        """The weighted total and each source's values. `users`: whom each completion is for (personalised reward
        models score it for that user; other sources ignore it)."""
        n = len(completions)
        total = [0.0] * n
        parts: dict[str, list[float]] = {}
        for src in self.sources:
            label = getattr(src, "label", src.name)
            try:
                if users is not None and getattr(src, "accepts_users", False):
                    vals = src(prompts, completions, users=list(users))
                else:
                    vals = src(prompts, completions)
                for m in getattr(src, "warnings", ()):
                    self.warn(m)
                if getattr(src, "warnings", None):
                    src.warnings.clear()
            except (TrainingError, UsageError):
                raise
            except Exception as e:
                raise TrainingError(f"reward '{label}' raised {type(e).__name__}: {e}") from None
            if vals is None or len(vals) != n:
                got = "None" if vals is None else f"{len(vals)} values"
                raise TrainingError(f"reward '{label}' returned {got} for {n} completions")
            clean = []
            for i, v in enumerate(vals):
                try:
                    v = float(v)
                except (TypeError, ValueError):
                    raise TrainingError(f"reward '{label}' returned {v!r} (not a number) for completion #{i}") from None
                if not math.isfinite(v):
                    raise TrainingError(f"reward '{label}' returned {v} for completion #{i}: {completions[i][:60]!r}")
                clean.append(v)
            parts[src.name] = clean
            if isinstance(src, EnsembleSource):
                parts[f"{src.name}_spread"] = list(src.last_spread)
            total = [t + src.weight * v for t, v in zip(total, clean)]
        return total, parts


class JudgeSource(RewardSource):
    """A local causal LM as a reward source (`rewards: [{kind: judge, ...}]`).

    The judge reads a prompt built from the recipe's template and the score is read from its next-token
    distribution over the answer tokens, never from generated text (Zheng et al. 2023, "Judging LLM-as-a-judge",
    score the verdict; G-Eval, Liu et al. 2023, weights each answer by its probability):

        score mode     template(prompt, completion)                    -> sum_a p(a) v_a / sum_a p(a)
        pairwise mode  template(prompt, completion_a, completion_b)   -> P(first better) = sum_a p(a) v_a / sum_a p(a)

    with p(a) the judge's probability of answer token a after the template and v_a its value in `answers`
    (e.g. {" yes": 1, " no": 0}: the probability of "yes" among the two). In pairwise mode each completion is
    compared with every other completion of the same prompt in the batch (the k samples of a rollout), both
    orders to cancel the judge's position bias (Zheng et al. 2023): win(i, j) = (P(i first better) + 1 -
    P(j first better)) / 2, and its score is its mean win rate (0.5 for a completion with no rival). Forwards
    are batched (left padding, the template's end kept when it is longer than max_length) and every verdict is
    cached per (prompt, completion) or (prompt, first, second).
    """

    def __init__(self, cfg, device=None, label: str = "judge"):
        import torch
        from transformers import AutoModelForCausalLM

        from .engine.tokenizer import open_tokenizer

        self.cfg, self.label = cfg, label
        self.name = cfg.name or "judge"
        try:
            self.tok = open_tokenizer(cfg.tokenizer or cfg.path)
            self.model = AutoModelForCausalLM.from_pretrained(cfg.path, use_safetensors=True)
        except (OSError, ValueError) as e:
            raise UsageError(
                f"{label}.path: could not load the judge model {cfg.path}: {str(e).splitlines()[0]}"
            ) from None
        except UsageError as e:  # a degenerate tokenizer (open_tokenizer)
            raise UsageError(f"{label}.tokenizer: {e}") from None
        self.device = device or torch.device("cpu")
        self.model.to(self.device).eval()
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        if self.pad_id is None:
            raise UsageError(f"{label}.tokenizer: the judge's tokenizer has neither a pad nor an EOS token")
        ids, values = [], []
        for text, v in cfg.answers.items():
            t = self.tok(text, add_special_tokens=False)["input_ids"]
            if len(t) != 1:
                raise UsageError(
                    f"{label}.answers: {text!r} is {len(t)} tokens for the judge's tokenizer; every answer must be "
                    "one token (try it with or without a leading space)"
                )
            ids.append(t[0])
            values.append(float(v))
        if len(set(ids)) != len(ids):
            raise UsageError(f"{label}.answers: two answers are the same token for the judge's tokenizer")
        self.answer_ids = torch.tensor(ids, device=self.device)
        self.values = torch.tensor(values, dtype=torch.float32, device=self.device)
        self.cache: OrderedDict = OrderedDict()
        self.forwards = 0  # judge prompts actually run (cache misses), for tests and the curious

    # ---------------------------------------------------------------------------------------- text
    def render(self, **fields) -> str:
        text = self.cfg.template.format(**fields)
        if self.cfg.chat_template:
            text = self.tok.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
            )
        return text

    # ------------------------------------------------------------------------------------- verdicts
    def verdicts(self, texts: list[str]) -> list[float]:
        """Expected answer value of each judge prompt, batched (the judge's next-token probabilities over
        the answer tokens, renormalised)."""
        import torch

        from .engine.sampling import left_pad

        out: list[float] = []
        add_special = not self.cfg.chat_template  # a chat template writes its own special tokens
        for s in range(0, len(texts), self.cfg.batch_size):
            enc = [
                self.tok(t, add_special_tokens=add_special)["input_ids"][-self.cfg.max_length :]
                for t in texts[s : s + self.cfg.batch_size]
            ]
            ids, mask = left_pad(enc, self.pad_id, self.device)
            pos = (mask.cumsum(-1) - 1).clamp_min(0)
            with torch.no_grad():
                logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
            p = logits[:, -1].float()[:, self.answer_ids].softmax(-1)
            out.extend((p @ self.values).tolist())
            self.forwards += len(enc)
        return out

    def _cached(self, keys: list[tuple], texts: list[str]) -> list[float]:
        todo = [i for i, k in enumerate(keys) if k not in self.cache]
        uniq: dict[tuple, str] = {}
        for i in todo:
            uniq.setdefault(keys[i], texts[i])
        if uniq:
            for k, v in zip(uniq, self.verdicts(list(uniq.values()))):
                self.cache[k] = v
                if len(self.cache) > self.cfg.cache_size:
                    self.cache.popitem(last=False)
        got = []
        for k in keys:
            self.cache.move_to_end(k)
            got.append(self.cache[k])
        return got

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        if self.cfg.mode == "score":
            keys = list(zip(prompts, completions))
            texts = [self.render(prompt=p, completion=c) for p, c in keys]
            return self._cached(keys, texts)
        groups: dict[str, list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault(p, []).append(i)
        pairs = [(i, j) for idx in groups.values() for i in idx for j in idx if i != j]
        keys = [(prompts[i], completions[i], completions[j]) for i, j in pairs]
        texts = [self.render(prompt=p, completion_a=a, completion_b=b) for p, a, b in keys]
        first_better = dict(zip(pairs, self._cached(keys, texts)))
        scores = []
        for i, p in enumerate(prompts):
            rivals = [j for j in groups[p] if j != i]
            wins = [(first_better[(i, j)] + 1.0 - first_better[(j, i)]) / 2 for j in rivals]
            scores.append(sum(wins) / len(wins) if wins else 0.5)
        return scores


def _judge(cfg, base_dir, tok, device, field):
    return JudgeSource(cfg, device, label=field)  # transformers' causal LM classes load only when a judge is used


# reward spec (recipe schema) -> its runtime source: fn(spec, base_dir, tokenizer, device, field)
SOURCES: dict[type, Callable] = {
    ModelReward: lambda cfg, base_dir, tok, device, field: ModelSource(cfg, device),
    EnsembleReward: lambda cfg, base_dir, tok, device, field: EnsembleSource(cfg, base_dir, tok, device, field),
    JudgeReward: _judge,
    FunctionReward: lambda cfg, base_dir, tok, device, field: FunctionSource(cfg, base_dir),
    LengthReward: lambda cfg, base_dir, tok, device, field: LengthSource(cfg, tok),
    KeywordReward: lambda cfg, base_dir, tok, device, field: KeywordSource(cfg),
    SentimentReward: lambda cfg, base_dir, tok, device, field: SentimentSource(cfg),
    HumanScoreReward: lambda cfg, base_dir, tok, device, field: HumanScoreSource(cfg),
}


def build_source(cfg, base_dir=None, tokenizer=None, device=None, field: str = "rewards") -> RewardSource:
    """The runtime source of one reward spec (`field`: where it sits in the recipe, for error messages)."""
    src = SOURCES[type(cfg)](cfg, base_dir, tokenizer, device, field)
    src.weight = cfg.weight
    return src


def build_rewards(
    specs, base_dir=None, tokenizer=None, device=None, field: str = "rewards", warn=None, empty_ok: bool = False
) -> RewardSet:
    return RewardSet(
        [build_source(cfg, base_dir, tokenizer, device, f"{field}[{i}]") for i, cfg in enumerate(specs)],
        warn,
        empty_ok,
    )
