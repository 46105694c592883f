"""A gateway for the AIW document tests: the simulated oven PLC (real OPC UA), the repo's oven
policies, one `driver: http` device for ingest, and tokens of every role in its control.db."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any, Literal

import yaml

from gateway.app import Gateway
from gateway.config import SiteConfig, parse_config
from gateway.control.users import parse_grant
from gateway.demo import demo_config_data

ROOT = Path(__file__).resolve().parents[1]
SETPOINT = "line1/oven1/heater_setpoint"
PUSHED = "line1/lab/sample_temp"
# name -> grants; each becomes an API token.
TOKENS: dict[str, list[str]] = {
    "admin1": ["admin"],
    "viewer1": ["viewer"],
    "agent1": ["agent:line1/*"],
    "exec1": ["executor"],
}


def aiw_site_config(
    tmp: Path, plc_port: int, *, read_access: Literal["open", "token"] = "open"
) -> SiteConfig:
    """The demo config with only the oven and a pushed point, no OPC UA server, oven policies."""
    data: dict[str, Any] = demo_config_data(
        device_ports={"oven-plc": plc_port}, http_port=0, opcua_port=0
    )
    data["storage"]["path"] = str(tmp / "twin.db")
    data["devices"][0]["options"].update(reconnect_cap_s=1.0)
    data["devices"].append(
        {
            "name": "lab",
            "driver": "http",
            "points": [
                {
                    "id": PUSHED,
                    "datatype": "float64",
                    "unit": "°C",
                    "range": {"lo": 0, "hi": 500},
                    "description": "A lab sample's temperature, pushed by the LIMS.",
                }
            ],
        }
    )
    data["opcua_server"]["enabled"] = False
    data["http"]["read_access"] = read_access
    # These tests' oven stands still (tick_hz 0): the demo's `stale` detector on its temperature
    # would rightly call the probe dead after 10 s, and a proposal reading it would then wait
    # for analysis as a suspect input (tests/integration/test_closed_loop.py shows that path).
    data.pop("anomalies", None)
    policies = tmp / "policies"
    policies.mkdir(exist_ok=True)
    for path in (ROOT / "policies").glob("oven-*.yaml"):
        shutil.copy(path, policies)
    data["policies"] = {"dir": str(policies)}
    return parse_config(yaml.safe_dump(data, allow_unicode=True), source="test")


async def make_tokens(gateway: Gateway) -> dict[str, dict[str, str]]:
    """An Authorization header per name of `TOKENS` (the gateway must be running)."""
    accounts = gateway.accounts
    assert accounts is not None, "start the gateway first"
    headers: dict[str, dict[str, str]] = {}
    for name, specs in TOKENS.items():
        grants = [parse_grant(spec) for spec in specs]
        token = await asyncio.to_thread(accounts.create_token, name, grants)
        headers[name] = {"Authorization": f"Bearer {token.secret}"}
    return headers
