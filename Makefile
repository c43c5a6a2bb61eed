# One command builds everything (`make docs`), one runs every test (`make test`).
#
# Environment: inside an activated virtualenv or conda env, that environment is
# used (and a torch it already has is kept). Otherwise a local .venv is created.
# Either way the first call installs what is missing; later calls skip it.

ifneq ($(strip $(VIRTUAL_ENV)$(CONDA_PREFIX)),)
PY := python
else
PY := .venv/bin/python
endif

SPHINXOPTS ?=
# make docs NOTEBOOKS=--check : fail instead of regenerating stale notebooks (CI)
NOTEBOOKS ?=

.PHONY: help all env docs html notebooks example test test-fast lint format bench dist clean

help:
	@echo "make docs                 notebooks (regenerated if stale) + HTML site in docs/_build/html"
	@echo "make test                 package doctests, unit tests and pytest --nbval notebooks/"
	@echo "make notebooks            regenerate stale notebooks/*.ipynb from gallery/"
	@echo "make example NAME=plot_x  build one tutorial page and its notebook, fast"
	@echo "make lint                 ruff check + ruff format --check (CI runs it first)"
	@echo "make format               ruff format + ruff check --fix"
	@echo "make dist                 sdist + wheel in dist/, checked with twine check --strict"
	@echo "make clean                remove build output"

all: docs

.venv/bin/python:
	python3 -m venv .venv

env: $(if $(filter .venv/bin/python,$(PY)),.venv/bin/python)
	@$(PY) tools/ensure_env.py

notebooks: env
	$(PY) tools/notebooks.py $(NOTEBOOKS)

html: env
	$(PY) -m sphinx -W --keep-going -b html $(SPHINXOPTS) docs docs/_build/html
	@echo "HTML: docs/_build/html/index.html"

docs: notebooks html

example: env
	@test -n "$(NAME)" || { echo "usage: make example NAME=plot_01_mlp_ensembling"; exit 2; }
	$(PY) tools/notebooks.py $(NAME)
	GALLERY_PATTERN='/$(NAME)\.py$$' $(PY) -m sphinx -W --keep-going -b html $(SPHINXOPTS) docs docs/_build/html

test: env
	$(PY) -m pytest --nbval --durations=15

lint: env
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: env
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

test-fast: env
	$(PY) -m pytest -m "not slow"

# The release artifacts: python -m build makes the sdist, then the wheel from it
# (so the wheel proves the sdist is complete); twine checks both, README included.
dist: env
	rm -rf dist
	$(PY) -m build --outdir dist .
	$(PY) -m twine check --strict dist/*

clean:
	rm -rf docs/_build docs/tutorials docs/generated docs/sg_execution_times.rst .make
