"""The proposal routes: authentication, RBAC and the engine's answers as HTTP, on a real gateway.

The pure parts (the Authorization header, the failed-login ration) are tested alone; the routes
against a Gateway started on the simulated oven PLC (plantsim, real OPC UA), with the repo's
oven policies, users and tokens in its control.db, through aiohttp's client over a real socket.
One gateway serves the whole module (starting one takes seconds); each test proposes moves of the
heater setpoint downward from 180 °C, which the oven's policy judges safe and better (the oven
runs at ~182.7 °C with this seed), and undoes what it wrote.
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
import pytest_asyncio
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from tests_support import FakeClock, account_headers, eventually

from drivers.contract import Quality
from gateway.app import Gateway
from gateway.config import SiteConfig, parse_config
from gateway.control.audit import AuditLog
from gateway.demo import demo_config_data
from gateway.http import GATEWAY, create_app
from gateway.http_proposals import (
    CREDENTIALS_REFUSED,
    PROPOSAL_ROUTES,
    LoginRation,
    add_proposal_routes,
    parse_authorization,
)
from plantsim import OvenDevice

ROOT = Path(__file__).resolve().parents[2]
SETPOINT = "line1/oven1/heater_setpoint"
TEMPERATURE = "line1/oven1/temperature"
PASSWORD = "correct horse battery"

# -- pure parts ---------------------------------------------------------------------------------


def basic(name: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{name}:{password}".encode()).decode()


@pytest.mark.parametrize(
    ("header", "kind", "name", "secret"),
    [
        ("Bearer otw_abc", "token", None, "otw_abc"),
        ("bearer   otw_abc  ", "token", None, "otw_abc"),
        (basic("alice", "pa:ss word"), "user", "alice", "pa:ss word"),
        (basic("", ""), "user", "", ""),
        (basic("ünï", "pässwörd"), "user", "ünï", "pässwörd"),
    ],
)
def test_authorization_headers_that_carry_credentials(header, kind, name, secret):
    credentials = parse_authorization(header)
    assert credentials is not None
    assert (credentials.kind, credentials.name, credentials.secret) == (kind, name, secret)


@pytest.mark.parametrize("header", [None, "", "   "])
def test_no_authorization_header_is_no_credentials(header):
    assert parse_authorization(header) is None


@pytest.mark.parametrize(
    "header",
    [
        "Bearer",
        "Bearer a b",
        "Basic",
        "Basic !!!not-base64",
        "Basic " + base64.b64encode(b"no colon").decode(),
        "Basic " + base64.b64encode(b"\xff\xfe:x").decode(),  # not UTF-8
        "Digest username=alice",
        "otw_abc",
    ],
)
def test_malformed_authorization_headers_are_refused_without_echoing_them(header):
    with pytest.raises(ValueError) as refused:
        parse_authorization(header)
    assert "not-base64" not in str(refused.value) and "alice" not in str(refused.value)


def test_ration_refuses_an_address_after_max_failures_until_the_window_passes():
    clock = FakeClock()
    ration = LoginRation(max_failures=3, window_s=60.0, clock=clock)
    for _ in range(3):
        assert ration.retry_after("10.0.0.9") is None
        ration.fail("10.0.0.9")
        clock.advance(1.0)
    assert ration.retry_after("10.0.0.9") == pytest.approx(57.0)
    assert ration.retry_after("10.0.0.10") is None, "another address is not affected"
    clock.advance(57.0)  # the first failure leaves the window
    assert ration.retry_after("10.0.0.9") is None
    ration.fail("10.0.0.9")
    assert ration.retry_after("10.0.0.9") is not None


def test_ration_counts_checks_still_running():
    ration = LoginRation(max_failures=10, window_s=60.0, max_concurrent=2, clock=FakeClock())
    ration.begin("a")
    ration.begin("a")
    assert ration.retry_after("a") == 1.0, "a third parallel check waits"
    ration.end("a", ok=True)
    assert ration.retry_after("a") is None
    ration.end("a", ok=False)
    ration.begin("a")
    ration.end("a", ok=False)
    assert ration.retry_after("a") is None  # two failures of ten


def test_ration_forgets_addresses_beyond_its_table():
    clock = FakeClock()
    ration = LoginRation(max_failures=1, window_s=60.0, max_tracked=100, clock=clock)
    for i in range(1000):
        ration.fail(f"10.0.{i // 256}.{i % 256}")
        clock.advance(0.001)
    assert len(ration._failures) <= 100
    assert ration.retry_after("10.0.3.231") is not None, "the newest are kept"


async def test_routes_answer_503_before_the_engine_runs(aiohttp_client):
    app = web.Application()
    app[GATEWAY] = cast(Gateway, SimpleNamespace(engine=None, accounts=None))
    add_proposal_routes(app, GATEWAY)
    client = await aiohttp_client(app)
    for method, path in [
        ("GET", "/proposals"),
        ("POST", "/proposals"),
        ("GET", "/proposals/p-1"),
        ("POST", "/proposals/p-1/approve"),
    ]:
        response = await client.request(method, path, headers={"Authorization": "Bearer x"})
        assert response.status == 503
        assert "retry" in (await response.json())["error"]
        assert response.headers["Retry-After"]


# -- on a running gateway -------------------------------------------------------------------------


@dataclass
class Site:
    oven: OvenDevice
    gateway: Gateway
    client: TestClient
    headers: dict[str, dict[str, str]]  # who -> Authorization header

    async def call(
        self, who: str | None, method: str, path: str, body: Any = None
    ) -> tuple[int, dict[str, Any]]:
        headers = dict(self.headers[who]) if who else {}
        kwargs: dict[str, Any] = {"headers": headers}
        if isinstance(body, bytes | str):
            kwargs["data"] = body
        elif body is not None:
            kwargs["json"] = body
        response = await self.client.request(method, path, **kwargs)
        assert response.content_type == "application/json", await response.text()
        return response.status, await response.json()

    async def propose(self, who: str, value: float, **extra: Any) -> tuple[int, dict[str, Any]]:
        body = {"point": SETPOINT, "value": value, "reason": f"test by {who}", **extra}
        return await self.call(who, "POST", "/proposals", body)

    def plc_setpoint(self) -> float:
        return float(self.oven.model.signals()["heater_setpoint"])


def oven_site_config(tmp: Path, plc_port: int) -> SiteConfig:
    """The demo config with only the oven, no OPC UA server, and the repo's oven policies."""
    data = demo_config_data(device_ports={"oven-plc": plc_port}, http_port=0, opcua_port=0)
    data["storage"]["path"] = str(tmp / "twin.db")
    data["devices"][0]["options"].update(reconnect_cap_s=1.0)
    data["opcua_server"]["enabled"] = False
    # The tank's policy names points this config leaves out: only the oven's are loaded.
    policies = tmp / "policies"
    policies.mkdir()
    for path in (ROOT / "policies").glob("oven-*.yaml"):
        shutil.copy(path, policies)
    data["policies"] = {"dir": str(policies)}
    return parse_config(yaml.safe_dump(data, allow_unicode=True), source="test")


