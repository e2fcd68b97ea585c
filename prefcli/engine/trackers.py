"""Experiment trackers: the run also goes to TensorBoard, Weights & Biases, MLflow or trackio (`log.report_to`).

Each tracker is its own library, installed through an extra (`pip install 'prefcli[wandb]'`); prefcli only maps
its run onto each library's own calls:

| what            | tensorboard                 | wandb                    | mlflow                         | trackio              |
|-----------------|-----------------------------|--------------------------|--------------------------------|----------------------|
| step metrics    | add_scalar                  | run.log(step=)           | log_batch(metrics)             | trackio.log(step=)   |
| the recipe      | text 'recipe' (YAML)        | run config               | params (dotted) + recipe.yaml  | run config           |
| completions     | text table per step         | wandb.Table              | table artifact samples/*.json  | trackio.Table        |
| the summary     | text 'summary' (JSON)       | run.summary              | summary.json artifact + tags   | summary/* scalars    |
| where           | RUN_DIR/tensorboard/        | WANDB_* settings         | MLFLOW_TRACKING_URI, else      | TRACKIO_DIR          |
|                 |                             |                          | RUN_DIR/mlflow.db (SQLite)     |                      |

metrics.jsonl stays the record. A tracker that fails to start, or raises later, is reported once as a warning
and gets nothing more from the run; training goes on. A tracker named in the recipe whose library is not
installed is a usage error (exit 2) before anything runs (`check_installed`). Only rank 0 reports.
Trackers print to stdout at times (trackio does); every call runs with stdout sent to stderr, because stdout
carries only the JSON summary.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UsageError

# tracker name -> the module its library installs (what `check_installed` looks for)
MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}


def check_installed(names: list[str], field_name: str = "log.report_to") -> None:
    """Exit 2 before anything runs when a named tracker's library is missing, saying which extra installs it."""
    missing = [n for n in names if importlib.util.find_spec(MODULES[n]) is None]
    if missing:
        extras = " ".join(f"'prefcli[{n}]'" for n in missing)
        raise UsageError(
            f"{field_name}: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} named but not installed; "
            f"install with: pip install {extras} (or 'prefcli[trackers]' for all four), or remove "
            f"{'it' if len(missing) == 1 else 'them'} from {field_name}"
        )
    if "mlflow" in names and not os.environ.get("MLFLOW_TRACKING_URI"):
        lacking = [m for m in MLFLOW_SQLITE_MODULES if importlib.util.find_spec(m) is None]
        if lacking:
            raise UsageError(
                f"{field_name}: mlflow without MLFLOW_TRACKING_URI writes to a SQLite file in the run folder, which "
                f"needs {' and '.join(lacking)} (mlflow-skinny leaves them out; the full mlflow, 'prefcli[mlflow]', "
                f"has them): pip install {' '.join(lacking)}, or set MLFLOW_TRACKING_URI to a tracking server"
            )


# MLflow's own default store (since MLflow 3.7) is a SQLite database, `sqlite:///mlflow.db` in the current
# directory, and its file store ('./mlruns') is refused unless MLFLOW_ALLOW_FILE_STORE=true. Without
# MLFLOW_TRACKING_URI, prefcli puts that SQLite database in the run folder (RUN_DIR/mlflow.db, the artifacts
# beside it in RUN_DIR/mlflow-artifacts/), so the run's record stays in its folder and works offline. MLflow's
# SQLite store needs these two, which the full mlflow installs and mlflow-skinny does not.
MLFLOW_SQLITE_MODULES = ("sqlalchemy", "alembic")


def mlflow_default_store(run_dir: Path) -> tuple[str, str]:
    """(tracking URI, artifact location) of a run when MLFLOW_TRACKING_URI is not set."""
    run_dir = Path(run_dir).resolve()
    return f"sqlite:///{run_dir / 'mlflow.db'}", (run_dir / "mlflow-artifacts").as_uri()


@dataclass
class RunInfo:
    """What every tracker is told about the run."""

    run_dir: Path
    name: str
    project: str
    tags: list[str]
    config: dict  # the resolved recipe
    recipe_yaml: str
    command: str
    start_step: int = 0  # > 0 when resumed


