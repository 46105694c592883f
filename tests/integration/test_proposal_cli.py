"""`opstwin propose|proposals|proposal|approve|reject|rollback` against a running gateway.

The gateway runs in-process (`gateway.serve.serve`, the code `opstwin run` runs) on the simulated
oven PLC, listening on a real port; the commands run as `python -m gateway.cli` where the entry
point and its exit code are the subject, and through `gateway.cli.main` in a worker thread
elsewhere (the same code, without paying ~2 s of interpreter start-up per command).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import re
import shutil
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml
from tests_support import eventually, free_port

from drivers.contract import Quality
from gateway.app import Gateway
from gateway.cli import main
from gateway.config import load_config
from gateway.control.users import parse_grant
from gateway.demo import demo_config_data
from gateway.proposal_cli import (
    EXIT_DONE,
    EXIT_ERROR,
    EXIT_PENDING,
    EXIT_REFUSED,
    ClientError,
    authorization,
    exit_code,
    gateway_url,
    render,
)
from gateway.serve import serve
from plantsim import OvenDevice

ROOT = Path(__file__).resolve().parents[2]
SETPOINT = "line1/oven1/heater_setpoint"
PASSWORD = "correct horse battery"


# -- pure parts -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "host", "port", "expected"),
    [
        ("http://10.0.0.5:8000/", None, None, "http://10.0.0.5:8000"),
        (None, "127.0.0.1", 8000, "http://127.0.0.1:8000"),
        (None, "0.0.0.0", 8000, "http://127.0.0.1:8000"),
        (None, "::", 8000, "http://[::1]:8000"),
        (None, "fe80::1", 8000, "http://[fe80::1]:8000"),
        (None, "gw.plant.local", 80, "http://gw.plant.local:80"),
        ("https://gw:8443", "0.0.0.0", 8000, "https://gw:8443"),  # --url wins
    ],
)
def test_gateway_url(url, host, port, expected):
    assert gateway_url(url, host, port) == expected


@pytest.mark.parametrize(
    ("url", "host", "port", "says"),
    [
        (None, None, None, "--url http://HOST:PORT, or --config FILE"),
        (None, "127.0.0.1", 0, "http.port is 0"),
        ("ftp://gw", None, None, "not an http:// or https:// URL"),
        ("http://", None, None, "not an http"),
    ],
)
def test_gateway_url_refusals(url, host, port, says):
    with pytest.raises(ClientError, match=re.escape(says)):
        gateway_url(url, host, port)


def test_credentials_from_flags_environment_and_prompt():
    assert authorization("otw_x", None, {}, None) == "Bearer otw_x"
    assert authorization(None, None, {"OPSTWIN_TOKEN": "otw_env"}, None) == "Bearer otw_env"
    assert authorization("otw_flag", None, {"OPSTWIN_TOKEN": "otw_env"}, None) == "Bearer otw_flag"
    # An explicit --user beats a token in the environment.
    header = authorization(None, "alice", {"OPSTWIN_TOKEN": "t", "OPSTWIN_PASSWORD": "pw"}, None)
    assert header == "Basic YWxpY2U6cHc="  # alice:pw
    asked: list[str] = []

    def prompt(text: str) -> str:
        asked.append(text)
        return "pw"

    header = authorization(None, "alice", {}, prompt)
    assert header == "Basic YWxpY2U6cHc=" and asked == ["password for alice: "]


@pytest.mark.parametrize(
    ("token", "user", "env", "says"),
    [
        (None, None, {}, "no credentials"),
        ("t", "alice", {}, "not both"),
        (None, "alice", {}, "no password for user alice: set OPSTWIN_PASSWORD"),
    ],
)
def test_credential_refusals(token, user, env, says):
    with pytest.raises(ClientError, match=says):
        authorization(token, user, env, None)


def test_exit_codes_follow_the_status():
    assert exit_code({"status": "succeeded"}) == EXIT_DONE
    for status in ("rejected", "failed", "expired", "rolled_back"):
        assert exit_code({"status": status}) == EXIT_REFUSED
    for status in ("pending_approval", "pending_analysis", "executing"):
        assert exit_code({"status": status}) == EXIT_PENDING
    assert exit_code({"status": "something new"}) == EXIT_ERROR
    assert exit_code({}) == EXIT_ERROR


def test_render_shows_what_a_person_decides_on_and_escapes_what_clients_wrote():
    record = {
        "id": "p-abc123-4",
        "point": SETPOINT,
        "value": 178.0,
        "current_value": 180.0,
        "proposer": {"name": "agent1", "kind": "token"},
        "source": "cli",
        "reason": "hall is warm\x1b[31m red",
        "status": "pending_approval",
        "created_ts": 1_700_000_000.0,
        "decision": "require_approval",
        "reasons": ["confidence 0.990 >= auto_execute_min 0.9", "token may not execute"],
        "confidence": 0.99,
        "confidence_breakdown": {"p_sim": 0.995},
        "simulation": {
            "model": "fopdt",
            "paths": 10000,
            "paths_safe": 9990,
            "paths_improved": 9950,
            "horizon_s": 600.0,
        },
        "judged_by": "oven-overtemp-drift",
        "expires_ts": 1_700_000_900.0,
    }
    text = render(record)
    assert text.splitlines()[0] == f"p-abc123-4  {SETPOINT} = 178 (was 180)  PENDING APPROVAL"
    assert "require_approval, confidence 0.990" in text
    assert "token may not execute" in text
    assert "fopdt, p 0.995, 9990/10000 paths safe, 9950 improved, horizon 600 s" in text
    assert "opstwin approve p-abc123-4 (or reject p-abc123-4)" in text
    assert "\x1b" not in text and "\\x1b[31m" in text
    failed = render({**record, "status": "failed", "error": "BadOutOfRange", "restored": "x"})
    assert "error       BadOutOfRange" in failed and "opstwin approve" not in failed


# -- against a running gateway --------------------------------------------------------------------


@dataclass
class Running:
    oven: OvenDevice
    gateway: Gateway
    config: Path
    url: str
    tokens: dict[str, str]

    def plc_setpoint(self) -> float:
        return float(self.oven.model.signals()["heater_setpoint"])


def write_config(tmp: Path, plc_port: int, http_port: int) -> Path:
    """The demo config with only the oven and the repo's oven policies, as a file."""
    data = demo_config_data(device_ports={"oven-plc": plc_port}, http_port=http_port, opcua_port=0)
    data["storage"]["path"] = str(tmp / "twin.db")
    data["opcua_server"]["enabled"] = False
    # The oven stands still (tick_hz 0): the demo's `stale` detector would make its temperature
    # a suspect input after 10 s, and what the gate decides would depend on the test's pace.
    data.pop("anomalies", None)
    policies = tmp / "policies"
    policies.mkdir()
    for path in (ROOT / "policies").glob("oven-*.yaml"):
        shutil.copy(path, policies)
    data["policies"] = {"dir": str(policies)}
    path = tmp / "site.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return path


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[Running]:
    # tick_hz=0: the oven (at ~182.7 °C with this seed) moves only when told.
    async with OvenDevice(seed=4, tick_hz=0) as oven:
        config = write_config(tmp_path, oven.port, free_port())
        stop = asyncio.Event()
        ready: asyncio.Future[tuple[Gateway, str]] = asyncio.get_running_loop().create_future()

        async def on_ready(gateway: Gateway, urls: list[str]) -> None:
            ready.set_result((gateway, urls[0]))

        task = asyncio.create_task(serve(load_config(config), on_ready=on_ready, stop=stop))
        try:
            first: set[asyncio.Future[Any]] = {task, ready}
            done, _ = await asyncio.wait(first, timeout=30, return_when="FIRST_COMPLETED")
            assert ready in done, f"the gateway did not start: {task}"
            gateway, url = ready.result()
            accounts = gateway.accounts
            assert accounts is not None
            for name, grant in [("alice", "supervisor"), ("vic", "viewer")]:
                await asyncio.to_thread(accounts.add_user, name, PASSWORD, [parse_grant(grant)])
            tokens = {}
            for name, grant in [("agent1", "agent:line1/*"), ("exec1", "executor")]:
                made = await asyncio.to_thread(accounts.create_token, name, [parse_grant(grant)])
                tokens[name] = made.secret
            await eventually(
                lambda: all(
                    v.quality is Quality.GOOD for v in gateway.store.snapshot()[1].values()
                ),
                what="every oven point GOOD",
            )
            yield Running(oven, gateway, config, url, tokens)
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)


