# Set-up installs the CPU build of PyTorch pinned in constraints.txt first, then llmkit (editable)
# with its test dependencies. Override the interpreter with `make PY=python3.11 ...`.
PY ?= python3
PIP = $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt

.PHONY: install demo test test-fast bench

install:
	$(PIP) torch==2.13.0
	$(PIP) -e ".[dev]"

demo: install
	$(PY) -m llmkit demo

test: install
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not slow"

bench: install
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/shakespeare_char.py ../shared/data/tinyshakespeare/input.txt
