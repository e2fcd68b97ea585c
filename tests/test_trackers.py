"""log.report_to: every tracker gets the run through its own library, offline, and reads back with its own
reader; a tracker that fails is a warning; a tracker named but not installed is exit 2 before anything runs."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from .conftest import ROOT, last_json, read_metrics, run_subprocess, sft_recipe_dict

ALL = ["tensorboard", "wandb", "mlflow", "trackio"]


def wandb_records(run_folder: Path) -> list:
    """The records of a W&B offline run file, parsed with W&B's own protobuf schema. (wandb 0.31 moved its
    Python reader of these files into its Go core; the file is the LevelDB log format: a 7-byte W&B header,
    then 32 KiB blocks of chunks, each with a 7-byte header: crc32, length, type full/first/middle/last.)"""
    from wandb.proto import wandb_internal_pb2 as pb

    (f,) = run_folder.glob("run-*.wandb")
    buf = f.read_bytes()
    assert buf[:4] == b":W&B"
    out, pos, cur = [], 7, b""
    while pos + 7 <= len(buf):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", buf[pos : pos + 7])
        if n == 0 and kind == 0:
            break
        data, pos = buf[pos + 7 : pos + 7 + n], pos + 7 + n
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(cur + data if kind == 4 else data)
            out.append(rec)
            cur = b""
        else:
            cur += data
    return out


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)  # W&B writes 'a/b' as the nested key [a, b]


@pytest.mark.slow
def test_every_tracker_gets_the_run_offline(tmp_path, monkeypatch):
    env = {
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp_path / "wandb-root"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),  # W&B's staging and settings: here, not in $HOME
        "WANDB_DATA_DIR": str(tmp_path / "wandb-data"),
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
        "TRACKIO_DIR": str(tmp_path / "trackio"),
        "OMP_NUM_THREADS": "1",
    }
    (tmp_path / "wandb-root").mkdir()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # MLflow as it comes: the default store
    run = tmp_path / "run"
    p = run_subprocess(
        "rlhf", ROOT / "recipes" / "tiny" / "rlhf-grpo.yaml", "-o", run, "-q",
        "--set", "train.max_steps=2", "--set", "train.eval_every_steps=1", "--set", "rlhf.log_examples_every_steps=1",
        "--set", "rlhf.prompts_per_rollout=2", "--set", "data.eval.max_rows=4",
        "--set", f"log.report_to={json.dumps(ALL)}", "--set", "log.run_name=r1", "--set", "log.project=proj",
        "--set", "log.tags=[tiny, ci]",
        env=env,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    summary = json.loads(p.stdout)  # stdout is still exactly the one JSON line (trackio prints; not there)
    assert "warning" not in p.stderr, p.stderr
    evals = [r for r in read_metrics(run) if "eval/reward" in r]
    assert [r["step"] for r in evals] == [1, 2]
    from prefcli.recipe import load_recipe

    declared = load_recipe(ROOT / "recipes" / "tiny" / "rlhf-grpo.yaml").recipe.eval_metrics()
    assert set(declared) <= set(evals[0])  # what keep_best/early_stopping may watch is logged
    samples = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]

    # TensorBoard: its own event reader
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    assert [(e.step, pytest.approx(e.value)) for e in ea.Scalars("eval/reward")] == [
        (r["step"], pytest.approx(r["eval/reward"])) for r in evals
    ]
    assert len(ea.Scalars("loss/grpo")) == 2
    recipe_text = ea.Tensors("recipe/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "algorithm: grpo" in recipe_text
    table = ea.Tensors("samples/text_summary")[0].tensor_proto.string_val[0].decode()
    assert table.startswith("| prompt | completion | reward |") and samples[0]["prompt"] in table
    assert '"status": "completed"' in ea.Tensors("summary/text_summary")[0].tensor_proto.string_val[0].decode()

    # W&B offline: the run folder's records
    (folder,) = (tmp_path / "wandb-root" / "wandb").glob("offline-run-*")
    recs = wandb_records(folder)
    head = next(r.run for r in recs if r.WhichOneof("record_type") == "run")
    assert (head.display_name, head.project, list(head.tags)) == ("r1", "proj", ["tiny", "ci"])
    config = {i.key: json.loads(i.value_json) for i in head.config.update}
    assert config["rlhf"]["algorithm"] == "grpo" and config["train"]["max_steps"] == 2
    history = [
        {_key(i): i.value_json for i in r.history.item} for r in recs if r.WhichOneof("record_type") == "history"
    ]
    assert [float(h["eval/reward"]) for h in history if "eval/reward" in h] == pytest.approx(
        [r["eval/reward"] for r in evals]
    )
    assert any(h.get("samples/_type") == '"table-file"' for h in history)
    (tfile,) = list((folder / "files" / "media" / "table").glob("samples_*.table.json"))[:1]
    assert json.loads(tfile.read_text())["columns"] == ["prompt", "completion", "reward"]
    summ = {}
    for r in recs:
        if r.WhichOneof("record_type") == "summary":
            summ.update({_key(i): i.value_json for i in r.summary.update})
    assert json.loads(summ["status"]) == "completed" and json.loads(summ["steps"]) == 2

    # MLflow without MLFLOW_TRACKING_URI: a SQLite store in the run folder, read back through its client
    from mlflow.tracking import MlflowClient

    assert (run / "mlflow.db").is_file() and not (tmp_path / "mlflow.db").exists()
    client = MlflowClient(f"sqlite:///{run / 'mlflow.db'}")
    (mr,) = client.search_runs([client.get_experiment_by_name("proj").experiment_id])
    assert mr.info.run_name == "r1" and mr.info.status == "FINISHED"
    assert {"tiny", "ci"} <= set(mr.data.tags) and mr.data.params["rlhf.algorithm"] == "grpo"
    hist = client.get_metric_history(mr.info.run_id, "eval/reward")
    assert [(m.step, m.value) for m in hist] == [(r["step"], pytest.approx(r["eval/reward"])) for r in evals]
    arts = {a.path for a in client.list_artifacts(mr.info.run_id)}
    assert {"recipe.yaml", "summary.json", "samples"} <= arts
    assert mr.info.artifact_uri.startswith((run / "mlflow-artifacts").as_uri())
    assert len(client.list_artifacts(mr.info.run_id, "samples")) == len({s["rollout"] for s in samples})

    # trackio: its local store
    import trackio.sqlite_storage as ts

    monkeypatch.setattr(ts, "TRACKIO_DIR", Path(env["TRACKIO_DIR"]))
    assert ts.SQLiteStorage.get_runs("proj") == ["r1"]
    logs = ts.SQLiteStorage.get_logs("proj", "r1")
    assert [(x["step"], x["eval/reward"]) for x in logs if "eval/reward" in x] == [
        (r["step"], pytest.approx(r["eval/reward"])) for r in evals
    ]
    tables = [x["samples"]["_value"] for x in logs if "samples" in x]
    assert tables and tables[0][0]["prompt"] == samples[0]["prompt"]
    cfg = ts.SQLiteStorage.get_run_config("proj", "r1")
    assert cfg["tags"] == ["tiny", "ci"] and cfg["rlhf"]["algorithm"] == "grpo"
    assert any(x.get("summary/steps") == 2 for x in logs) and summary["status"] == "completed"


@pytest.mark.slow
def test_a_failing_tracker_is_a_warning_not_a_failed_run(tmp_path, write_recipe, cli, monkeypatch):
    """MLflow cannot start (a file store MLflow refuses unless allowed); TensorBoard dies at step 2."""
    from torch.utils.tensorboard import SummaryWriter

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    real = SummaryWriter.add_scalar

    def add_scalar(self, tag, value, step, *a, **k):
        if step >= 2:
            raise OSError("No space left on device")
        return real(self, tag, value, step, *a, **k)

    monkeypatch.setattr(SummaryWriter, "add_scalar", add_scalar)
    r = write_recipe(sft_recipe_dict(log={"report_to": ["tensorboard", "mlflow"]}))
    code, stdout, stderr = cli("sft", r, "-o", tmp_path / "run", "-q")
    assert code == 0, stderr
    assert "warning: mlflow could not start (MlflowException" in stderr
    assert "warning: tensorboard failed while logging metrics (OSError: No space left on device)" in stderr
    assert stderr.count("warning: tensorboard") == 1  # dropped after its first failure
    assert [x["step"] for x in read_metrics(tmp_path / "run") if "loss/sft" in x] == [1, 2, 3, 4]
    assert last_json(stdout)["status"] == "completed"


def test_tracker_not_installed_or_unknown_is_exit_2_before_anything_runs(tmp_path, write_recipe, cli, monkeypatch):
    from prefcli.engine import trackers

    monkeypatch.setitem(trackers.MODULES, "wandb", "prefcli_no_such_module")
    r = write_recipe(sft_recipe_dict(log={"report_to": ["wandb"]}))
    code, stdout, stderr = cli("sft", r, "-o", tmp_path / "run")
    assert code == 2 and "log.report_to: wandb is named but not installed" in stderr
    assert "pip install 'prefcli[wandb]'" in stderr and not (tmp_path / "run").exists()
    assert last_json(stdout)["status"] == "invalid"

    # mlflow-skinny without sqlalchemy: the default store (SQLite in the run folder) cannot open; a set
    # MLFLOW_TRACKING_URI (a server) needs neither
    real = trackers.importlib.util.find_spec
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda n: None if n == "sqlalchemy" else real(n))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    r = write_recipe(sft_recipe_dict(log={"report_to": ["mlflow"]}))
    code, stdout, stderr = cli("sft", r, "-o", tmp_path / "run")
    assert code == 2 and "mlflow without MLFLOW_TRACKING_URI writes to a SQLite file in the run folder" in stderr
    assert "pip install sqlalchemy" in stderr and not (tmp_path / "run").exists()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    trackers.check_installed(["mlflow"])  # no exit 2

    r = write_recipe(sft_recipe_dict(log={"report_to": ["tensorbord"]}))
    code, stdout, stderr = cli("sft", r, "-o", tmp_path / "run")
    assert code == 2 and "log.report_to[0]" in stderr and "did you mean 'tensorboard'" in stderr
    assert not (tmp_path / "run").exists()
