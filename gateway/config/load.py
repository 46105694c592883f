"""Load a site config once, validate it, and report every problem with file, key path and line."""

from __future__ import annotations

import codecs
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from pydantic import ValidationError

from gateway.config.model import (
    DRIVERS,
    ModbusDeviceConfig,
    OpcuaDeviceConfig,
    SiteConfig,
    host_problem,
)
from gateway.config.problems import (
    PathParts,
    Problem,
    problem_from_pydantic,
    render_problems,
    yaml_error_message,
)
from gateway.config.yamlpos import format_path, parse_yaml
from gateway.errors import ConfigError

__all__ = [
    "MAX_CONFIG_BYTES",
    "Problem",
    "check_site",
    "load_config",
    "parse_config",
    "read_config_text",
]

_MiB = 1024 * 1024
# A site config with 100,000 points written out in full is about 14 MiB; anything larger is not
# a site config (a log, an image, a disk) and would take minutes and gigabytes to refuse.
MAX_CONFIG_BYTES = 16 * _MiB


def load_config(path: str | Path) -> SiteConfig:
    """Read, validate and return a site config; raise ConfigError naming every problem."""
    path = Path(path)
    text = read_config_text(path)
    return parse_config(text, source=str(path), base_dir=path.parent)


def read_config_text(
    path: str | Path, what: str = "config", *, max_bytes: int = MAX_CONFIG_BYTES
) -> str:
    """Return the text of a YAML file a user named; ConfigError, in one line, if it is not one.

    Refused without blocking or reading more than `max_bytes` (MAX_CONFIG_BYTES unless told):
    anything but a regular file (a FIFO would block `check` forever, /dev/zero never ends),
    larger files, binary files and text that is not UTF-8.
    """
    path = Path(path)
    try:
        # stat before open: opening a FIFO blocks until a writer comes, and opening some
        # devices acts on them (a tape rewinds).
        _refuse_irregular(path, os.stat(path).st_mode, what)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
        with os.fdopen(fd, "rb") as file:
            _refuse_irregular(path, os.fstat(file.fileno()).st_mode, what)  # swapped meanwhile
            data = file.read(max_bytes + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what}: {exc.strerror or exc}") from None
    if len(data) > max_bytes:
        size = f"{max_bytes // _MiB} MiB" if max_bytes % _MiB == 0 else f"{max_bytes:,} bytes"
        raise ConfigError(
            f"{path}: larger than the {size} a {what} file may be; is this the right file?"
        )
    return _decode(path, data, what)


def _refuse_irregular(path: Path, mode: int, what: str) -> None:
    if stat.S_ISREG(mode):
        return
    kinds = {
        stat.S_ISDIR: "a directory",
        stat.S_ISFIFO: "a named pipe (FIFO)",
        stat.S_ISCHR: "a character device",
        stat.S_ISBLK: "a block device",
        stat.S_ISSOCK: "a socket",
    }
    kind = next((name for test, name in kinds.items() if test(mode)), "a special file")
    raise ConfigError(
        f"{path}: {kind}, not a regular file; give the path of the {what} file itself"
    )


_WIDE_BOMS = {
    codecs.BOM_UTF32_LE: "UTF-32",
    codecs.BOM_UTF32_BE: "UTF-32",
    codecs.BOM_UTF16_LE: "UTF-16",
    codecs.BOM_UTF16_BE: "UTF-16",
}


