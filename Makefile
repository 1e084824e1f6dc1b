# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv if absent, install once
# (re-install only when pyproject.toml changes), fetch the SmolLM2 GGUF into $(S2D_CACHE), then run.
# jax >= 0.11 needs Python >= 3.12: the first python3.12 (then 3.13) on PATH or in pyenv, else python3.
PYTHON ?= $(shell for v in 3.12 3.13; do for p in $$(command -v python$$v 2>/dev/null) \
	$${PYENV_ROOT:-$$HOME/.pyenv}/versions/$$v.*/bin/python$$v; do $$p -c '' 2>/dev/null && echo $$p && exit; done; \
	done; echo python3)
VENV ?= .venv
PY := $(VENV)/bin/python
export S2D_CACHE ?= $(HOME)/.cache/s2d_jax
GGUF := $(S2D_CACHE)/SmolLM2-135M-Instruct.Q4_1.gguf
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# pytest-xdist workers, a test file each at a time: one compiles (one core) while the other computes
TEST_WORKERS ?= 2

.PHONY: demo test setup fixtures bench clean tunix-venv docs

setup: $(STAMP)

# pip byte-compiles what it installs: where PYTHONDONTWRITEBYTECODE is set (this project's machines) nothing else
# would, and every process of the suite would compile its imports from source again
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else "s2d_jax needs Python >= 3.12 (jax >= 0.11); set PYTHON=/path/to/python3.12")'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	@touch $(STAMP)

fixtures: $(GGUF)

$(GGUF): | $(STAMP)
	$(PY) -m s2d_jax.assets

# --max-worker-restart=0: a worker that dies (a crash inside XLA) ends the run with a failure, never a hang
test: setup fixtures
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --max-worker-restart=0 $(PYTEST_ARGS) tests

demo: setup fixtures
	$(PY) -m s2d_jax.demo

# the docs site (docs/, mkdocs.yml) into site/; the config keys' page is generated from the schema
docs: setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# Tunix, for benchmarks/sampler.py --tunix-python: its own venv (it pins other transformers versions than ours), on
# our versions of JAX, Flax and NumPy
TUNIX_VENV ?= .venv-tunix
tunix-venv: $(TUNIX_VENV)/.installed

$(TUNIX_VENV)/.installed: | $(STAMP)
	@test -x $(TUNIX_VENV)/bin/python || $(PYTHON) -m venv $(TUNIX_VENV)
	$(TUNIX_VENV)/bin/python -m pip install -q --disable-pip-version-check google-tunix==0.1.7 \
		$$($(PY) -c 'import importlib.metadata as m; print(*(f"{p}=={m.version(p)}" for p in ("jax", "jaxlib", "flax", "numpy")))')
	@touch $@

clean:
	rm -rf $(VENV) $(TUNIX_VENV) runs .pytest_cache