async def opstwin(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run `opstwin ARGS` through gateway.cli.main in a worker thread: (exit code, out, err)."""

    def run() -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        clean = {k: v for k, v in os.environ.items() if not k.startswith("OPSTWIN_")}
        with (
            mock.patch.dict(os.environ, {**clean, **(env or {})}, clear=True),
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(err),
        ):
            try:
                code = main(list(args))
            except SystemExit as exc:  # argparse's usage errors
                code = int(exc.code or 0)
        return code, out.getvalue(), err.getvalue()

    return await asyncio.to_thread(run)


async def opstwin_process(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    """Run `python -m gateway.cli ARGS` as a process: (exit code, out, err)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OPSTWIN_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.cli",
        *args,
        env={**clean, **env},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def proposal_id(output: str) -> str:
    match = re.match(r"(p-[0-9a-f]+-\d+)\s", output)
    assert match, output
    return match.group(1)


@pytest.mark.slow
async def test_propose_approve_roll_back_and_reject_from_the_command_line(running: Running):
    config = ["--config", str(running.config)]
    agent = {"OPSTWIN_TOKEN": running.tokens["agent1"]}
    alice = {"OPSTWIN_PASSWORD": PASSWORD}
    before = running.plc_setpoint()

    # The entry point itself: an agent's change waits for a person, exit 3.
    code, out, err = await opstwin_process(
        "propose", SETPOINT, "178", "--reason", "the hall is warm", *config, env=agent
    )
    assert code == EXIT_PENDING, out + err
    pid = proposal_id(out)
    assert "PENDING APPROVAL" in out.splitlines()[0] and "(was 180)" in out
    assert f"opstwin approve {pid}" in out and "by token agent1 via cli" in out
    assert "fopdt" in out and "10000/10000 paths safe" in out
    assert running.plc_setpoint() == before

    code, out, _ = await opstwin("proposals", "--status", "pending", *config, env=agent)
    assert code == EXIT_DONE and pid in out
    code, out, _ = await opstwin("proposal", pid, "--json", *config, env=agent)
    assert code == EXIT_PENDING
    assert json.loads(out)["status"] == "pending_approval"

    code, out, err = await opstwin("approve", pid, "--user", "alice", *config, env=alice)
    assert code == EXIT_DONE, out + err
    assert "SUCCEEDED" in out and "read back   178" in out and "approved by alice" in out
    assert running.plc_setpoint() == pytest.approx(178.0)

    code, out, err = await opstwin("approve", pid, "--user", "alice", *config, env=alice)
    assert code == EXIT_ERROR and "is succeeded, not waiting" in err

    code, out, err = await opstwin(
        "rollback", pid, "--user", "alice", "--reason", "test over", *config, env=alice
    )
    assert code == EXIT_DONE, out + err
    assert "ROLLED BACK" in out and running.plc_setpoint() == pytest.approx(before)
    code, _, _ = await opstwin("proposal", pid, *config, env=agent)
    assert code == EXIT_REFUSED, "rolled back: no longer in effect"

    # Reject: exit 0, the rejection was done.
    code, out, _ = await opstwin("propose", SETPOINT, "179", "--reason", "r", *config, env=agent)
    assert code == EXIT_PENDING
    second = proposal_id(out)
    code, out, _ = await opstwin(
        "reject", second, "--user", "alice", "--reason", "not now", *config, env=alice
    )
    assert code == EXIT_DONE and "REJECTED" in out and "not now" in out

    # A viewer's proposal is recorded and rejected: exit 2, why on stderr.
    code, out, err = await opstwin(
        "propose", SETPOINT, "177", "--reason", "r", "--user", "vic", *config, env=alice
    )
    assert code == EXIT_REFUSED and "REJECTED" in out
    assert "propose needs role" in err

    # An executor's change is written at once; --url and --token instead of config and env.
    code, out, err = await opstwin(
        "propose",
        SETPOINT,
        "178.5",
        "--reason",
        "r",
        "--key",
        "cli-once",
        "--url",
        running.url,
        "--token",
        running.tokens["exec1"],
    )
    assert code == EXIT_DONE, out + err
    assert "SUCCEEDED" in out and running.plc_setpoint() == pytest.approx(178.5)
    executed = proposal_id(out)
    code, out, _ = await opstwin(
        "propose", SETPOINT, "178.5", "--reason", "r", "--key", "cli-once", "--url", running.url,
        "--token", running.tokens["exec1"],
    )  # fmt: skip
    assert code == EXIT_REFUSED and "REJECTED" in out, "the same key never executes twice"
    code, _, _ = await opstwin(
        "rollback", executed, "--url", running.url, "--token", running.tokens["exec1"]
    )
    assert code == EXIT_DONE and running.plc_setpoint() == pytest.approx(before)

    # What goes wrong is one line on stderr and exit 1.
    wrong = {"OPSTWIN_PASSWORD": "not the password"}
    code, out, err = await opstwin("proposals", "--user", "alice", *config, env=wrong)
    assert (code, out) == (EXIT_ERROR, "") and err.startswith("opstwin: credentials refused")
    code, _, err = await opstwin("proposals", "--user", "alice", *config)
    assert code == EXIT_ERROR and "set OPSTWIN_PASSWORD" in err
    code, _, err = await opstwin("proposal", "p-000000-1", *config, env=agent)
    assert code == EXIT_ERROR and "no proposal 'p-000000-1'" in err


@pytest.mark.slow  # one `python -m gateway.cli` process: ~2 s of imports
async def test_without_a_gateway_the_commands_say_what_to_do(tmp_path: Path):
    port = free_port()
    code, out, err = await opstwin_process(
        "proposals", "--url", f"http://127.0.0.1:{port}", env={"OPSTWIN_TOKEN": "otw_x"}
    )
    assert (code, out) == (EXIT_ERROR, "")
    assert f"cannot reach the gateway at http://127.0.0.1:{port}: is it running?" in err
    assert "Traceback" not in err

    code, _, err = await opstwin("proposals", "--url", f"http://127.0.0.1:{port}")
    assert code == EXIT_ERROR and "no credentials" in err
    code, _, err = await opstwin("proposals", env={"OPSTWIN_TOKEN": "otw_x"})
    assert code == EXIT_ERROR and "say where the gateway is" in err
    # A usage error exits 1, not 2: for these commands 2 means a rejected proposal.
    code, _, err = await opstwin("propose", SETPOINT, "1", "--url", "http://x")
    assert code == EXIT_ERROR and "--reason" in err
    code, _, err = await opstwin("propose", SETPOINT, "nan", "--reason", "r", "--url", "http://x")
    assert code == EXIT_ERROR and "finite number" in err
    missing = tmp_path / "nope.yaml"
    code, _, err = await opstwin("proposals", "--config", str(missing), env={"OPSTWIN_TOKEN": "t"})
    assert code == EXIT_ERROR and str(missing) in err


async def test_a_server_that_is_not_a_gateway_is_named(aiohttp_server):
    from aiohttp import web

    async def page(request: web.Request) -> web.Response:
        return web.Response(text="<html>hello</html>")

    app = web.Application()
    app.router.add_get("/proposals", page)
    server = await aiohttp_server(app)
    code, _, err = await opstwin(
        "proposals", "--url", str(server.make_url("")), env={"OPSTWIN_TOKEN": "otw_x"}
    )
    assert code == EXIT_ERROR and "no JSON object: is it an OpsTwin gateway's HTTP port?" in err
