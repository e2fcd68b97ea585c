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

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from .errors import UsageError
from .reward_sources import RewardSource


class JudgeSource(RewardSource):
    def __init__(self, cfg, device=None, label: str = "judge"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg, self.label = cfg, label
        self.name = cfg.name or "judge"
        try:
            self.tok = AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.path)
            self.model = AutoModelForCausalLM.from_pretrained(cfg.path, use_safetensors=True)
        except (OSError, ValueError) as e:
            raise UsageError(
                f"{label}.path: could not load the judge model {cfg.path}: {str(e).splitlines()[0]}"
            ) from None
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

        out: list[float] = []
        add_special = not self.cfg.chat_template  # a chat template writes its own special tokens
        for s in range(0, len(texts), self.cfg.batch_size):
            enc = [
                self.tok(t, add_special_tokens=add_special)["input_ids"][-self.cfg.max_length :]
                for t in texts[s : s + self.cfg.batch_size]
            ]
            width = max(len(e) for e in enc)
            ids = torch.full((len(enc), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(enc), width), dtype=torch.long)
            for i, e in enumerate(enc):
                ids[i, width - len(e) :] = torch.tensor(e)
                mask[i, width - len(e) :] = 1
            ids, mask = ids.to(self.device), mask.to(self.device)
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
