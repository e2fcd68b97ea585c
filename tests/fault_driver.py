"""`python tests/fault_driver.py FAULT prefcli-args...`: the real entry point with one fault injected at a named
point of the run folder's lifecycle, where a timer would land only by luck (tests/test_faults.py).

The faults act on engine/runfolder.py, not on the checkpoint's contents, so they hold whatever format the
state is written in:

  kill-in-write:STEP       SIGKILL while checkpoint STEP is written: its largest file cut to half, no marker
  kill-before-marker:STEP  SIGKILL once every file of checkpoint STEP is written, before its marker
  kill-in-prune:N          SIGKILL inside the N-th checkpoint removal, once prefcli has done its first part
                           (removed the marker) and one more file is gone
  kill-at-final-eval       SIGKILL when the final evaluation starts (the last step is checkpointed)
  sigint-at-final-eval     SIGINT to itself when the final evaluation starts (it then finishes)
  kill-in-final-write      SIGKILL once final/ is written into its temporary folder, before the rename
  sigterm-at-startup       SIGTERM to itself while the task is built (data and model loading), before anything is written
  sigterm-while-plotting   SIGTERM to itself once summary.json is written, while curves.png is drawn
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path


def die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def largest_file(folder: Path) -> Path:
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def install(fault: str) -> None:
    from prefcli.engine import runfolder
    from prefcli.engine.loop import Engine

    kind, _, arg = fault.partition(":")
    if kind == "kill-in-write":
        commit = runfolder.commit_checkpoint

        def cut_commit(tmp, step, *a, **k):
            if step == int(arg):
                f = largest_file(tmp)
                f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
                die()
            return commit(tmp, step, *a, **k)

        runfolder.commit_checkpoint = cut_commit
    elif kind == "kill-before-marker":
        write_marker = runfolder._write_marker

        def no_marker(folder, info):
            if info.get("step") == int(arg):
                die()
            return write_marker(folder, info)

        runfolder._write_marker = no_marker
    elif kind == "kill-in-prune":
        import shutil
        import types

        calls = [0]

        def cut_rmtree(path, *a, **k):  # the tree removal that follows whatever remove_checkpoint does first
            if Path(path).name.startswith("step-"):
                calls[0] += 1
                if calls[0] == int(arg):
                    largest_file(Path(path)).unlink()
                    die()
            return shutil.rmtree(path, *a, **k)

        runfolder.shutil = types.SimpleNamespace(rmtree=cut_rmtree)
    elif kind in ("kill-at-final-eval", "sigint-at-final-eval"):
        evaluate = Engine._evaluate

        def final_eval(self, step, history):
            if step == self.task.total_steps():
                if kind == "kill-at-final-eval":
                    die()
                os.kill(os.getpid(), signal.SIGINT)
            return evaluate(self, step, history)

        Engine._evaluate = final_eval
    elif kind == "kill-in-final-write":
        write_final = runfolder.write_final

        def cut_final(run_dir, save, main=True):
            def save_then_die(folder):
                save(folder)
                die()

            return write_final(run_dir, save_then_die, main)

        runfolder.write_final = cut_final
    elif kind == "sigterm-at-startup":
        from prefcli.engine import run

        check = run.check_position_limit  # runs right after the task (data, models) is built

        def term_then_check(task, recipe):
            os.kill(os.getpid(), signal.SIGTERM)
            return check(task, recipe)

        run.check_position_limit = term_then_check
    elif kind == "sigterm-while-plotting":
        from prefcli.engine import plots

        plot_runs = plots.plot_runs

        def term_then_plot(*a, **k):
            os.kill(os.getpid(), signal.SIGTERM)
            return plot_runs(*a, **k)

        plots.plot_runs = term_then_plot
    else:
        raise SystemExit(f"unknown fault {fault!r}")


if __name__ == "__main__":
    install(sys.argv[1])
    from prefcli.cli import main

    main(sys.argv[2:])
