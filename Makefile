# `make demo` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU build of torch: small and fast to install. Users elsewhere get any torch>=2.3 from pyproject.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test lint format bench clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/metatl train configs/maml_sinusoid_demo.yaml --out runs/demo --overwrite

test: setup lint
	$(PY) -m pytest -q

# ruff's rules and format, as configured in pyproject.toml; `make format` applies them
lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: setup
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

# make bench BENCH="transfer --quick": any entry point of benchmarks/README.md
BENCH ?= speed
bench: setup
	$(PY) -m benchmarks $(BENCH)

clean:
	rm -rf $(VENV) runs .pytest_cache
