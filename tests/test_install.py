"""Installs that hold: a built wheel gives a fresh venv the `prefcli` entry point and the bundled model; `make
install` takes torch from the CPU-only index and reinstalls it when TORCH_SPEC changes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

from .conftest import ROOT


@pytest.mark.slow
def test_a_built_wheel_gives_a_fresh_venv_the_entry_point_and_the_bundled_model(tmp_path):
    src = tmp_path / "src"  # a copy, so the build leaves no build/ or egg-info in the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "prefcli", src / "prefcli", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    # offline and quick: no isolated build environment, no dependencies (they are this venv's)
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", src], check=True)
    (wheel,) = (tmp_path / "dist").glob("prefcli-*.whl")

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    py = venv / "bin" / "python"
    subprocess.run([*pip, "--python", py, "install", "--no-deps", wheel], check=True)
    site = subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True
    ).stdout.strip()
    # the dependencies: this venv's site-packages, appended after the fresh venv's own (whose prefcli wins)
    with open(os.path.join(site, "deps.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing from the checkout
    exe = venv / "bin" / "prefcli"
    assert exe.is_file(), "the wheel installed no console script"
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.startswith("prefcli "), out.stderr
    where = subprocess.run(
        [py, "-c", "import prefcli; print(prefcli.__file__)"], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert where.stdout.startswith(site), where.stdout  # the wheel's copy, not the checkout's
    model = os.path.join(site, "prefcli", "assets", "kjv-base")
    check = (
        "import json, sys, tokenizers, safetensors; m = sys.argv[1]; "
        "n = sum(1 for _ in safetensors.safe_open(m + '/model.safetensors', 'pt').keys()); "
        "t = tokenizers.Tokenizer.from_file(m + '/tokenizer.json'); "
        "print(json.dumps({'tensors': n, 'vocab': t.get_vocab_size(), 'model_type': json.load(open(m + '/config.json'))['model_type']}))"
    )  # the bundled model as installed: weights, tokenizer and config readable (cheaper than loading torch)
    got = subprocess.run([py, "-c", check, model], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert got.returncode == 0, got.stderr
    info = json.loads(got.stdout)
    assert info["tensors"] > 10 and info["vocab"] == 4096 and info["model_type"] == "llama", info


def make_n(*args: str, venv) -> str:
    """What `make install` would run (make -n prints the commands without running them)."""
    out = subprocess.run(
        ["make", "-n", "-C", str(ROOT), "install", f"VENV={venv}", *args], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_install_uses_the_cpu_index_and_reinstalls_when_torch_spec_changes(tmp_path):
    venv = tmp_path / ".venv"
    plan = make_n(venv=venv)
    torch_line = next(x for x in plan.splitlines() if '"torch==' in x)
    assert "--index-url https://download.pytorch.org/whl/cpu" in torch_line and "--upgrade" in torch_line
    # an installed venv: the stamp make would write, newer than pyproject.toml
    stamp = next(x for x in plan.splitlines() if x.startswith("touch ")).split()[-1]
    venv.mkdir()
    open(stamp, "w").close()
    assert "pip install" not in make_n(venv=venv)  # up to date: nothing to do
    gpu = make_n("TORCH_SPEC=torch", "TORCH_INDEX=", venv=venv)  # the documented GPU line
    line = next(x for x in gpu.splitlines() if '"torch"' in x)
    assert "--index-url" not in line and "--upgrade" in line
    assert "pip install" in make_n("TORCH_SPEC=torch==2.13.0+cpu", venv=venv)


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_install_takes_the_locked_versions_and_never_locks_torch(tmp_path):
    """prefcli and its dependencies are installed with `-c constraints.txt` (the versions CI tested); torch comes
    before them from TORCH_INDEX without the constraints, and the constraints name no torch build, so they cannot
    make pip fetch one. `CONSTRAINTS=` installs the newest inside the ranges; test-latest holds torch too. Every
    package pyproject.toml requires is locked: a dependency added without `make lock` fails here."""
    plan = make_n(venv=tmp_path / ".venv").splitlines()
    torch_line = next(x for x in plan if '"torch==' in x)
    prefcli_line = next(x for x in plan if '-e ".[dev]"' in x)
    assert "-c constraints.txt" in prefcli_line and "-c" not in torch_line.split()
    free = next(x for x in make_n("CONSTRAINTS=", venv=tmp_path / ".venv2").splitlines() if '-e ".[dev]"' in x)
    assert " -c " not in free
    latest = subprocess.run(["make", "-n", "-C", str(ROOT), "test-latest"], capture_output=True, text=True).stdout
    upgrade = next(x for x in latest.splitlines() if "--upgrade-strategy eager" in x)
    assert "torch.txt" in upgrade and "grep -i '^torch=='" in latest  # torch held where TORCH_SPEC put it

    import re

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    locked = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version, line  # exact versions only
            locked[re.sub(r"[-_.]+", "-", name).lower()] = version
    assert not {k for k in locked if k in ("torch", "triton") or k.startswith("nvidia-")}, "a torch build is locked"
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = meta["optional-dependencies"]
    wanted = meta["dependencies"] + extras["dev"]
    for w in list(wanted):  # prefcli[label] in dev: the label extra's packages
        if m := re.match(r"prefcli\[([\w,\s-]+)\]", w):
            wanted += [d for x in m.group(1).split(",") for d in extras[x.strip()]]
    names = {re.sub(r"[-_.]+", "-", re.split(r"[<>=!~\[ ;]", w, maxsplit=1)[0]).lower() for w in wanted}
    names -= {"torch", "prefcli"}
    assert names <= set(locked), f"not in constraints.txt: {names - set(locked)}"