ACCOUNTS: dict[str, tuple[str, list[str]]] = {
    # name: (kind, grants)
    "alice": ("user", ["supervisor"]),
    "sam": ("user", ["supervisor:utilities/*"]),  # a supervisor of another plant area
    "vic": ("user", ["viewer"]),
    "agent1": ("token", ["agent:line1/*"]),
    "exec1": ("token", ["executor:line1/oven1/*"]),
    "reader": ("token", ["viewer:utilities/*"]),
    "gone": ("token", ["agent"]),  # revoked below
}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def site(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Site]:
    # tick_hz=0: the oven moves only when told, so every proposal meets the same plant.
    async with OvenDevice(seed=4, tick_hz=0) as oven:
        gateway = Gateway(oven_site_config(tmp_path_factory.mktemp("proposals"), oven.port))
        async with TestClient(TestServer(create_app(gateway))) as client:
            accounts = gateway.accounts
            assert accounts is not None
            headers = await account_headers(accounts, ACCOUNTS, PASSWORD)
            await asyncio.to_thread(accounts.revoke_token, "gone")
            await eventually(lambda: all_good(gateway), what="every oven point GOOD")
            yield Site(oven, gateway, client, headers)


def all_good(gateway: Gateway) -> bool:
    return all(v.quality is Quality.GOOD for v in gateway.store.snapshot()[1].values())


@pytest.fixture(autouse=True)
def fresh_rations(request: pytest.FixtureRequest) -> None:
    """Every test starts with no refused logins counted against 127.0.0.1."""
    if "site" in request.fixturenames:
        site = request.getfixturevalue("site")
        routes = site.client.app[PROPOSAL_ROUTES]
        routes.password_ration = LoginRation(max_failures=10, window_s=60.0, max_concurrent=4)
        routes.token_ration = LoginRation(max_failures=30, window_s=60.0)


