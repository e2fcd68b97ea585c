"""Two processes under torchrun (CPU, gloo) train exactly like one process with the same global batch."""

import os
import subprocess
import sys

import pytest

from .conftest import last_json, losses, run_subprocess, sft_recipe_dict


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(tmp_path, write_recipe):
    d = sft_recipe_dict(train={"max_steps": 4, "eval_every_steps": 2})
    p = write_recipe(d)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29517",
            "-m",
            "prefcli",
            "sft",
            str(p),
            "-o",
            str(tmp_path / "ddp"),
            "-q",
            "--set",
            "train.batch_size=2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    s = last_json(res.stdout)
    assert s["world_size"] == 2 and s["steps"] == 4
    assert res.stdout.count('"command"') == 1  # only rank 0 prints the summary
    single = run_subprocess("sft", p, "-o", tmp_path / "one", "-q", "--set", "train.batch_size=4")
    assert single.returncode == 0, single.stderr
    a, b = losses(tmp_path / "ddp"), losses(tmp_path / "one")
    assert sorted(a) == [1, 2, 3, 4]
    for step in a:
        assert a[step] == pytest.approx(b[step], abs=1e-5)
    assert s["final"]["eval/loss"] == pytest.approx(last_json(single.stdout)["final"]["eval/loss"], abs=1e-5)
