"""Several prefcli training runs in one `torchrun` launch, for the distributed tests: process start-up and
the process group are paid once for all of them (on a loaded 2-core machine a launch costs ~30 s).

    torchrun --nproc_per_node 2 tests/dist_jobs.py JOBS.json

JOBS.json: a list of {"command", "recipe", "out", "set": [KEY=VALUE ...], "resume": bool}. Each job runs
through `runner.run_training`, exactly as `prefcli <command>` does after parsing its options; the process
group made here stays up between jobs (a runtime destroys only a group it created). Every rank runs every
job; each run folder's summary.json is what the tests read.
"""

import datetime
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def main() -> None:
    jobs = json.loads(Path(sys.argv[1]).read_text())
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
    from prefcli.runner import RunOptions, run_training

    for job in jobs:
        run_training(
            job["command"],
            job["recipe"],
            RunOptions(
                overrides=job.get("set", []), output_dir=job["out"], resume=job.get("resume", False), quiet=True
            ),
        )
        if int(os.environ["RANK"]) == 0:
            print(f"done: {job['out']}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