on_gateway = pytest.mark.asyncio(loop_scope="module")


@pytest.mark.slow
@on_gateway
async def test_an_agents_change_waits_is_approved_executed_and_rolled_back(site: Site):
    before = site.plc_setpoint()
    status, proposal = await site.propose("agent1", 178.0)
    assert status == 201
    assert proposal["status"] == "pending_approval", proposal["reasons"]
    assert proposal["proposer"] == {"name": "agent1", "kind": "token"}
    assert proposal["judged_by"] == "oven-overtemp-drift"
    assert proposal["simulation"]["paths"] == 10000
    assert any("may not execute" in r for r in proposal["reasons"])
    pid = proposal["id"]
    assert site.plc_setpoint() == before, "nothing is written before the approval"

    status, shown = await site.call("vic", "GET", f"/proposals/{pid}")
    assert (status, shown["status"]) == (200, "pending_approval")
    status, listed = await site.call("alice", "GET", "/proposals?status=pending")
    assert status == 200 and pid in [p["id"] for p in listed["proposals"]]

    status, denied = await site.call("agent1", "POST", f"/proposals/{pid}/approve")
    assert status == 403 and "approve" in denied["error"]

    status, approved = await site.call(
        "alice", "POST", f"/proposals/{pid}/approve", {"comment": "checked the oven"}
    )
    assert status == 200, approved
    assert approved["status"] == "succeeded" and approved["approver"] == "alice"
    assert approved["read_back"] == pytest.approx(178.0)
    assert site.plc_setpoint() == pytest.approx(178.0), "the PLC has the approved value"

    status, again = await site.call("alice", "POST", f"/proposals/{pid}/approve")
    assert status == 409 and "succeeded" in again["error"]
    status, _ = await site.call("alice", "POST", f"/proposals/{pid}/reject")
    assert status == 409

    status, rolled = await site.call(
        "alice", "POST", f"/proposals/{pid}/rollback", {"reason": "test over"}
    )
    assert (status, rolled["status"]) == (200, "rolled_back")
    assert site.plc_setpoint() == pytest.approx(before)
    status, twice = await site.call("alice", "POST", f"/proposals/{pid}/rollback")
    assert status == 409 and "only a succeeded write rolls back" in twice["error"]


@pytest.mark.slow
@on_gateway
async def test_an_executor_changes_the_setpoint_alone(site: Site):
    before = site.plc_setpoint()
    status, proposal = await site.propose("exec1", 178.5, idempotency_key="exec1-once")
    assert status == 201
    assert proposal["status"] == "succeeded", proposal["reasons"]
    assert proposal["decision"] == "auto_execute" and proposal["confidence"] >= 0.9
    assert proposal["previous_value"] == pytest.approx(before)
    assert site.plc_setpoint() == pytest.approx(178.5)

    # The same key never executes twice: the gate judges the retry and rejects it.
    status, retry = await site.propose("exec1", 178.5, idempotency_key="exec1-once")
    assert (status, retry["status"]) == (201, "rejected")
    assert retry["id"] != proposal["id"]

    status, rolled = await site.call("exec1", "POST", f"/proposals/{proposal['id']}/rollback")
    assert (status, rolled["status"]) == (200, "rolled_back")
    assert site.plc_setpoint() == pytest.approx(before)


@pytest.mark.slow
@on_gateway
async def test_a_viewers_proposal_is_403_and_recorded_as_rejected(site: Site):
    before = site.plc_setpoint()
    status, answer = await site.propose("vic", 177.0)
    assert status == 403
    assert "propose" in answer["error"] and "agent" in answer["error"]
    record = answer["proposal"]
    assert record["status"] == "rejected" and record["reasons"][0].startswith("no permission")
    assert record["id"] in answer["error"]
    status, shown = await site.call("alice", "GET", f"/proposals/{record['id']}")
    assert (status, shown["status"]) == (200, "rejected")
    assert site.plc_setpoint() == before


@pytest.mark.slow
@on_gateway
async def test_a_change_outside_the_points_range_is_judged_and_rejected(site: Site):
    status, proposal = await site.propose("exec1", 450.0)  # the point's range is 0..300
    assert (status, proposal["status"]) == (201, "rejected")
    assert any("never clamped" in r for r in proposal["reasons"])
    assert proposal["simulation"] is None, "a rejection by the cheap checks costs no simulation"


