# `make run` and `make test` do the whole set-up from a fresh clone; neither needs Node.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
VENDOR := public/vendor
SIO_CLIENT := node_modules/socket.io-client

.PHONY: run test test-fast bench bench-rooms soak install vendor dist system-deps cluster clean

run: install
	$(PY) -m chatd

# The whole suite on SQLite, then the tests marked `storage` again with chatd on
# PostgreSQL (CHATD_TEST_BACKEND=postgres; a throwaway server, tests/pg_service.py).
# Tests marked `postgres` start or use a PostgreSQL of their own whatever the backend
# (tests/test_storage.py covers both backends, the cluster tests run on it), so the
# second pass leaves them out. Markers: setup.cfg [tool:pytest].
# XDIST: two pytest-xdist workers (a 2-core machine), each with its own throwaway
# servers; a module that starts a module-wide server (a cluster, a built wheel) runs whole
# on one worker (tests/conftest.py). Tests marked `serial` measure timing and run
# afterwards, alone.
# With PYTEST_ARGS (e.g. one file), a pass that finds nothing in that selection (pytest's
# exit status 5) is no failure; without, every pass must find tests.
XDIST ?= -n 2
PYTEST := $(PY) -m pytest
NONE_SELECTED_IS_OK = $(if $(strip $(PYTEST_ARGS)),|| [ $$? -eq 5 ])

test: install system-deps
	$(PYTEST) $(XDIST) -m "not serial" $(PYTEST_ARGS) $(NONE_SELECTED_IS_OK)
	$(PYTEST) -m serial $(PYTEST_ARGS) $(NONE_SELECTED_IS_OK)
	CHATD_TEST_BACKEND=postgres $(PYTEST) $(XDIST) -m "storage and not postgres and not serial" $(PYTEST_ARGS) $(NONE_SELECTED_IS_OK)
	CHATD_TEST_BACKEND=postgres $(PYTEST) -m "storage and not postgres and serial" $(PYTEST_ARGS) $(NONE_SELECTED_IS_OK)

# The edit-test loop, in about half a minute: no Chromium, PostgreSQL, cluster (Redis,
# nginx, several chatd processes) or wheel/.pyz build. `make test` (and CI) runs those too.
LIGHT := not browser and not postgres and not cluster and not dist

test-fast: install
	$(PYTEST) $(XDIST) -m "$(LIGHT) and not serial" $(PYTEST_ARGS) $(NONE_SELECTED_IS_OK)
	$(PYTEST) -m "$(LIGHT) and serial" $(PYTEST_ARGS) $(NONE_SELECTED_IS_OK)

# Two chatd processes, a throwaway Redis and nginx on loopback; Ctrl-C stops them all.
cluster: install
	$(PY) scripts/cluster.py

# chatd side by side with the Node stack (bench/run.py; docs/performance.md).
BENCH_ARGS ?=
bench: install bench/loadgen/node_modules/.installed bench/node-peer/node_modules/.installed
	$(PY) bench/run.py $(BENCH_ARGS)

# Half an hour of churn with nothing allowed to grow (bench/soak.py; docs/performance.md "Soak").
SOAK_ARGS ?=
soak: install $(VENV)/.bench-installed
	$(PY) bench/soak.py $(SOAK_ARGS)

$(VENV)/.bench-installed: setup.cfg pyproject.toml
	$(PY) -m pip install --quiet -e '.[test,bench]'
	touch $@

# A session in 50 rooms: server CPU per handshake against one in general only (bench/rooms50.py).
bench-rooms: install
	$(PY) bench/rooms50.py $(BENCH_ARGS)

bench/%/node_modules/.installed: bench/%/package.json bench/%/package-lock.json
	cd bench/$* && npm ci --no-audit --no-fund --loglevel=error
	touch $@

install: $(VENV)/.installed

# The virtualenv, re-installed whenever the package metadata changes.
$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

# A maintainer's tool: refresh the committed Socket.IO browser client from npm,
# at the version package-lock.json pins (byte for byte what is committed, unless
# the pin moved). Running and testing chatd never need it.
vendor: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	rm -rf $(VENDOR) && mkdir -p $(VENDOR)
	cp $(SIO_CLIENT)/dist/socket.io.min.js $(SIO_CLIENT)/dist/socket.io.min.js.map $(VENDOR)/
	cp $(SIO_CLIENT)/LICENSE $(VENDOR)/socket.io-client.LICENSE
	node -p 'require("./$(SIO_CLIENT)/package.json").version' > $(VENDOR)/socket.io-client.version

# The wheel and the single-file zipapp (shiv; see README), both in $(DIST).
DIST ?= dist
dist: install
	rm -rf $(DIST) build
	$(PY) -m build --wheel --outdir $(DIST) .
	$(PY) -m shiv --quiet --reproducible --compressed -p '/usr/bin/env python3' -c chatd -o $(DIST)/chatd.pyz $(DIST)/chatd-*.whl

# What the tests start for themselves, from Debian's packages: Chromium (browser
# tests), PostgreSQL, Redis and nginx (throwaway servers in temp dirs). Installed
# when we can (root with apt-get) and missing.
SYSTEM_PACKAGES := chromium:chromium initdb:postgresql redis-server:redis-server nginx:nginx-light

system-deps:
	@missing=""; for pair in $(SYSTEM_PACKAGES); do \
		cmd=$${pair%%:*}; pkg=$${pair#*:}; \
		command -v $$cmd >/dev/null 2>&1 || [ -x /usr/sbin/$$cmd ] || ls /usr/lib/postgresql/*/bin/$$cmd >/dev/null 2>&1 || missing="$$missing $$pkg"; \
	done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing Debian's$$missing for the tests"; \
			(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null) \
				|| echo "warning: could not install$$missing; the tests that need them will skip (or fail under CI=true)"; \
		else \
			echo "warning: missing$$missing; the tests that need them will skip (or fail under CI=true)"; \
		fi; \
	fi

clean:
	rm -rf $(VENV) node_modules bench/*/node_modules dist build *.egg-info .pytest_cache test-artifacts
