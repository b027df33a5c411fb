# The README's two commands. Each one creates or updates .venv, then runs.
# A stamp file records what was installed; a second run with an unchanged pyproject.toml installs nothing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_CPU := torch==2.13.0

.PHONY: train test

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first: with it present, nothing else can pull a CUDA build of it.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_CPU)"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

train: $(STAMP)
	$(PY) -m launch.train --config configs/quickstart.yaml $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)