@pytest.mark.slow
@on_gateway
async def test_a_rejected_proposal_cannot_be_approved(site: Site):
    _, proposal = await site.propose("agent1", 179.0)
    pid = proposal["id"]
    status, rejected = await site.call(
        "alice", "POST", f"/proposals/{pid}/reject", {"reason": "not during this batch"}
    )
    assert (status, rejected["status"]) == (200, "rejected")
    assert rejected["error"] == "not during this batch"
    status, late = await site.call("alice", "POST", f"/proposals/{pid}/approve")
    assert status == 409 and "rejected" in late["error"]


@pytest.mark.slow
@on_gateway
async def test_grants_scope_what_a_principal_sees_and_decides(site: Site):
    _, proposal = await site.propose("agent1", 179.5)
    pid = proposal["id"]
    # sam supervises utilities/*: the oven is not theirs.
    status, denied = await site.call("sam", "GET", f"/proposals/{pid}")
    assert status == 403 and "outside" in denied["error"]
    status, denied = await site.call("sam", "POST", f"/proposals/{pid}/approve")
    assert status == 403
    status, listed = await site.call("sam", "GET", "/proposals")
    assert status == 200
    assert pid not in [p["id"] for p in listed["proposals"]] and listed["hidden"] >= 1
    status, listed = await site.call("reader", "GET", "/proposals?limit=1000")
    assert (status, listed["proposals"]) == (200, [])
    # alice, site-wide, sees it; a limit cuts the list.
    status, listed = await site.call("alice", "GET", "/proposals?limit=1")
    assert status == 200 and [p["id"] for p in listed["proposals"]] == [pid]
    await site.call("alice", "POST", f"/proposals/{pid}/reject")


@pytest.mark.slow
@on_gateway
async def test_a_rollback_the_plc_refuses_is_502_with_its_words(site: Site):
    before = site.plc_setpoint()
    _, proposal = await site.propose("exec1", 177.5)
    assert proposal["status"] == "succeeded", proposal["reasons"]
    pid = proposal["id"]
    params = site.oven.model.params
    # The PLC now takes setpoints up to 178 °C only: restoring 180 is out of its range.
    site.oven.model.params = replace(params, setpoint_max_c=178.0)
    try:
        status, failed = await site.call("exec1", "POST", f"/proposals/{pid}/rollback")
    finally:
        site.oven.model.params = params
    assert status == 502
    assert "BadOutOfRange" in failed["error"] and "still in place" in failed["error"]
    assert site.plc_setpoint() == pytest.approx(177.5)
    status, shown = await site.call("exec1", "GET", f"/proposals/{pid}")
    assert shown["status"] == "succeeded", "a failed rollback leaves the record as it was"
    status, rolled = await site.call("exec1", "POST", f"/proposals/{pid}/rollback")
    assert (status, rolled["status"]) == (200, "rolled_back")
    assert site.plc_setpoint() == pytest.approx(before)


@pytest.mark.slow
@on_gateway
async def test_unknown_points_and_proposals_are_404(site: Site):
    status, answer = await site.call(
        "agent1", "POST", "/proposals", {"point": "line1/oven9/x", "value": 1, "reason": "r"}
    )
    assert status == 404 and "unknown point 'line1/oven9/x'" in answer["error"]
    for path in ("/proposals/p-000000-999", "/proposals/p-000000-999/approve"):
        method = "GET" if path.count("/") == 2 else "POST"
        status, answer = await site.call("alice", method, path)
        assert status == 404 and "GET /proposals" in answer["error"]
    status, answer = await site.call("alice", "GET", "/proposals/" + "x" * 5000)
    assert status == 404 and len(answer["error"]) < 400, "an odd id is not echoed whole"


@pytest.mark.slow
@on_gateway
@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"", "EOF"),
        (b"{not json", "Invalid JSON"),
        (b"[]", "object"),
        ({"point": SETPOINT, "value": 1}, "'reason': Field required"),
        ({"point": SETPOINT, "value": 1, "reason": "r", "force": True}, "'force': Extra inputs"),
        ({"point": SETPOINT, "value": "178", "reason": "r"}, "'value': Input should be a valid"),
        ({"point": SETPOINT, "value": True, "reason": "r"}, "'value': Input should be a valid"),
        (b'{"point": "%s", "value": NaN, "reason": "r"}' % SETPOINT.encode(), "finite"),
        (b'{"point": "%s", "value": 1e999, "reason": "r"}' % SETPOINT.encode(), "finite"),
        ({"point": SETPOINT, "value": 1, "reason": "r" * 2001}, "at most 2000"),
        ({"point": SETPOINT, "value": 1, "reason": "   "}, "say why"),
        ({"point": SETPOINT, "value": 1, "reason": "r", "idempotency_key": "k" * 201}, "200"),
        ({"point": "", "value": 1, "reason": "r"}, "'point'"),
    ],
)
async def test_malformed_proposals_are_400_saying_what_is_wrong(site: Site, body, says):
    status, answer = await site.call("agent1", "POST", "/proposals", body)
    assert status == 400
    assert says in answer["error"], answer["error"]
    assert (
        "send a JSON object with `point`, `value`, `reason`, `idempotency_key`?"
        in (answer["error"])
    )


