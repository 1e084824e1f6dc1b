# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv if absent, install once
# (re-install only when pyproject.toml changes), fetch the SmolLM2 GGUF into $(S2D_CACHE), then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export S2D_CACHE ?= $(HOME)/.cache/s2d_jax
GGUF := $(S2D_CACHE)/SmolLM2-135M-Instruct.Q4_1.gguf
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test setup fixtures bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	@touch $(STAMP)

fixtures: $(GGUF)

$(GGUF): | $(STAMP)
	$(PY) -m s2d_jax.assets

test: setup fixtures
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

demo: setup fixtures
	$(PY) -m s2d_jax.demo

clean:
	rm -rf $(VENV) runs .pytest_cache
