# The two commands of the README: `make demo` and `make test`. Each sets up what it needs.
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.bootstrapped

.PHONY: demo test lint bench clean install upgrade uninstall

# The C kernel is compiled by the install, so its sources are prerequisites too.
$(STAMP): pyproject.toml setup.py scripts/bootstrap $(wildcard native/*.c native/*.h native/build_sim.py)
	VENV=$(VENV) scripts/bootstrap
	touch $@

demo: $(STAMP)
	$(BIN)/opstwin demo

# The tests start with the lint: a type error or an unformatted file fails CI like a test does.
test: lint
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# bench/sim.py times a Numba peer: the optional `bench` extra, installed here when missing.
bench: $(STAMP)
	$(BIN)/python -c "import numba" 2>/dev/null || \
		$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[bench]'
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/codec.py
	$(BIN)/python bench/modbus_decode.py
	$(BIN)/python bench/opcua.py
	$(BIN)/python bench/sim.py
	$(BIN)/python bench/decide.py
	$(BIN)/python bench/sync.py
	$(BIN)/python bench/web.py
	$(BIN)/python bench/footprint.py --quick
	$(BIN)/python bench/retention.py --quick
	$(BIN)/python bench/closed_loop.py

# The appliance on a factory PC (README, "Install on a factory PC"), run as root: a virtualenv
# in /opt/opstwin built from this tree, /etc/opstwin/site.yaml, the systemd unit. Not the .venv
# above: these need nothing from `make demo`. `make uninstall PURGE=1` removes config and data too.
install upgrade:
	scripts/install $@

uninstall:
	scripts/install uninstall $(if $(PURGE),--purge)

clean:
	rm -rf $(VENV) build *.egg-info opstwin-demo .pytest_cache .ruff_cache .mypy_cache
