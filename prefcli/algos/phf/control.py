"""Control tokens (conditional training): registering them, initialising their embedding rows, their learning-rate scale, and where a row puts them."""

from __future__ import annotations

import torch

from ...engine.logprobs import IGNORE
from ...errors import DataError


def add_control_tokens(tok, aligned: str, misaligned: str) -> tuple[int, int]:
    """Register the two control tokens as special tokens (kept whole by the tokenizer, skipped by
    decode(skip_special_tokens=True)); the model's embeddings are resized to len(tok) when it is built."""
    new = [t for t in (aligned, misaligned) if t not in tok.get_vocab()]
    if new:
        extra = [t for t in (getattr(tok, "extra_special_tokens", None) or []) if isinstance(t, str)]
        tok.add_special_tokens({"extra_special_tokens": extra + new})
    ids = tok.convert_tokens_to_ids([aligned, misaligned])
    for t, i in zip((aligned, misaligned), ids):
        if i is None or i == tok.unk_token_id or tok.convert_ids_to_tokens(i) != t:
            raise DataError(f"could not add the control token {t!r} to the tokenizer")
    return int(ids[0]), int(ids[1])


def init_control_embeddings(lm, control_ids: tuple[int, int], mode: str, n_tokens: int, seed: int) -> None:
    """Initialise the embedding rows of the control tokens (and their output rows when the output embeddings
    are not tied), from the statistics of the other rows below n_tokens (the tokenizer's size):

    - 'default': leave them as the model was built: from model.init, initialised like every other token; from
      model.path, transformers' `resize_token_embeddings` (mean resizing: the mean of the existing rows plus
      noise of 1e-9 x their covariance, so the two tokens start almost identical);
    - 'mean': both rows exactly the mean of the other rows (Hewitt 2021, "Initializing new word embeddings");
    - 'random': each row a draw from N(mean, covariance) of the other rows: a typical token, and the two
      tokens differ from the start. Seeded by `seed`.

    transformers' resize does 'mean' with epsilon-scaled noise; the full-covariance draw is written here
    because transformers has no switch for it."""
    if mode == "default":
        return
    layers = [lm.get_input_embeddings()]
    out = lm.get_output_embeddings()
    if out is not None and out.weight is not layers[0].weight:
        layers.append(out)
    ids = list(control_ids)
    g = torch.Generator().manual_seed(seed)
    for layer in layers:
        w = layer.weight
        keep = torch.ones(min(n_tokens, w.shape[0]), dtype=torch.bool)
        keep[[i for i in ids if i < keep.numel()]] = False
        rows = w.detach()[: keep.numel()][keep].float().cpu()
        mean = rows.mean(0)
        if mode == "mean":
            new = mean.unsqueeze(0).repeat(len(ids), 1)
        else:
            c = rows - mean
            cov = c.T @ c / max(1, rows.shape[0] - 1)
            # a tiny ridge keeps the Cholesky factor defined when the rows span fewer dimensions than the width
            L = torch.linalg.cholesky(cov + 1e-8 * cov.diagonal().mean() * torch.eye(cov.shape[0]))
            new = mean + torch.randn(len(ids), mean.numel(), generator=g) @ L.T
        with torch.no_grad():
            w[ids] = new.to(w.dtype).to(w.device)


class RowLRScale:
    """Multiply the learning rate of some rows of some weight matrices (the control tokens' embedding rows)
    by `scale`, with any optimizer: a pre-step hook keeps the rows, a post-step hook stretches their update,
    w <- w_before + scale * (w_after - w_before). For AdamW that is exactly a learning rate (and decoupled
    weight decay) of scale x lr for these rows; the optimizer's state is untouched. Rows of one tensor cannot
    sit in a parameter group of their own, which is why this is a hook."""

    def __init__(self, optimizer, weights: list[torch.Tensor], rows: list[int], scale: float):
        self.weights, self.rows, self.scale = weights, list(rows), float(scale)
        self._before: list[torch.Tensor] = []
        optimizer.register_step_pre_hook(self._pre)
        optimizer.register_step_post_hook(self._post)

    def _pre(self, *_):
        self._before = [w.detach()[self.rows].clone() for w in self.weights]

    def _post(self, *_):
        with torch.no_grad():
            for w, b in zip(self.weights, self._before):
                w[self.rows] = b + self.scale * (w[self.rows] - b)
        self._before = []


def control_index(ids: list[int], labels: list[int], bos: int | None, position: str) -> int:
    """Where the control token goes in an example that has none. 'start': first, after a leading BOS.
    'after_prompt' (and the first segment of 'per_segment'): right before the first token the example
    trains on, after its masked lead (the prompt of a prompt_completion row, the turns before an assistant
    reply); an example without a masked lead (a 'text' row) gets it at the start."""
    lead = 1 if bos is not None and ids and ids[0] == bos else 0
    if position == "start":
        return lead
    k = 0
    while k < len(labels) and labels[k] == IGNORE:
        k += 1
    return max(k, lead)


def prefix_control(
    ids: list[int], labels: list[int], ctrl: int, bos: int | None, mask_next: bool, position: str = "start"
) -> tuple[list[int], list[int]]:
    """Insert the control token into an example at `control_index`. The control token is never a target.
    With mask_next, the token after it keeps the status it had without the token (the first token of an
    example is no target), so that the targets are exactly those of an mle run."""
    p = control_index(ids, labels, bos, position)
    new_ids = ids[:p] + [ctrl] + ids[p:]
    new_labels = labels[:p] + [IGNORE] + labels[p:]
    if mask_next and p == 0 and len(new_labels) > 1:
        new_labels[1] = IGNORE
    return new_ids, new_labels


def control_context(
    ids: list[int], labels: list[int], ctrl: int, bos: int | None, position: str
) -> tuple[list[int], int]:
    """What sampling after a control token starts from, for a held-out example without one: its prompt
    (masked lead, or a BOS) with the control token where training puts it, and the token's index."""
    lead = 1 if bos is not None and ids and ids[0] == bos else 0
    k = 0
    while k < len(labels) and labels[k] == IGNORE:
        k += 1
    prompt = max(k, lead)
    p = control_index(ids, labels, bos, position)
    return ids[:p] + [ctrl] + ids[p:prompt], p


def split_segments(text: str, separator: str) -> list[str]:
    """`text` cut after every `separator`, which stays with the segment before it; a piece with no
    non-space character joins the segment before it (or the one after it, at the start), so that
    ''.join(segments) == text."""
    pieces = text.split(separator)
    out: list[str] = []
    carry = ""
    for i, piece in enumerate(pieces):
        seg = carry + piece + (separator if i < len(pieces) - 1 else "")
        carry = ""
        if not seg:
            continue
        if not piece.strip():
            if out:
                out[-1] += seg
            else:
                carry = seg
            continue
        out.append(seg)
    if carry:
        out.append(carry)
    return out


def encode_segments(
    prompt_ids: list[int],
    prompt_labels: list[int],
    segments: list[list[int]],
    controls: list[int | None],
    eos: int | None,
    max_length: int,
) -> tuple[list[int], list[int], bool]:
    """One example of the 'per_segment' variant: the prompt, then every segment after its own control token
    (None: no token), then EOS; truncated to max_length. Control tokens are never targets; every segment
    token and the EOS are. Returns (ids, labels, truncated)."""
    ids, labels = list(prompt_ids), list(prompt_labels)
    for seg, c in zip(segments, controls):
        if c is not None:
            ids.append(c)
            labels.append(IGNORE)
        ids.extend(seg)
        labels.extend(seg)
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
        labels.append(eos)
    return ids[:max_length], labels[:max_length], len(ids) > max_length
