"""Read access and credentials on the whole HTTP app (gateway/aiw/auth.py), on a real gateway.

The gateway has only pushed (`driver: http`) points, so it starts in a moment with no plant;
users and tokens are real ones in its control.db, and every request goes over a real socket.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import yaml
from aiohttp.test_utils import TestClient, TestServer
from tests_support import account_headers, eventually

from gateway.aiw.auth import AUTHENTICATOR
from gateway.app import Gateway
from gateway.config import parse_config
from gateway.control.audit import AuditLog
from gateway.http import create_app
from gateway.http_proposals import PROPOSAL_ROUTES, LoginRation

TEMP = "lab/bench1/temp"
OTHER = "lab/bench2/temp"
PASSWORD = "correct horse battery"
ACCOUNTS: dict[str, tuple[str, list[str]]] = {
    "vic": ("token", ["viewer"]),
    "bench1": ("token", ["viewer:lab/bench1/*"]),
    "olga": ("user", ["viewer"]),
}


def site_config(tmp: Path, read_access: str) -> Any:
    data = {
        "site_id": "lab",
        "gateway_id": "gw-auth",
        "storage": {"path": str(tmp / "twin.db")},
        "http": {"read_access": read_access},
        "opcua_server": {"enabled": False},
        "devices": [
            {
                "name": "benches",
                "driver": "http",
                "points": [
                    {"id": TEMP, "datatype": "float64", "unit": "°C"},
                    {"id": OTHER, "datatype": "float64", "unit": "°C"},
                ],
            }
        ],
    }
    return parse_config(yaml.safe_dump(data), source="test")


@dataclass
class Site:
    gateway: Gateway
    client: TestClient
    headers: dict[str, dict[str, str]]

    async def get(self, path: str, who: str | None = None) -> tuple[int, Any, Any]:
        response = await self.client.get(path, headers=self.headers[who] if who else {})
        assert response.content_type == "application/json", await response.text()
        return response.status, await response.json(), response.headers

    def audit_entries(self) -> list[dict[str, Any]]:
        assert self.gateway.control is not None
        return [json.loads(r.entry) for r in AuditLog(self.gateway.control).tail(1000)]

    async def audited(self) -> list[dict[str, Any]]:
        """Every audit entry, once everything queued before has been written."""
        assert self.gateway.control is not None
        await self.gateway.control.write_async(lambda conn: None)
        return await asyncio.to_thread(self.audit_entries)


async def _site(tmp: Path, read_access: str) -> AsyncIterator[Site]:
    gateway = Gateway(site_config(tmp, read_access))
    async with TestClient(TestServer(create_app(gateway))) as client:
        accounts = gateway.accounts
        assert accounts is not None
        headers = await account_headers(accounts, ACCOUNTS, PASSWORD)
        headers["forged"] = {"Authorization": "Bearer otw_not-a-token"}
        headers["garbled"] = {"Authorization": "Bearer a b c"}
        yield Site(gateway, client, headers)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def token_site(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Site]:
    async for site in _site(tmp_path_factory.mktemp("token-reads"), "token"):
        yield site


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def open_site(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Site]:
    async for site in _site(tmp_path_factory.mktemp("open-reads"), "open"):
        yield site


@pytest.fixture(autouse=True)
def fresh_rations(request: pytest.FixtureRequest) -> None:
    """Every test starts with no refused logins counted against 127.0.0.1."""
    for name in ("token_site", "open_site"):
        if name in request.fixturenames:
            site = request.getfixturevalue(name)
            authenticator = site.client.app[AUTHENTICATOR]
            authenticator.password_ration = LoginRation(max_failures=10, window_s=60.0)
            authenticator.token_ration = LoginRation(max_failures=30, window_s=60.0)


on_gateway = pytest.mark.asyncio(loop_scope="module")

SITE_WIDE_READS = ["/twin", "/diff?since=0", "/schemas", "/openapi.json"]


@on_gateway
@pytest.mark.parametrize("path", [*SITE_WIDE_READS, f"/twin/{TEMP}"])
async def test_token_reads_need_credentials(token_site: Site, path: str):
    status, body, headers = await token_site.get(path)
    assert status == 401
    assert "Bearer" in body["error"]
    assert any(c.startswith("Bearer") for c in headers.getall("WWW-Authenticate"))


@on_gateway
@pytest.mark.parametrize("path", [*SITE_WIDE_READS, f"/twin/{TEMP}"])
@pytest.mark.parametrize("who", ["vic", "olga"])
async def test_token_reads_pass_with_a_viewers_token_or_password(token_site, path, who):
    status, _, _ = await token_site.get(path, who)
    assert status == 200


@on_gateway
@pytest.mark.parametrize("path", ["/health", "/.well-known/aiw-manifest.json"])
async def test_health_and_the_manifest_stay_open(token_site: Site, path: str):
    status, _, _ = await token_site.get(path)
    assert status == 200


@on_gateway
@pytest.mark.parametrize("who", ["forged", "garbled"])
async def test_refused_credentials_get_the_same_401_as_none(token_site: Site, who: str):
    status, body, _ = await token_site.get("/twin", who)
    none_status, none_body, _ = await token_site.get("/twin")
    assert (status, body) == (none_status, none_body) == (401, none_body)


@on_gateway
async def test_a_scoped_viewer_reads_its_points_only_and_denials_are_audited(token_site: Site):
    status, point, _ = await token_site.get(f"/twin/{TEMP}", "bench1")
    assert (status, point["id"]) == (200, TEMP)
    status, _, _ = await token_site.get(f"/telemetry/query?point={TEMP}", "bench1")
    assert status == 200

    status, body, _ = await token_site.get(f"/twin/{OTHER}", "bench1")
    assert status == 403 and "outside" in body["error"] and OTHER in body["error"]
    status, _, _ = await token_site.get(f"/telemetry/aggregate?point={OTHER}", "bench1")
    assert status == 403
    # The whole twin is a site-wide read: a grant on one bench does not cover it.
    status, body, _ = await token_site.get("/twin", "bench1")
    assert status == 403 and "the whole site" in body["error"]

    entries = await token_site.audited()
    denials = [e for e in entries if e["action"] == "access.read" and e["actor"] == "bench1"]
    assert {(e.get("target"), e["decision"]) for e in denials} == {
        (OTHER, "denied"),
        (None, "denied"),
    }, "denials are audited; the two allowed reads are not"


@on_gateway
async def test_allowed_reads_add_no_audit_rows(token_site: Site):
    before = len(await token_site.audited())
    for _ in range(20):  # a UI polling the twin
        assert (await token_site.get("/twin", "vic"))[0] == 200
    assert len(await token_site.audited()) == before


@on_gateway
async def test_refused_logins_on_reads_are_audited_and_rationed_with_every_route(
    token_site: Site,
):
    app = token_site.client.app
    # One authenticator for the whole app: the proposal routes' rations are the reads'.
    assert app[PROPOSAL_ROUTES].token_ration is app[AUTHENTICATOR].token_ration
    app[AUTHENTICATOR].token_ration = LoginRation(max_failures=2, window_s=600.0)
    for _ in range(2):
        assert (await token_site.get("/twin", "forged"))[0] == 401
    status, body, headers = await token_site.get("/proposals", "vic")
    assert status == 429 and int(headers["Retry-After"]) > 500, body
    await eventually(
        lambda: any(
            e["action"] == "auth.refused" and e["details"]["via"] == "http"
            for e in token_site.audit_entries()
        ),
        what="the refused token audited",
    )


@on_gateway
async def test_an_unknown_path_is_404_not_401(token_site: Site):
    response = await token_site.client.get("/no/such/thing")
    assert response.status == 404


@on_gateway
async def test_open_reads_need_nothing_but_proposals_and_actions_still_do(open_site: Site):
    for path in [*SITE_WIDE_READS, f"/twin/{TEMP}", f"/telemetry/query?point={TEMP}"]:
        status, _, _ = await open_site.get(path)
        assert status == 200, path
    for path in ["/proposals", "/actions"]:
        status, _, _ = await open_site.get(path)
        assert status == 401, path
        status, _, _ = await open_site.get(path, "vic")
        assert status == 200, path
