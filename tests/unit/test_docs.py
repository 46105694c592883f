"""The README documents every command, config key and HTTP endpoint; CI runs its test command."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel

from gateway.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, re.M | re.S)
    assert match, f"README has no '## {title}' section"
    return match.group(1)


def test_every_cli_command_is_documented():
    parser = build_parser()
    commands = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    documented = section("Commands") + section("Proposing and approving changes")
    assert commands.choices is not None
    for name in commands.choices:
        assert f"`opstwin {name}" in documented, f"`opstwin {name}` missing from README Commands"


def test_config_reference_matches_the_models():
    from gateway.config.reference import render

    assert render() in README, (
        "README's configuration reference is out of date: run "
        "`.venv/bin/python -m gateway.config.reference --write README.md`"
    )


def test_every_config_model_is_in_the_reference():
    from gateway.config import model as m
    from gateway.config.reference import sections

    listed = {cls for _, cls in sections()}
    declared = {
        obj
        for obj in vars(m).values()
        if isinstance(obj, type)
        and issubclass(obj, BaseModel)
        and obj.__module__ == m.__name__
        and not obj.__name__.startswith("_")
        and obj is not m.Range
    }
    assert declared <= listed, f"not in the reference: {declared - listed}"


def test_every_http_route_is_documented(tmp_path):
    from gateway.http import create_app

    app = create_app(object())  # type: ignore[arg-type]  # routes only; nothing is served
    routes = {
        (route.method, resource.canonical)
        for resource in app.router.resources()
        for route in resource
        if route.method != "HEAD"
    }
    assert ("POST", "/proposals") in routes  # the check sees every method
    documented = section("HTTP endpoints") + section("Proposing and approving changes")
    for method, path in routes:
        shown = path.replace("{point_id}", "{point}")
        assert f"`{method} {shown}" in documented, f"{method} {path} missing from README"


def test_ci_runs_the_readme_test_command():
    assert "make test" in section("Two commands")
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.M), ".ci/run must call the README's test command"


def _requirement_name(spec: str) -> str:
    return re.split(r"[<>=!~;\[ ]", spec, maxsplit=1)[0].strip().lower()


def test_every_dependency_is_in_the_readme():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    specs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        specs += extra
    table = section("Dependencies").lower()
    listed = set(re.findall(r"[a-z0-9][a-z0-9._-]*", table))
    missing = sorted({_requirement_name(s) for s in specs} - listed)
    assert not missing, f"README Dependencies does not list {missing}"


def test_every_top_level_folder_is_in_the_layout():
    import subprocess

    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    folders = {path.split("/", 1)[0] for path in tracked if "/" in path}
    folders = {f for f in folders if not f.startswith(".")}
    layout = section("Layout")
    missing = sorted(f for f in folders if f"| `{f}/` |" not in layout)
    assert not missing, f"README Layout does not describe {missing}"
    listed = set(re.findall(r"^\| `([^`/]+)/` \|", layout, re.M))
    gone = sorted(listed - {p.name for p in ROOT.iterdir() if p.is_dir()})
    assert not gone, f"README Layout describes folders that do not exist: {gone}"
