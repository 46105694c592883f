"""Schemathesis against a running gateway's own `/openapi.json`: no 5xx, no answer off its schema.

The gateway runs as `opstwin run` sets it up (the app, the body-timeout middleware, the guarded
listener on a free port) on the simulated oven PLC over real OPC UA, with the repo's oven
policies, in a thread of its own: schemathesis's calls are blocking `requests` calls from the
test's thread, over a real socket. Every request carries an admin token, so that the writes and
actions are exercised past authentication (the refusals without one are tested beside the
routes). Schemathesis loads the document over HTTP, generates requests for every operation
(valid ones, from the document's examples and schemas, and invalid ones), and checks each
answer: not a server error; status code, content type, headers and body as documented.

`/subscribe` is left out: a stream does not end, and a fuzzer waits for the end of an answer.
`test_subscribe_answers_as_documented` reads it instead, within the document's terms.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest
import requests
import schemathesis
import schemathesis.checks
from aiohttp import web
from aiw_support import SETPOINT, aiw_site_config, make_tokens
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from tests_support import eventually

from drivers.contract import Quality
from gateway.aiw.openapi import OPERATIONS
from gateway.aiw.schemas import schema_document
from gateway.app import Gateway
from gateway.http import create_app
from gateway.netguard import GuardedSite, body_timeout
from plantsim import OvenDevice

pytestmark = pytest.mark.slow

CHECKS = [
    schemathesis.checks.not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
START_TIMEOUT_S = 60.0
EXAMPLES = 25  # per operation and mode: ~1,000 requests in all


@dataclass
class Served:
    """A gateway serving HTTP from its own thread and event loop."""

    url: str
    gateway: Gateway
    headers: dict[str, dict[str, str]]  # token name -> Authorization header


@asynccontextmanager
async def serving(tmp: Path) -> AsyncIterator[tuple[str, Gateway, dict[str, dict[str, str]]]]:
    """The oven PLC and a gateway reading it, listening as `gateway.serve.serve` does."""
    async with AsyncExitStack() as stack:
        oven = await stack.enter_async_context(OvenDevice(seed=4, tick_hz=0))
        config = aiw_site_config(tmp, oven.port)
        gateway = Gateway(config)
        app = create_app(gateway)
        app.middlewares.append(body_timeout(config.http.body_timeout_s))
        runner = web.AppRunner(app, access_log=None, keepalive_timeout=10.0)
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        site = GuardedSite(runner, "127.0.0.1", 0, config.http.max_connections)
        await site.start()
        host, port = runner.addresses[0][:2]
        headers = await make_tokens(gateway)
        await eventually(lambda: oven_good(gateway), within=30, what="every oven point GOOD")
        yield f"http://{host}:{port}", gateway, headers


def oven_good(gateway: Gateway) -> bool:
    values = gateway.store.snapshot()[1]
    oven = [v for pid, v in values.items() if gateway.points[pid].device != "lab"]
    return all(v.quality is Quality.GOOD for v in oven)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="gateway-loop", daemon=True)
    thread.start()
    context = serving(tmp_path_factory.mktemp("aiw-fuzz"))
    try:
        url, gateway, headers = asyncio.run_coroutine_threadsafe(context.__aenter__(), loop).result(
            START_TIMEOUT_S
        )
        try:
            yield Served(url, gateway, headers)
        finally:
            asyncio.run_coroutine_threadsafe(context.__aexit__(None, None, None), loop).result(
                START_TIMEOUT_S
            )
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(START_TIMEOUT_S)
        loop.close()


@pytest.fixture(scope="module")
def api_schema(served: Served) -> Any:
    # Through the public loader, over HTTP, as any client of the document would.
    return schemathesis.openapi.from_url(
        f"{served.url}/openapi.json", headers=served.headers["admin1"], timeout=30
    )


# Every described route but the stream; a test below checks the document holds exactly these.
FUZZED = sorted(key for key in OPERATIONS if key != ("GET", "/subscribe"))
# Valid requests for every route; invalid ones where there is something to get wrong (a route
# that takes nothing has no invalid request: its headers are not ours to declare).
CASES = [
    pytest.param(method, path, mode, id=f"{method} {path} {mode}")
    for method, path in FUZZED
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    if mode is GenerationMode.POSITIVE
    or OPERATIONS[method, path].parameters
    or OPERATIONS[method, path].body is not None
]


# One test per operation and mode, not schemathesis's `from_fixture(...).parametrize()`: that
# integration (4.32) reads `Node._nodeid`, which pytest 9 no longer has. `as_strategy` is the
# same generation, driven by Hypothesis here.
@pytest.mark.parametrize(("method", "path", "mode"), CASES)
def test_operation_answers_as_its_document_says(
    api_schema: Any, served: Served, method: str, path: str, mode: GenerationMode
) -> None:
    try:
        operation = api_schema[path][method]
    except LookupError:
        pytest.fail(f"{method} {path} is described in OPERATIONS but not in /openapi.json")
    admin = served.headers["admin1"]

    def answers_as_documented(strategy: st.SearchStrategy[Any], examples: int) -> None:
        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            # A failure is reported as found, with schemathesis's curl line to replay it;
            # shrinking would cost minutes of requests on a loaded machine.
            phases=[Phase.explicit, Phase.generate],
            # The gateway shares two cores with the suite: slow answers are no health problem.
            suppress_health_check=list(HealthCheck),
        )
        @given(case=strategy)
        def call(case: Any) -> None:
            response = case.call(base_url=served.url, headers=admin, timeout=30)
            case.validate_response(response, checks=CHECKS)

        call()

    if mode is GenerationMode.POSITIVE:
        # The document's examples first: real points, so that the handlers get past 404.
        documented = api_schema.get_strategies_from_examples(operation)
        if documented:
            answers_as_documented(st.one_of(documented), 5)
    answers_as_documented(operation.as_strategy(generation_mode=mode), EXAMPLES)


def test_proposals_followed_through_their_links_answer_as_documented(
    api_schema: Any, served: Served
) -> None:
    # Stateful: a proposal's id, from its 201, fed to the operations its links name (show,
    # approve, reject, roll back, the action), in generated orders.
    admin = served.headers["admin1"]

    class FollowLinks(api_schema.exclude(path="/subscribe").as_state_machine()):  # type: ignore[misc]
        def before_call(self, case: Any) -> None:
            # A generated point is never one of ours: aim the proposals at the heater setpoint,
            # inside its range, so that they are judged and their links lead somewhere.
            body = case.body
            if case.operation.label == "POST /proposals" and isinstance(body, dict):
                value = body.get("value")
                step = value % 8 if isinstance(value, int | float) and math.isfinite(value) else 0
                body.update(point=SETPOINT, value=176.0 + step)

        def get_call_kwargs(self, case: Any) -> dict[str, Any]:
            return {"base_url": served.url, "headers": admin, "timeout": 30}

        def validate_response(self, response: Any, case: Any, *args: Any, **kwargs: Any) -> None:
            case.validate_response(response, checks=CHECKS)

    FollowLinks.run(
        settings=settings(
            max_examples=10,
            stateful_step_count=6,
            deadline=None,
            database=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
    )


def test_the_fuzzed_operations_are_the_documented_ones(api_schema: Any) -> None:
    documented = {
        (operation.method.upper(), operation.path)
        for result in api_schema.get_all_operations()
        for operation in [result.ok()]
    }
    # A schema loaded from a URL leaves out the operation that serves it: fuzzed all the same.
    assert documented - {("GET", "/subscribe")} == set(FUZZED) - {("GET", "/openapi.json")}


def test_subscribe_answers_as_documented(served: Served) -> None:
    document = requests.get(f"{served.url}/openapi.json", timeout=30).json()
    responses = document["paths"]["/subscribe"]["get"]["responses"]
    assert set(responses["200"]["content"]) == {"text/event-stream"}
    admin = served.headers["admin1"]

    refused = requests.get(f"{served.url}/subscribe", params={"since": "nonsense"}, timeout=30)
    assert refused.status_code == 400 and "400" in responses
    assert refused.headers["Content-Type"].startswith("application/json")
    assert "since" in refused.json()["error"]

    # From the oldest event kept: the start-up's events replay at once, each an event.v1.
    event_schema = jsonschema_rs.validator_for(schema_document("event.v1"))
    with requests.get(
        f"{served.url}/subscribe", params={"since": "0"}, headers=admin, stream=True, timeout=30
    ) as stream:
        assert stream.status_code == 200
        assert stream.headers["Content-Type"].startswith("text/event-stream")
        fields: dict[str, str] = {}
        for raw in stream.iter_lines():
            if raw:
                name, _, value = raw.decode().partition(": ")
                fields[name] = value
                continue
            if "data" in fields:
                break
            fields = {}
    event = json.loads(fields["data"])
    event_schema.validate(event)
    assert fields["id"] == event["id"] and fields["event"] == event["type"]
