# magseg developer entry points. Everything installs into a local virtual environment,
# so `make demo` and `make test` work on a bare machine with only python3.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.magseg-installed
PYTEST_ARGS ?=
OUT    ?= demo_out

.PHONY: install test demo bench clean

install: $(STAMP)

# torch/torchvision are pinned as a pair (constraints.txt): a CPU-only torch found on some
# machines breaks PyPI's torchvision, and smp cannot import without torchvision.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# make demo OUT=/tmp/demo: where the demo writes (replaced on every run).
demo: $(STAMP)
	$(BIN)/python scripts/demo.py --out "$(OUT)"

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
