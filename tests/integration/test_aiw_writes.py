"""AIW writes on a real gateway: push ingest, what-if simulation, actions and their rollback.

The gateway reads the simulated oven PLC (plantsim, real OPC UA) judged by the repo's oven
policies, and takes pushed values for a lab bench (`driver: http`); users and tokens are real
ones in its control.db; every request goes over a real socket. One gateway serves the module.
The oven runs at ~182.7 °C with this seed and `tick_hz=0`, so its policies never fire on their
own and every change here is one a test made.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import yaml
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests_support import account_headers, eventually, logged_events

from drivers.contract import Quality
from gateway.aiw.auth import AUTHENTICATOR
from gateway.aiw.schemas import ActionV1, SimRunResult
from gateway.app import Gateway
from gateway.config import SiteConfig, parse_config
from gateway.demo import demo_config_data
from gateway.http import create_app
from gateway.http_proposals import LoginRation
from gateway.netguard import body_timeout
from plantsim import OvenDevice

ROOT = Path(__file__).resolve().parents[2]
SETPOINT = "line1/oven1/heater_setpoint"
RUNNING = "line1/oven1/running"
TEMP = "lab/bench1/temp"
COUNT = "lab/bench1/count"
ON = "lab/bench1/on"
NOTE = "lab/bench1/note"
OTHER_BENCH = "lab/bench2/temp"
SILENT = "lab/probe/level"  # a device with a short stale_after_s
RETIRED = "lab/old/temp"
LEVEL = "utilities/tank1/level"
PASSWORD = "correct horse battery"
STALE_AFTER_S = 0.5

ACCOUNTS: dict[str, tuple[str, list[str]]] = {
    "feeder": ("token", ["executor:lab/bench1/*", "executor:lab/probe/*"]),
    "vic": ("token", ["viewer"]),
    "agent1": ("token", ["agent:line1/*"]),
    "exec1": ("token", ["executor:line1/oven1/*"]),
    "benchview": ("token", ["viewer:lab/*"]),
    "alice": ("user", ["supervisor"]),
}


def site_config(tmp: Path, plc_port: int) -> SiteConfig:
    """The demo's oven with the repo's oven policies, plus pushed and disabled devices."""
    data = demo_config_data(device_ports={"oven-plc": plc_port}, http_port=0, opcua_port=0)
    data["storage"]["path"] = str(tmp / "twin.db")
    data["devices"][0]["options"].update(reconnect_cap_s=1.0)
    data["opcua_server"]["enabled"] = False
    # The oven stands still (tick_hz 0): the demo's `stale` detector would make its temperature
    # a suspect input after 10 s, and what the gate decides would depend on the test's pace.
    data.pop("anomalies", None)
    policies = tmp / "policies"
    policies.mkdir()
    for path in (ROOT / "policies").glob("oven-*.yaml"):
        shutil.copy(path, policies)
    data["policies"] = {"dir": str(policies)}
    data["devices"] += [
        {
            "name": "bench",
            "driver": "http",
            "points": [
                {"id": TEMP, "datatype": "float64", "unit": "°C"},
                {"id": COUNT, "datatype": "uint16"},
                {"id": ON, "datatype": "bool"},
                {"id": NOTE, "datatype": "string"},
                {"id": OTHER_BENCH, "datatype": "float32"},
            ],
        },
        {
            "name": "probe",
            "driver": "http",
            "stale_after_s": STALE_AFTER_S,
            "points": [{"id": SILENT, "datatype": "float64"}],
        },
        {
            "name": "old-bench",
            "driver": "http",
            "enabled": False,
            "points": [{"id": RETIRED, "datatype": "float64"}],
        },
        {
            # Declared, not polled: what matters is that its points are read, not pushed.
            "name": "tank1",
            "driver": "modbus",
            "endpoint": "tcp://127.0.0.1:5020",
            "enabled": False,
            "points": [{"id": LEVEL, "address": "holding:0", "datatype": "uint16"}],
        },
    ]
    return parse_config(yaml.safe_dump(data, allow_unicode=True), source="test")


@dataclass
class Site:
    oven: OvenDevice
    gateway: Gateway
    client: TestClient
    headers: dict[str, dict[str, str]]

    async def call(
        self,
        who: str | None,
        method: str,
        path: str,
        body: Any = None,
        *,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        sent = {**(self.headers[who] if who else {}), **(headers or {})}
        kwargs: dict[str, Any] = {"headers": sent}
        if isinstance(body, bytes | str):
            kwargs["data"] = body
        elif body is not None:
            kwargs["json"] = body
        response = await self.client.request(method, path, **kwargs)
        assert response.status < 500, await response.text()
        assert response.content_type == "application/json", await response.text()
        return response.status, await response.json()

    async def ingest(self, items: list[dict[str, Any]], who: str = "feeder") -> dict[str, Any]:
        status, answer = await self.call(who, "POST", "/telemetry/ingest", {"items": items})
        assert status == 200, answer
        return answer

    async def point(self, point_id: str) -> dict[str, Any]:
        status, body = await self.call("vic", "GET", f"/twin/{point_id}")
        assert status == 200, body
        return body

    def plc_setpoint(self) -> float:
        return float(self.oven.model.signals()["heater_setpoint"])


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def site(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Site]:
    async with OvenDevice(seed=4, tick_hz=0) as oven:
        gateway = Gateway(site_config(tmp_path_factory.mktemp("aiw-writes"), oven.port))
        app = create_app(gateway)
        # As `opstwin run` has it: every body is read (bounded) before any handler runs.
        app.middlewares.append(body_timeout(gateway.config.http.body_timeout_s))
        async with TestClient(TestServer(app)) as client:
            accounts = gateway.accounts
            assert accounts is not None
            headers = await account_headers(accounts, ACCOUNTS, PASSWORD)
            headers["forged"] = {"Authorization": "Bearer otw_forged"}
            await eventually(lambda: oven_good(gateway), what="every oven point GOOD")
            yield Site(oven, gateway, client, headers)


def oven_good(gateway: Gateway) -> bool:
    _, values = gateway.store.snapshot()
    return all(v.quality is Quality.GOOD for p, v in values.items() if p.startswith("line1/"))


@pytest.fixture(autouse=True)
def fresh_rations(request: pytest.FixtureRequest) -> None:
    """Every test starts with no refused logins counted against 127.0.0.1."""
    if "site" in request.fixturenames:
        authenticator = request.getfixturevalue("site").client.app[AUTHENTICATOR]
        authenticator.password_ration = LoginRation(max_failures=10, window_s=60.0)
        authenticator.token_ration = LoginRation(max_failures=30, window_s=60.0)


on_gateway = pytest.mark.asyncio(loop_scope="module")

WRITES = [
    ("POST", "/telemetry/ingest", {"items": [{"point": TEMP, "value": 1.0}]}),
    ("POST", "/sim/run", {"point": SETPOINT, "value": 178.0}),
    ("POST", "/rollback/p-000000-1", {"reason": "test"}),
    ("GET", "/actions", None),
    ("GET", "/actions/p-000000-1", None),
]


# -- credentials and roles ------------------------------------------------------------------------


@pytest.mark.slow
@on_gateway
@pytest.mark.parametrize(("method", "path", "body"), WRITES, ids=[w[1] for w in WRITES])
@pytest.mark.parametrize("who", [None, "forged"])
async def test_every_write_and_action_route_needs_credentials(site: Site, method, path, body, who):
    status, answer = await site.call(who, method, path, body)
    assert status == 401 and "Bearer" in answer["error"]


@pytest.mark.slow
@on_gateway
async def test_a_viewer_may_not_ingest(site: Site):
    status, answer = await site.call("vic", "POST", "/telemetry/ingest", WRITES[0][2])
    assert status == 403
    assert "ingest needs role executor or admin" in answer["error"]


# -- ingest ---------------------------------------------------------------------------------------


@pytest.mark.slow
@on_gateway
async def test_pushed_values_reach_the_twin_and_the_event_log(site: Site):
    measured = time.time() - 5.0
    answer = await site.ingest(
        [
            {"point": TEMP, "value": 21.25, "source_ts": measured},
            {"point": COUNT, "value": 7},
            {"point": ON, "value": True},
            {"point": NOTE, "value": "calibrated", "quality": "UNCERTAIN"},
        ]
    )
    assert answer["accepted"] == 4 and answer["rejected"] == []
    assert answer["rev"] <= site.gateway.store.committed_rev, "the answer names a committed rev"

    temp = await site.point(TEMP)
    assert (temp["value"], temp["quality"], temp["source_ts"]) == (21.25, "GOOD", measured)
    assert (await site.point(COUNT))["value"] == 7
    assert (await site.point(ON))["value"] is True
    note = await site.point(NOTE)
    assert (note["value"], note["quality"]) == ("calibrated", "UNCERTAIN")
    assert "token `feeder`" in note["reason"]

    status, rows = await site.call("vic", "GET", f"/telemetry/query?point={TEMP}")
    assert status == 200 and rows["rows"][-1]["value"] == 21.25
    events = await logged_events(site.gateway.store, "TelemetryChanged")
    pushed = {e.point_id: e for e in events if e.point_id in (TEMP, COUNT, ON, NOTE)}
    assert set(pushed) == {TEMP, COUNT, ON, NOTE}
    assert max(e.rev for e in pushed.values()) <= answer["rev"]


@pytest.mark.slow
@on_gateway
async def test_each_bad_item_is_rejected_with_why_and_the_rest_is_taken(site: Site):
    far_future = time.time() + 3600
    items: list[dict[str, Any]] = [
        {"point": TEMP, "value": 22.5},  # 0: taken
        {"point": TEMP, "value": "22.5"},  # 1: text for a number
        {"point": COUNT, "value": 70000},  # 2: beyond uint16
        {"point": COUNT, "value": -1},  # 3
        {"point": COUNT, "value": 2.5},  # 4
        {"point": ON, "value": 1},  # 5: a number for a bool
        {"point": NOTE, "value": 5},  # 6
        {"point": OTHER_BENCH, "value": 1.0},  # 7: outside feeder's scope
        {"point": "lab/bench9/temp", "value": 1.0},  # 8: unknown
        {"point": LEVEL, "value": 3},  # 9: a Modbus device's
        {"point": SETPOINT, "value": 150.0},  # 10: read from the PLC
        {"point": RETIRED, "value": 1.0},  # 11: a disabled device's
        {"point": TEMP, "value": 1.0, "source_ts": far_future},  # 12: a clock in the future
        {"point": TEMP, "value": [1]},  # 13: not a value
        {"value": 1.0},  # 14: no point
        {"point": TEMP, "value": 1.0, "quality": "STALE"},  # 15: the gateway's to say
        {"point": TEMP, "value": 1.0, "extra": 1},  # 16
        {"point": COUNT, "value": 9},  # 17: taken
    ]
    answer = await site.ingest(items)
    assert answer["accepted"] == 2
    errors = {r["index"]: r["error"] for r in answer["rejected"]}
    assert sorted(errors) == list(range(1, 17))
    says = {
        1: "takes a number",
        2: "outside uint16's range",
        3: "outside uint16's range",
        4: "whole number",
        5: "true or false",
        6: "takes text",
        7: "outside token `feeder`'s scope",
        8: "unknown point",
        9: "device tank1 over modbus",
        10: "device oven-plc over opcua",
        11: "disabled",
        12: "ahead of the gateway's clock",
        13: "value",
        14: "point",
        15: "quality",
        16: "extra",
    }
    for index, text in says.items():
        assert text in errors[index], (index, errors[index])
    points = {r["index"]: r["point"] for r in answer["rejected"]}
    assert points[9] == LEVEL and points[13] == TEMP and points[14] is None
    assert (await site.point(TEMP))["value"] == 22.5
    assert (await site.point(COUNT))["value"] == 9
    assert (await site.point(OTHER_BENCH))["rev"] == 0, "nothing reached a refused point"


@pytest.mark.slow
@on_gateway
async def test_nan_and_infinity_are_rejected_per_item(site: Site):
    # JSON has no NaN: a client that writes one anyway (Python's json does) gets per-item answers.
    values = ["NaN", "-Infinity", "1e999", "23.5"]
    listed = ", ".join(f'{{"point": "{TEMP}", "value": {v}}}' for v in values)
    raw = '{"items": [' + listed + "]}"
    status, answer = await site.call(
        "feeder",
        "POST",
        "/telemetry/ingest",
        raw,
        headers={"Content-Type": "application/json"},
    )
    assert status == 200, answer
    assert answer["accepted"] == 1
    assert [r["index"] for r in answer["rejected"]] == [0, 1, 2]
    assert all("finite" in r["error"] for r in answer["rejected"])
    assert (await site.point(TEMP))["value"] == 23.5


@pytest.mark.slow
@on_gateway
@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        (b"{", 400, "not JSON"),
        (b"", 400, "not JSON"),
        (b"[]", 400, "array"),
        (b'"items"', 400, "string"),
        (b"{}", 400, "items: missing"),
        (b'{"items": {}}', 400, "items: a JSON object"),
        (b'{"items": []}', 400, "items: 0 items"),
        (b'{"items": [], "more": 1}', 400, "'more': unknown key"),
        (
            json.dumps({"items": [{"point": TEMP, "value": 1.0}] * 10_001}).encode(),
            400,
            "items: 10,001 items",
        ),
    ],
    ids=[
        "truncated",
        "empty",
        "array",
        "string",
        "no-items",
        "items-object",
        "no-item",
        "extra-key",
        "too-many",
    ],
)
async def test_malformed_ingest_bodies_are_400_naming_the_field(site: Site, body, status, says):
    got, answer = await site.call(
        "feeder", "POST", "/telemetry/ingest", body, headers={"Content-Type": "application/json"}
    )
    assert got == status and says in answer["error"], answer


@pytest.mark.slow
@on_gateway
async def test_ingest_wants_json_and_a_bounded_body(site: Site):
    body = json.dumps({"items": [{"point": TEMP, "value": 1.0}]})
    for content_type in ("text/plain", "application/x-www-form-urlencoded"):
        status, answer = await site.call(
            "feeder", "POST", "/telemetry/ingest", body, headers={"Content-Type": content_type}
        )
        assert status == 415 and "application/json" in answer["error"]
    huge = json.dumps({"items": [{"point": NOTE, "value": "x" * 4000}] * 2500})
    status, answer = await site.call(
        "feeder", "POST", "/telemetry/ingest", huge, headers={"Content-Type": "application/json"}
    )
    # Refused by the bound every body meets before any handler (body_timeout reads it), in JSON.
    assert status == 413 and ("1048576" in answer["error"] or "1 MiB" in answer["error"])


@pytest.mark.slow
@on_gateway
async def test_a_full_batch_is_taken_in_one_request(site: Site):
    items = [{"point": COUNT, "value": i % 65536} for i in range(10_000)]
    answer = await site.ingest(items)
    assert (answer["accepted"], answer["rejected"]) == (10_000, [])
    assert (await site.point(COUNT))["value"] == 9999


@pytest.mark.slow
@on_gateway
async def test_a_push_point_not_pushed_within_stale_after_s_turns_stale(site: Site):
    await site.ingest([{"point": SILENT, "value": 1.5}])

    async def quality() -> str:
        return str((await site.point(SILENT))["quality"])

    seen: list[str] = []

    async def stale() -> bool:
        seen.append(await quality())
        return seen[-1] == "STALE"

    deadline = time.monotonic() + 10.0
    while not await stale():
        assert time.monotonic() < deadline, f"never went STALE: {seen[-5:]}"
        await asyncio.sleep(0.1)
    point = await site.point(SILENT)
    assert point["value"] == 1.5, "a STALE point keeps its last value"
    assert f"stale_after_s {STALE_AFTER_S:g}" in point["reason"]
    status, health = await site.call(None, "GET", "/health")
    assert status == 200 and health["devices"]["probe"]["state"] == "STALE"
    assert any("device probe is STALE" in r for r in health["reasons"])
    # The bench, pushed to without a `stale_after_s`, is no problem however long it is silent.
    assert health["devices"]["bench"]["state"] in ("RECEIVING", "WAITING")
    assert not any("bench" in r for r in health["reasons"])

    await site.ingest([{"point": SILENT, "value": 1.75}])
    point = await site.point(SILENT)
    assert (point["value"], point["quality"]) == (1.75, "GOOD")


json_leaf = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
json_values = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=8,
)
items = st.lists(
    st.fixed_dictionaries(
        {"point": st.sampled_from([TEMP, COUNT, ON, NOTE, LEVEL, "x", ""]) | st.text(max_size=8)},
        optional={
            "value": json_values,
            "quality": st.sampled_from(["GOOD", "BAD", "STALE", "", 1]),
            "source_ts": json_values,
        },
    ),
    min_size=0,
    max_size=6,
)


@pytest.mark.slow
@on_gateway
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=st.fixed_dictionaries({"items": items}) | json_values)
async def test_hostile_ingest_bodies_never_get_a_5xx(site: Site, body):
    raw = json.dumps(body, allow_nan=True)
    status, answer = await site.call(
        "feeder", "POST", "/telemetry/ingest", raw, headers={"Content-Type": "application/json"}
    )
    assert status in (200, 400), answer
    if status == 200:
        assert answer["accepted"] + len(answer["rejected"]) == len(body["items"])


# -- simulation -----------------------------------------------------------------------------------


@pytest.mark.slow
@on_gateway
async def test_a_what_if_runs_the_gates_simulation_and_writes_nothing(site: Site):
    before = site.plc_setpoint()
    status, result = await site.call("vic", "POST", "/sim/run", {"point": SETPOINT, "value": 178.0})
    assert status == 200, result
    SimRunResult.model_validate(result)
    assert result["policy"] == "oven-overtemp-drift" and result["model"] == "fopdt"
    assert result["paths"] == 10_000 and result["error"] is None
    assert 0.9 <= result["p_success"] <= 1.0, "the oven's own proposals of 178 auto-execute"
    assert result["p_success"] == result["paths_ok"] / result["paths"]
    (constraint,) = [c for c in result["constraints"] if c["kind"] == "upper"]
    assert constraint["output"] == "line1/oven1/temperature" and constraint["limit"] == 190
    assert 0.0 <= constraint["violation_probability"] <= 0.1
    final = result["kpis"]["line1/oven1/temperature"]["final"]
    assert final["p5"] <= final["p50"] <= final["p95"]
    fan = result["trajectory"]
    assert len(fan["times"]) <= 200 and fan["times"][-1] == pytest.approx(600.0)
    temps = fan["outputs"]["line1/oven1/temperature"]
    assert all(lo <= hi for lo, hi in zip(temps["p5"], temps["p95"], strict=True))
    assert result["seed"] is not None and result["elapsed_ms"] > 0
    assert result["written"] is False and site.plc_setpoint() == before

    (event,) = [
        e
        for e in await logged_events(site.gateway.store, "SimulationCompleted")
        if e.data["by"] == "vic" and e.data["simulation"]["seed"] == result["seed"]
    ]
    assert event.point_id == SETPOINT and event.data["p_success"] == result["p_success"]


@pytest.mark.slow
@on_gateway
async def test_a_what_if_may_ask_for_fewer_paths_and_a_shorter_horizon(site: Site):
    body = {"point": SETPOINT, "value": 176.0, "paths": 500, "horizon_s": 120.0}
    status, result = await site.call("agent1", "POST", "/sim/run", body)
    assert status == 200, result
    assert (result["paths"], result["horizon_s"]) == (500, 120.0)
    assert result["trajectory"]["times"][-1] == pytest.approx(120.0)


@pytest.mark.slow
@on_gateway
@pytest.mark.parametrize(
    ("who", "body", "status", "says"),
    [
        ("vic", {"point": RUNNING, "value": 1.0}, 422, "no enabled policy models"),
        ("vic", {"point": TEMP, "value": 1.0}, 422, "no enabled policy models"),
        ("vic", {"point": SETPOINT, "value": 450.0}, 422, "outside"),
        ("vic", {"point": "line1/oven9/x", "value": 1.0}, 404, "unknown point"),
        ("vic", {"point": SETPOINT, "value": "178"}, 400, "value"),
        ("vic", {"point": SETPOINT}, 400, "value"),
        ("vic", {"point": SETPOINT, "value": 178.0, "paths": 0}, 400, "paths"),
        (
            "vic",
            {"point": SETPOINT, "value": 178.0, "paths": 100_000, "horizon_s": 6000},
            400,
            "at most 50,000,000",
        ),
        ("benchview", {"point": SETPOINT, "value": 178.0}, 403, "outside"),
    ],
    ids=[
        "unmodelled",
        "pushed",
        "out-of-range",
        "unknown",
        "text-value",
        "no-value",
        "no-paths",
        "too-much-work",
        "out-of-scope",
    ],
)
async def test_what_ifs_that_cannot_run(site: Site, who, body, status, says):
    got, answer = await site.call(who, "POST", "/sim/run", body)
    assert got == status and says in answer["error"], answer


# -- actions and rollback -------------------------------------------------------------------------


@pytest.mark.slow
@on_gateway
async def test_an_executed_change_is_an_action_and_rolls_back_by_its_id(site: Site):
    before = site.plc_setpoint()
    status, proposal = await site.call(
        "exec1", "POST", "/proposals", {"point": SETPOINT, "value": 178.5, "reason": "test"}
    )
    assert (status, proposal["status"]) == (201, "succeeded"), proposal
    pid = proposal["id"]
    assert site.plc_setpoint() == pytest.approx(178.5)
    # A proposal the gate rejected never reached the device: it is no action.
    _, rejected = await site.call(
        "exec1", "POST", "/proposals", {"point": SETPOINT, "value": 450.0, "reason": "test"}
    )
    assert rejected["status"] == "rejected"

    status, page = await site.call("vic", "GET", "/actions")
    assert status == 200
    ids = [a["id"] for a in page["actions"]]
    assert ids[0] == pid and rejected["id"] not in ids
    action = ActionV1.model_validate(page["actions"][0])
    assert (action.status, action.verified, action.rolled_back) == ("succeeded", True, False)
    assert action.previous_value == pytest.approx(before)
    status, shown = await site.call("vic", "GET", f"/actions/{pid}")
    assert (status, shown["id"]) == (200, pid)
    status, answer = await site.call("vic", "GET", f"/actions/{rejected['id']}")
    assert status == 404 and "wrote nothing" in answer["error"]
    status, scoped = await site.call("benchview", "GET", "/actions")
    assert status == 200 and scoped["actions"] == [] and scoped["hidden"] >= 1
    status, _ = await site.call("benchview", "GET", f"/actions/{pid}")
    assert status == 403

    for who in ("vic", "agent1"):  # a viewer and an agent may not undo a write
        status, answer = await site.call(who, "POST", f"/rollback/{pid}", {"reason": "no"})
        assert status == 403 and "rollback" in answer["error"], answer
    assert site.plc_setpoint() == pytest.approx(178.5)

    status, rolled = await site.call("alice", "POST", f"/rollback/{pid}", {"reason": "test over"})
    assert status == 200, rolled
    action = ActionV1.model_validate(rolled)
    assert (action.id, action.status, action.rolled_back) == (pid, "rolled_back", True)
    assert site.plc_setpoint() == pytest.approx(before)
    status, page = await site.call("vic", "GET", "/actions?status=rolled_back&limit=1")
    assert [a["id"] for a in page["actions"]] == [pid]

    # The same errors as /proposals/{id}/rollback: it is the same handler.
    status, twice = await site.call("alice", "POST", f"/rollback/{pid}")
    assert status == 409 and "only a succeeded write rolls back" in twice["error"]
    status, answer = await site.call("alice", "POST", "/rollback/p-000000-999")
    assert status == 404
    status, answer = await site.call("alice", "POST", f"/rollback/{pid}", b"{not json")
    assert status == 400 and "invalid request body" in answer["error"]


@pytest.mark.slow
@on_gateway
@pytest.mark.parametrize(
    ("query", "says"),
    [("status=pending", "status must be one of"), ("limit=0", "limit"), ("limit=x", "limit")],
)
async def test_bad_action_queries_are_400(site: Site, query, says):
    status, answer = await site.call("vic", "GET", f"/actions?{query}")
    assert status == 400 and says in answer["error"]


@pytest.mark.slow
@on_gateway
async def test_the_audit_chain_holds_after_everything(site: Site):
    from gateway.control.audit import AuditLog

    control = site.gateway.control
    assert control is not None
    await control.write_async(lambda conn: None)
    result = await asyncio.to_thread(AuditLog(control).verify)
    assert result.ok, result.describe()
    assert not math.isnan(site.plc_setpoint())
