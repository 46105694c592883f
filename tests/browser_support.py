"""The web UI's browser tests: a real gateway on a real socket, Debian's Chromium driven by
Playwright, pages that record every request they make, screenshots, and the login form.

Plain async context managers and functions (as in tests_support.py); a test module wraps them in
its own fixtures, with the loop scope its gateway lives in (Playwright's objects belong to the
event loop that made them):

    @pytest_asyncio.fixture(scope="module", loop_scope="module")
    async def site(tmp_path_factory):
        async with web_gateway(tmp_path_factory.mktemp("web")) as gateway:
            yield gateway

The browser is /usr/bin/chromium (scripts/bootstrap installs it); Playwright never downloads one.
Screenshots go to test-results/web/ at the repo root, named after the test that took them.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from aiw_support import SETPOINT, aiw_site_config
from playwright.async_api import Browser, BrowserContext, Page, Response, async_playwright
from tests_support import eventually

from drivers.contract import Quality
from gateway.app import Gateway
from gateway.control.users import parse_grant
from gateway.http import create_app
from gateway.netguard import body_timeout
from gateway.policy.engine import PolicyEngine
from gateway.web.security import WEB, WebState
from plantsim import OvenDevice

__all__ = [
    "CHROMIUM",
    "PASSWORD",
    "RESULTS",
    "SETPOINT",
    "TOKENS",
    "USERS",
    "BrowserPage",
    "WebGateway",
    "chromium",
    "chromium_executable",
    "csrf_of",
    "recorded_page",
    "screenshot",
    "ui_login",
    "web_gateway",
]

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "test-results" / "web"
CHROMIUM = Path("/usr/bin/chromium")
# Background networking off: Chromium's own calls home (component updates, safe browsing) would
# be requests to other hosts that no page made, and a factory network has no route for them.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-background-networking"]
PASSWORD = "correct horse battery"
# name -> grant specs; each a control.db user with PASSWORD.
USERS: dict[str, list[str]] = {
    "sam": ["supervisor"],
    "vera": ["viewer"],
    "ada": ["admin"],
}
# name -> grant specs; each an API token (its secret in WebGateway.tokens).
TOKENS: dict[str, list[str]] = {"agent1": ["agent:line1/*"]}


@dataclass
class WebGateway:
    """A running gateway with its UI on `base` (http://127.0.0.1:PORT)."""

    gateway: Gateway
    server: TestServer
    base: str
    tokens: dict[str, str]
    oven: OvenDevice  # the simulated PLC itself: what a device really holds, not the twin

    @property
    def engine(self) -> PolicyEngine:
        """The gateway's running policy engine."""
        engine = self.gateway.engine
        assert engine is not None, "the gateway runs without its policy engine"
        return engine

    @property
    def netloc(self) -> str:
        """`127.0.0.1:PORT`: the one host and port the pages may ask anything of."""
        return urlsplit(self.base).netloc

    @property
    def web(self) -> WebState:
        """The UI's state on the app (sessions, the first-admin link)."""
        return self.server.app[WEB]

    async def api(
        self, method: str, path: str, *, token: str | None = None, json: Any = None
    ) -> tuple[int, Any]:
        """One JSON API call over a fresh connection, with `token`'s Bearer header if given."""
        headers = {"Authorization": f"Bearer {self.tokens[token]}"} if token else {}
        async with (
            aiohttp.ClientSession() as session,
            session.request(method, self.base + path, json=json, headers=headers) as response,
        ):
            assert response.content_type == "application/json", await response.text()
            return response.status, await response.json()

    async def pending_proposal(self, value_offset: float = -2.0) -> dict[str, Any]:
        """An agent's proposal to move the oven's setpoint, waiting for a person's approval.

        -2 °C: the oven policy's simulation judges it safe, and an agent may not execute, so it
        waits in `pending_approval`; +5 °C would fail the simulation (`pending_analysis`).
        """
        current = self.gateway.store.get(SETPOINT).value
        assert isinstance(current, float), current
        status, body = await self.api(
            "POST",
            "/proposals",
            token="agent1",
            json={
                "point": SETPOINT,
                "value": current + value_offset,
                "reason": "browser test: cool the oven a little",
            },
        )
        assert status == 201, body
        # An agent may propose, never execute: the gate leaves it to a supervisor.
        assert body["status"] == "pending_approval", body
        return dict(body)


@asynccontextmanager
async def web_gateway(
    tmp: Path,
    *,
    users: Mapping[str, list[str]] = USERS,
    tokens: Mapping[str, list[str]] = TOKENS,
    read_access: Literal["open", "token"] = "token",
) -> AsyncIterator[WebGateway]:
    """A gateway reading the simulated oven PLC over real OPC UA, served on 127.0.0.1.

    `users` get PASSWORD; with `users={}` control.db holds no admin, so the gateway makes the
    one-time first-admin link at start (`WebGateway.web.setup`). `read_access` defaults to
    `token`, the stricter mode: the pages' live updates then read with the session alone.
    """
    async with OvenDevice(seed=4, tick_hz=0) as oven:
        gateway = Gateway(aiw_site_config(tmp, oven.port, read_access=read_access))
        app = create_app(gateway)
        # As `opstwin run` (gateway/serve.py) has it: every body is read, bounded, first.
        app.middlewares.append(body_timeout(gateway.config.http.body_timeout_s))
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        try:
            accounts = gateway.accounts
            assert accounts is not None, "the gateway started without control.db"
            for name, specs in users.items():
                grants = [parse_grant(spec) for spec in specs]
                await asyncio.to_thread(accounts.add_user, name, PASSWORD, grants)
            secrets: dict[str, str] = {}
            for name, specs in tokens.items():
                grants = [parse_grant(spec) for spec in specs]
                secrets[name] = (
                    await asyncio.to_thread(accounts.create_token, name, grants)
                ).secret
            await eventually(lambda: _oven_good(gateway), what="every oven point GOOD")
            base = str(server.make_url("")).rstrip("/")
            yield WebGateway(gateway, server, base, secrets, oven)
        finally:
            await server.close()


def _oven_good(gateway: Gateway) -> bool:
    _, values = gateway.store.snapshot()
    return all(v.quality is Quality.GOOD for p, v in values.items() if p.startswith("line1/oven1/"))


def chromium_executable() -> str:
    """Debian's Chromium; the test fails (never skips) without it."""
    if not CHROMIUM.is_file() or not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"{CHROMIUM} is missing: the web UI's browser tests drive Debian's Chromium. "
            "Run scripts/bootstrap (it installs the `chromium` package); Playwright must not "
            "download a browser of its own.",
            pytrace=False,
        )
    return str(CHROMIUM)


@asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    """A headless Chromium, closed on exit."""
    executable = chromium_executable()
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


@dataclass
class BrowserPage:
    """A page in a fresh browser context (its own cookies), and everything it did."""

    page: Page
    context: BrowserContext
    requests: list[str] = field(default_factory=list)  # every URL the browser asked for
    responses: list[Response] = field(default_factory=list)
    console: list[str] = field(default_factory=list)  # "type: text", page errors included

    def foreign_requests(self, netloc: str) -> list[str]:
        """The requested URLs that went anywhere but http://`netloc`."""
        return [
            url
            for url in self.requests
            if urlsplit(url).scheme != "http" or urlsplit(url).netloc != netloc
        ]


@asynccontextmanager
async def recorded_page(browser: Browser) -> AsyncIterator[BrowserPage]:
    """A page whose requests, responses and console messages are recorded; closed on exit."""
    context = await browser.new_context()
    page = await context.new_page()
    recorded = BrowserPage(page, context)
    # On the context, not the page: a worker or a popup would make requests of its own.
    context.on("request", lambda request: recorded.requests.append(request.url))
    context.on("response", lambda response: recorded.responses.append(response))
    page.on("console", lambda message: recorded.console.append(f"{message.type}: {message.text}"))
    page.on("pageerror", lambda error: recorded.console.append(f"pageerror: {error}"))
    try:
        yield recorded
    finally:
        await context.close()


async def screenshot(page: Page, name: str) -> Path:
    """Save a full-page PNG as test-results/web/<test>-<name>.png; return its path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{_current_test()}-{_safe(name)}.png"
    await page.screenshot(path=path, full_page=True)
    return path


def _current_test() -> str:
    # "tests/integration/test_x.py::test_name[param] (call)" -> "test_name[param]"
    current = os.environ.get("PYTEST_CURRENT_TEST", "no-test")
    return _safe(current.split("::")[-1].rsplit(" ", 1)[0])


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\[\]-]+", "_", name)


async def ui_login(page: Page, base: str, name: str, password: str) -> Response:
    """Log in through the real form; return the answer to its POST (303 when it worked)."""
    await page.goto(f"{base}/ui/login")
    form = page.locator("form[action='/ui/login']")
    await form.locator("input[name=name]").fill(name)
    await form.locator("input[name=password]").fill(password)
    async with page.expect_response(
        lambda r: urlsplit(r.url).path == "/ui/login" and r.request.method == "POST"
    ) as answer:
        await form.locator("button[type=submit]").click()
    await page.wait_for_load_state()
    return await answer.value


async def csrf_of(page: Page) -> str:
    """The CSRF token the current page's forms post back."""
    token = await page.locator("input[name=csrf]").first.get_attribute("value")
    assert token, f"no CSRF token on {page.url}"
    return token
