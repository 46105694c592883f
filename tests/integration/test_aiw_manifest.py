"""The AIW manifest, `/schemas` and `/openapi.json` on a running gateway, over a real socket.

The gateway reads the simulated oven PLC over OPC UA, with the repo's oven policies and one pushed
(`driver: http`) device (tests/aiw_support.py). What is checked is what an agent relies on: every
endpoint the manifest lists is served and answers, every schema it lists is served, the OpenAPI
document describes exactly the routes the app serves, and `http.read_access: token` shows in
all three and is enforced on them (the manifest itself stays open).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio
import schemathesis
from aiohttp.test_utils import TestClient, TestServer
from aiw_support import PUSHED, SETPOINT, aiw_site_config, make_tokens
from tests_support import eventually

from gateway.aiw.events import twin_id
from gateway.aiw.openapi import OPERATIONS, served_routes, undocumented_routes
from gateway.aiw.schemas import SCHEMA_BASE, SCHEMAS, schema_document
from gateway.aiw.stream import DIFF_MAX_LIMIT
from gateway.app import Gateway
from gateway.http import create_app
from plantsim import OvenDevice

pytestmark = pytest.mark.slow
on_gateway = pytest.mark.asyncio(loop_scope="module")

MANIFEST = "/.well-known/aiw-manifest.json"


@dataclass
class Site:
    gateway: Gateway
    client: TestClient
    headers: dict[str, dict[str, str]]

    async def get(self, path: str, who: str | None = None, **kwargs: Any) -> tuple[int, Any]:
        headers = self.headers[who] if who else {}
        response = await self.client.get(path, headers=headers, **kwargs)
        assert response.content_type == "application/json", (path, await response.text())
        return response.status, await response.json()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def site(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Site]:
    async with OvenDevice(seed=4, tick_hz=0) as oven:
        gateway = Gateway(aiw_site_config(tmp_path_factory.mktemp("manifest"), oven.port))
        async with TestClient(TestServer(create_app(gateway))) as client:
            headers = await make_tokens(gateway)
            await eventually(lambda: gateway.engine is not None, what="the policy engine")
            yield Site(gateway, client, headers)


@on_gateway
async def test_the_manifest_describes_this_gateway(site: Site):
    status, manifest = await site.get(MANIFEST)
    assert status == 200
    config = site.gateway.config
    assert manifest["aiw_version"] == "0.3"
    assert manifest["service"]["id"] == twin_id(config.site_id, config.gateway_id)
    assert manifest["service"]["name"] == "opstwin-gateway" and manifest["service"]["version"]
    assert manifest["site_type"] == "manufacturing"
    assert manifest["auth"] == {
        "read": "open",
        "write": "token",
        "action": "token",
        "schemes": ["bearer", "basic"],
    }
    assert manifest["schemas"] == list(SCHEMAS)
    limits = manifest["limits"]
    assert limits["diff_max_limit"] == DIFF_MAX_LIMIT
    assert limits["ingest_max_items"] == 10_000
    assert limits["max_subscribers"] == config.http.max_subscribers
    assert limits["history_max_rows"] == limits["aggregate_max_buckets"] == 10_000
    assert all(isinstance(v, int | float) and v > 0 for v in limits.values()), limits
    # Relative URLs only: the manifest cannot know the name a proxy serves it under.
    assert all(url.startswith("/") and "//" not in url for url in manifest["endpoints"].values())


@on_gateway
async def test_every_endpoint_the_manifest_lists_is_served_and_answers(site: Site):
    _, manifest = await site.get(MANIFEST)
    endpoints: dict[str, str] = manifest["endpoints"]
    described = {op.name: (method, path) for (method, path), op in OPERATIONS.items()}
    served = served_routes(site.client.app)
    assert set(endpoints) == set(described), "every route is in the manifest, and no other"
    status, proposal = await site_propose(site)
    assert status == 201, proposal
    fill = {"{point_id}": SETPOINT, "{name}": "twin.v1", "{id}": proposal["id"]}
    fill["{action_id}"] = proposal["id"]
    for name, template in endpoints.items():
        method, path = described[name]
        assert template == path and (method, path) in served, name
        if method != "GET" or name == "subscribe":
            continue  # writes are exercised in their own tests; the stream below
        url = template
        for key, value in fill.items():
            url = url.replace(key, value)
        params = {"point": PUSHED} if name.startswith("telemetry") else {}
        if name == "diff":
            params = {"since": "0"}
        response = await site.client.get(url, params=params, headers=site.headers["admin1"])
        # The action id names a proposal that wrote nothing yet: a 404 saying so, in JSON.
        expected = 404 if name == "action" else 200
        assert response.status == expected, (name, url, await response.text())
        # Everything answers JSON but the Prometheus exposition, which is its own format.
        media = "text/plain" if name == "metrics" else "application/json"
        assert response.content_type == media, name


async def site_propose(site: Site) -> tuple[int, Any]:
    # An agent's proposal waits for approval: a real id, and nothing written to the PLC.
    response = await site.client.post(
        "/proposals",
        json={"point": SETPOINT, "value": 178.0, "reason": "manifest test"},
        headers=site.headers["agent1"],
    )
    return response.status, await response.json()


@on_gateway
async def test_every_schema_the_manifest_lists_is_served(site: Site):
    _, manifest = await site.get(MANIFEST)
    status, index = await site.get("/schemas")
    assert status == 200
    assert [entry["name"] for entry in index["schemas"]] == manifest["schemas"]
    for entry in index["schemas"]:
        name = entry["name"]
        assert entry["id"] == SCHEMA_BASE + name
        assert entry["url"] == manifest["endpoints"]["schema"].replace("{name}", name)
        status, document = await site.get(entry["url"])
        assert status == 200 and document == schema_document(name)


@on_gateway
@pytest.mark.parametrize("name", ["nope", "TWIN.V1", "twin.v1 ", "twin.v1\x00", "é" * 300])
async def test_an_unknown_schema_is_a_json_404_naming_the_known_ones(site: Site, name: str):
    status, body = await site.get(f"/schemas/{name}")
    assert status == 404
    assert "twin.v1" in body["error"] and "/schemas" in body["error"]
    assert len(body["error"]) < 400, "a long name is not echoed whole"


@on_gateway
async def test_the_openapi_document_describes_exactly_the_routes_served(site: Site):
    app = site.client.app
    assert undocumented_routes(app) == set(), "describe it in gateway/aiw/openapi.py OPERATIONS"
    assert set(OPERATIONS) == served_routes(app), "OPERATIONS describes a route not served"
    status, document = await site.get("/openapi.json")
    assert status == 200 and document["openapi"].startswith("3.1.")
    in_document = {
        (method.upper(), path) for path, item in document["paths"].items() for method in item
    }
    assert in_document == served_routes(app)
    # A valid OpenAPI 3.1 document: schemathesis checks it against the specification's schema.
    schemathesis.openapi.from_dict(document).validate()
    for path, item in document["paths"].items():
        for method, operation in item.items():
            where = f"{method.upper()} {path}"
            assert operation["summary"] and operation["responses"], where
            declared = {p["name"] for p in operation.get("parameters", []) if p["in"] == "path"}
            assert declared == set(_path_names(path)), where
            errors = [code for code in operation["responses"] if code >= "400"]
            for code in errors:
                schema = operation["responses"][code]["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/ErrorBody"} or code == "410", where
            needs = operation["security"]
            if (method.upper(), path) in {("GET", "/health"), ("GET", MANIFEST)}:
                assert needs == [], where
            elif path.startswith(("/proposals", "/actions", "/rollback", "/sim", "/telemetry/in")):
                assert needs and "401" in operation["responses"], where
            else:
                assert needs == [], f"{where}: reads are open with read_access: open"


def _path_names(path: str) -> list[str]:
    return [part[1:-1] for part in path.split("/") if part.startswith("{")]


@on_gateway
async def test_the_documents_examples_name_real_points(site: Site):
    _, document = await site.get("/openapi.json")
    propose = document["paths"]["/proposals"]["post"]["requestBody"]["content"]
    example = propose["application/json"]["example"]
    assert example["point"] == SETPOINT
    ingest = document["paths"]["/telemetry/ingest"]["post"]["requestBody"]["content"]
    assert ingest["application/json"]["example"]["items"][0]["point"] == PUSHED


@on_gateway
@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/no/such/route", 404),
        ("GET", "/twin/line1%0Aoven1", 404),  # a newline matches no point id route
        ("DELETE", "/twin", 405),
        ("PUT", "/proposals", 405),
    ],
)
async def test_what_aiohttp_refuses_is_json_too(site: Site, method: str, path: str, status: int):
    response = await site.client.request(method, path)
    assert response.status == status
    assert response.content_type == "application/json"
    message = (await response.json())["error"]
    if status == 404:
        assert "/openapi.json" in message, message
    else:
        assert "allowed" in message and "GET" in response.headers["Allow"], message


# -- http.read_access: token -----------------------------------------------------------------------


@pytest_asyncio.fixture(loop_scope="module")
async def token_site(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Site]:
    async with OvenDevice(seed=4, tick_hz=0) as oven:
        config = aiw_site_config(tmp_path_factory.mktemp("token"), oven.port, read_access="token")
        gateway = Gateway(config)
        async with TestClient(TestServer(create_app(gateway))) as client:
            yield Site(gateway, client, await make_tokens(gateway))


@on_gateway
async def test_token_reads_show_in_the_manifest_and_the_document(token_site: Site):
    status, manifest = await token_site.get(MANIFEST)
    assert status == 200, "the manifest stays open: it says how to authenticate"
    assert manifest["auth"]["read"] == "token"
    for path in ("/openapi.json", "/schemas", "/schemas/twin.v1"):
        status, body = await token_site.get(path)
        assert status == 401 and "Bearer" in body["error"], path
    status, document = await token_site.get("/openapi.json", "viewer1")
    assert status == 200
    twin = document["paths"]["/twin"]["get"]
    assert twin["security"] == [{"bearer": []}, {"basic": []}]
    assert {"401", "403"} <= set(twin["responses"])
    assert document["paths"]["/health"]["get"]["security"] == []
    assert "token-only" in document["info"]["description"]
    status, _ = await token_site.get("/schemas/twin.v1", "viewer1")
    assert status == 200
