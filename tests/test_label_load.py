"""Load and a kill -9 for `prefcli label serve`, short (the 50-rater, 60 s run is bench/label_load.py, its figures
in docs/labelling.md): 10 simulated raters answer 800 assignments through the JSON API of a real server process;
after 150 acknowledged answers the server is killed with SIGKILL and started again (by answer count, not by time:
on an idle machine the raters finish in under 2 s, so a kill at a fixed second could come after the end). Every acknowledged answer must be in the store, once, and
nothing else: answers committed just before the kill are acknowledged after the restart as duplicates of the
same client_id, never stored twice."""

from __future__ import annotations

import importlib.util

import pytest

from .conftest import ROOT

pytest.importorskip("uvicorn", reason="pip install 'prefcli[label]'")


def load_bench():
    spec = importlib.util.spec_from_file_location("label_load", ROOT / "bench" / "label_load.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_no_acknowledged_answer_is_lost_or_doubled_across_a_kill_9():
    res = load_bench().run(raters=10, seconds=20, kill_at=None, items=400, overlap=2, kill_after_answers=150)
    assert res["restart_s"] is not None and res["submits_spanning_the_outage"] > 0, res
    assert res["acknowledged"] > 20 and res["acknowledged_after_restart"] > 0, res
    assert res["missing"] == 0 and res["not_acknowledged"] == 0 and res["same_item_twice_by_one_rater"] == 0, res
    assert res["stored"] == res["acknowledged"] == res["server_summary_answers"], res
    assert res["refused"] == {}, res
