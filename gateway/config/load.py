"""Load a site config once, validate it, and report every problem with file, key path and line."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from pydantic import ValidationError

from gateway.config.model import DRIVERS, ModbusDeviceConfig, OpcuaDeviceConfig, SiteConfig
from gateway.config.yamlpos import YamlDocument, format_path, parse_yaml
from gateway.errors import ConfigError

__all__ = ["Problem", "check_site", "load_config", "parse_config"]

PathParts = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a config: where, and what is expected instead."""

    path: PathParts
    message: str


def load_config(path: str | Path) -> SiteConfig:
    """Read, validate and return a site config; raise ConfigError naming every problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror or exc}") from exc
    return parse_config(text, source=str(path), base_dir=path.parent)


def parse_config(
    text: str, *, source: str = "<config>", base_dir: Path | None = None
) -> SiteConfig:
    """Validate config text; raise ConfigError listing each problem with key path and line.

    Relative storage paths are resolved against `base_dir` (the config file's folder when
    loaded from a file; the working directory otherwise).
    """
    try:
        doc = parse_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f", line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{source}{where}: invalid YAML: {problem}") from exc
    if not isinstance(doc.data, dict):
        kind = "empty" if doc.data is None else f"a {type(doc.data).__name__}"
        raise ConfigError(f"{source}: expected a mapping of settings at the top level, got {kind}")
    try:
        config = SiteConfig.model_validate(doc.data)
    except ValidationError as exc:
        problems = [_from_pydantic(err) for err in exc.errors()]
        raise ConfigError(_render(source, doc, problems)) from None
    problems = check_site(config)
    if problems:
        raise ConfigError(_render(source, doc, problems))
    return _resolve_paths(config, base_dir or Path.cwd())


def _resolve_paths(config: SiteConfig, base: Path) -> SiteConfig:
    # Relative to the config file, not the working directory: systemd and a shell in another
    # folder must find the same database and certificates.
    storage = config.storage
    db = (base / storage.path).resolve()
    pki = db.parent / "pki" if storage.pki_dir is None else (base / storage.pki_dir).resolve()
    # Written out, so what `check` prints and what `run` uses is the same resolved folder.
    storage = storage.model_copy(update={"path": db, "pki_dir": pki})
    return config.model_copy(update={"storage": storage})


def check_site(config: SiteConfig) -> list[Problem]:
    """Cross-field checks pydantic cannot express per field; pure, so tests need no files."""
    return [*_unique_names(config), *_each_device(config)]


# -- cross-field checks -----------------------------------------------------------------------


def _unique_names(config: SiteConfig) -> Iterator[Problem]:
    devices: dict[str, int] = {}
    points: dict[str, PathParts] = {}
    for d, device in enumerate(config.devices):
        if device.name in devices:
            yield Problem(
                ("devices", d, "name"),
                f"device name {device.name!r} is already used by devices[{devices[device.name]}]",
            )
        devices.setdefault(device.name, d)
        for p, point in enumerate(device.points):
            where = ("devices", d, "points", p)
            if point.id in points:
                yield Problem(
                    (*where, "id"),
                    f"point id {point.id!r} is already declared at {format_path(points[point.id])}",
                )
            points.setdefault(point.id, where)


def _each_device(config: SiteConfig) -> Iterator[Problem]:
    for d, device in enumerate(config.devices):
        base: PathParts = ("devices", d)
        for p, point in enumerate(device.points):
            yield from _check_point((*base, "points", p), point)
        yield from _DRIVER_CHECKS[device.driver](base, device)


def _check_point(where: PathParts, point: Any) -> Iterator[Problem]:
    if point.range is not None and not point.range.lo < point.range.hi:
        yield Problem(
            (*where, "range"),
            f"lo must be below hi, got lo={point.range.lo:g} hi={point.range.hi:g}",
        )
    if point.writable and point.range is None and point.datatype not in ("bool", "string"):
        yield Problem(
            (*where, "range"),
            "a writable numeric point needs an engineering range {lo, hi}: the gateway "
            "never writes a value it cannot check against limits",
        )
    if point.datatype in ("bool", "string") and point.deadband:
        yield Problem(
            (*where, "deadband"), f"a deadband needs a numeric point, not {point.datatype}"
        )


def _check_modbus(base: PathParts, device: Any) -> Iterator[Problem]:
    from gateway.devices import modbus_driver, modbus_point  # the driver's own rules, one place

    assert isinstance(device, ModbusDeviceConfig)
    yield from _check_modbus_endpoint((*base, "endpoint"), device.endpoint)
    for p, point in enumerate(device.points):
        where = (*base, "points", p)
        if point.scale == 0:
            yield Problem((*where, "scale"), "scale must not be 0")
        if point.datatype == "string" and point.length is None:
            yield Problem((*where, "length"), "a string point needs `length` (characters)")
        if point.datatype != "string" and point.length is not None:
            yield Problem((*where, "length"), "`length` applies only to string points")
    yield from _driver_rules(base, device, modbus_point, modbus_driver)


def _check_opcua(base: PathParts, device: Any) -> Iterator[Problem]:
    from gateway.devices import opcua_driver, opcua_point

    assert isinstance(device, OpcuaDeviceConfig)
    parts = urlsplit(device.endpoint)
    try:
        port_ok = parts.port != 0
    except ValueError:
        port_ok = False
    if parts.scheme != "opc.tcp" or not parts.hostname or not port_ok:
        yield Problem(
            (*base, "endpoint"),
            f"expected opc.tcp://HOST[:PORT][/PATH], got {device.endpoint!r}",
        )
    yield from _driver_rules(base, device, opcua_point, opcua_driver)


def _driver_rules(
    base: PathParts, device: Any, make_point: Callable[..., Any], make_driver: Callable[..., Any]
) -> Iterator[Problem]:
    """Run the driver's own point and device validation (no I/O) and place its errors."""
    bad_point = False
    for p, point in enumerate(device.points):
        try:
            make_point(point, device.options)
        except Exception as exc:  # driver validation errors carry the field they blame
            bad_point = True
            field = getattr(exc, "field", None) or "address"
            field = _CONFIG_KEY_OF_DRIVER_FIELD.get(field, field)
            yield Problem((*base, "points", p, field), str(exc))
    if not bad_point:
        # Device-level rules (a point larger than max_registers, a serial line with the socket
        # framer) are checked when the driver is built; building one does no I/O.
        try:
            make_driver(device, pki_dir=None)
        except Exception as exc:
            yield Problem((*base, "options"), str(exc))


