# bentowhisper: `make serve` starts the service, `make test` runs the tests (see README.md).
# Every target uses .venv/bin/... directly: no activation needed.

PYTHON ?= python3.11
VENV ?= .venv
PORT ?= 3000
# Extra pip options for the torch install. Empty: pip's configured sources (on the project's
# machines a CPU wheel of torch 2.13.0 lies on local disk). Elsewhere use PyTorch's CPU index,
# or a bare `torch` would pull the multi-GB CUDA build:
#   make .venv TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu"
TORCH_INDEX ?=
PYTEST_ARGS ?=
# pytest-xdist workers for `make test` (tests/conftest.py groups the tests; 0: one process).
TEST_WORKERS ?= 2
BENCH_ARGS ?= --out benchmarks/results/tmp/rtf.json
LINT_PATHS := src tests service.py benchmarks
# Every package pinned (requirements/constraints.txt, `make constraints`): pip resolves at once
# instead of backtracking through releases (a cold install without it took 226 s). No
# byte-compiling at install time: Python compiles what it imports on first use.
CONSTRAINTS := requirements/constraints.txt
PIP_INSTALL = $(VENV)/bin/python -m pip install --no-compile --prefer-binary --no-input \
	--disable-pip-version-check -c $(CONSTRAINTS)

# Written last by the install, so an interrupted install is redone; redone when pyproject changes.
STAMP := $(VENV)/.bentowhisper-installed

.PHONY: help .venv serve test lint bench constraints gpu-bundle

help:
	@echo "make serve   start the service on port $(PORT) (PORT=...; model and settings: configs/, BENTOWHISPER_*)"
	@echo "make test    run the test suite (installs $(VENV) first if needed)"
	@echo "make lint    ruff check + ruff format --check"
	@echo "make bench   engine real-time factor benchmark (docs/benchmarks.md)"
	@echo "make .venv   create $(VENV): CPU torch first, then the project with [embedded,test]"
	@echo "make gpu-bundle  pack .gpu-bundle/ for benchmarks/gpu_check.sh on a lent GPU (docs/benchmarks.md)"
	@echo "make constraints  re-pin $(CONSTRAINTS) from $(VENV) after a dependency change"

.venv: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --no-compile --disable-pip-version-check --upgrade pip
	$(PIP_INSTALL) "torch==2.13.0" $(TORCH_INDEX)
	$(PIP_INSTALL) -e ".[embedded,test]"
	# resemblyzer only for its speaker-encoder weights: its own requirements (librosa, webrtcvad,
	# the obsolete `typing` backport) are not needed by our code.
	$(PIP_INSTALL) --no-deps "resemblyzer==0.1.4"
	touch $@

# Re-pin after a dependency change in pyproject.toml (install it into $(VENV) first).
constraints:
	{ sed -n '1,2p' $(CONSTRAINTS); $(VENV)/bin/python -m pip freeze --exclude-editable \
		--exclude bentowhisper | sed 's/+cpu$$//'; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)

serve: .venv
	$(VENV)/bin/bentowhisper serve --port $(PORT)

# Two workers (much of the suite waits on servers and subprocesses): the tests of each shared
# `bentoml serve` run on one worker (tests/conftest.py). -rfE names every failure and error at
# the end. JUNIT_DIR: a JUnit report there (CI reads it).
test: .venv
	$(VENV)/bin/python -m pytest -q -rfE -n $(TEST_WORKERS) --no-loadscope-reorder $(PYTEST_ARGS) \
		$(if $(JUNIT_DIR),--junitxml=$(JUNIT_DIR)/tests.xml) tests

lint: .venv
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)

bench: .venv
	$(VENV)/bin/python benchmarks/rtf.py $(BENCH_ARGS)

# What benchmarks/gpu_check.sh needs on the device tool's GPU machine (no network there).
gpu-bundle: .venv
	$(VENV)/bin/python benchmarks/gpu_check.py bundle