def _decode(path: Path, data: bytes, what: str) -> str:
    for bom, encoding in _WIDE_BOMS.items():  # UTF-32 first: its LE mark starts like UTF-16's
        if data.startswith(bom):
            raise ConfigError(f"{path}: saved as {encoding}; save the {what} as UTF-8")
    nul = data.find(b"\x00")
    if nul >= 0:
        line = data.count(b"\n", 0, nul) + 1
        raise ConfigError(
            f"{path}, line {line}: a NUL byte: this is a binary file, not a YAML {what}"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - data.rfind(b"\n", 0, exc.start)
        raise ConfigError(
            f"{path}, line {line} column {column}: not UTF-8 text (byte 0x{data[exc.start]:02x}); "
            f"save the {what} as UTF-8"
        ) from None


def parse_config(
    text: str, *, source: str = "<config>", base_dir: Path | None = None
) -> SiteConfig:
    """Validate config text; raise ConfigError listing each problem with key path and line.

    Relative storage paths are resolved against `base_dir` (the config file's folder when
    loaded from a file; the working directory otherwise).
    """
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"{source}: larger than the {MAX_CONFIG_BYTES // _MiB} MiB a config may be"
        )
    try:
        doc = parse_yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigError(yaml_error_message(source, text, exc)) from None
    except UnicodeEncodeError as exc:  # only from a str handed in: a file is decoded strictly
        line = text.count("\n", 0, exc.start) + 1
        raise ConfigError(f"{source}, line {line}: not valid Unicode text ({exc.reason})") from None
    if not isinstance(doc.data, dict):
        kind = "empty" if doc.data is None else f"a {type(doc.data).__name__}"
        raise ConfigError(f"{source}: expected a mapping of settings at the top level, got {kind}")
    try:
        # Strict: YAML already gives ints, floats and booleans; a `true` port, a `"80"` port or
        # a `1` for a boolean is a mistake to point out, not a value to convert.
        config = SiteConfig.model_validate(doc.data, strict=True)
    except ValidationError as exc:
        problems = [_from_pydantic(err) for err in exc.errors()]
        raise ConfigError(render_problems(source, doc, problems)) from None
    base = base_dir or Path.cwd()
    problems = [*check_site(config), *_check_files(config, base)]
    if problems:
        raise ConfigError(render_problems(source, doc, problems))
    return _resolve_paths(config, base)


def _resolve_paths(config: SiteConfig, base: Path) -> SiteConfig:
    # Relative to the config file, not the working directory: systemd and a shell in another
    # folder must find the same database and certificates.
    storage = config.storage
    db = (base / storage.path).resolve()
    pki = db.parent / "pki" if storage.pki_dir is None else (base / storage.pki_dir).resolve()
    # Written out, so what `check` prints and what `run` uses is the same resolved folder.
    storage = storage.model_copy(update={"path": db, "pki_dir": pki})
    devices = [_resolve_device_paths(device, base) for device in config.devices]
    folder = config.policies.dir
    policies = config.policies.model_copy(
        update={"dir": None if folder is None else (base / folder).resolve()}
    )
    return config.model_copy(update={"storage": storage, "devices": devices, "policies": policies})


def _resolve_device_paths(device: Any, base: Path) -> Any:
    if isinstance(device, OpcuaDeviceConfig) and device.options.server_certificate is not None:
        cert = str((base / device.options.server_certificate).resolve())
        options = device.options.model_copy(update={"server_certificate": cert})
        return device.model_copy(update={"options": options})
    return device


def check_site(config: SiteConfig) -> list[Problem]:
    """Cross-field checks pydantic cannot express per field; pure, so tests need no files."""
    return [
        *_unique_names(config),
        *_each_device(config),
        *_check_opcua_server(config),
        *_check_anomalies(config),
    ]


def _check_files(config: SiteConfig, base: Path) -> Iterator[Problem]:
    """Files the config names that `run` would read: they must exist and be what they claim."""
    from drivers.errors import ConfigurationError
    from drivers.opcua.security import load_certificate_file

    yield from _check_storage_paths(config, base)
    for d, device in enumerate(config.devices):
        if not isinstance(device, OpcuaDeviceConfig) or device.options.server_certificate is None:
            continue
        where = ("devices", d, "options", "server_certificate")
        given = device.options.server_certificate
        path = base / given
        if not path.is_file():
            state = "is not a file" if path.exists() else "does not exist"
            yield Problem(
                where,
                f"{given!r} ({path}) {state}; give the PLC's certificate (DER or PEM) relative "
                "to the config file, or remove the key to trust the certificate on first use",
            )
            continue
        try:
            load_certificate_file(path)
        except ConfigurationError as exc:
            yield Problem(where, str(exc))


def _check_storage_paths(config: SiteConfig, base: Path) -> Iterator[Problem]:
    # What exists already must be of the right kind; what does not, `run` creates. Writability
    # is left to `run`: `check` may run as another user than the service.
    storage = config.storage
    wanted = [(("storage", "path"), base / storage.path, "file")]
    if storage.pki_dir is not None:
        wanted.append((("storage", "pki_dir"), base / storage.pki_dir, "directory"))
    # A policy folder that does not exist (yet) is left to the policy loader, which names it.
    if config.policies.dir is not None:
        wanted.append((("policies", "dir"), base / config.policies.dir, "directory"))
    for where, path, kind in wanted:
        folder = next((p for p in path.parents if p.exists()), None)
        if folder is not None and not folder.is_dir():
            yield Problem(where, f"{path}: {folder} is not a directory")
        elif kind == "file" and path.is_dir():
            yield Problem(where, f"{path} is a directory; give the database file inside it")
        elif kind == "file" and path.exists() and not path.is_file():
            yield Problem(where, f"{path} is not a regular file")
        elif kind == "directory" and path.exists() and not path.is_dir():
            yield Problem(where, f"{path} is not a directory")


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
    numeric = point.datatype not in ("bool", "string")
    if point.range is not None and not point.range.lo < point.range.hi:
        yield Problem(
            (*where, "range"),
            f"lo must be below hi, got lo={point.range.lo:g} hi={point.range.hi:g}",
        )
    if point.writable and point.range is None and numeric:
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
    else:
        yield from _check_host((*base, "endpoint"), parts.hostname)
    yield from _driver_rules(base, device, opcua_point, opcua_driver)


