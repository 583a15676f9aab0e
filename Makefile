# Two entry points for a fresh machine:  `make run`  (the main job)  and  `make test`.
# Each installs what it needs into .venv: the CPU build of torch 2.13.0 first (a bare `torch`
# requirement could pull a multi-GB CUDA build), then fishprune with its extras.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-run
TSTAMP := $(VENV)/.installed-test
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: run test lint setup setup-test data bench clean

setup: $(STAMP)
setup-test: $(TSTAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e .
	touch $(STAMP)

$(TSTAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(TSTAMP)

# Fashion-MNIST from Debian's package when we can install it; otherwise fishprune looks in
# --data-dir, $$FISHPRUNE_DATA and its cache, downloads (with checksums) when online, or says how.
data:
	@if [ ! -f $(FMNIST)/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null \
	    && [ "$$(id -u)" = 0 ]; then \
	  (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update -qq >/dev/null && apt-get install -y -qq dataset-fashion-mnist >/dev/null)) \
	  || echo "note: could not install dataset-fashion-mnist; fishprune will search/download"; \
	fi

run: setup data
	$(BIN)/fishprune run $(ARGS)

lint: setup-test
	$(BIN)/ruff check src tests benchmarks

test: setup-test data lint
	$(BIN)/python -m pytest -q

bench: setup data
	$(BIN)/python benchmarks/bench_scoring.py
	$(BIN)/python benchmarks/bench_training.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
