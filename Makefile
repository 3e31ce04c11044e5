# Two entry points for a fresh machine: `make run` and `make test`. Each sets up .venv first, skipping
# whatever is already installed.
#
# TORCH is the torch requirement installed before everything else. The default is the CPU build;
# on a GPU machine pass your CUDA build, e.g. `make run TORCH=torch` (or a pinned CUDA wheel).
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
EXPERIMENT ?= jobs/sst2-minilm-full-pbt.yaml
PYTEST_ARGS ?=

.PHONY: setup run test lint unit integration clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install "$(TORCH)"
	$(BIN)/pip install -e ".[dev]"
	touch $(STAMP)

# The whole job on an embedded local Ray: SST-2 data report, PBT search over full fine-tuning of the packaged
# MiniLM, the winner tested once, promoted, served (left running: `.venv/bin/raytune-ft serve stop`), benchmarked
# and reported. A rerun reuses every complete stage. RUN_ARGS passes options, e.g. RUN_ARGS=--stop-server.
RUN_ARGS ?=
run: $(STAMP)
	$(BIN)/raytune-ft run $(EXPERIMENT) $(RUN_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check raytune_ft tests
	$(BIN)/ruff format --check raytune_ft tests

# pytest exits 5 when it collects no tests; that is not a failure of the suite.
test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

integration: $(STAMP)
	$(BIN)/python -m pytest tests/integration $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
