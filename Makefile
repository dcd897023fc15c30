# Two commands for a new user: `make demo` and `make test`.
# TORCH_SPEC picks the torch build; override it to keep your usual one, e.g.
#   make test TORCH_SPEC="torch"        (latest from PyPI, CUDA build on Linux)
#   make test TORCH_SPEC=""             (keep whatever torch the venv already has)
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
DEMO_DIR ?= demo_out
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=23" "setuptools>=64" wheel
	if [ -n "$(TORCH_SPEC)" ]; then $(BIN)/python -m pip install -q "$(TORCH_SPEC)"; fi
	$(BIN)/python -m pip install -q -e ".[offline,dev]"
	# hearvalidator declares a dependency on full tensorflow, which it only uses for TF models;
	# the HEAR test gives it a stand-in module, so install it without its dependencies.
	$(BIN)/python -m pip install -q --no-deps hearvalidator==2021.0.2
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

demo: $(STAMP)
	@echo "demo: filled in below"

clean:
	rm -rf $(VENV) $(DEMO_DIR)
