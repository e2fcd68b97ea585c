# prefcli developer tasks. `make test` and `make quickstart` need nothing but python3 (>= 3.10).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch comes first, from TORCH_INDEX (which serves torch and its dependencies) instead of PyPI. The default is
# PyTorch's CPU-only wheel index, so a laptop or CI runner gets the CPU build and never PyPI's Linux torch, the CUDA
# build of several GB. On a GPU machine, in one line:
#   make install TORCH_SPEC=torch TORCH_INDEX=          (PyPI's CUDA build; or TORCH_INDEX=.../whl/cu128)
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
# Everything but torch is installed at the versions CI tested: CONSTRAINTS is a pip constraints file (pip install -c),
# written by `make lock` and moved only by it. `make install CONSTRAINTS=` takes the newest versions inside
# pyproject.toml's ranges instead (on a Python or platform the lock was not made for); `make test-latest` tests those.
CONSTRAINTS ?= constraints.txt
# The stamp's name carries TORCH_SPEC, TORCH_INDEX and CONSTRAINTS, so changing any of them installs again.
STAMP := $(VENV)/.installed-$(shell printf '%s|%s|%s' '$(TORCH_SPEC)' '$(TORCH_INDEX)' '$(CONSTRAINTS)' | cksum | cut -d' ' -f1)
TORCH_INSTALL = python -m pip install -q --upgrade --retries 1 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
# One pytest worker per core, at most 4 (pytest-xdist), each file on one worker (--dist loadfile) so that a module's
# shared fixture (tests/test_fsdp.py's torchrun launches) is built once. Every test runs on one torch thread
# (tests/conftest.py), so a 2-core machine runs two files at a time. `make test XDIST=` runs in one process.
XDIST ?= -n auto --maxprocesses 4 --dist loadfile
PYTEST_ARGS ?= -q --durations=15 $(XDIST)

.PHONY: install test test-fast test-latest lock lint format quickstart demo docs bench-cpu clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/$(TORCH_INSTALL)
	$(BIN)/python -m pip install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[dev]"
	rm -f $(VENV)/.installed $(VENV)/.installed-*
	touch $@

install: $(STAMP)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Move the lock deliberately: a fresh venv takes the newest versions inside pyproject.toml's ranges (torch as
# `make install` takes it) and constraints.txt becomes its `pip freeze`, less torch (scripts/lock.py). Run
# `make test` on the new file before committing it.
LOCK_VENV ?= .venv-lock
lock:
	rm -rf $(LOCK_VENV)
	$(PY) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q --upgrade pip
	$(LOCK_VENV)/bin/$(TORCH_INSTALL)
	$(LOCK_VENV)/bin/python -m pip install -q -e ".[dev]"
	$(LOCK_VENV)/bin/python scripts/lock.py write $(LOCK_VENV)/bin/python > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf $(LOCK_VENV)

# The suite on the newest versions inside pyproject.toml's ranges, in a venv of its own (.venv-latest): drift
# shows here before a newcomer's install meets it. torch stays as TORCH_SPEC installs it (held by a one-line
# constraint, so the eager upgrade cannot fetch PyPI's CUDA build). It lists what moved since constraints.txt.
LATEST_VENV ?= .venv-latest
test-latest:
	$(PY) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade pip
	$(LATEST_VENV)/bin/$(TORCH_INSTALL)
	$(LATEST_VENV)/bin/python -m pip freeze | grep -i '^torch==' > $(LATEST_VENV)/torch.txt
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -c $(LATEST_VENV)/torch.txt -e ".[dev]"
	$(LATEST_VENV)/bin/python scripts/lock.py compare $(LATEST_VENV)/bin/python constraints.txt
	$(LATEST_VENV)/bin/python -m pytest $(PYTEST_ARGS)

# ruff: lint rules and format in pyproject.toml; CI runs this before the tests.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The inner loop: every test but the end-to-end runs (@pytest.mark.slow; CONTRIBUTING.md says which).
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" --durations=10 $(XDIST)

# The main job on the embedded default: RLHF of the bundled KJV model with the human-score
# stand-in as the reward (~2 minutes on 2 CPU cores).
quickstart: install
	$(BIN)/prefcli rlhf recipes/quickstart/rlhf.yaml --overwrite

# The whole quickstart pipeline over 3 seeds, ending with the comparison table (~40 min on 2 CPU cores).
demo: install
	$(BIN)/python experiments/quickstart_demo.py

docs: install
	$(BIN)/python -m prefcli.recipe.docs > docs/recipe-reference.md

# TRL and prefcli side by side on CPU, the tiny workload: sft, dpo, grpo, 10 measured steps after 3 warm-up steps,
# each run in a fresh process (about 4 CPU-minutes; longer in wall time on a busy machine). The table goes to
# stdout; bench/README.md.
bench-cpu: install
	$(BIN)/python bench/bench.py all --size tiny --modes sft,dpo,grpo --steps 10 --warmup 3

clean:
	rm -rf $(VENV) $(LATEST_VENV) $(LOCK_VENV) runs .pytest_cache
