# Two commands set everything up on a fresh machine:
#   make train   create .venv, install, train the debug RAT+ model on the bundled corpus (CPU if no GPU)
#   make test    create .venv, install, run the test suite
#   make test-gpu  the whole suite on a CUDA machine, kernels compiled (scripts/test_gpu.sh; JOBS=8 workers)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
# A CPU machine takes the CPU build of torch (2.13.0); a GPU machine keeps the range from pyproject.toml.
GPU_TORCH := torch>=2.11,<2.15
CPU_TORCH := torch==2.13.0
TORCH_SPEC ?= $(if $(HAS_GPU),$(GPU_TORCH),$(CPU_TORCH))
CONFIG_FILE ?= train_configs/debug_model.toml

.PHONY: install train test test-gpu lint bench-kernels clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,eval]"
	touch $@

train: install
	CONFIG_FILE=$(CONFIG_FILE) PYTHON=$(PY) ./run_train.sh $(ARGS)

test: install
	$(PY) -m pytest -q tests

# No `install` prerequisite: scripts/test_gpu.sh installs offline from .whl/ when it is there, else runs `make install`.
test-gpu:
	bash scripts/test_gpu.sh

lint: install
	$(PY) -m ruff check .

bench-kernels: install
	$(PY) -m bench.kernels

clean:
	rm -rf $(VENV) outputs .pytest_cache
