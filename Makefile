# `make run` and `make test` do the whole set-up from a fresh clone; neither needs Node.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
VENDOR := public/vendor
SIO_CLIENT := node_modules/socket.io-client

.PHONY: run test bench bench-rooms install vendor dist system-deps cluster clean

run: install
	$(PY) -m chatd

# The whole suite, then the socket and HTTP tests again with chatd on PostgreSQL (a
# throwaway server; see tests/pg_service.py). The second pass leaves out the browser
# tests, the storage suite (it covers both backends itself) and the process tests
# (command line and SQLite data dir).
PG_PASS_IGNORE := --ignore=tests/test_browser.py --ignore=tests/test_browser_rooms.py --ignore=tests/test_storage.py \
	--ignore=tests/test_process.py

test: install system-deps
	$(PY) -m pytest $(PYTEST_ARGS)
	CHATD_TEST_BACKEND=postgres $(PY) -m pytest $(PG_PASS_IGNORE) $(PYTEST_ARGS)

# Two chatd processes, a throwaway Redis and nginx on loopback; Ctrl-C stops them all.
cluster: install
	$(PY) scripts/cluster.py

# chatd side by side with the Node stack (bench/run.py; docs/performance.md).
BENCH_ARGS ?=
bench: install bench/loadgen/node_modules/.installed bench/node-peer/node_modules/.installed
	$(PY) bench/run.py $(BENCH_ARGS)

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