def _check_host(where: PathParts, host: str) -> Iterator[Problem]:
    problem = host_problem(host)
    if problem is not None:
        yield Problem(where, f"host {problem}")


def _check_http(base: PathParts, device: Any) -> Iterator[Problem]:
    # Pushed points have no connection to write to: a proposal on one could only ever fail.
    for p, point in enumerate(device.points):
        if point.writable:
            yield Problem(
                (*base, "points", p, "writable"),
                "a point of a `driver: http` device is pushed to the gateway, which cannot "
                "write it back; remove `writable: true`",
            )


def _check_opcua_server(config: SiteConfig) -> Iterator[Problem]:
    server = config.opcua_server
    host = urlsplit(server.endpoint).hostname  # the model checked the URL's shape
    if host is not None:
        yield from _check_host(("opcua_server", "endpoint"), host)
    if not server.enabled:
        return
    # Each point is a node and each path prefix a folder: an id that is also another point's
    # folder would be one NodeId for two nodes, and the server would refuse to start.
    ids = {
        point.id: (d, p)
        for d, dev in enumerate(config.devices)
        for p, point in enumerate(dev.points)
    }
    for point_id, (d, p) in ids.items():
        segments = point_id.split("/")
        for n in range(1, len(segments)):
            folder = "/".join(segments[:n])
            if folder in ids:
                fd, fp = ids[folder]
                yield Problem(
                    ("devices", d, "points", p, "id"),
                    f"{folder!r} is a point (devices[{fd}].points[{fp}]) and the folder of this "
                    "one: an OPC UA node cannot be both; rename one of them",
                )
                break


def _check_anomalies(config: SiteConfig) -> Iterator[Problem]:
    """Each glob of an anomaly rule must match a declared point, and each numeric detector a
    numeric one: a typo would otherwise leave a point silently unwatched."""
    from gateway.devices import point_defs
    from gateway.policy.anomaly import NUMERIC_TYPES, glob_matcher

    rules = config.anomalies.rules
    if not rules:
        return
    # Twin datatypes: a scaled Modbus integer is a float there, and numeric.
    datatypes = {p.id: p.datatype for p in point_defs(config)}
    for n, rule in enumerate(rules):
        where = ("anomalies", "rules", n)
        matched: dict[str, str] = {}
        for k, pattern in enumerate(rule.points):
            if pattern in datatypes:  # an id: no need to test every point
                hits = {pattern: datatypes[pattern]}
            else:
                match = glob_matcher(pattern)
                hits = {pid: t for pid, t in datatypes.items() if match(pid)}
            if not hits:
                yield Problem(
                    (*where, "points", k),
                    f"{pattern!r} matches no declared point: correct it against the point ids "
                    "under `devices` (`*` and `?` stay within one `/` segment, `**` crosses "
                    "them) or remove it",
                )
            matched.update(hits)
        if not matched or any(t in NUMERIC_TYPES for t in matched.values()):
            continue
        types = ", ".join(sorted(set(matched.values())))
        for d, spec in enumerate(rule.detectors):
            if spec.kind != "stale":
                yield Problem(
                    (*where, "detectors", d, "kind"),
                    f"{spec.kind} needs numeric points, and this rule's points are {types}: "
                    "use `stale` on them, or match numeric points",
                )


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
        else:
            yield from _check_host(where, parts.hostname)
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
    "http": _check_http,
}


# -- rendering ---------------------------------------------------------------------------------


def _from_pydantic(err: Any) -> Problem:
    loc = tuple(err["loc"])
    # pydantic puts the union member's tag into the path (devices.0.modbus.points...); a user
    # wrote devices[0].points.
    if len(loc) > 2 and loc[0] == "devices" and loc[2] in DRIVERS:
        loc = loc[:2] + loc[3:]
    return problem_from_pydantic(err, loc=loc, tag_choices={"driver": DRIVERS})
