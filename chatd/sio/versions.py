"""The library versions chatd/sio was checked against: chatd refuses to start on others.

chatd/sio reaches into these libraries' internals (listed in chatd/sio/__init__.py),
which may change in any release. setup.cfg pins the same ranges; this check
catches an environment that was installed some other way.
"""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version

# distribution: (lowest checked, first release not checked)
TESTED = {
    "aiohttp": ("3.14.0", "3.15"),
    "aiohttp-session": ("2.12.1", "2.13"),
    "python-engineio": ("4.15.1", "4.16"),
    "python-socketio": ("5.18.1", "5.19"),
}


def _numbers(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text.split("+")[0])[:3])


def untested_versions() -> list[str]:
    """One phrase per installed library outside its tested range (empty when all fit)."""
    problems = []
    for name, (floor, ceiling) in TESTED.items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            problems.append(f"{name} is not installed")
            continue
        if not _numbers(floor) <= _numbers(installed) < _numbers(ceiling):
            problems.append(f"{name} {installed} (tested: >={floor},<{ceiling})")
    return problems
