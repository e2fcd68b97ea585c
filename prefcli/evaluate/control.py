"""Output control on transformers `generate` that transformers does not offer as is: banned words
(whole words, any tokenization) and required keywords (see prefcli/evaluate/generation.py for why these
two are written here as LogitsProcessors), and stop strings that wait for the keywords."""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from transformers import LogitsProcessor, StoppingCriteria

from .metrics import contains_word, word_pattern

NEG_INF = float("-inf")


def token_strings(tok, vocab_size: int) -> list[str]:
    """The text each token adds when it follows other text. Decoding a token alone loses a
    SentencePiece-style leading space, so each is decoded after an anchor token and the anchor's
    text removed. Special tokens (and ids past the tokenizer) give ''."""
    anchor = tok("a", add_special_tokens=False)["input_ids"][:1]
    base = tok.decode(anchor, skip_special_tokens=True)
    special = set(tok.all_special_ids)
    n = len(tok)
    texts = tok.batch_decode([anchor + [i] for i in range(min(n, vocab_size))], skip_special_tokens=True)
    out = []
    for i, t in enumerate(texts):
        out.append("" if i in special else (t[len(base) :] if t.startswith(base) else t))
    return out + [""] * max(0, vocab_size - n)


def _finished(row: torch.Tensor, eos_ids: set[int], pad_id: int) -> bool:
    if row.numel() == 0:
        return False
    last = int(row[-1])
    return last in eos_ids or last == pad_id or any(int(t) in eos_ids for t in row.tolist())


class BannedWordsProcessor(LogitsProcessor):
    """Bans every token that would make a banned word appear as a whole word (any letter case) in
    the completion.

    With the completion text so far (`text`) and a candidate token's text (`s`), a violation is a
    match of the word in `text + s` that involves `s` and is *confirmed*: followed by a non-word
    character (on the last step, also a match at the very end, since nothing can follow). A match
    left at the end of `text` ("...dark") is *pending*: then every token that starts with a
    non-word character, and EOS, are banned, so it can only grow into another word ("darkness").
    Only tokens that can take part in a match are checked one by one (tokens containing the word,
    or starting with a suffix of it that `text` ends the beginning of), so a step costs a decode
    of the completion and a few regex searches per row."""

    def __init__(
        self,
        tok,
        words: Sequence[str],
        prompt_len: int,
        max_new_tokens: int,
        vocab_size: int,
        eos_ids: set[int],
        pad_id: int,
        strings: list[str] | None = None,
    ):
        self.tok = tok
        self.words = list(words)
        self.prompt_len = prompt_len
        self.max_new = max_new_tokens
        self.eos_ids = eos_ids
        self.pad_id = pad_id
        self.strings = strings if strings is not None else token_strings(tok, vocab_size)
        lower = [s.lower() for s in self.strings]
        self.patterns = [word_pattern(w) for w in self.words]
        self.end_patterns = [re.compile(p.pattern + r"\Z", re.IGNORECASE) for p in self.patterns]
        self.nonword_start = torch.tensor([bool(s) and not re.match(r"\w", s) for s in self.strings])
        self.contains: list[list[int]] = []
        self.starts: list[dict[int, list[int]]] = []
        for w in self.words:
            wl = w.lower()
            self.contains.append([i for i, s in enumerate(lower) if wl in s])
            self.starts.append({k: [i for i, s in enumerate(lower) if s.startswith(wl[k:])] for k in range(1, len(wl))})

    def banned_for(self, text: str, last_step: bool) -> tuple[set[int], bool]:
        """Token ids to ban after `text`, and whether non-word starts and EOS are banned too."""
        banned: set[int] = set()
        block_boundary = False
        low = text.lower()
        for wi, w in enumerate(self.words):
            L = len(w)
            if self.end_patterns[wi].search(text):
                block_boundary = True
            ctx = text[-(L + 1) :]
            cands = set(self.contains[wi])
            for k, ids in self.starts[wi].items():
                if low.endswith(w[:k].lower()):
                    cands.update(ids)
            pat = self.patterns[wi]
            for t in cands:
                new = ctx + self.strings[t]
                for m in pat.finditer(new):
                    if m.end() > len(ctx) and (m.end() < len(new) or last_step):
                        banned.add(t)
                        break
        return banned, block_boundary

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        gen = input_ids[:, self.prompt_len :]
        last_step = gen.shape[1] + 1 >= self.max_new
        for r in range(gen.shape[0]):
            if _finished(gen[r], self.eos_ids, self.pad_id):
                continue
            text = self.tok.decode(gen[r].tolist(), skip_special_tokens=True)
            banned, boundary = self.banned_for(text, last_step)
            if banned:
                scores[r, list(banned)] = NEG_INF
            if boundary:
                scores[r, : len(self.nonword_start)][self.nonword_start.to(scores.device)] = NEG_INF
                for e in self.eos_ids:
                    scores[r, e] = NEG_INF
        return scores


