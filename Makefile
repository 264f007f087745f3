# `make test` and `make demo` build .venv on first use; the stamp is keyed on pyproject.toml
# so a second call is instant and a changed dependency list reinstalls.
# The installed dependencies are also kept, hard-linked, in a machine-wide cache keyed on
# pyproject.toml and the Python version (tools/venv_cache.py): a fresh clone on a machine that has
# installed them once restores them in seconds instead of unpacking ~5.5 GB of wheels again.
PY ?= python3.11
VENV := .venv
KEY := $(shell (cat pyproject.toml; $(PY) --version) | sha256sum | cut -c1-16)
STAMP := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-16)
BIN := $(VENV)/bin
DEPS_CACHE ?= $(HOME)/.cache/avtune
CACHED_VENV := $(DEPS_CACHE)/venv-$(KEY)

.PHONY: setup test test-cluster test-fast demo bench clean clean-cache

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) tools/venv_cache.py restore $(CACHED_VENV) $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[dev]'
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)
	@$(PY) tools/venv_cache.py save $(VENV) $(CACHED_VENV)

# Two pytest-xdist workers: one Ray test is about 60% CPU-bound on 2 cores (the rest is Ray's start-up
# waits), so two streams keep both cores busy; `loadgroup` keeps the shared sweep's readers on one worker.
# A worker that dies (its local Ray's raylet gone, a segfault) ends the run with that test failed
# (`--max-worker-restart 0`): pytest-xdist 3.8's loadgroup scheduler hung after replacing one.
# Each test has its own time limit (pyproject.toml); SUITE_TIMEOUT_S is the last guard for the whole run.
SUITE_TIMEOUT_S ?= 1800
test: setup
	timeout --kill-after=30 $(SUITE_TIMEOUT_S) $(BIN)/python -m pytest -q -n 2 --dist loadgroup --max-worker-restart 0 tests

test-cluster: setup
	$(BIN)/python -m pytest -q -m cluster tests

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" tests

demo: setup
	$(BIN)/avtune demo

bench: setup
	$(BIN)/python benchmarks/decode.py
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/startup.py
	$(BIN)/python benchmarks/gblend_estimate.py

clean:
	rm -rf $(VENV) runs .pytest_cache

clean-cache:
	rm -rf $(DEPS_CACHE)
