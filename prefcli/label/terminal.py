"""`prefcli label`: a terminal interface for a person to compare two completions or rate one.

Files (docs/commands/label.md):

- OUT (`--out prefs.jsonl`): the dataset, only real answers, in the shapes the other commands read:
  pairs `{"prompt", "chosen", "rejected"}` (prefcli reward / contrastive), ratings
  `{"prompt", "completion", "score"}` (the `human_scores` reward source; text/score regression).
  Every row also records who answered (`rater`, from `--rater`) and, for pairs, where the chosen
  completion was shown (`chosen_position`: A or B), so `prefcli data inspect` can measure rater
  agreement and position bias; the training commands ignore both columns.
- the journal (`--log`, default `<OUT without .jsonl>.log.jsonl`): every action, in order, one JSON
  object per line: `open` (a session starts; OUT's size), `answer` (the item id, the answer: A, B,
  tie, skip or a score, the texts, and the byte range [out_offset, out_end) of the OUT row it
  wrote, null for tie/skip) and `undo` (the id of the answer it takes back). Ties and skips live
  only here, so readers of OUT see real preferences only.

Append-only and crash-safe: an answer appends its row to OUT, fsyncs, then appends its journal line
and fsyncs; Ctrl-C is held back while that happens, so an answer given is an answer kept. Undo
takes back the newest live answer: it appends an `undo` line to the journal (fsync), then
truncates OUT to that answer's out_offset, which removes exactly its row, the last one in OUT
(answers are undone newest first, so the row to remove is always the last). OUT is therefore
append-only except for undo, which cuts only its own newest row. On start, the journal is replayed
(answers pushed, undos popped) to find what is answered; OUT is checked against the journal: a row
written by an answer whose journal line never landed (a crash between the two writes) is cut, and
its item asked again; an OUT shorter than the journal says means the file was edited, and is an
error. Resume therefore skips every answered item, and undo works across sessions.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..engine.datacheck import parse_json_row
from ..errors import DataError, UsageError
from .items import row_candidates

PAIR_KEYS = {"a": "A", "1": "A", "b": "B", "2": "B", "t": "tie", "s": "skip"}


@dataclass
class Item:
    id: str
    prompt: str
    completions: list[str]  # two for pairs, one for a rating


def item_id(prompt: str, completions: list[str]) -> str:
    return hashlib.sha1(json.dumps([prompt, completions], ensure_ascii=False).encode()).hexdigest()[:16]


def default_log_path(out: Path) -> Path:
    name = out.name[: -len(".jsonl")] if out.name.endswith(".jsonl") else out.name
    return out.with_name(name + ".log.jsonl")


# ------------------------------------------------------------------------------- input


def read_items(path: Path, mode: str | None) -> tuple[list[Item], str]:
    """Items from a JSONL file: pairs from {"prompt", "completions": [a, b]} (or "completion_a" and
    "completion_b"), ratings from {"prompt", "completion"} (or "completions": one item each). `mode`
    None: pairs if the first row has two completions, else ratings."""
    if not path.is_file():
        raise UsageError(f"label: no such input file: {path}")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            obj = parse_json_row(line, f"{path}:{n}", "expected one JSON object per line")
            prompt, comps = row_candidates(obj, f"{path}:{n}")  # as `prefcli label serve` reads a task's items
            rows.append((n, prompt, comps))
    if not rows:
        raise DataError(f"{path} has no rows")
    if mode is None:
        mode = "pair" if len(rows[0][2]) == 2 else "rate"
    items = []
    for n, prompt, comps in rows:
        if mode == "pair":
            if len(comps) != 2:
                raise DataError(f"{path}:{n}: a pair needs exactly two completions, got {len(comps)}")
            items.append(Item(item_id(prompt, comps), prompt, comps))
        else:
            for c in comps:
                items.append(Item(item_id(prompt, [c]), prompt, [c]))
    return items, mode


# ----------------------------------------------------------------------------- storage


@contextmanager
def sigint_held():
    """Ctrl-C and SIGTERM wait until the block is done (in the main thread): a write pair is never cut in half."""
    if hasattr(signal, "pthread_sigmask"):
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
    else:  # pragma: no cover - non-POSIX
        yield


def _append(path: Path, line: str) -> tuple[int, int]:
    with open(path, "ab") as f:
        start = f.seek(0, os.SEEK_END)
        data = (line + "\n").encode("utf-8")
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return start, start + len(data)


def _truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)
        f.flush()
        os.fsync(f.fileno())


@dataclass
class Store:
    """OUT + journal. `stack` holds the live answers (journal entries), oldest first."""

    out: Path
    log: Path
    stack: list[dict] = field(default_factory=list)
    base_size: int = 0
    notes: list[str] = field(default_factory=list)

    @classmethod
    def open(cls, out: Path, log: Path) -> Store:
        s = cls(out, log)
        out.parent.mkdir(parents=True, exist_ok=True)
        size = out.stat().st_size if out.exists() else 0
        first_open = None
        if log.exists():
            with open(log, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        e = json.loads(line)
                    except json.JSONDecodeError:
                        if f.read().strip():
                            raise DataError(f"{log}:{n}: the journal has a damaged line in the middle") from None
                        s.notes.append(f"{log}: ignored a last line cut short by an interruption")
                        break
                    if e.get("action") == "open" and first_open is None:
                        first_open = e
                    elif e.get("action") == "answer":
                        s.stack.append(e)
                    elif e.get("action") == "undo":
                        if not s.stack or s.stack[-1]["id"] != e.get("id"):
                            raise DataError(f"{log}:{n}: an undo that does not match the newest answer")
                        s.stack.pop()
        s.base_size = first_open["out_size"] if first_open else size
        rows = [e for e in s.stack if e.get("out_end") is not None]
        expected = rows[-1]["out_end"] if rows else s.base_size
        if size > expected:
            _truncate(out, expected)
            s.notes.append(
                f"{out}: removed {size - expected} bytes written by an answer whose journal line never "
                "landed (interrupted while saving); that item will be asked again"
            )
        elif size < expected:
            raise DataError(
                f"{out} is shorter ({size} bytes) than its journal {log} records ({expected} bytes): was it "
                "edited? Move both files aside to start over."
            )
        _append(
            log,
            json.dumps(
                {"action": "open", "t": round(time.time(), 3), "out_size": out.stat().st_size if out.exists() else 0}
            ),
        )
        return s

    @property
    def answered(self) -> set[str]:
        return {e["id"] for e in self.stack}

    def answer(self, item: Item, answer, row: dict | None) -> None:
        with sigint_held():
            off = end = None
            if row is not None:
                off, end = _append(self.out, json.dumps(row, ensure_ascii=False))
            entry = {
                "action": "answer",
                "t": round(time.time(), 3),
                "id": item.id,
                "answer": answer,
                "prompt": item.prompt,
                "completions": item.completions,
                "out_offset": off,
                "out_end": end,
            }
            _append(self.log, json.dumps(entry, ensure_ascii=False))
            self.stack.append(entry)

    def undo(self) -> dict | None:
        if not self.stack:
            return None
        with sigint_held():
            e = self.stack.pop()
            _append(self.log, json.dumps({"action": "undo", "t": round(time.time(), 3), "id": e["id"]}))
            if e.get("out_offset") is not None:
                _truncate(self.out, e["out_offset"])
        return e

    def counts(self) -> dict:
        c = {"answered": len(self.stack), "rows": 0, "ties": 0, "skips": 0}
        for e in self.stack:
            if e.get("out_end") is not None:
                c["rows"] += 1
            elif e["answer"] == "tie":
                c["ties"] += 1
            elif e["answer"] == "skip":
                c["skips"] += 1
        return c


# --------------------------------------------------------------------------- terminal


class Keys:
    """Single keypresses from the terminal (cbreak mode: no Enter needed; Ctrl-C still interrupts)."""

    def __init__(self):
        import termios
        import tty

        self.fd = sys.stdin.fileno()
        self._saved = termios.tcgetattr(self.fd)
        tty.setcbreak(self.fd)

    def read(self) -> str:
        ch = os.read(self.fd, 1)
        if not ch:
            raise EOFError
        return ch.decode("utf-8", "replace").lower()

    def discard(self) -> None:
        """Drop every key typed but not yet read: called once an item is on screen, so that keys pressed
        while the screen was being drawn (or candidates sampled) never answer an item the rater had not seen."""
        import termios

        termios.tcflush(self.fd, termios.TCIFLUSH)

    def close(self) -> None:
        import termios

        termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)


def pair_row(item: Item, answer: str, order: tuple[int, int], rater: str | None = None) -> dict | None:
    """The OUT row of a pair answer (None for tie/skip). `order`: which completion was shown as A, B.
    The row records where the chosen completion was shown (`chosen_position`) and who chose (`rater`)."""
    if answer not in ("A", "B"):
        return None
    a, b = (item.completions[order[0]], item.completions[order[1]])
    chosen, rejected = (a, b) if answer == "A" else (b, a)
    row = {"prompt": item.prompt, "chosen": chosen, "rejected": rejected, "chosen_position": answer}
    if rater is not None:
        row["rater"] = rater
    return row


def default_rater() -> str:
    """The rater id when --rater is not given: $PREFCLI_RATER, else the login name."""
    import getpass

    env = os.environ.get("PREFCLI_RATER", "").strip()
    if env:
        return env
    try:
        return getpass.getuser()
    except Exception:  # no login name in some containers
        return "unknown"


def shown_order(item: Item, shuffle: bool, seed: int) -> tuple[int, int]:
    if not shuffle:
        return (0, 1)
    return (1, 0) if random.Random(f"{seed}:{item.id}").random() < 0.5 else (0, 1)


@dataclass
class LabelOptions:
    input: str | None = None
    model_dir: str | None = None
    prompts: str | None = None
    out: str = ""
    log: str | None = None
    mode: str | None = None  # pair | rate
    scale: int = 5
    shuffle: bool = True
    seed: int = 0
    settings: dict = field(default_factory=dict)  # generation settings for --model
    rater: str | None = None  # recorded in every row; default: default_rater()


def candidates_path(out: Path) -> Path:
    name = out.name[: -len(".jsonl")] if out.name.endswith(".jsonl") else out.name
    return out.with_name(name + ".candidates.jsonl")


def sampled_items(opts: LabelOptions, mode: str, err, on_sample=None) -> Iterator[Item]:
    """Items whose candidates a model samples, lazily, one prompt at a time. Candidates are cached
    in <OUT>.candidates.jsonl (append-only) so a resumed session shows the same ones. `on_sample(i)` is
    called before prompt i is sampled (the terminal says so: sampling takes seconds)."""
    import torch

    from ..evaluate.generation import (
        GenerateOptions,
        Generator,
        generation_settings,
        read_prompts,
        resolve_generate_model,
    )
    from ..evaluate.loading import load_lm, make_runtime

    ppath = Path(opts.prompts)
    if not ppath.is_file():
        raise UsageError(f"--prompts: no such file: {ppath}")
    fmt = "jsonl" if ppath.name.endswith(".jsonl") else "lines"
    with open(ppath, "rb") as f:  # read_prompts decodes, naming a line that is not UTF-8
        prompts = [p for p, _ in read_prompts(f, fmt, str(ppath))]
    if not prompts:
        raise DataError(f"{ppath} has no prompts")
    cache_file = candidates_path(Path(opts.out))
    cache: dict[tuple[int, str], list[str]] = {}
    if cache_file.exists():
        for line in cache_file.read_text(encoding="utf-8").splitlines():
            try:
                e = json.loads(line)
                cache[(e["index"], e["prompt"])] = e["completions"]
            except (json.JSONDecodeError, KeyError):
                continue
    section, base, seed, (device, precision, chunk) = resolve_generate_model(GenerateOptions(model_dir=opts.model_dir))
    cfg = generation_settings(base, opts.settings)
    state: dict = {}

    def generator():
        if "gen" not in state:
            print("loading the model to sample candidates ...", file=err, flush=True)
            rt = make_runtime(device, precision, chunk)
            lm, tok = load_lm(section, rt)
            state["gen"] = Generator(
                lm, tok, cfg, rt.device, autocast=rt.autocast, warn=lambda t: print(f"warning: {t}", file=err)
            )
        return state["gen"]

    n = 2 if mode == "pair" else 1
    for i, p in enumerate(prompts):
        comps = cache.get((i, p))
        if comps is None:
            if on_sample is not None:
                on_sample(i)
            torch.manual_seed(opts.seed * 1_000_003 + i)
            comps = [g.completion for g in generator().generate([p] * n)]
            with sigint_held():
                _append(cache_file, json.dumps({"index": i, "prompt": p, "completions": comps}, ensure_ascii=False))
        yield Item(item_id(p, comps), p, comps)


def run_label(opts: LabelOptions) -> dict:
    """The interactive loop. Returns the summary (status 'interrupted' and exit_code 130 after Ctrl-C:
    every answer given is already on disk)."""
    from rich.console import Console

    _check_options(opts)
    rater = opts.rater.strip() if opts.rater and opts.rater.strip() else default_rater()
    out = Path(opts.out)
    log = Path(opts.log) if opts.log else default_log_path(out)
    console = Console(stderr=True, highlight=False)
    items, mode, total = _label_items(opts, console)
    store = Store.open(out, log)
    for note in store.notes:
        console.print(f"note: {note}", markup=False)
    session = 0
    status = "completed"
    pending: list[Item] = []  # items undone in this session: asked again first
    keys = Keys()
    try:
        it = iter(items)
        while True:
            if pending:
                item = pending.pop()
            else:
                item = next((x for x in it if x.id not in store.answered), None)
                if item is None:
                    break
            order = shown_order(item, opts.shuffle, opts.seed)
            _show_item(console, store, item, order, mode, opts.scale, total, out)
            keys.discard()  # type-ahead from before this item was on screen answers nothing
            session += _ask(console, keys, store, item, order, mode, opts.scale, rater, pending)
    except _Quit:
        status = "stopped"
    except KeyboardInterrupt:
        status = "interrupted"
    finally:
        keys.close()
    c = store.counts()
    if status == "completed":
        console.print(f"all items answered: {c['rows']} rows in {out}", markup=False)
    elif status == "interrupted":
        console.print(
            f"interrupted: every answer given is saved ({c['rows']} rows in {out}); run the same command to continue",
            markup=False,
        )
    code = 130 if status == "interrupted" else 0
    return {
        "command": "label",
        "status": status,
        "exit_code": code,
        "mode": mode,
        "out": str(out),
        "log": str(log),
        "answered": c["answered"],
        "rows": c["rows"],
        "ties": c["ties"],
        "skips": c["skips"],
        "this_session": session,
        "rater": rater,
    }


def _check_options(opts: LabelOptions) -> None:
    """Usage errors before anything is read or written: one source of items, --out, --mode, --scale, a TTY."""
    if (opts.input is None) == (opts.model_dir is None):
        raise UsageError("give an input JSONL of candidates, or --model DIR with --prompts FILE (one of them)")
    if opts.model_dir is not None and opts.prompts is None:
        raise UsageError("--model needs --prompts FILE (the prompts to sample candidates for)")
    if not opts.out:
        raise UsageError("--out FILE.jsonl is required (where the answers go)")
    if opts.mode not in (None, "pair", "rate"):
        raise UsageError(f"--mode must be 'pair' or 'rate', got {opts.mode!r}")
    if not 2 <= opts.scale <= 9:
        raise UsageError("--scale must be between 2 and 9 (one key per score)")
    if not sys.stdin.isatty():
        raise UsageError("prefcli label is interactive: run it in a terminal (stdin is not a TTY)")


def _label_items(opts: LabelOptions, console) -> tuple[Iterator[Item], str, int | None]:
    """The items to ask, the mode and their number: read from the input JSONL, or sampled lazily from
    --model (count unknown; the screen says when a prompt is being sampled)."""
    if opts.input is not None:
        items_list, mode = read_items(Path(opts.input), opts.mode)
        return iter(items_list), mode, len(items_list)

    def sampling(i: int) -> None:  # the old item leaves the screen: nothing typed now can answer it
        console.clear()
        console.print(
            f"sampling candidates for prompt {i + 1} ... (keys typed now are ignored)",
            markup=False,
            highlight=False,
        )

    mode = opts.mode or "pair"
    return sampled_items(opts, mode, sys.stderr, on_sample=sampling), mode, None


def _show_item(console, store: Store, item: Item, order, mode: str, scale: int, total: int | None, out: Path) -> None:
    """Clear the screen and show the progress line, the prompt, the completion(s) and the keys."""
    from rich.panel import Panel
    from rich.text import Text

    c = store.counts()
    console.clear()
    where = f"{c['answered'] + 1}" + (f"/{total}" if total else "")
    console.print(
        Text.assemble(
            ("prefcli label", "bold"),
            f"  item {where}  ({c['rows']} saved, {c['ties']} ties, {c['skips']} skipped)  -> {out}",
        )
    )
    console.print(Panel(Text(item.prompt), title="prompt", title_align="left"))
    if mode == "pair":
        console.print(Panel(Text(item.completions[order[0]]), title="A", title_align="left"))
        console.print(Panel(Text(item.completions[order[1]]), title="B", title_align="left"))
        console.print("[a] A is better  [b] B is better  [t] tie  [s] skip  [u] undo  [q] quit", markup=False)
    else:
        console.print(Panel(Text(item.completions[0]), title="completion", title_align="left"))
        console.print(f"[1-{scale}] score (higher is better)  [s] skip  [u] undo  [q] quit", markup=False)


def _ask(console, keys, store: Store, item: Item, order, mode: str, scale: int, rater: str, pending: list) -> int:
    """Read keys until one answers the item (+1: stored), undoes the last answer (-1: it and this item go on
    `pending`, asked next) or quits (raises _Quit); other keys are ignored."""
    while True:
        k = keys.read()
        if k == "q":
            raise _Quit
        if k == "u":
            undone = store.undo()
            if undone is None:
                console.print("nothing to undo", markup=False)
                continue
            pending.append(item)  # the current one comes back after the undone one
            pending.append(Item(undone["id"], undone["prompt"], undone["completions"]))
            return -1
        if mode == "pair" and k in PAIR_KEYS:
            ans = PAIR_KEYS[k]
            store.answer(item, ans, pair_row(item, ans, order, rater))
        elif mode == "rate" and k == "s":
            store.answer(item, "skip", None)
        elif mode == "rate" and k.isdigit() and 1 <= int(k) <= scale:
            store.answer(
                item,
                int(k),
                {"prompt": item.prompt, "completion": item.completions[0], "score": int(k), "rater": rater},
            )
        else:
            continue
        return 1


class _Quit(Exception):
    pass
