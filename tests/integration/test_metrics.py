"""`GET /metrics` on a real gateway reading the simulated oven PLC (real OPC UA, ticking): it
parses with prometheus-client's own parser, follows Prometheus' naming, and its counters move
as the plant runs, as requests are answered and as the gate decides."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer
from aiw_support import SETPOINT, aiw_site_config, make_tokens
from prometheus_client.parser import text_string_to_metric_families
from tests_support import eventually

from gateway.app import Gateway
from gateway.http import create_app
from gateway.metrics import CONTENT_TYPE_LATEST
from plantsim import OvenDevice

pytestmark = pytest.mark.asyncio(loop_scope="module")

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@dataclass
class Site:
    client: TestClient
    gateway: Gateway
    tokens: dict[str, dict[str, str]]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def site(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Site]:
    async with OvenDevice(seed=3, tick_hz=10) as oven:
        tmp: Path = tmp_path_factory.mktemp("metrics")
        gateway = Gateway(aiw_site_config(tmp, oven.port))
        async with TestClient(TestServer(create_app(gateway))) as client:
            tokens = await make_tokens(gateway)
            await eventually(lambda: gateway.store.stats.accepted > 20, what="samples")
            yield Site(client, gateway, tokens)


async def scrape(client: TestClient) -> Samples:
    async with client.get("/metrics") as answer:
        assert answer.status == 200
        assert answer.headers["Content-Type"] == CONTENT_TYPE_LATEST
        text = await answer.text()
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        assert family.name.startswith("opstwin_"), family.name
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


async def test_metrics_parse_and_their_counters_move_as_the_plant_runs(site: Site) -> None:
    client = site.client
    first = await scrape(client)
    assert value(first, "opstwin_device_state", device="oven-plc", state="CONNECTED") == 1.0
    assert value(first, "opstwin_device_state", device="oven-plc", state="BACKOFF") == 0.0
    assert value(first, "opstwin_device_connects_total", device="oven-plc") >= 1
    assert value(first, "opstwin_database_bytes") > 0
    used = value(first, "opstwin_database_used_bytes")
    assert 0 < used <= value(first, "opstwin_database_bound_bytes")
    assert value(first, "opstwin_storage_bound_episodes_total") == 0
    await asyncio.sleep(1.5)
    second = await scrape(client)
    for name, labels in (
        ("opstwin_device_samples_total", {"device": "oven-plc"}),
        ("opstwin_twin_rev", {}),
        ("opstwin_twin_samples_accepted_total", {}),
        ("opstwin_writer_commits_total", {}),
        ("opstwin_writer_commit_seconds_count", {}),
    ):
        assert value(second, name, **labels) > value(first, name, **labels), name
    # The commit latency is a histogram: cumulative buckets ending in +Inf, which is the count.
    les = sorted(
        (float(dict(key[1])["le"]), n)
        for key, n in second.items()
        if key[0] == "opstwin_writer_commit_seconds_bucket"
    )
    assert [n for _, n in les] == sorted(n for _, n in les)
    assert les[-1] == (math.inf, value(second, "opstwin_writer_commit_seconds_count"))
    assert value(second, "opstwin_writer_longest_step_seconds") >= 0
    # Every answered request is counted under its route's template, with its status.
    requests = "opstwin_http_requests_total"
    assert value(second, requests, route="/metrics", method="GET", status="200") >= 1
    async with client.get("/twin/no/such/point") as answer:
        assert answer.status == 404
    async with client.get("/no-such-page") as answer:
        assert answer.status == 404
    third = await scrape(client)
    assert value(third, requests, route="/twin/{point_id}", method="GET", status="404") == 1
    assert value(third, requests, route="unmatched", method="GET", status="404") >= 1


async def test_decisions_and_simulations_are_counted(site: Site) -> None:
    before = await scrape(site.client)
    current = site.gateway.store.get(SETPOINT).value
    async with site.client.post(
        "/proposals",
        json={"point": SETPOINT, "value": current - 2, "reason": "metrics test"},
        headers=site.tokens["agent1"],
    ) as answer:
        assert answer.status == 201, await answer.text()
        decided = (await answer.json())["decision"]
    after = await scrape(site.client)
    key = ("opstwin_decisions_total", (("decision", decided),))
    assert after[key] == before.get(key, 0) + 1
    runs = "opstwin_simulations_total"
    assert value(after, runs) == value(before, runs) + 1
    assert value(after, "opstwin_simulation_seconds_total") > value(
        before, "opstwin_simulation_seconds_total"
    )