class RequiredWordsProcessor(LogitsProcessor):
    """Makes every completion contain each required keyword (whole word, any case).

    Per row: while a keyword is missing, EOS is banned. When the tokens left
    (max_new_tokens - generated) are no more than the tokens the missing keywords need, the next
    missing keyword is forced: its tokens (with a leading space unless the text ends in one) get
    all the probability, one per step; the step after a forced keyword cannot start with a word
    character, so the keyword stays a whole word. Put it last in the processor list: forcing
    overrides every other processor."""

    def __init__(
        self,
        tok,
        words: Sequence[str],
        prompt_len: int,
        max_new_tokens: int,
        eos_ids: set[int],
        pad_id: int,
        strings: list[str],
    ):
        self.tok = tok
        self.words = list(words)
        self.prompt_len = prompt_len
        self.max_new = max_new_tokens
        self.eos_ids = eos_ids
        self.pad_id = pad_id
        self.word_start = torch.tensor([bool(s) and re.match(r"\w", s) is not None for s in strings])
        self.ids = {
            w: (tok(" " + w, add_special_tokens=False)["input_ids"], tok(w, add_special_tokens=False)["input_ids"])
            for w in self.words
        }
        self.queue: dict[int, list[int]] = {}
        self.after_forced: set[int] = set()

    def need(self, w: str) -> int:
        return max(len(x) for x in self.ids[w])

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        gen = input_ids[:, self.prompt_len :]
        remaining = self.max_new - gen.shape[1]
        for r in range(gen.shape[0]):
            if _finished(gen[r], self.eos_ids, self.pad_id):
                continue
            q = self.queue.get(r)
            if q:
                self._force(scores, r, q.pop(0))
                if not q:
                    self.after_forced.add(r)
                continue
            if r in self.after_forced:
                self.after_forced.discard(r)
                if remaining > 0:
                    scores[r, : len(self.word_start)][self.word_start.to(scores.device)] = NEG_INF
            text = self.tok.decode(gen[r].tolist(), skip_special_tokens=True)
            missing = [w for w in self.words if not contains_word(text, w)]
            if not missing:
                continue
            for e in self.eos_ids:
                scores[r, e] = NEG_INF
            if remaining <= sum(self.need(w) for w in missing):
                spaced, bare = self.ids[missing[0]]
                ids = list(bare if (not text or text[-1].isspace()) else spaced)
                self._force(scores, r, ids.pop(0))
                if ids:
                    self.queue[r] = ids
                else:
                    self.after_forced.add(r)
        return scores

    @staticmethod
    def _force(scores: torch.FloatTensor, r: int, token: int) -> None:
        scores[r, :] = NEG_INF
        scores[r, token] = 0.0


class KeywordGatedStop(StoppingCriteria):
    """Transformers' StopStringCriteria, firing only once the text before the stop string holds every
    required keyword (so a stop string cannot cut a completion short of its keywords)."""

    def __init__(self, inner, tok, words: Sequence[str], stops: Sequence[str], prompt_len: int):
        self.inner, self.tok, self.words, self.stops, self.prompt_len = inner, tok, list(words), list(stops), prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        hit = self.inner(input_ids, scores, **kwargs)
        for r in torch.nonzero(hit).flatten().tolist():
            text = self.tok.decode(input_ids[r, self.prompt_len :].tolist(), skip_special_tokens=True)
            cut = max((text.rfind(s) for s in self.stops), default=-1)
            before = text[:cut] if cut >= 0 else text
            if not all(contains_word(before, w) for w in self.words):
                hit[r] = False
        return hit


def cut_at_stop(text: str, stops: Sequence[str], required: Sequence[str] = ()) -> tuple[str, bool]:
    """The text before the first stop string whose preceding text holds every required keyword."""
    best = None
    for s in stops:
        start = 0
        while True:
            p = text.find(s, start)
            if p < 0:
                break
            if all(contains_word(text[:p], w) for w in required):
                best = p if best is None else min(best, p)
                break
            start = p + 1
    return (text[:best], True) if best is not None else (text, False)
