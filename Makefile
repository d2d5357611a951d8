# Two commands for a new machine with only Python 3.11:
#   make setup   install everything into .venv, then run the CPU smoke job (prepare, train, sample)
#   make test    run the whole test suite (installs first if needed)
#   make test-fast  only the tests that start no training process (pytest -m "not slow")
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Where a CPU-only torch wheel comes from on machines whose default index serves CUDA builds,
# e.g. TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
SMOKE  ?= configs/smoke.yaml
# pytest-xdist workers for `make test`; each test file runs on one worker, and runs that several files share
# are trained once (tests/conftest.py: once_per_session); files start in name order, so the longest single
# run (tests/test_arithmetic_e2e.py) starts first instead of last
WORKERS ?= 2

.PHONY: setup install smoke test test-fast lint bench clean

setup: install smoke

install: $(STAMP)

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	@# No CUDA GPU: take the CPU build first, so nothing below pulls a multi-GB CUDA build.
	if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi >/dev/null 2>&1; then \
		$(BIN)/pip install --quiet torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)); fi
	$(BIN)/pip install --quiet -e '.[dev]'
	@# Microsoft's mup, the reference tests/test_mup.py compares our μP against. Its metadata asks for torchvision,
	@# seaborn and pandas (and so a CUDA torch); the parts the test uses need only torch and pyyaml.
	$(BIN)/pip install --quiet --no-deps mup==1.0.0
	touch $@

smoke: $(STAMP)
	$(BIN)/scalegpt prepare $(SMOKE)
	$(BIN)/scalegpt launch $(SMOKE) --procs 2
	$(BIN)/scalegpt sample runs/smoke --prompt "Q: What is 12 plus 7? A:" --max-new-tokens 40 --num-samples 2 --temperature 0.7

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(WORKERS) --dist loadfile --no-loadscope-reorder

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" -n $(WORKERS) --dist load

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf runs prepared