def flatten(d: dict, prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """{'train': {'lr': 1e-3}} -> {'train.lr': 1e-3}; lists become JSON text."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + sep, sep))
        elif isinstance(v, (list, tuple)):
            out[key] = json.dumps(v, default=str)
        else:
            out[key] = v
    return out


def scalars(record: dict) -> dict[str, float]:
    """The numeric entries of a metrics record (NaN and inf included; strings and flags left out)."""
    return {
        k: float(v)
        for k, v in record.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"
    }


def markdown_table(columns: list[str], rows: list[list[Any]]) -> str:
    def cell(x: Any) -> str:
        text = f"{x:.4g}" if isinstance(x, float) else str(x)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ the trackers


class TensorBoard:
    name = "tensorboard"

    def __init__(self, run: RunInfo):
        from torch.utils.tensorboard import SummaryWriter  # writes TensorBoard's own event files

        # a resumed run drops the events after its checkpoint, as metrics.jsonl does
        self.writer = SummaryWriter(
            log_dir=str(run.run_dir / "tensorboard"), purge_step=run.start_step + 1 if run.start_step else None
        )
        self.writer.add_text("recipe", "```yaml\n" + run.recipe_yaml + "\n```", run.start_step)
        self.last = run.start_step

    def log(self, step: int, record: dict) -> None:
        for k, v in scalars(record).items():
            self.writer.add_scalar(k, v, step)
        self.last = step

    def table(self, step: int, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        self.writer.add_text(name, markdown_table(columns, rows), step)

    def summary(self, summary: dict) -> None:
        self.writer.add_text("summary", "```json\n" + json.dumps(summary, indent=2, default=str) + "\n```", self.last)

    def finish(self, status: str) -> None:
        self.writer.close()


class WandB:
    name = "wandb"

    def __init__(self, run: RunInfo):
        import wandb

        self.wandb = wandb
        # online without credentials, wandb.init would stop the run at an interactive login prompt
        if wandb.setup().settings.mode == "online" and not wandb.login(prompt=False, verify=False):
            raise RuntimeError(
                "not logged in to W&B: run `wandb login` or set WANDB_API_KEY (or WANDB_MODE=offline to keep the "
                "run on disk for `wandb sync`)"
            )
        self.run = wandb.init(
            project=run.project,
            name=run.name,
            tags=run.tags or None,
            config=run.config,
            dir=None if os.environ.get("WANDB_DIR") else str(run.run_dir),  # W&B's own setting wins
            job_type=run.command,
            reinit="finish_previous",
        )

    def log(self, step: int, record: dict) -> None:
        self.run.log(scalars(record), step=step)

    def table(self, step: int, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        self.run.log({name: self.wandb.Table(columns=columns, data=[list(r) for r in rows])}, step=step)

    def summary(self, summary: dict) -> None:
        self.run.summary.update({k: v for k, v in flatten(summary).items() if v is not None})

    def finish(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "completed" else 1)


class MLflow:
    name = "mlflow"

    def __init__(self, run: RunInfo):
        from mlflow.tracking import MlflowClient  # a set MLFLOW_TRACKING_URI (and credentials) is MLflow's own

        uri, artifacts = (None, None) if os.environ.get("MLFLOW_TRACKING_URI") else mlflow_default_store(run.run_dir)
        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(run.project)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(run.project, artifacts)
        tags = {t: "" for t in run.tags}
        tags["prefcli.command"] = run.command
        self.run_id = self.client.create_run(exp_id, run_name=run.name, tags=tags).info.run_id
        from mlflow.entities import Param

        # MLflow caps a parameter value at 6,000 characters; the whole recipe is an artifact beside them
        params = [Param(k, str(v)[:6000]) for k, v in flatten(run.config).items()]
        for i in range(0, len(params), 100):  # at most 100 parameters per batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])
        self.client.log_text(self.run_id, run.recipe_yaml, "recipe.yaml")

    def log(self, step: int, record: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in scalars(record).items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def table(self, step: int, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        data = {c: [r[i] for r in rows] for i, c in enumerate(columns)}
        self.client.log_table(self.run_id, data=data, artifact_file=f"{name}/step-{step}.json")

    def summary(self, summary: dict) -> None:
        self.client.log_dict(self.run_id, summary, "summary.json")
        self.client.set_tag(self.run_id, "prefcli.status", str(summary.get("status")))

    def finish(self, status: str) -> None:
        mlflow_status = {"completed": "FINISHED", "interrupted": "KILLED"}.get(status, "FAILED")
        self.client.set_terminated(self.run_id, status=mlflow_status)


class Trackio:
    name = "trackio"

    def __init__(self, run: RunInfo):
        import trackio

        self.trackio = trackio
        config = dict(run.config)
        if run.tags:
            config["tags"] = list(run.tags)  # trackio has no tags of its own
        self.run = trackio.init(
            project=run.project, name=run.name, config=config, embed=False, auto_log_cpu=False, auto_log_gpu=False
        )
        self.last = run.start_step

    def log(self, step: int, record: dict) -> None:
        self.trackio.log(scalars(record), step=step)
        self.last = step

    def table(self, step: int, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        self.trackio.log({name: self.trackio.Table(columns=columns, data=[list(r) for r in rows])}, step=step)

    def summary(self, summary: dict) -> None:
        flat = {
            f"summary/{k}": v
            for k, v in flatten(summary).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        }
        if flat:
            self.trackio.log(flat, step=self.last)

    def finish(self, status: str) -> None:
        self.trackio.finish()


TRACKER_CLASSES = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow, "trackio": Trackio}


# ------------------------------------------------------------------------------------------- fan-out


@dataclass
class Trackers:
    """The trackers of one run. Every call goes to each live tracker; one that raises is dropped with a warning."""

    run: RunInfo | None = None
    warn: Any = None
    live: list = field(default_factory=list)
    finished: bool = False

    def start(self, names: list[str]) -> Trackers:
        for n in names:
            try:
                with _stdout_to_stderr():
                    self.live.append(TRACKER_CLASSES[n](self.run))
            except Exception as e:  # any failure of a tracker's library: the run goes on without it
                self._warn(n, "could not start", e)
        if self.live:
            atexit.register(self.finish, "failed")  # a run that dies before finish() still closes its trackers
        return self

    def _warn(self, name: str, what: str, e: BaseException) -> None:
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if self.warn is not None:
            self.warn(
                f"{name} {what} ({type(e).__name__}: {text}); the run goes on without it, metrics.jsonl is complete"
            )

    def _each(self, what: str, fn) -> None:
        for t in list(self.live):
            try:
                with _stdout_to_stderr():
                    fn(t)
            except Exception as e:
                self.live.remove(t)
                self._warn(t.name, f"failed while {what}", e)

    def log(self, step: int, record: dict) -> None:
        if self.live:
            self._each("logging metrics", lambda t: t.log(step, record))

    def table(self, step: int, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        if self.live:
            self._each("logging a table", lambda t: t.table(step, name, columns, rows))

    def summary(self, summary: dict) -> None:
        if self.live:
            self._each("logging the summary", lambda t: t.summary(summary))

    def finish(self, status: str = "completed") -> None:
        if self.finished:
            return
        self.finished = True
        atexit.unregister(self.finish)
        self._each("finishing", lambda t: t.finish(status))
        self.live = []


@contextlib.contextmanager
def _stdout_to_stderr():
    with contextlib.redirect_stdout(sys.stderr):
        yield


def start_trackers(log, command: str, run_dir: Path, config: dict, recipe_yaml: str, warn, start_step: int = 0):
    """The trackers `log.report_to` names (an empty Trackers when it names none)."""
    names = list(getattr(log, "report_to", []) or [])
    run = RunInfo(
        run_dir=Path(run_dir),
        name=log.run_name or Path(run_dir).name,
        project=log.project or "prefcli",
        tags=list(log.tags),
        config=config,
        recipe_yaml=recipe_yaml,
        command=command,
        start_step=start_step,
    )
    return Trackers(run=run, warn=warn).start(names) if names else Trackers(run=run, warn=warn)
