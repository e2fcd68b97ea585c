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
# The stamp's name carries TORCH_SPEC and TORCH_INDEX, so changing either reinstalls torch.
STAMP := $(VENV)/.installed-$(shell printf '%s|%s' '$(TORCH_SPEC)' '$(TORCH_INDEX)' | cksum | cut -d' ' -f1)

.PHONY: install test test-fast lint format quickstart demo docs bench-cpu clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q --upgrade --retries 1 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	rm -f $(VENV)/.installed $(VENV)/.installed-*
	touch $@

install: $(STAMP)

test: install
	$(BIN)/python -m pytest -q --durations=15

# ruff: lint rules and format in pyproject.toml; CI runs this before the tests.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The inner loop: every test but the end-to-end runs (@pytest.mark.slow; CONTRIBUTING.md says which).
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" --durations=10

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
	rm -rf $(VENV) runs .pytest_cache
