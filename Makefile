# `make run` and `make test` do the whole set-up from a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
VENDOR := public/vendor
SIO_CLIENT := node_modules/socket.io-client/dist/socket.io.min.js

.PHONY: run test bench install system-deps clean

run: install
	$(PY) -m chatd

test: install system-deps
	$(PY) -m pytest $(PYTEST_ARGS)

# chatd side by side with the Node stack (bench/run.py; docs/performance.md).
BENCH_ARGS ?=
bench: install bench/loadgen/node_modules/.installed bench/node-peer/node_modules/.installed
	$(PY) bench/run.py $(BENCH_ARGS)

bench/%/node_modules/.installed: bench/%/package.json bench/%/package-lock.json
	cd bench/$* && npm ci --no-audit --no-fund --loglevel=error
	touch $@

install: $(VENV)/.installed $(VENDOR)/socket.io.min.js

# The virtualenv, re-installed whenever the package metadata changes.
$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

# The Socket.IO browser client, pinned in package-lock.json, served by chatd itself.
$(VENDOR)/socket.io.min.js: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	mkdir -p $(VENDOR)
	cp $(SIO_CLIENT) $(SIO_CLIENT).map $(VENDOR)/

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
	rm -rf $(VENV) node_modules bench/*/node_modules $(VENDOR) *.egg-info .pytest_cache test-artifacts
