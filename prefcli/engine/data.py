"""Datasets to token batches: loading through `datasets`, column mapping, tokenization with a
cache key, prompt masking, truncation counts, padding and packing, and the per-step schedule
that makes resume exact.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import DataError
from ..recipe.paths import is_local
from ..recipe.sections import DataMixture, DataSource
from .datacheck import (
    check_json_depth,
    check_utf8,
    describe_value,
    exception_chain,
    is_blank_file,
    is_messages,
    json_syntax_error,
    not_utf8_message,
    parse_json_row,
    text_line,
)
from .logprobs import IGNORE
from .tokenizer import chat_ids, text_ids

_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".txt": "text"}
CACHE_VERSION = "2"  # bump when tokenization output changes for the same inputs


def _quiet_datasets():
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


def load_rows(src: DataSource | DataMixture, required: Sequence[str] = (), what: str = "data"):
    """A `datasets.Dataset` for one DataSource, columns renamed per `src.columns`, checked for the
    `required` columns and for emptiness. Errors name the source and what was expected. A DataMixture
    gives its sources interleaved (`load_mixture`); the path `-` reads JSONL rows from stdin."""
    if isinstance(src, DataMixture):
        return load_mixture(src, required, what)
    _quiet_datasets()
    path = src.path
    shown = shown_path(path)
    field = f"{what}.path" if what.startswith("data.") else what
    if is_local(path) and not os.access(path, os.R_OK):
        raise DataError(f"{what}: could not read file {shown}: permission denied; check its permissions")
    if is_local(path) and os.path.isfile(path) and is_blank_file(path):
        raise DataError(f"{what}: {shown} is empty: it has no rows. Point {field} at a file with data")
    try:
        ds = _open_dataset(src, what, shown, field)
    except DataError:
        raise
    except Exception as e:  # datasets raises many types; all mean "cannot read this"
        raise _unreadable(e, path, what, shown, field) from None
    check_utf8(ds, what, path)
    ds = _map_columns(ds, src, required, what, shown)
    if src.max_rows is not None and len(ds) > src.max_rows:
        ds = ds.select(range(src.max_rows))
    if len(ds) == 0:
        raise DataError(f"{what}: {shown} has no rows. Point {field} at a file with data")
    return ds


def _open_dataset(src: DataSource, what: str, shown: str, field: str):
    """The rows of `src.path`: stdin (`-`), a local data file, a folder saved by `save_to_disk` (its split), or
    anything else `datasets.load_dataset` reads (a folder of data files, a Hub dataset)."""
    import datasets

    path = src.path
    if path == "-":
        return read_stdin_rows(what)
    if is_local(path) and os.path.isfile(path):
        builder = _builder(path)
        if builder is None:
            raise DataError(f"{what}: {shown}: unknown file type; use .jsonl, .json, .csv, .tsv, .parquet or .txt")
        kw = {"delimiter": "\t"} if path.removesuffix(".gz").endswith(".tsv") else {}
        if builder == "json":  # a line nested too deep would crash pyarrow's reader (datacheck.MAX_ROW_DEPTH)
            check_json_depth(path, what)
        return datasets.load_dataset(builder, data_files=path, split="train", **kw)
    if is_local(path) and (
        Path(path, "dataset_info.json").exists()
        or Path(path, "state.json").exists()
        or Path(path, "dataset_dict.json").exists()
    ):
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            if src.split not in ds:
                raise DataError(f"{what}: {shown} has no split '{src.split}' (splits: {', '.join(ds)})")
            ds = ds[src.split]
        return ds
    if is_local(path) and os.path.isdir(path) and not _has_data_files(path):
        raise DataError(
            f"{what}: {shown} is a folder without data files (no {', '.join(sorted(_BUILDERS))} or .arrow "
            f"file in it or below it) and not a dataset saved by datasets' save_to_disk; point {field} at a "
            "data file or a folder of them"
        )
    return datasets.load_dataset(path, src.subset, split=src.split)


def _unreadable(e: Exception, path: str, what: str, shown: str, field: str) -> DataError:
    """The DataError for an exception `datasets` raised reading `path`: not UTF-8, no rows, the JSON line with a
    syntax error, rows on stdin that make no column, else the innermost message and what to check."""
    chain = exception_chain(e)
    text = " ".join(f"{type(c).__name__} {c}" for c in chain).lower().replace("-", "")
    if is_local(path) and ("utf8" in text or "unicodedecodeerror" in text):
        return DataError(not_utf8_message(what, path, None))
    if is_local(path) and ("corresponds to no data" in text or "batchsize must be greater than 0" in text):
        return DataError(f"{what}: {shown} has no rows. Point {field} at a file with data")
    syntax = json_syntax_error(path) if is_local(path) and os.path.isfile(path) and _builder(path) == "json" else None
    if syntax:  # pyarrow names a byte position inside a block; this names the line
        return DataError(f"{what}: could not read file {shown}: {syntax}")
    msg = next((str(c).strip().splitlines()[0] for c in reversed(chain) if str(c).strip()), type(e).__name__)
    if path == "-":
        return DataError(
            f"{what}: could not read the rows on stdin: {msg}; every row needs the same fields with values of "
            "one type (text in one row and a number or a list in another cannot make a column)"
        )
    where = "file" if is_local(path) else "hub dataset (needs network or a cache)"
    fix = "check that it is valid for its type" if is_local(path) else "check the name and the network"
    return DataError(f"{what}: could not read {where} {shown}: {msg}; {fix}")


def _map_columns(ds, src: DataSource, required: Sequence[str], what: str, shown: str):
    """`ds` with its columns renamed per `src.columns` (a mapped name replaces a column already called so), checked
    for the `required` columns."""
    for want, have in src.columns.items():
        if have not in ds.column_names:
            raise DataError(
                f"{what}: {shown}: data.columns maps '{want}' to column '{have}', which is not in the "
                f"data (columns: {', '.join(ds.column_names)})"
            )
        if want != have:
            if want in ds.column_names:
                ds = ds.remove_columns(want)
            ds = ds.rename_column(have, want)
    missing = [c for c in required if c not in ds.column_names]
    if missing:
        raise DataError(
            f"{what}: {shown}: missing column(s) {', '.join(missing)} (columns: {', '.join(ds.column_names)}); "
            "map yours with data.<split>.columns, e.g. {prompt: question}"
        )
    return ds


def _has_data_files(folder: str) -> bool:
    """Whether datasets finds anything to read in a folder (a file of a type it reads, hidden files aside); an empty
    folder otherwise fails inside datasets with an internal `functools.partial(...)` in its message."""
    suffixes = (*_BUILDERS, ".arrow")
    for _root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        if any(not f.startswith(".") and f.removesuffix(".gz").lower().endswith(suffixes) for f in files):
            return True
    return False


def shown_path(path: str) -> str:
    """A data path as messages name it: `-` is stdin."""
    return "stdin" if path == "-" else path


def _builder(path: str) -> str | None:
    """The datasets builder that reads a local file, by its extension (a .gz is read through)."""
    name = path[:-3] if path.endswith(".gz") else path
    return _BUILDERS.get(Path(name).suffix.lower())


def read_stdin_rows(what: str):
    """JSONL rows from stdin (`path: -`, e.g. `prefcli generate ... | prefcli eval r.yaml --completions -`)."""
    import sys

    import datasets

    rows = []
    for n, line in enumerate(getattr(sys.stdin, "buffer", sys.stdin), 1):  # bytes: a line not UTF-8 is named
        if not line.strip():
            continue
        obj = parse_json_row(text_line(line, f"{what}: <stdin>:{n}"), f"{what}: <stdin>:{n}")
        if not isinstance(obj, dict):
            raise DataError(f"{what}: <stdin>:{n}: expected a JSON object, got {type(obj).__name__}")
        rows.append(obj)
    if not rows:
        raise DataError(f"{what}: stdin had no rows (did the command before the pipe fail?)")
    return datasets.Dataset.from_list(rows)


def load_mixture(mix: DataMixture, required: Sequence[str], what: str):
    """The sources of a mixture interleaved by `datasets.interleave_datasets`: row k comes from source i with
    probability weight_i / sum(weights), the choice seeded by `mix.seed`, so the mixed set (and a resumed
    run's position in it) is the same every time. The sources must agree on their columns."""
    import datasets

    parts, weights, names = [], [], []
    for i, s in enumerate(mix.sources):
        ds = load_rows(s, required, f"{what}[{i}]")
        if s.weight > 0:  # a source of weight 0 is never drawn (and would never run out under all_exhausted)
            parts.append(ds)
            weights.append(s.weight)
            names.append(f"{what}[{i}]: {s.path}")
    cols = parts[0].column_names
    for ds, name in zip(parts[1:], names[1:]):
        if sorted(ds.column_names) != sorted(cols):
            raise DataError(
                f"{name}: columns ({', '.join(ds.column_names)}) differ from {names[0]} ({', '.join(cols)}); every "
                "source of a mixture needs the same columns (rename with its columns: mapping, or drop the source)"
            )
    try:
        parts = [parts[0]] + [ds.select_columns(cols).cast(parts[0].features) for ds in parts[1:]]
    except (ValueError, TypeError) as e:
        raise DataError(f"{what}: the mixture's sources hold different value types: {str(e).splitlines()[0]}") from None
    if len(parts) == 1:
        return parts[0]
    total = sum(weights)
    return datasets.interleave_datasets(
        parts, probabilities=[w / total for w in weights], seed=mix.seed, stopping_strategy=mix.stopping
    )


def check_values(ds, columns: Sequence[str], source: str, what: str = "data") -> None:
    """Every row has a non-empty value of the right type in each of `columns` (a string; `messages`: a list of
    {role, content} messages); the first bad row is named."""
    source = shown_path(source)
    for col in columns:
        chat = col == "messages"
        for i, v in enumerate(ds[col]):
            if v is None or (isinstance(v, (str, list)) and len(v) == 0):
                raise DataError(
                    f"{what}: {source}: row {i + 1} has an empty or missing '{col}'; fill it or remove the row"
                )
            if not (is_messages(v) if chat else isinstance(v, str)):
                kind = "a list of {role, content} messages" if chat else "text (a string)"
                fix = "write it in quotes in the data file" if not isinstance(v, (list, dict)) else "fix the row"
                raise DataError(
                    f"{what}: {source}: row {i + 1}: '{col}' is {describe_value(v)}, expected {kind}; {fix}"
                )


def blank_rows(ds, columns: Sequence[str]) -> tuple[int, int | None, str | None]:
    """(count of rows whose text in one of `columns` is only whitespace, first such row (1-based), its column)."""
    n, first, first_col = 0, None, None
    for col in columns:
        for i, v in enumerate(ds[col]):
            if isinstance(v, str) and v and not v.strip():
                n += 1
                if first is None or i + 1 < first:
                    first, first_col = i + 1, col
    return n, first, first_col


def tokenizer_fingerprint(tok) -> str:
    h = hashlib.sha256()
    backend = getattr(tok, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else json.dumps(tok.get_vocab(), sort_keys=True).encode())
    h.update(
        json.dumps(
            [
                str(tok.chat_template),
                tok.eos_token,
                tok.pad_token,
                tok.bos_token,
                [str(t) for t in tok.all_special_tokens],
            ]
        ).encode()
    )
    return h.hexdigest()[:16]


def cache_key(ds, tok, *parts: Any) -> str:
    """Tokenization cache key: the source rows, the tokenizer and every recipe field that changes
    the tokens. Passed as the `datasets` fingerprint so its on-disk cache is reused exactly."""
    h = hashlib.sha256(CACHE_VERSION.encode())
    h.update(str(ds._fingerprint).encode())
    h.update(tokenizer_fingerprint(tok).encode())
    h.update(json.dumps(parts, sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


def split_eval(ds, fraction: float, seed: int):
    if fraction <= 0:
        return ds, None
    n_eval = max(1, int(round(len(ds) * fraction)))
    if n_eval >= len(ds):
        raise DataError(f"data.eval_fraction {fraction} leaves no training rows ({len(ds)} rows)")
    parts = ds.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


# ------------------------------------------------------------------------------ SFT rows


def detect_format(columns: Sequence[str], requested: str) -> str:
    if requested != "auto":
        return requested
    if "messages" in columns:
        return "messages"
    if "prompt" in columns and "completion" in columns:
        return "prompt_completion"
    if "text" in columns:
        return "text"
    raise DataError(
        "cannot tell the row format from the columns "
        f"({', '.join(columns)}); expected 'text', 'prompt' + 'completion', or 'messages'. "
        "Map yours with data.train.columns or set data.format"
    )


FORMAT_COLUMNS = {"text": ["text"], "prompt_completion": ["prompt", "completion"], "messages": ["messages"]}


def encode_messages(tok, messages: list[dict], mask_prompt: bool) -> tuple[list[int], list[int]]:
    """Token ids and labels of a chat. With mask_prompt, only assistant turns carry labels: each
    assistant span is found by rendering the conversation up to it (prefix rendering)."""
    if not tok.chat_template:
        raise DataError(
            "chat 'messages' rows need a chat template: the tokenizer has none; set model.chat_template in the recipe "
            "(a bundled one by name, e.g. chatml or llama3, or a Jinja string)"
        )
    ids = chat_ids(tok, messages)
    if not mask_prompt:
        return ids, list(ids)
    labels = [IGNORE] * len(ids)
    for i, msg in enumerate(messages):
        if msg.get("role") != "assistant" or msg.get("weight") == 0:  # OpenAI's format: weight 0 is not trained
            continue
        start = len(chat_ids(tok, messages[:i], add_generation_prompt=True)) if i else 0
        end = len(chat_ids(tok, messages[: i + 1]))
        labels[start:end] = ids[start:end]
    return ids, labels


def sft_encoder(tok, fmt: str, max_length: int, mask_prompt: bool, add_eos: bool) -> Callable:
    eos = tok.eos_token_id

    def encode_one(row) -> tuple[list[int], list[int]]:
        if fmt == "messages":
            ids, labels = encode_messages(tok, row["messages"], mask_prompt)
        elif fmt == "text":
            ids = text_ids(tok, row["text"])
            labels = list(ids)
        else:
            p = text_ids(tok, row["prompt"])
            c = tok(row["completion"], add_special_tokens=False)["input_ids"]
            ids = p + c
            labels = ([IGNORE] * len(p) if mask_prompt else list(p)) + list(c)
        if add_eos and fmt != "messages" and (not ids or ids[-1] != eos):  # chats: the template ends turns
            ids = ids + [eos]
            labels = labels + [eos]
        return ids, labels

    def encode(batch):
        out = {"input_ids": [], "labels": [], "truncated": []}
        n = len(next(iter(batch.values())))
        for i in range(n):
            ids, labels = encode_one({k: v[i] for k, v in batch.items()})
            out["truncated"].append(len(ids) > max_length)
            out["input_ids"].append(ids[:max_length])
            out["labels"].append(labels[:max_length])
        return out

    return encode


@dataclass
class TokenizedSet:
    """Tokenized examples in memory (lists of ids), with what tokenization dropped or cut."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    n_rows: int
    n_truncated: int = 0
    n_dropped: int = 0  # no label token left after truncation/masking
    rows: list[int] = field(default_factory=list)  # source row of each example (rows without a label are dropped)

    def __len__(self) -> int:
        return len(self.input_ids)

    def n_tokens(self) -> int:
        return sum(len(x) for x in self.input_ids)


def tokenize_sft(
    ds, tok, fmt: str, max_length: int, mask_prompt: bool, add_eos: bool, source: str, what: str = "data"
) -> TokenizedSet:
    check_values(ds, FORMAT_COLUMNS[fmt], source, what)
    key = cache_key(ds, tok, "sft", fmt, max_length, mask_prompt, add_eos)
    enc = ds.map(
        sft_encoder(tok, fmt, max_length, mask_prompt, add_eos),
        batched=True,
        batch_size=256,
        remove_columns=ds.column_names,
        new_fingerprint=key,
        desc="tokenizing",
    )
    ids, labels, trunc = enc["input_ids"], enc["labels"], enc["truncated"]
    keep = [i for i, lab in enumerate(labels) if any(t != IGNORE for t in lab[1:])]
    return TokenizedSet(
        input_ids=[ids[i] for i in keep],
        labels=[labels[i] for i in keep],
        n_rows=len(ds),
        n_truncated=int(sum(trunc)),
        n_dropped=len(ds) - len(keep),
        rows=keep,
    )


# ---------------------------------------------------------------------------- batching


def pad_batch(seqs: list[list[int]], labels: list[list[int]], pad_id: int, pad_to_multiple: int = 1) -> dict:
    """Right-padded tensors: input_ids, attention_mask, position_ids, targets (already shifted:
    targets[t] is the label of token t+1; -100 where there is none)."""
    T = max(len(s) for s in seqs)
    T = int(math.ceil(T / pad_to_multiple) * pad_to_multiple)
    B = len(seqs)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    tgt = torch.full((B, T), IGNORE, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for i, (s, lab) in enumerate(zip(seqs, labels)):
        n = len(s)
        ids[i, :n] = torch.tensor(s)
        mask[i, :n] = 1
        if n > 1:
            tgt[i, : n - 1] = torch.tensor(lab[1:])
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "targets": tgt}


def pack_rows(order: Sequence[int], data: TokenizedSet, max_length: int) -> list[list[int]]:
    """Greedy packing: consecutive examples (in `order`) share a row while they fit. Examples are
    never split, so every example keeps its own positions 0..n-1."""
    rows: list[list[int]] = []
    cur: list[int] = []
    used = 0
    for i in order:
        n = len(data.input_ids[i])
        if cur and used + n > max_length:
            rows.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += n
    if cur:
        rows.append(cur)
    return rows


def packed_batch(rows: list[list[int]], data: TokenizedSet, pad_id: int, max_length: int) -> dict:
    """Packed tensors: position ids restart at every example, and there is no attention mask,
    so transformers builds a block-diagonal causal mask from the position ids (no attention
    across example boundaries). Targets never cross a boundary either."""
    B = len(rows)
    ids = torch.full((B, max_length), pad_id, dtype=torch.long)
    tgt = torch.full((B, max_length), IGNORE, dtype=torch.long)
    pos = torch.zeros((B, max_length), dtype=torch.long)
    for r, members in enumerate(rows):
        off = 0
        for i in members:
            s, lab = data.input_ids[i], data.labels[i]
            n = len(s)
            ids[r, off : off + n] = torch.tensor(s)
            pos[r, off : off + n] = torch.arange(n)
            if n > 1:
                tgt[r, off : off + n - 1] = torch.tensor(lab[1:])
            off += n
        if off < max_length:  # trailing padding: a segment of its own, never attended to by real tokens
            pos[r, off:] = torch.arange(max_length - off)
    return {"input_ids": ids, "attention_mask": None, "position_ids": pos, "targets": tgt}


@dataclass
class StepSchedule:
    """Which examples every optimizer step uses: a deterministic function of (seed, epoch), so a
    resumed run recomputes the same order and skips to its position."""

    n_examples: int
    global_batch: int  # examples (or packed rows) per optimizer step across all ranks
    seed: int
    shuffle: bool = True

    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(self.n_examples / self.global_batch))

    def order(self, epoch: int) -> list[int]:
        idx = list(range(self.n_examples))
        if self.shuffle:
            random.Random(self.seed * 100_003 + epoch).shuffle(idx)
        return idx

    def steps(self, epoch: int) -> list[list[int]]:
        o = self.order(epoch)
        return [o[s : s + self.global_batch] for s in range(0, len(o), self.global_batch)]


class DataCursor:
    """Where a task is in its data: the (epoch, index) of the next optimizer step of a StepSchedule.
    Every task reads its steps through one of these, so resume is exact for all of them.

    Steps with fewer than `min_items` items (a short last step that cannot give every rank an
    example) are skipped."""

    def __init__(self, n_examples: int, global_batch: int, seed: int, shuffle: bool, min_items: int = 1):
        self.schedule = StepSchedule(n_examples, global_batch, seed, shuffle)
        self.min_items = min_items
        self.epoch = 0
        self.index = 0
        self._cached: tuple[int, list[list[int]]] | None = None  # one epoch's steps, computed once

    def steps_per_epoch(self) -> int:
        return self.schedule.steps_per_epoch()

    def _steps(self, epoch: int) -> list[list[int]]:
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, [s for s in self.schedule.steps(epoch) if len(s) >= self.min_items])
        return self._cached[1]

    def peek(self) -> list[int]:
        """The items `next()` would return, without moving (the start-up guard's batch)."""
        epoch, index = self.epoch, self.index
        while index >= len(self._steps(epoch)):
            epoch, index = epoch + 1, 0
        return self._steps(epoch)[index]

    def next(self) -> list[int]:
        """The global items of the next optimizer step (all ranks); moves on to the next epoch as needed."""
        while self.index >= len(self._steps(self.epoch)):
            self.epoch, self.index = self.epoch + 1, 0
        items = self._steps(self.epoch)[self.index]
        self.index += 1
        return items

    def state(self) -> dict:
        return {
            "epoch": self.epoch,
            "index": self.index,
            "n_units": self.schedule.n_examples,
            "global_batch": self.schedule.global_batch,
        }

    def load(self, state: dict, warn) -> None:
        if state.get("n_units") != self.schedule.n_examples or state.get("global_batch") != self.schedule.global_batch:
            warn(
                "the data or batch size changed since the checkpoint; the data order will not match the "
                "interrupted run exactly"
            )
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


def shard_for_rank(items: Sequence, rank: int, world: int) -> list:
    """Contiguous, near-equal slices of one global step's items, one per rank."""
    n = len(items)
    lo = (n * rank) // world
    hi = (n * (rank + 1)) // world
    return list(items[lo:hi])


def split_micro(items: Sequence, n_micro: int, lengths: Sequence[int] | None = None) -> list[list]:
    """Split a rank's items into up to n_micro micro-batches. With lengths, items are sorted by
    length first so each micro-batch pads less; the step's loss is token-weighted over the whole
    step, so this changes no number, only the padding."""
    items = list(items)
    if lengths is not None:
        items = [x for _, x in sorted(zip(lengths, items), key=lambda t: t[0])]
    n_micro = max(1, min(n_micro, len(items)))
    return [shard_for_rank(items, k, n_micro) for k in range(n_micro)]


def unpad_if_full(batch: dict) -> dict:
    """Drop attention_mask and position_ids of a right-padded batch without any padding (checked on
    the host): the model then uses its plain causal path, with no mask to build or read."""
    m = batch.get("attention_mask")
    if m is not None and m.device.type == "cpu" and bool(m.all()):
        batch = dict(batch, attention_mask=None, position_ids=None)
    return batch


def move(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def iterate_eval(n: int, batch_size: int, rank: int, world: int, max_batches: int | None) -> Iterable[list[int]]:
    """Sequential held-out batches, sharded across ranks (every rank gets the same count)."""
    idx = list(range(n))
    per = batch_size * world
    batches = [idx[s : s + per] for s in range(0, n, per)]
    if max_batches is not None:
        batches = batches[:max_batches]
    for b in batches:
        yield shard_for_rank(b, rank, world)
