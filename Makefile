# twinmesh developer entry points. Everything runs from a local .venv that
# `make` creates on first use, so a fresh machine needs only Python 3.11.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
RUN_DIR ?= .run
PYTEST_ARGS ?=

.PHONY: venv test run bench bench-quick lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,lint]'
	rm -f $(VENV)/.installed-*
	touch $@

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# A small local mesh: three pnicd processes in a line (TCP and websocket links).
run: $(STAMP)
	$(BIN)/python -m twinmesh.nic.localmesh --dir $(RUN_DIR) --nics 3

bench: $(STAMP)
	$(BIN)/python -m bench --out docs/BENCHMARKS.md

bench-quick: $(STAMP)
	$(BIN)/python -m bench --quick

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy

clean:
	rm -rf $(VENV) $(RUN_DIR) build dist .pytest_cache .mypy_cache .ruff_cache