@pytest.mark.slow
@on_gateway
@pytest.mark.parametrize(
    ("query", "says"),
    [("status=done", "status must be one of"), ("limit=0", "limit"), ("limit=x", "limit")],
)
async def test_bad_list_queries_are_400(site: Site, query, says):
    status, answer = await site.call("alice", "GET", f"/proposals?{query}")
    assert status == 400 and says in answer["error"]


@pytest.mark.slow
@on_gateway
@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": basic("alice", "wrong password")},
        {"Authorization": basic("nobody", PASSWORD)},
        {"Authorization": basic("alice", "")},
        {"Authorization": "Bearer otw_" + "A" * 43},
        {"Authorization": "Bearer not-a-token"},
        {"Authorization": "Basic %%%"},
        {"Authorization": "Negotiate abc"},
        "revoked",
    ],
)
async def test_every_refused_login_gets_the_same_401(site: Site, headers):
    if headers == "revoked":
        headers = site.headers["gone"]
    response = await site.client.get("/proposals", headers=headers)
    assert response.status == 401
    assert (await response.json()) == {"error": CREDENTIALS_REFUSED}
    challenges = response.headers.getall("WWW-Authenticate")
    assert any(c.startswith("Bearer") for c in challenges)
    assert any(c.startswith("Basic") for c in challenges)


@pytest.mark.slow
@on_gateway
async def test_refused_logins_are_audited_and_rationed_per_address(site: Site):
    routes = site.client.app[PROPOSAL_ROUTES]
    routes.password_ration = LoginRation(max_failures=3, window_s=600.0)
    wrong = {"Authorization": basic("alice", "guess-1")}
    for _ in range(3):
        assert (await site.client.get("/proposals", headers=wrong)).status == 401
    throttled = await site.client.get("/proposals", headers=site.headers["alice"])
    assert throttled.status == 429, "even the right password waits: the guesser is rationed"
    assert int(throttled.headers["Retry-After"]) > 500
    assert "retry in" in (await throttled.json())["error"]
    # Tokens have their own ration: an agent on the same host still gets through.
    status, _ = await site.call("agent1", "GET", "/proposals")
    assert status == 200

    control = site.gateway.control
    assert control is not None
    await eventually(
        lambda: len(_refusals(control, "wrong password")) >= 3, what="the refusals audited"
    )
    entry = _refusals(control, "wrong password")[-1]
    assert entry["actor"] == "alice" and entry["details"]["address"] == "127.0.0.1"


def _refusals(control: Any, why: str) -> list[dict[str, Any]]:
    rows = AuditLog(control).tail(500)
    entries = [json.loads(r.entry) for r in rows]
    return [e for e in entries if e["action"] == "auth.refused" and e.get("reason") == why]


# -- hostile input --------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
numbers = st.one_of(
    st.floats(),
    st.integers(-(10**30), 10**30),
    st.just(10**400),  # a JSON integer beyond any float
)
out_of_range = st.floats().filter(lambda v: not 0 <= v <= 300)  # the setpoint's range
points = st.one_of(
    st.sampled_from([SETPOINT, TEMPERATURE, "line1/oven1/running", "x", ""]),
    st.text(max_size=300),
)


def proposal_bodies(values: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    """Bodies for POST /proposals, well-formed often enough to reach the engine."""
    return st.fixed_dictionaries(
        {
            "point": points,
            "value": values,
            "reason": st.text(min_size=1, max_size=40) | st.text(max_size=3000) | json_values,
        },
        optional={
            "idempotency_key": st.text(max_size=300) | json_values,
            "comment": json_values,
        },
    ).map(lambda v: json.dumps(v).encode())


junk = st.one_of(json_values.map(lambda v: json.dumps(v).encode()), st.binary(max_size=200))
header_text = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=80
)
ids = st.one_of(
    st.text(max_size=80),
    st.just("p-000000-1"),
    st.integers().map(str),
    st.text(alphabet="./%-_~", min_size=1, max_size=20),
    st.just("x" * 9000),
)
HOSTILE = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _assert_sane(status: int, content_type: str, body: bytes) -> None:
    event(f"HTTP {status}")  # --hypothesis-show-statistics: which answers were reached
    assert status < 500, body[:300]
    if content_type == "application/json" and status >= 400:
        assert "error" in json.loads(body)


