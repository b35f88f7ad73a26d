# The two commands the README starts with. Both set up everything they need.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEMO   ?= demo

.PHONY: demo test unit integration bench demo-down

$(BIN)/fab: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

## make demo: deploy examples/hello to a local sandbox droplet, print its URL and smoke checks
demo: $(BIN)/fab
	$(BIN)/fab sandbox.up --name $(DEMO)
	$(BIN)/fab -H $(DEMO) deploy
	$(BIN)/fab -H $(DEMO) check
	$(BIN)/fab sandbox.info --name $(DEMO)

## make test: unit tests, then integration tests on sandbox droplets
test: $(BIN)/fab
	$(BIN)/pytest tests

unit: $(BIN)/fab
	$(BIN)/pytest tests/unit

integration: $(BIN)/fab
	$(BIN)/pytest tests/integration

bench: $(BIN)/fab
	$(BIN)/python bench/run

demo-down: $(BIN)/fab
	$(BIN)/fab sandbox.down --name $(DEMO)
