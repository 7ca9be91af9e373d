"""The Socket.IO browser client is kept in the repository (public/vendor/), at the
version package-lock.json pins, so running and testing chatd need no Node."""

from __future__ import annotations

import json
import re

from conftest import ROOT

VENDOR = ROOT / "public" / "vendor"


def pinned_version() -> str:
    lock = json.loads((ROOT / "package-lock.json").read_text())
    return lock["packages"]["node_modules/socket.io-client"]["version"]


def test_the_committed_client_is_the_version_package_lock_pins():
    version = pinned_version()
    assert (VENDOR / "socket.io-client.version").read_text().strip() == version
    banner = (VENDOR / "socket.io.min.js").read_text()[:200]
    assert re.search(r"^ \* Socket\.IO v(\S+)$", banner, re.M).group(1) == version


def test_the_client_comes_with_its_licence_and_source_map():
    assert "MIT" in (VENDOR / "socket.io-client.LICENSE").read_text() or "Permission is hereby granted" in (
        VENDOR / "socket.io-client.LICENSE"
    ).read_text()
    assert (VENDOR / "socket.io.min.js").read_text().rstrip().endswith("sourceMappingURL=socket.io.min.js.map")
    assert json.loads((VENDOR / "socket.io.min.js.map").read_text())["version"] == 3
