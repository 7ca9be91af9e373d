"""The contract lives in the repository (issue 9, acceptance 6): README and
docs/ link to nothing outside it, and docs/protocol.md names every route,
error code and server event that chatd's code can produce."""

from __future__ import annotations

import re

import pytest

from chatd.config import Config
from chatd.web import create_app

from conftest import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PROTOCOL = (ROOT / "docs" / "protocol.md").read_text()
SOURCES = {path: path.read_text() for path in (ROOT / "chatd").rglob("*.py")}

MARKDOWN_LINK = re.compile(r"\]\(([^)\s]+)[^)]*\)|^\[[^\]]+\]:\s*(\S+)", re.M)
AUTOLINK = re.compile(r"<([a-z][a-z0-9+.-]*:[^>\s]+)>", re.I)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_links_stay_inside_the_repository(doc):
    text = doc.read_text()
    assert not AUTOLINK.findall(text)
    for match in MARKDOWN_LINK.finditer(text):
        target = (match.group(1) or match.group(2)).split("#")[0]
        if not target:
            continue  # a heading of the same document
        assert ":" not in target and not target.startswith("/"), f"{doc.name}: {target}"
        resolved = (doc.parent / target).resolve()
        assert resolved.is_relative_to(ROOT) and resolved.exists(), f"{doc.name}: {target}"


def test_the_readme_points_at_the_protocol():
    assert "](docs/protocol.md)" in (ROOT / "README.md").read_text()


def codes_in_the_code() -> set[str]:
    patterns = [r'ApiError\(\s*\d+,\s*"([a-z_]+)"', r'EventError\(\s*"([a-z_]+)"', r'"error":\s*"([a-z_]+)"']
    return {code for text in SOURCES.values() for p in patterns for code in re.findall(p, text)}


def test_every_error_code_is_in_the_protocol():
    codes = codes_in_the_code()
    assert {"invalid_request", "not_found", "method_not_allowed", "rate_limited"} <= codes  # the patterns work
    assert {code for code in codes if f"`{code}`" not in PROTOCOL} == set()


def test_every_route_is_in_the_protocol(tmp_path):
    app = create_app(Config(data_dir=tmp_path, metrics=True, secret_keys=("x" * 43 + "=",)))
    paths = {route.resource.canonical for route in app.router.routes()} - {"/socket.io/"}
    assert "/api/login" in paths
    missing = {p for p in paths if p.rstrip("/") not in PROTOCOL and p.replace("/static", "/static/") not in PROTOCOL}
    assert missing == set()


def test_every_server_event_is_in_the_protocol():
    # Events sent with emit(), and packets written whole (`'2["welcome",' + …`).
    patterns = [r'\.emit\(\s*"([a-z_ ]+)"', r"'2\[\"([a-z_ ]+)\","]
    events = {e for text in SOURCES.values() for p in patterns for e in re.findall(p, text)}
    assert {"welcome", "new chat"} <= events
    assert {e for e in events if f"`{e}`" not in PROTOCOL} == set()
