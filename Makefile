# The README's two commands. Each one creates or updates .venv, then runs.
# A stamp file records what was installed; a second run with an unchanged pyproject.toml installs nothing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0

# Which torch goes into .venv. Without an NVIDIA GPU, $(TORCH) is installed first: pip here finds its
# CPU build, and with torch present nothing else can pull a CUDA build of it. With a GPU (nvidia-smi -L
# lists one), .venv must get a torch that uses it, or training silently runs on the CPU:
# - if the system $(PYTHON) already has a torch that sees the GPU (a GPU image's own build, matched to
#   its driver and CUDA), .venv shares it through --system-site-packages and installs no torch;
# - otherwise $(TORCH) comes from the package index's default build, which is the CUDA one on Linux.
# Either way the set-up stops with a message if .venv's torch still cannot see the GPU.
HAS_GPU := nvidia-smi -L >/dev/null 2>&1
TORCH_SEES_GPU := -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null

.PHONY: venv train test

venv: $(STAMP)

$(STAMP): pyproject.toml
	if $(HAS_GPU) && ! test -x $(PY) && $(PYTHON) $(TORCH_SEES_GPU); then \
		$(PYTHON) -m venv --system-site-packages $(VENV); fi
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	if $(HAS_GPU) && ! $(PY) $(TORCH_SEES_GPU); then \
		echo "error: nvidia-smi lists a GPU but the torch in $(VENV) cannot use it: delete $(VENV) and rerun," \
			"or install a CUDA build of torch into it (https://pytorch.org/get-started/locally/)" >&2; \
		exit 1; fi
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

train: $(STAMP)
	$(VENV)/bin/nsa-dist train configs/quickstart.yaml $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)
