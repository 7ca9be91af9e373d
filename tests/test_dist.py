"""The installed forms (issue 9, acceptance 1): `make dist` builds the wheel and
the single-file `chatd.pyz`; the wheel installed in a fresh virtualenv, and the
`.pyz` run by a bare Python, each serve the whole page from a folder outside
the checkout: the page, every script, module, stylesheet and image it
references, and a socket that gets `welcome`.
"""

from __future__ import annotations

import os
import posixpath
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import aiohttp
import pytest

from conftest import ROOT, ChatdProcess, Visitor

pytestmark = pytest.mark.dist

# The interpreter under the test virtualenv: "Python 3.11+ and nothing else".
BARE_PYTHON = getattr(sys, "_base_executable", sys.executable)


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    """`make dist` into a temporary folder (the checkout's own dist/ is left alone)."""
    out = tmp_path_factory.mktemp("dist")
    # -o: use the virtualenv the tests run in as it is; never re-install it from here.
    subprocess.run(
        ["make", "-o", ".venv/.installed", "dist", f"DIST={out}", f"PY={sys.executable}"],
        cwd=ROOT, check=True, capture_output=True, timeout=600,
    )
    return out


def outside_env(**extra: str) -> dict[str, str]:
    """The environment of a user's shell: nothing pointing into the checkout or the test virtualenv."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if str(ROOT) not in p)
    return {**env, **extra}


class Served(ChatdProcess):
    """A chatd started by a command line (an installed `chatd`, the zipapp), in a folder of
    its own, with exactly `env` as its environment."""

    def __init__(self, command: list[str], cwd: Path, env: dict[str, str]) -> None:
        super().__init__(data_dir=cwd / "data", command=tuple(command), cwd=cwd, base_env=env)

    def wait_until_serving(self, timeout: float = 60) -> None:
        self.start(timeout)


class References(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[tuple[str, str]] = []  # (tag, url)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for name in ("src", "href"):
            url = attrs.get(name)
            if url and url.startswith("/") and tag in ("script", "link", "img"):
                self.urls.append((tag, url))


IMPORT = re.compile(r"""(?:import|export)\s[^'"]*?from\s*['"](\.{1,2}/[^'"]+)['"]|import\s*['"](\.{1,2}/[^'"]+)['"]""")

EXPECTED_TYPES = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}


async def assert_serves_the_whole_page(base_url: str) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(base_url + "/") as response:
            assert response.status == 200 and response.content_type == "text/html"
            page = await response.text()
        parser = References()
        parser.feed(page)
        tags = {tag for tag, _ in parser.urls}
        assert {"script", "link"} <= tags, parser.urls
        assert "/static/vendor/socket.io.min.js" in {url for _, url in parser.urls}
        # Every referenced file, and every ES module those scripts import, transitively.
        pending = [url for _, url in parser.urls]
        fetched: set[str] = set()
        while pending:
            url = pending.pop()
            if url in fetched:
                continue
            fetched.add(url)
            async with http.get(base_url + url) as response:
                assert response.status == 200, url
                suffix = Path(url).suffix
                if suffix in EXPECTED_TYPES:
                    expected = (EXPECTED_TYPES[suffix], "application/javascript")
                    assert response.content_type in expected, (url, response.content_type)
                body = await response.read()
                assert body, url
            if suffix == ".js":
                for match in IMPORT.finditer(body.decode("utf-8", "replace")):
                    relative = match.group(1) or match.group(2)
                    pending.append(posixpath.normpath(posixpath.join(posixpath.dirname(url), relative)))
        assert any(url.startswith("/static/js/") for url in fetched), fetched  # the modules were followed
    visitor = Visitor(base_url)
    try:
        socket = await visitor.socket()
        welcome = await socket.next("welcome")
        assert welcome["room"] == "general" and welcome["name"].startswith("guest-")
    finally:
        await visitor.close()


async def test_the_wheel_in_a_fresh_virtualenv_serves_the_page_from_elsewhere(dist, tmp_path):
    wheel = next(dist.glob("chatd-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([BARE_PYTHON, "-m", "venv", str(venv)], check=True, timeout=120)
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", str(wheel)],
        check=True, capture_output=True, timeout=600, env=outside_env(),
    )
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import chatd.http_api; print(chatd.http_api.PUBLIC_DIR)"],
        cwd=tmp_path, check=True, capture_output=True, text=True, env=outside_env(),
    ).stdout.strip()
    assert where.startswith(str(venv)), where  # the page comes from the installed package

    for command in ([str(venv / "bin" / "chatd")], [str(venv / "bin" / "python"), "-m", "chatd"]):
        served = Served(command, tmp_path, outside_env())
        try:
            served.wait_until_serving()
            await assert_serves_the_whole_page(served.url)
        finally:
            assert served.stop() == 0


async def test_the_pyz_runs_with_a_bare_python_from_elsewhere(dist, tmp_path):
    pyz = dist / "chatd.pyz"
    assert pyz.stat().st_size > 0
    # SHIV_ROOT: where the zipapp unpacks its libraries on first start (default ~/.shiv).
    served = Served([BARE_PYTHON, str(pyz)], tmp_path, outside_env(SHIV_ROOT=str(tmp_path / "shiv")))
    try:
        served.wait_until_serving()
        await assert_serves_the_whole_page(served.url)
    finally:
        assert served.stop() == 0
    # The keygen subcommand works from the zipapp too.
    key = subprocess.run(
        [BARE_PYTHON, str(pyz), "keygen"], cwd=tmp_path, capture_output=True, text=True, check=True,
        env=outside_env(SHIV_ROOT=str(tmp_path / "shiv")),
    ).stdout.strip()
    assert len(key) == 44
