"""The constraints file of the versions CI tested (`make lock`), and what the newest versions moved (`make test-latest`).

    python scripts/lock.py write VENV/bin/python > constraints.txt     # the venv's versions, as pip constraints
    python scripts/lock.py compare VENV/bin/python constraints.txt    # the packages whose version differs

`write` lists every package of the venv (`pip freeze`) except prefcli itself and torch with what only a CUDA torch
brings (triton, nvidia-*): torch is installed by the Makefile before everything else, from TORCH_INDEX (the CPU
build by default), and a torch line among the constraints would make pip fetch another build of it. pip's own
`freeze` does the listing; this script only filters it and writes the header.
"""

from __future__ import annotations

import platform
import re
import subprocess
import sys
from datetime import date

# torch and the packages only a CUDA build of torch pulls in: the Makefile's TORCH_SPEC/TORCH_INDEX decide them
NOT_LOCKED = re.compile(r"^(torch|triton|nvidia-[a-z0-9-]+|prefcli)$", re.IGNORECASE)


def freeze(python: str) -> dict[str, str]:
    """{name: 'name==version'} of the venv whose interpreter is `python` (editable installs left out)."""
    out = subprocess.run(
        [python, "-m", "pip", "freeze", "--exclude-editable", "--disable-pip-version-check"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    pins = {}
    for line in out.splitlines():
        name, sep, _ = line.partition("==")
        if sep and not NOT_LOCKED.match(name.strip()):
            pins[canonical(name)] = line.strip()
    return pins


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: str) -> dict[str, str]:
    pins = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if "==" in line:
                pins[canonical(line.partition("==")[0])] = line
    return pins


def write(python: str) -> None:
    pins = freeze(python)
    version = subprocess.run(
        [python, "-c", "import platform; print(platform.python_version())"], capture_output=True, text=True
    ).stdout.strip()
    print("# The versions CI tested: pip constraints for `make install` and .ci/run (pip install -c constraints.txt).")
    print("# Written by `make lock` from a fresh venv that installed the newest versions inside pyproject.toml's")
    print("# ranges; move it only that way, and run `make test` before committing the new file. torch is not")
    print("# here: the Makefile installs it first from TORCH_INDEX (the CPU build by default).")
    print(f"# {date.today().isoformat()}, Python {version}, {platform.system()} {platform.machine()}")
    for key in sorted(pins):
        print(pins[key])


def compare(python: str, lock: str) -> None:
    new, old = freeze(python), read_lock(lock)
    moved = [
        f"  {key}: {old[key].partition('==')[2] if key in old else '(not locked)'} -> "
        f"{new[key].partition('==')[2] if key in new else '(not installed)'}"
        for key in sorted(set(new) | set(old))
        if new.get(key) != old.get(key)
    ]
    if moved:
        print(f"newest versions inside pyproject.toml's ranges that differ from {lock}:")
        print("\n".join(moved))
    else:
        print(f"the newest versions inside pyproject.toml's ranges are the ones in {lock}")


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "write":
        write(sys.argv[2])
    elif len(sys.argv) >= 4 and sys.argv[1] == "compare":
        compare(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__)
