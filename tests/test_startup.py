"""`prefcli --help` and `prefcli validate` must answer without importing torch or transformers."""

import subprocess
import sys
import time

from .conftest import ROOT

PROBE = """
import sys, time
t = time.perf_counter()
from typer.testing import CliRunner
from prefcli.cli import app
r = CliRunner().invoke(app, sys.argv[1:])
heavy = [m for m in ("torch", "transformers", "datasets") if m in sys.modules]
print(r.exit_code, ",".join(heavy) or "-", round(time.perf_counter() - t, 3))
"""


def probe(*args):
    out = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=60)
    code, heavy, secs = out.stdout.split()
    return int(code), heavy, float(secs)


def test_help_and_validate_import_no_torch():
    code, heavy, secs = probe("--help")
    assert code == 0 and heavy == "-"
    for sub in (["data", "inspect", "--help"], ["explain", "--help"]):  # their heavy imports wait for the work
        code, heavy, secs = probe(*sub)
        assert code == 0 and heavy == "-", sub
    code, heavy, secs = probe("validate", str(ROOT / "recipes" / "tiny" / "sft.yaml"))
    assert code == 0 and heavy == "-"
    assert secs < 1.0


def test_whole_process_help_is_fast():
    t = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "prefcli", "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "validate" in res.stdout
    assert time.perf_counter() - t < 2.0  # well under a second on an idle machine; CI machines are noisy
