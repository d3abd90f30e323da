# Two entry points for a fresh machine: `make demo` and `make test`.
# TORCH pins the CPU build on a CPU-only machine; on a GPU machine use e.g. `make demo TORCH=torch`.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
OUT ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)

.PHONY: install demo test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/reftune demo --out $(OUT)

test: install
	$(PY) -m pytest tests

bench: install
	$(PY) bench/bench_generation.py
	$(PY) bench/bench_sandbox.py

clean:
	rm -rf $(VENV) runs
