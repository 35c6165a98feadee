# Two commands for a new user: `make run` (a gateway with an example list) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
DEMO   ?= demo

.PHONY: run test lint install clean

$(BIN)/listgate: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(BIN)/listgate

# Start the gateway on 127.0.0.1:2525 with the example list discuss@example.org;
# with no smarthost configured, what members would get lands in $(DEMO)/outbox/new/.
run: install
	$(BIN)/listgate --config $(DEMO)/listgate.toml init --example
	$(BIN)/listgate --config $(DEMO)/listgate.toml serve

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check gateway tests bench fuzz docs
	$(BIN)/mypy

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache .mypy_cache
