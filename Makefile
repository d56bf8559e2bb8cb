# keras_vmoe developer commands. `make test` and `make demo` work on a fresh machine:
# they create the virtual environment and install the pinned packages first.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
BACKENDS ?= jax tensorflow torch
PYTEST_ARGS ?=

.PHONY: setup test test-multiprocess test-jax test-tensorflow test-torch lint demo bench notebooks clean

$(STAMP): pyproject.toml requirements-lock.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c requirements-lock.txt -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

# Runs the whole suite once per backend (in parallel); fails if any backend fails.
# Prints the tests done so far every TEST_PROGRESS_INTERVAL seconds (30).
test: setup
	tools/test_all_backends.sh $(PY) "$(BACKENDS)" $(PYTEST_ARGS)

test-%: setup
	KERAS_BACKEND=$* $(PY) -m pytest -q $(PYTEST_ARGS) tests

lint: setup
	$(PY) -m ruff check keras_vmoe tests benchmarks guides
	$(PY) -m ruff format --check keras_vmoe tests benchmarks guides

# The multi-process training tests alone (two JAX processes of 4 simulated
# CPU devices each, killed and resumed; bad process settings). `make test`
# runs them too, on its JAX backend.
test-multiprocess: setup
	KERAS_BACKEND=jax $(PY) -m pytest -q -m multiprocess tests/cli/test_train_distributed.py

demo: setup
	$(VENV)/bin/keras-vmoe --backend jax study

bench: setup
	KERAS_BACKEND=jax $(PY) -m benchmarks.run

# Regenerates the Colab notebooks guides/ipynb/*.ipynb from the guides.
notebooks: setup
	$(PY) tools/make_notebooks.py

clean:
	rm -rf $(VENV) .pytest_cache .jax_cache build dist *.egg-info
