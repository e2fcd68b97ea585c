"""`prefcli --help` and `prefcli validate` must answer without importing torch, transformers or datasets.

What start-up imports is asserted here; how long it takes is measured by the benchmark
(`python bench/bench.py startup`), not asserted: wall-clock limits fail on a loaded machine.
"""

import subprocess
import sys

from .conftest import ROOT, last_json

HEAVY = ("torch", "transformers", "datasets")
RECIPES = sorted(ROOT.glob("recipes/**/*.yaml"))


def imports_of(*args: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run the real entry point in a fresh process; the top-level modules it imported (`python -X importtime`
    lists every import on stderr as `import time: self | cumulative | dotted.name`)."""
    res = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "prefcli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("import time:") and "|" in ln]
    modules = {ln.rsplit("|", 1)[1].strip().split(".")[0] for ln in lines}
    assert "prefcli" in modules, res.stderr[-2000:]  # the probe sees the imports at all
    return res, modules


def test_help_imports_no_torch():
    res, modules = imports_of("--help")
    assert res.returncode == 0 and "validate" in res.stdout
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))


def test_data_inspect_and_explain_help_import_no_torch():
    for sub in (["data", "inspect", "--help"], ["explain", "--help"]):  # their heavy imports wait for the work
        res, modules = imports_of(*sub)
        assert res.returncode == 0, sub
        assert not modules & set(HEAVY), (sub, sorted(modules & set(HEAVY)))


def test_validate_every_bundled_recipe_imports_no_torch():
    assert len(RECIPES) >= 30, RECIPES  # recipes/tiny, recipes/quickstart, recipes/gpu
    res, modules = imports_of("validate", *[str(p.relative_to(ROOT)) for p in RECIPES])
    assert res.returncode == 0, res.stderr[-3000:]
    summary = last_json(res.stdout)
    assert summary["status"] == "valid" and len(summary["recipes"]) == len(RECIPES)
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))
