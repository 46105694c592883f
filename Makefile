# The two commands of the README: `make demo` and `make test`. Each sets up what it needs.
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.bootstrapped

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml scripts/bootstrap
	VENV=$(VENV) scripts/bootstrap
	touch $@

demo: $(STAMP)
	$(BIN)/opstwin demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/opcua.py

clean:
	rm -rf $(VENV) build *.egg-info opstwin-demo .pytest_cache .ruff_cache
