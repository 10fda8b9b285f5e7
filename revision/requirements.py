"""The floors this code is tested at, checked once at import so a too-old environment fails in one clear line
instead of deep inside a training step. (Optional parts name their extra where they are imported.)"""
from __future__ import annotations

import sys
from importlib import metadata

PYTHON_FLOOR = (3, 10)
# The lowest releases the test suite was run against (README: "Installing"); pyproject.toml says the same.
FLOORS = {"torch": (2, 13), "transformers": (5, 7)}


def _release(version: str) -> tuple[int, ...]:
    """'2.14.1+cu130' -> (2, 14, 1); stops at the first part that is not a number ('2.13.0a0' -> (2, 13))."""
    parts = []
    for piece in version.split("+")[0].split("."):
        digits = "".join(c for c in piece if c.isdigit()) if piece[:1].isdigit() else ""
        if not digits or digits != piece:
            if digits:
                parts.append(int(digits))
            break
        parts.append(int(piece))
    return tuple(parts)


def requirement_problems(python: tuple[int, ...] | None = None, versions: dict[str, str | None] | None = None) -> list[str]:
    """One line per requirement this environment misses (empty when all is well)."""
    python = tuple(python or sys.version_info[:3])
    problems = []
    if python[:2] < PYTHON_FLOOR:
        problems.append(f"ReVision needs Python >= {'.'.join(map(str, PYTHON_FLOOR))}, found {'.'.join(map(str, python))}")
    for name, floor in FLOORS.items():
        found = versions[name] if versions is not None else _installed(name)
        wanted = ".".join(map(str, floor))
        if found is None:
            problems.append(f"ReVision needs {name} >= {wanted}, which is not installed (README: Installing)")
        elif _release(found) < floor:
            problems.append(f"ReVision needs {name} >= {wanted}, found {name} {found}: pip install '{name}>={wanted}'")
    return problems


def _installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def check_requirements() -> None:
    problems = requirement_problems()
    if problems:
        raise SystemExit("; ".join(problems))

