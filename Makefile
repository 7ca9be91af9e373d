# `make run` and `make test` do the whole set-up from a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
VENDOR := public/vendor
SIO_CLIENT := node_modules/socket.io-client/dist/socket.io.min.js

.PHONY: run test install browser clean

run: install
	$(PY) -m chatd

test: install browser
	$(PY) -m pytest $(PYTEST_ARGS)

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

# The browser tests drive Debian's Chromium; install it when we can (root) and it is missing.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing Debian's chromium for the browser tests"; \
			(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
				|| echo "warning: could not install chromium; browser tests will skip (or fail under CI=true)"; \
		else \
			echo "warning: chromium is missing; browser tests will skip (or fail under CI=true)"; \
		fi; \
	}

clean:
	rm -rf $(VENV) node_modules $(VENDOR) *.egg-info .pytest_cache test-artifacts
