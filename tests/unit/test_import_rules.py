"""The dependency rules of DESIGN.md §2, read from the sources: who may import whom.

The plant (`hardware-sim/`) stands in for real hardware, so it may not lean on the product it
tests, nor the product on it; `asyncua_glue` is shared by both and so depends on neither; the
twin sees drivers only through their contract, not through the driver base classes.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]

# (sources, forbidden module prefixes, why)
RULES = [
    ("hardware-sim", ("gateway", "drivers"), "the plant must not lean on the product it tests"),
    ("gateway", ("plantsim",), "the product must not lean on the simulated plant"),
    ("drivers", ("plantsim",), "the product must not lean on the simulated plant"),
    ("asyncua_glue", ("gateway", "drivers", "plantsim"), "shared glue depends on neither side"),
    ("gateway/twin", ("drivers.base",), "the twin sees drivers only through their contract"),
]


def imported_modules(source: str, module: str = "") -> Iterator[str]:
    """Yield every module `source` imports, relative imports resolved against `module`."""
    package = module.split(".")[:-1]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package[: len(package) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            yield base
            # `from gateway import twin` imports gateway.twin: check the names as modules too.
            yield from (f"{base}.{alias.name}" for alias in node.names)


def violations(source: str, forbidden: tuple[str, ...], module: str = "") -> list[str]:
    """Return the imports in `source` of a forbidden module or anything under it."""
    return sorted(
        {
            name
            for name in imported_modules(source, module)
            if any(name == f or name.startswith(f + ".") for f in forbidden)
        }
    )


def python_files(folder: str) -> list[Path]:
    """Return every .py file under `folder` of the repository."""
    return sorted((ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize(("folder", "forbidden", "why"), RULES, ids=[r[0] for r in RULES])
def test_dependency_rule(folder, forbidden, why):
    files = python_files(folder)
    assert files, f"{folder}: no sources found; has it moved?"
    found = {}
    for path in files:
        rel = path.relative_to(ROOT)
        # `hardware-sim/plantsim/x.py` is the module `plantsim.x`.
        parts = rel.with_suffix("").parts[1 if rel.parts[0] == "hardware-sim" else 0 :]
        bad = violations(path.read_text(encoding="utf-8"), forbidden, ".".join(parts))
        if bad:
            found[str(rel)] = bad
    assert not found, f"{why}: {found}"


# -- the checker itself -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source",
    [
        "import gateway",
        "import gateway.twin.store as s",
        "from gateway.twin import store",
        "from gateway import twin",
        "import os, drivers.base",
        "def f():\n    from drivers.opcua import driver\n",
        "try:\n    import gateway\nexcept ImportError:\n    pass\n",
    ],
)
def test_the_checker_sees_a_forbidden_import(source):
    assert violations(source, ("gateway", "drivers"))


@pytest.mark.parametrize(
    "source",
    [
        "import gateways",
        "from plantsim import drivers_of_the_plant",
        "import asyncio\nfrom .faults import Value\n",
        "x = 'import gateway'",
    ],
)
def test_the_checker_lets_other_imports_pass(source):
    assert violations(source, ("gateway", "drivers"), "plantsim.opcua.server") == []


def test_the_checker_resolves_relative_imports():
    source = "from ..base import Driver\nfrom . import base\n"
    assert violations(source, ("drivers.base",), "drivers.opcua.driver") == [
        "drivers.base",
        "drivers.base.Driver",
    ]
    assert violations(source, ("drivers.base",), "drivers.opcua.sub.driver") == []
    assert violations("import drivers.base_user", ("drivers.base",)) == []
    assert violations("from .. import base", ("drivers.base",), "drivers.opcua.x") == [
        "drivers.base"
    ]


def test_the_checker_names_a_submodule_imported_from_a_package():
    assert violations("from drivers import base", ("drivers.base",)) == ["drivers.base"]
