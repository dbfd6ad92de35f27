# twinmesh developer entry points. Everything runs from a local .venv that
# `make` creates on first use, so a fresh machine needs only Python 3.11.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
RUN_DIR ?= .run
# The peers the benchmarks compare against (/work/shared/PEERS.md) live in their own
# venv, never in twinmesh's dependencies; bench/peers/ drivers run under its python.
BENCH_VENV  ?= .venv-bench
BENCH_PEERS ?= rns==1.5.7 libp2p==0.8.1
BENCH_STAMP := $(BENCH_VENV)/.installed-$(shell echo '$(BENCH_PEERS)' | cat - pyproject.toml | cksum | cut -d' ' -f1)
PYTEST_ARGS ?=

.PHONY: venv test run lab-down bench bench-quick bench-env scale scale-quick sim sim-quick lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,lint]'
	rm -f $(VENV)/.installed-*
	touch $@

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The lab in labs/line3.toml: three NICs in a line (TCP and websocket links), a twin on
# each; prints the twins' ids and the first one's browser URL; Ctrl-C stops it all.
run: $(STAMP)
	$(BIN)/twinctl lab up labs/line3.toml --foreground --dir $(RUN_DIR)/lab/line3

# Stop a lab started in the background (`twinctl lab up FILE`), or left behind.
lab-down: $(STAMP)
	$(BIN)/twinctl lab down $(if $(LAB),--dir $(LAB))

# Without the benchmark venv (e.g. no package index) the peers' rows say
# "not measured" and everything else still runs.
bench: $(STAMP)
	$(MAKE) bench-env || echo "bench: no benchmark venv; the peers will be 'not measured'" >&2
	BENCH_VENV=$(BENCH_VENV) $(BIN)/python -m bench --out docs/BENCHMARKS.md

bench-quick: $(STAMP)
	$(MAKE) bench-env || echo "bench: no benchmark venv; the peers will be 'not measured'" >&2
	BENCH_VENV=$(BENCH_VENV) $(BIN)/python -m bench --quick

# 1000 twins (4 twind processes in hosting mode) over 20 real pnicd processes, each twin
# sending 0.1 msg/s for 30 s, then 0.2, 0.5 and 1 msg/s for 10 s each while every message
# still arrives. Takes 3-6 minutes; the section lands in docs/BENCHMARKS.md between
# scale markers.
scale: $(STAMP)
	$(BIN)/python -m bench.scale --twins 1000 --nics 20 --hosts 4 --rate 0.1 --duration 30 \
		--push 0.2,0.3,0.4,0.5,1 --out docs/BENCHMARKS.md

scale-quick: $(STAMP)
	$(BIN)/python -m bench.scale --twins 200 --nics 10 --hosts 2 --rate 1 --duration 10

bench-env: $(BENCH_STAMP)

$(BENCH_STAMP): pyproject.toml
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(BENCH_VENV)/bin/python -m pip install --quiet $(BENCH_PEERS) -e .
	rm -f $(BENCH_VENV)/.installed-*
	touch $@

# Routing at 100 / 1 000 / 10 000 NICs on the discrete-event simulator (7-10 minutes on 2 cores);
# the figures land in docs/SCALING.md, between its generated-section markers.
sim: $(STAMP)
	$(BIN)/python -m twinmesh.sim --out docs/SCALING.md

sim-quick: $(STAMP)
	$(BIN)/python -m twinmesh.sim --quick

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy

clean:
	rm -rf $(VENV) $(BENCH_VENV) $(RUN_DIR) build dist .pytest_cache .mypy_cache .ruff_cache
