"""Progress on stderr (rich on a terminal, one plain line every N steps otherwise), metrics.jsonl,
and the run summary. stdout is reserved for the single JSON summary line the CLI prints last.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from .trackers import Trackers

BAR_WIDTH = 20  # characters of the progress bar (rich's default, 40, leaves little room at 80 columns)

# The metrics shown on the progress line, in order, when present.
HEADLINE = ("loss", "eval/loss", "eval/ppl", "reward/mean", "kl/mean", "lr", "perf/tokens_per_s")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != v or math.isinf(v):
            return str(v)
        a = abs(v)
        if a >= 1000:
            return f"{v:,.0f}"
        if a != 0 and a < 1e-3:
            return f"{v:.3g}"
        return f"{v:.4g}"
    return str(v)


def _eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def headline(record: dict) -> list[tuple[str, Any]]:
    out = []
    for key in HEADLINE:
        if key == "loss":
            found = [(k, v) for k, v in record.items() if k.startswith("loss/")][:2]
            out.extend(found)
        elif key in record:
            out.append((key, record[key]))
    return out


class Progress:
    """Rank 0 only writes; other ranks get a Progress whose methods do nothing visible."""

    def __init__(
        self,
        enabled: bool,
        total_steps: int,
        title: str,
        run_dir: Path | None,
        quiet: bool = False,
        every_steps: int = 10,
        metrics_every: int = 1,
        start_step: int = 0,
        trackers: Callable[[Callable[[str], None]], Trackers] | None = None,
    ):
        """`trackers(warn)` starts the run's trackers (engine.trackers.start_trackers), on the main process only;
        they get every step, evaluation and table too, and their failures come back as warnings."""
        self.enabled = enabled
        self.total = total_steps
        self.title = title
        self.quiet = quiet or not enabled
        self.every = every_steps
        self.metrics_every = metrics_every
        self.console = Console(stderr=True, highlight=False)
        self.tty = self.console.is_terminal and not self.quiet
        self.t0 = time.perf_counter()
        self.start_step = start_step
        self._metrics = None
        self.lines = 0  # lines in metrics.jsonl: a checkpoint records it, a resume cuts the file back to it
        self.warnings: list[str] = []  # every warning shown, for the summary
        self.trackers: Trackers | None = None
        self.last_step = start_step
        if enabled and run_dir is not None:
            path = Path(run_dir) / "metrics.jsonl"
            self.lines = path.read_bytes().count(b"\n") if path.exists() else 0
            self._metrics = open(path, "a", encoding="utf-8")
        self._bar = None
        if self.tty:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("[bold]{task.description}"),
                BarColumn(bar_width=BAR_WIDTH),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                console=self.console,
                transient=False,
                refresh_per_second=4,
            )
            self._task = self._bar.add_task(title, total=total_steps, completed=start_step, info="")
            self._bar.start()
        if enabled and trackers is not None:
            self.trackers = trackers(self.warn)

    def _fit(self, info: str) -> str:
        """The metrics text cut to what the terminal has left after the title, the bar, the step counter and the
        ETA. Rich shrinks a table row that is too wide by dropping its narrow columns first: an uncut metrics text
        on an 80-column terminal hid the step counter and the ETA."""
        n = len(str(self.total))
        room = self.console.width - (len(self.title) + BAR_WIDTH + 2 * n + 1 + len("0:00:00") + 4)
        return info if len(info) <= room else (info[: room - 1] + "…" if room > 1 else "")

    def log(self, text: str) -> None:
        """A message on stderr (shown unless --quiet)."""
        if self.enabled and not self.quiet:
            self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def warn(self, text: str) -> None:
        self.warnings.append(text)
        if self.enabled:
            self.console.print(f"warning: {text}", markup=False, highlight=False, style="yellow", soft_wrap=True)

    def step(self, step: int, record: dict) -> None:
        if not self.enabled:
            return
        self.last_step = step
        if step % self.metrics_every == 0 or step == self.total:
            if self._metrics is not None:
                self._metrics.write(json.dumps({"step": step, **{k: _clean(v) for k, v in record.items()}}) + "\n")
                self._metrics.flush()
                self.lines += 1
            if self.trackers is not None:
                self.trackers.log(step, record)
        if self.quiet:
            return
        info = "  ".join(f"{k} {_fmt(v)}" for k, v in headline(record))
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=self._fit(info))
        elif step % self.every == 0 or step == self.total or step == self.start_step + 1:
            done = step - self.start_step
            elapsed = time.perf_counter() - self.t0
            eta = elapsed / max(done, 1) * (self.total - step)
            self.console.print(
                f"step {step}/{self.total}  {info}  eta {_eta(eta)}", markup=False, highlight=False, soft_wrap=True
            )

    def eval(self, step: int, record: dict) -> None:
        """An evaluation result: appended to metrics.jsonl and shown as one line."""
        if not self.enabled:
            return
        if self._metrics is not None:
            self._metrics.write(json.dumps({"step": step, **{k: _clean(v) for k, v in record.items()}}) + "\n")
            self._metrics.flush()
            self.lines += 1
        if self.trackers is not None:
            self.trackers.log(step, record)
        if not self.quiet:
            info = "  ".join(f"{k} {_fmt(v)}" for k, v in record.items())
            self.console.print(f"eval @ step {step}: {info}", markup=False, highlight=False, soft_wrap=True)

    def table(
        self,
        title: str,
        columns: list[str],
        rows: list[list[Any]],
        name: str | None = None,
        full_rows: list[list[Any]] | None = None,
    ) -> None:
        """A table on stderr; the trackers get it as table `name` (default: the title) at the current step,
        with `full_rows` when the shown rows are shortened."""
        if not self.enabled:
            return
        if self.trackers is not None:
            self.trackers.table(self.last_step, name or title, columns, full_rows if full_rows is not None else rows)
        if self.quiet:
            return
        t = Table(title=title, show_lines=False)
        for c in columns:
            t.add_column(c, overflow="fold")
        for r in rows:
            t.add_row(*[_fmt(x) if not isinstance(x, str) else x for x in r])
        self.console.print(t)

    def finish(self, summary: dict) -> None:
        """The run's summary to the trackers, which then close."""
        if self.trackers is not None:
            self.trackers.summary(summary)
            self.trackers.finish(summary.get("status", "completed"))

    def close(self) -> None:
        """Stop the bar and close metrics.jsonl; when an error is on its way out, the trackers close as failed
        (or interrupted) too, since `finish` will not come."""
        err = sys.exc_info()[1]
        if err is not None and self.trackers is not None:
            from ..errors import Interrupted

            self.trackers.finish("interrupted" if isinstance(err, (Interrupted, KeyboardInterrupt)) else "failed")
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None


def _clean(v: Any) -> Any:
    if isinstance(v, float) and (v != v or math.isinf(v)):
        return str(v)
    return v
