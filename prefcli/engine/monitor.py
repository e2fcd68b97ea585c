"""What the engine does with each evaluation besides logging it: keep the best checkpoint (train.keep_best) and
stop early (train.early_stopping). The engine calls `Monitors.after_eval` at every evaluation.

The state (best value and step, evaluations since the last improvement) is a function of the evaluations
logged so far, so a resumed run rebuilds it from metrics.jsonl (`replay`) instead of storing it in checkpoints.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..errors import TrainingError
from ..recipe.sections import EarlyStopping, EvalMonitor, TrainSection
from .runfolder import complete_checkpoints

BEST_DIR = "best"  # RUN_DIR/best/checkpoints/step-N: the checkpoint of the best evaluation


@dataclass
class Watch:
    """One watched metric: its best value so far and how many evaluations have not beaten it."""

    cfg: EvalMonitor
    best: float | None = None
    best_step: int | None = None
    since_best: int = 0

    def improves(self, value: float) -> bool:
        if self.best is None:
            return True
        delta = getattr(self.cfg, "min_delta", 0.0)
        return value < self.best - delta if self.cfg.mode == "min" else value > self.best + delta

    def update(self, step: int, record: dict, field: str) -> bool:
        """True when this evaluation is the new best."""
        value = record.get(self.cfg.metric)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise TrainingError(
                f"{field}.metric: the evaluation at step {step} has no {self.cfg.metric!r} "
                f"(it logged: {', '.join(sorted(k for k in record if k.startswith('eval/')))})"
            )
        if math.isfinite(value) and self.improves(value):
            self.best, self.best_step, self.since_best = float(value), step, 0
            return True
        self.since_best += 1
        return False


class Monitors:
    def __init__(self, train: TrainSection, run_dir: Path):
        self.keep = Watch(train.keep_best) if train.keep_best is not None else None
        self.stop: Watch | None = Watch(train.early_stopping) if train.early_stopping is not None else None
        self.best_root = Path(run_dir) / BEST_DIR
        self.stopped_at: int | None = None

    @property
    def active(self) -> bool:
        return self.keep is not None or self.stop is not None

    def after_eval(self, step: int, record: dict) -> tuple[bool, bool]:
        """(save the best checkpoint now, stop the run now) after the evaluation at `step`."""
        save = self.keep.update(step, record, "train.keep_best") if self.keep is not None else False
        stop = False
        if self.stop is not None:
            self.stop.update(step, record, "train.early_stopping")
            cfg: EarlyStopping = self.stop.cfg
            if self.stop.since_best >= cfg.patience:
                stop = True
                self.stopped_at = step
        return save, stop

    def replay(self, metrics_file: Path, upto: int) -> None:
        """Rebuild the state from the evaluations a resumed run logged up to its checkpoint."""
        if not metrics_file.exists():
            return
        for line in metrics_file.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("step", 0) > upto or not any(k.startswith("eval/") for k in rec):
                continue
            for w, field in ((self.keep, "train.keep_best"), (self.stop, "train.early_stopping")):
                if w is not None and w.cfg.metric in rec:
                    w.update(rec["step"], rec, field)
        saved = self.best_checkpoint()
        if self.keep is not None and saved is not None and int(saved.name.split("-")[1]) > upto:
            shutil.rmtree(self.best_root, ignore_errors=True)  # from after the checkpoint resumed from

    def best_checkpoint(self) -> Path | None:
        cps = complete_checkpoints(self.best_root)
        return cps[-1][1] if cps else None

    def describe(self) -> dict:
        out: dict = {}
        if self.keep is not None:
            cp = self.best_checkpoint()
            out["best"] = {
                "metric": self.keep.cfg.metric,
                "mode": self.keep.cfg.mode,
                "value": self.keep.best,
                "step": self.keep.best_step,
                "checkpoint": str(cp) if cp is not None else None,
            }
        if self.stop is not None:
            out["stopped_early"] = (
                {
                    "step": self.stopped_at,
                    "metric": self.stop.cfg.metric,
                    "best_value": self.stop.best,
                    "best_step": self.stop.best_step,
                    "patience": self.stop.cfg.patience,
                }
                if self.stopped_at is not None
                else None
            )
        return out
