"""The README documents every command, config key and HTTP endpoint; CI runs its test command."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from drivers.modbus.options import ModbusOptions
from gateway.cli import build_parser
from gateway.config.model import (
    HttpConfig,
    ModbusDeviceConfig,
    PointConfig,
    Range,
    SiteConfig,
    StorageConfig,
)

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", README, re.M | re.S)
    assert match, f"README has no '## {title}' section"
    return match.group(1)


def test_every_cli_command_is_documented():
    parser = build_parser()
    commands = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    documented = section("Commands")
    for name in commands.choices:
        assert f"`opstwin {name}" in documented, f"`opstwin {name}` missing from README Commands"


@pytest.mark.parametrize(
    "model",
    [SiteConfig, StorageConfig, HttpConfig, ModbusDeviceConfig, PointConfig, ModbusOptions],
)
def test_every_config_key_is_documented(model: type[BaseModel]):
    reference = section("Configuration reference")
    for name in model.model_fields:
        assert f"| `{name}` |" in reference, f"{model.__name__}.{name} missing from README"


def test_range_keys_are_documented():
    assert set(Range.model_fields) == {"lo", "hi"}
    assert "`{lo, hi}`" in section("Configuration reference")


def test_every_http_route_is_documented(tmp_path):
    from gateway.http import create_app

    routes = {
        r.resource.canonical
        for r in create_app(object()).router.routes()  # type: ignore[arg-type]
        if r.method != "HEAD"
    }
    documented = section("HTTP endpoints")
    for route in routes:
        shown = route.replace("{point_id}", "{point}")
        assert f"`GET {shown}" in documented, f"{route} missing from README HTTP endpoints"


def test_ci_runs_the_readme_test_command():
    assert "make test" in section("Two commands")
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.M), ".ci/run must call the README's test command"
