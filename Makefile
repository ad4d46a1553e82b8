# `make demo` and `make test` work on a fresh clone: each creates .venv when missing.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned to the release on this machine's disk (CPU and CUDA alike).
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test setup setup-dev bench clean install-check

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e '.[report,data]'
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[dev]'
	# the report test renders the HTML in headless Chromium: a machine where it cannot be installed fails here
	command -v chromium || command -v chromium-browser || (apt-get update -q && apt-get install -y -q chromium) \
	  || { echo "chromium could not be installed (apt-get install chromium): make test needs it"; exit 1; }
	touch $@

setup: $(VENV)/.installed
setup-dev: $(VENV)/.installed-dev

demo: setup
	$(BIN)/medtune run configs/demo.yaml

# MEDTUNE_STRICT_SKIPS: a skip that does not name an optional extra outside `dev` fails (tests/conftest.py).
test: setup-dev
	MEDTUNE_STRICT_SKIPS=1 $(BIN)/python -m pytest tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

# `pip install .` into an empty venv, then the smoke grid from that install (~10 min, most of it torch).
install-check:
	PY=$(PY) bash scripts/install_check.sh

clean:
	rm -rf $(VENV) results
