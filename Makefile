# Set-up makes a virtual environment in the checkout (.venv), so it works the same on a developer
# machine and on a fresh Debian/Ubuntu whose system Python is externally managed (PEP 668). It
# installs the CPU build of PyTorch pinned in constraints.txt first, then llmkit (editable) with its
# test dependencies. Choose the interpreter that makes the venv with `make PY=python3.12 ...`.
PY ?= python3
VENV ?= .venv
VPY = $(VENV)/bin/python
PIP = $(VPY) -m pip install --quiet --disable-pip-version-check -c constraints.txt

.PHONY: install demo test test-fast bench clean-venv

# The stamp is rebuilt when the project's dependencies change.
$(VENV)/.installed: pyproject.toml constraints.txt
	@$(PY) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "llmkit needs Python >= 3.11: run make PY=python3.11 (or newer)"; exit 2; }
	@test -x $(VPY) || $(PY) -m venv $(VENV) || { echo "could not create $(VENV): on Debian/Ubuntu install the venv module (sudo apt install python3-venv), then run make again"; rm -rf $(VENV); exit 2; }
	$(PIP) --upgrade "pip>=23"
	$(PIP) torch==2.13.0
	$(PIP) -e ".[dev]"
	@touch $@

install: $(VENV)/.installed

demo: install
	$(VPY) -m llmkit demo

test: install
	$(VPY) -m pytest

test-fast: install
	$(VPY) -m pytest -m "not slow"

bench: install
	$(VPY) benchmarks/train_throughput.py
	$(VPY) benchmarks/shakespeare_char.py ../shared/data/tinyshakespeare/input.txt

clean-venv:
	rm -rf $(VENV)