def _check_modbus_endpoint(where: PathParts, endpoint: str) -> Iterator[Problem]:
    parts = urlsplit(endpoint)
    if parts.scheme == "tcp":
        try:
            port_ok = parts.port != 0 and not (parts.port is None and parts.netloc.endswith(":"))
        except ValueError:  # not a number, or above 65535
            port_ok = False
        if not parts.hostname or not port_ok or parts.path not in ("", "/"):
            yield Problem(where, f"expected tcp://HOST[:PORT], port 1-65535, got {endpoint!r}")
    elif parts.scheme == "serial":
        if not parts.path.startswith("/"):
            yield Problem(where, f"expected serial:///dev/NAME, got {endpoint!r}")
    else:
        yield Problem(where, f"expected tcp://HOST[:PORT] or serial:///dev/NAME, got {endpoint!r}")


# The driver's point fields are flat; the config nests the limits under `range`.
_CONFIG_KEY_OF_DRIVER_FIELD = {"lo": "range", "hi": "range", "key": "id", "node_id": "address"}

_DRIVER_CHECKS: dict[str, Callable[[PathParts, Any], Iterator[Problem]]] = {
    "modbus": _check_modbus,
    "opcua": _check_opcua,
}


# -- rendering ---------------------------------------------------------------------------------


def _from_pydantic(err: Any) -> Problem:
    loc = tuple(err["loc"])
    kind = err["type"]
    # pydantic puts the union member's tag into the path (devices.0.modbus.points...); a user
    # wrote devices[0].points.
    if len(loc) > 2 and loc[0] == "devices" and loc[2] in DRIVERS:
        loc = loc[:2] + loc[3:]
    if kind == "union_tag_invalid":
        return Problem(
            (*loc, "driver"),
            f"expected one of {', '.join(DRIVERS)}, got {err.get('ctx', {}).get('tag')!r}",
        )
    if kind == "union_tag_not_found":
        return Problem((*loc, "driver"), f"required key is missing ({', '.join(DRIVERS)})")
    if kind == "extra_forbidden":
        return Problem(loc, "unknown key (check its spelling and where it is indented)")
    if kind == "missing":
        return Problem(loc, "required key is missing")
    message = err["msg"]
    if _echoable(loc, err.get("input")):
        message = f"{message}, got {err['input']!r}"
    if kind == "string_pattern_mismatch" and loc and loc[-1] == "id":
        message = "expected a path like area/line/asset/signal (lower case, digits, _ . -)" + (
            f", got {err['input']!r}" if "input" in err else ""
        )
    return Problem(loc, message)


def _echoable(loc: PathParts, value: Any) -> bool:
    # Echo a scalar back so the user sees what was read; never a whole section (it may hold
    # password hashes) and never anything under a password key (a plain password pasted by
    # mistake must not reach a terminal log).
    if any(isinstance(part, str) and "password" in part for part in loc):
        return False
    return isinstance(value, (str, int, float, bool))


def _render(source: str, doc: YamlDocument, problems: Sequence[Problem]) -> str:
    lines = [f"{source}: {len(problems)} problem{'s' if len(problems) != 1 else ''}:"]
    for problem in problems:
        line = doc.line_of(problem.path)
        at = f" (line {line})" if line else ""
        lines.append(f"  {format_path(problem.path)}{at}: {problem.message}")
    return "\n".join(lines)
