# `make test` and `make demo` build .venv on first use; the stamp is keyed on pyproject.toml
# so a second call is instant and a changed dependency list reinstalls.
PY ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-16)
BIN := $(VENV)/bin

.PHONY: setup test test-cluster test-fast demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[dev]'
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q tests

test-cluster: setup
	$(BIN)/python -m pytest -q -m cluster tests

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" tests

demo: setup
	$(BIN)/avtune demo

bench: setup
	$(BIN)/python benchmarks/decode.py
	$(BIN)/python benchmarks/train_step.py

clean:
	rm -rf $(VENV) runs .pytest_cache
