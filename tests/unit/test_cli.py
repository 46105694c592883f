"""The `opstwin` command line under careless use: bad arguments, closed pipes, damaged databases.

Whatever goes wrong, the user sees one line saying what and where, and the exit code says whose
fault it is (2: the command line or the config; 1: the system) — never a traceback.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from drivers.contract import Quality, Sample
from gateway.cli import main
from gateway.config import load_config
from gateway.devices import point_defs
from gateway.twin.store import TwinStore

LEVEL = "utilities/tank1/level"


def site_config(points: int = 2) -> dict[str, Any]:
    return {
        "site_id": "plant-a",
        "gateway_id": "gw-1",
        "storage": {"path": "state/twin.db"},
        "devices": [
            {
                "name": "tank1",
                "driver": "modbus",
                "endpoint": "tcp://127.0.0.1:5020",
                "points": [
                    {
                        "id": LEVEL if p == 0 else f"utilities/tank1/p{p}",
                        "address": f"holding:{p}",
                        "datatype": "uint16",
                        "range": {"lo": 0, "hi": 100},
                        "description": "a point described at some length, as real sites do",
                    }
                    for p in range(points)
                ],
            }
        ],
    }


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(site_config()))
    return path


@pytest.fixture
def site(config_file: Path) -> Path:
    """A config whose twin database holds a few values and events."""
    config = load_config(config_file)
    config.storage.path.parent.mkdir(parents=True, exist_ok=True)
    store = TwinStore(config.storage.path, point_defs(config))
    store.open()
    now = time.time()
    for i in range(5):
        store.ingest([Sample(LEVEL, 10 + i, Quality.GOOD, now - 5 + i)])
    store.flush()
    store.close()
    return config_file


def db_of(config_file: Path) -> Path:
    return load_config(config_file).storage.path


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run `opstwin ARGS` in-process the way the console script does; exit code, out, err."""
    try:
        code = main(args)
    except SystemExit as exc:  # argparse's usage errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def one_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("usage:")]
    lines = [ln for ln in lines if not ln.startswith(" ")]  # argparse's wrapped usage lines
    assert len(lines) == 1, f"expected one line, got:\n{err}"
    return lines[0]


def test_the_views_work_on_a_healthy_database(site, capsys):
    code, out, _ = run_cli(["twin", "-c", str(site)], capsys)
    assert code == 0 and LEVEL in out
    code, out, _ = run_cli(["events", "-c", str(site), "--since", "0"], capsys)
    assert code == 0 and "TelemetryChanged" in out
    code, out, _ = run_cli(["history", "-c", str(site), LEVEL], capsys)
    assert code == 0 and "14" in out


# -- usage errors exit 2 with a message naming the argument ---------------------------------


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["events", "--since", "99999999999999999999999"], "--since"),
        (["events", "--since", "-1"], "--since"),
        (["events", "--limit", "0"], "--limit"),
        (["events", "--limit", "99999999999999999999999"], "--limit"),
        (["history", LEVEL, "--minutes", "-5"], "--minutes"),
        (["history", LEVEL, "--minutes", "nan"], "--minutes"),
        (["history", LEVEL, "--minutes", "inf"], "--minutes"),
        (["history", LEVEL, "--bucket", "-1"], "--bucket"),
        (["history", LEVEL, "--bucket", "0"], "--bucket"),
        (["history", LEVEL, "--limit", "0"], "--limit"),
        (["history", "no/such/point"], "no/such/point"),
        (["history", "not a point id"], "not a point id"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_usage_errors_exit_2_with_one_line(site, capsys, args, says):
    command, *rest = args
    code, _, err = run_cli([command, "-c", str(site), *rest], capsys)
    assert code == 2, err
    assert says in one_line(err)


@pytest.mark.parametrize(
    "args",
    [
        ["twin"],
        ["events", "-c"],
        ["history", "-c", "x.yaml"],
        ["history", "-c", "x.yaml", "a/b", "--minutes", "abc"],
        ["check"],
        ["run"],
        ["sim", "run"],
        ["sim", "fit", "-c", "x.yaml", "a/b"],
        ["demo", "--http-port", "http"],
        ["no-such-command"],
    ],
    ids=" ".join,
)
def test_argparse_errors_exit_2_for_every_subcommand(capsys, args):
    code, _, err = run_cli(args, capsys)
    assert code == 2
    assert "error:" in err


# -- a damaged or missing database: one line, no traceback ----------------------------------


VIEWS = [["twin"], ["events"], ["events", "--since", "1"], ["history", LEVEL]]


def _corrupt_pages(db: Path) -> None:
    data = bytearray(db.read_bytes())
    page = int.from_bytes(data[16:18], "big") or 65536
    assert len(data) > 2 * page, "the test database is too small to damage past its header"
    for offset in range(page, len(data), page):  # every page but the first (the header)
        data[offset : offset + page] = bytes((offset // page * 37 + i) % 251 for i in range(page))
    db.write_bytes(bytes(data))


@pytest.mark.parametrize("view", VIEWS, ids=" ".join)
@pytest.mark.parametrize("damage", ["corrupted-pages", "not-a-database", "empty-file"])
def test_a_damaged_database_gives_one_line_and_exit_1(site, capsys, view, damage):
    db = db_of(site)
    for extra in (db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        extra.unlink(missing_ok=True)
    if damage == "corrupted-pages":
        _corrupt_pages(db)
    elif damage == "not-a-database":
        db.write_text("these are not the pages you are looking for\n" * 200)
    else:
        db.write_bytes(b"")
    command, *rest = view
    code, _, err = run_cli([command, "-c", str(site), *rest], capsys)
    assert code == 1, err
    line = one_line(err)
    assert str(db) in line


@pytest.mark.parametrize("view", VIEWS, ids=" ".join)
def test_a_missing_database_gives_one_line_and_exit_2(config_file, capsys, view):
    command, *rest = view
    code, _, err = run_cli([command, "-c", str(config_file), *rest], capsys)
    assert code == 2, err
    assert "no twin database" in one_line(err)


# -- a closed pipe --------------------------------------------------------------------------


def test_check_into_a_closed_pipe_exits_quietly(tmp_path):
    # More output than a pipe holds, so `check` is still writing when the reader goes away,
    # as with `opstwin check site.yaml | head -1`.
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(site_config(points=1500)))
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "check", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    code = proc.wait(timeout=60)
    assert b"OK" in first
    assert err == "", err
    assert code in (0, 141)  # 141: the shell's code for a command ended by a closed pipe


def test_check_says_where_the_cloud_sync_goes_and_how_reads_are_guarded(tmp_path, capsys):
    data = site_config()
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(data))
    code, out, _ = run_cli(["check", str(path)], capsys)
    assert code == 0
    assert "cloud sync off (no sync.broker)" in out
    assert "(reads open; web UI at /ui/, sessions end after 30 min idle or 12 h)" in out
    data["sync"] = {"broker": "mqtts://cloud.example.com", "username": "gw7"}
    data["http"] = {"read_access": "token"}
    path.write_text(yaml.safe_dump(data))
    code, out, _ = run_cli(["check", str(path)], capsys)
    assert code == 0
    site, gateway = data["site_id"], data["gateway_id"]
    assert f"cloud sync to mqtts://cloud.example.com as gw7, topics aiw/v1/{site}/{gateway}/" in out
    assert "(reads token; web UI" in out
