PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: venv peers test lint bench demo registry clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

venv: $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[dev]'
	@# byte-compiled, as a wheel install is (PYTHONDONTWRITEBYTECODE would keep .pyc away)
	$(BIN)/python -m compileall -q src >/dev/null

lint: venv
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/ruff format --check src tests benchmarks scripts
	$(BIN)/mypy --strict src

test: lint
	$(BIN)/python -m pytest -q

# Debian's docker-registry, installed when missing (as .ci/run does).
registry:
	@command -v docker-registry >/dev/null 2>&1 || { \
		SUDO=; [ "$$(id -u)" -eq 0 ] || SUDO=sudo; \
		$$SUDO apt-get update -qq; DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq docker-registry; }

demo: venv registry
	$(BIN)/python scripts/demo.py

# The suite's Python peer (the `bench` extra) in a venv of its own, inside $(VENV): it
# brings aiodns, which aiohttp imports and uses whenever it is installed. Best effort: the
# suite reports the peer "not installed" when this fails.
PEERS := $(VENV)/peers

$(PEERS)/bin/python: $(BIN)/python
	$(PYTHON) -m venv $(PEERS)

peers: $(PEERS)/bin/python
	-$(PEERS)/bin/python -m pip install -q -e '.[bench]'

bench: venv registry peers
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