@pytest.mark.slow
@on_gateway
@HOSTILE
@given(
    who_body=st.one_of(
        # A viewer of another area: a well-formed proposal is recorded as a rejection.
        st.tuples(st.just("reader"), proposal_bodies(numbers | json_values) | junk),
        # An agent, with values outside the setpoint's range: rejected before any simulation,
        # so nothing waits and nothing is written.
        st.tuples(st.just("agent1"), proposal_bodies(out_of_range)),
    )
)
async def test_hostile_proposals_never_get_a_5xx(site: Site, who_body):
    who, body = who_body
    response = await site.client.post("/proposals", data=body, headers=site.headers[who])
    _assert_sane(response.status, response.content_type, await response.read())
    assert response.status in (201, 400, 403, 404), await response.text()


@pytest.mark.slow
@on_gateway
@HOSTILE
@given(
    body=junk
    | proposal_bodies(numbers)
    | st.fixed_dictionaries(
        {}, optional={"comment": st.text(max_size=2100), "reason": st.text(max_size=2100)}
    ).map(lambda v: json.dumps(v).encode()),
    action=st.sampled_from(["approve", "reject", "rollback"]),
    proposal_id=st.sampled_from(["p-000000-1", "known"]),
)
async def test_hostile_decision_bodies_never_get_a_5xx(site: Site, body, action, proposal_id):
    if proposal_id == "known":  # a real proposal, finished long ago: 400, 403 or 409
        assert site.gateway.engine is not None
        recent = site.gateway.engine.recent(status="rejected", limit=1)
        proposal_id = recent[0].id if recent else "p-000000-1"
    # An executor: may roll back (409: not a succeeded write), may not approve or reject (403).
    response = await site.client.post(
        f"/proposals/{proposal_id}/{action}", data=body, headers=site.headers["exec1"]
    )
    _assert_sane(response.status, response.content_type, await response.read())


@pytest.mark.slow
@on_gateway
@HOSTILE
@given(
    name=header_text,
    value=header_text,
    auth=st.one_of(
        header_text,
        header_text.map(lambda t: f"Bearer {t}"),
        st.tuples(st.text(max_size=30), st.text(max_size=30)).map(lambda p: basic(*p)),
        st.binary(max_size=60).map(lambda b: "Basic " + base64.b64encode(b).decode()),
    ),
    method=st.sampled_from(["GET", "POST"]),
)
async def test_hostile_headers_never_get_a_5xx(site: Site, name, value, auth, method):
    headers = {"Authorization": auth}
    if name.strip() and name.isascii() and name.isprintable() and ":" not in name:
        headers[name.strip().replace(" ", "-")] = value
    response = await site.client.request(method, "/proposals", headers=headers)
    _assert_sane(response.status, response.content_type, await response.read())
    assert response.status in (400, 401, 403, 404, 429) or response.status < 300


@pytest.mark.slow
@on_gateway
@HOSTILE
@given(
    proposal_id=ids,
    action=st.sampled_from(["", "/approve", "/reject", "/rollback", "/other"]),
    query=st.dictionaries(st.sampled_from(["status", "limit", "x"]), st.text(max_size=30)),
)
async def test_hostile_ids_and_queries_never_get_a_5xx(site: Site, proposal_id, action, query):
    path = "/proposals/" + urllib.parse.quote(proposal_id, safe="") + action
    method = "GET" if action == "" else "POST"
    response = await site.client.request(method, path, headers=site.headers["alice"])
    _assert_sane(response.status, response.content_type, await response.read())
    listing = await site.client.get(
        "/proposals?" + urllib.parse.urlencode(query), headers=site.headers["agent1"]
    )
    _assert_sane(listing.status, listing.content_type, await listing.read())


@pytest.mark.slow
@on_gateway
async def test_the_audit_chain_holds_after_everything(site: Site):
    control = site.gateway.control
    assert control is not None
    await control.write_async(lambda conn: None)  # everything queued before is committed
    result = await asyncio.to_thread(AuditLog(control).verify)
    assert result.ok, result.describe()
