# KubeRLHF: every target sets up what it needs on a fresh machine, then runs.
#   make demo   - the tiny end-to-end pipeline on CPU (local backend)
#   make test   - the whole test suite (and ruff)
#   make bench  - the benchmarks in bench/, figures printed and written to bench/results/

PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build on CPU machines; a GPU machine sets e.g. TORCH_SPEC="torch==2.13.0" and
# TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cu128".
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
STAMP := $(VENV)/.installed

.PHONY: setup system-deps demo test lint bench clean

setup: system-deps $(STAMP)

# Debian packages the suite needs: a C++ toolchain for DeepSpeed's JIT ops on GPU machines
# and for the packages pip builds from source.
system-deps:
	@if ! command -v g++ >/dev/null 2>&1; then \
	  if command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++ make; \
	  else echo "install a C++ compiler (g++)"; exit 1; fi; \
	fi

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, so that the range in pyproject.toml installs nothing more
	$(BIN)/pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e '.[test,bench]'
	touch $(STAMP)

demo: setup
	$(BIN)/rlhf run examples/demo.yaml
	@echo
	@echo "Outputs, metrics and manifests are under runs/demo/. Again: 'make demo' (every stage is skipped)."

lint: setup
	$(BIN)/ruff check jobs pipeline tests bench

test: setup lint
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python -m bench.dedup
	$(BIN)/python -m bench.sft_throughput

clean:
	rm -rf $(VENV) runs bench/results .pytest_cache
