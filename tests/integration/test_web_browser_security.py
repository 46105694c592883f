"""The web UI's locks, seen from a real browser: sessions, throttled logins, roles, CSRF and
Origin checks, the CSP, no request to any other host, and the one-time first-admin link.

Headless Chromium (Debian's, driven by Playwright) against one real gateway for the module: the
simulated oven PLC over real OPC UA, real users and an agent token in its control.db, every
request over a real socket. Each test saves screenshots under test-results/web/.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import pytest_asyncio
from browser_support import (
    PASSWORD,
    BrowserPage,
    WebGateway,
    chromium,
    csrf_of,
    recorded_page,
    screenshot,
    ui_login,
    web_gateway,
)
from playwright.async_api import Browser, Cookie

from gateway.aiw.auth import AUTHENTICATOR, Authenticator
from gateway.web.security import COOKIE

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def site(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[WebGateway]:
    async with web_gateway(tmp_path_factory.mktemp("web-security")) as gateway:
        yield gateway


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser(site: WebGateway) -> AsyncIterator[Browser]:
    # Depends on `site` so that it closes first: no page holds a live stream at server close.
    async with chromium() as browser:
        yield browser


@pytest_asyncio.fixture(loop_scope="module")
async def tab(site: WebGateway, browser: Browser) -> AsyncIterator[BrowserPage]:
    """A fresh browser context's page; every test starts logged out with no refused logins."""
    # All of the module's logins come from 127.0.0.1: the throttle test must not lock out the
    # tests after it. A fresh ration as the gateway makes it (10 refused a minute).
    site.server.app[AUTHENTICATOR].password_ration = Authenticator().password_ration
    async with recorded_page(browser) as tab:
        yield tab


async def session_cookie(tab: BrowserPage) -> Cookie | None:
    cookies = [c for c in await tab.context.cookies() if c.get("name") == COOKIE]
    return cookies[0] if cookies else None


async def status_of(site: WebGateway, proposal_id: str) -> str:
    status, body = await site.api("GET", f"/proposals/{proposal_id}", token="agent1")
    assert status == 200, body
    return str(body["status"])


# -- sessions --------------------------------------------------------------------------------------


async def test_login_sets_a_strict_http_only_session_and_logout_ends_it(
    site: WebGateway, tab: BrowserPage
) -> None:
    page = tab.page
    answer = await ui_login(page, site.base, "sam", PASSWORD)
    assert answer.status == 303
    assert page.url == f"{site.base}/ui/approvals"
    assert (await page.locator("header .who").inner_text()).strip() == "sam"
    await screenshot(page, "logged-in")

    cookie = await session_cookie(tab)
    assert cookie is not None, await tab.context.cookies()
    # Script on the page cannot read it, and no other site's link or form carries it.
    assert cookie["httpOnly"] is True
    assert cookie["sameSite"] == "Strict"
    assert cookie["path"] == "/"
    assert COOKIE not in await page.evaluate("document.cookie")

    await page.locator("form.logout button[type=submit]").click()
    await page.wait_for_url(f"{site.base}/ui/login")
    assert await session_cookie(tab) is None
    await page.goto(f"{site.base}/ui/approvals")
    assert urlsplit(page.url).path == "/ui/login"

    # Ended on the server, not only forgotten by the browser: the old cookie opens nothing.
    await tab.context.add_cookies([{"name": COOKIE, "value": cookie["value"], "url": site.base}])
    await page.goto(f"{site.base}/ui/approvals")
    assert urlsplit(page.url).path == "/ui/login"
    assert await page.locator("header .who").count() == 0
    await screenshot(page, "after-logout")


async def test_wrong_passwords_are_throttled_per_address(
    site: WebGateway, tab: BrowserPage
) -> None:
    page = tab.page
    for attempt in range(10):
        answer = await ui_login(page, site.base, "sam", f"wrong password {attempt}")
        assert answer.status == 401, (attempt, await page.content())
        assert "Wrong name or password" in await page.locator("p.error").inner_text()
    await screenshot(page, "wrong-password")

    # The eleventh try is refused before any check, even with the right password.
    answer = await ui_login(page, site.base, "sam", PASSWORD)
    assert answer.status == 429
    assert int((await answer.all_headers())["retry-after"]) > 0
    message = await page.locator("p.error").inner_text()
    assert "Too many failed logins" in message, message
    assert urlsplit(page.url).path == "/ui/login"
    assert await session_cookie(tab) is None
    await screenshot(page, "throttled")


# -- roles and forged forms ------------------------------------------------------------------------


async def test_a_viewer_sees_proposals_but_cannot_approve_even_with_a_valid_token(
    site: WebGateway, tab: BrowserPage
) -> None:
    proposal = await site.pending_proposal()
    page = tab.page
    assert (await ui_login(page, site.base, "vera", PASSWORD)).status == 303
    assert urlsplit(page.url).path == "/ui/approvals"
    assert await page.locator(f"tr[data-proposal='{proposal['id']}']").count() == 1
    await screenshot(page, "approvals")

    answer = await page.goto(f"{site.base}/ui/proposals/{proposal['id']}")
    assert answer is not None and answer.status == 200
    assert await page.locator("#status").inner_text() == "pending_approval"
    assert await page.locator("#approve").count() == 0
    assert await page.locator("#reject").count() == 0
    assert await page.get_by_text("Your role may not decide this proposal").count() == 1
    await screenshot(page, "proposal")

    # A hand-made POST with vera's own session and CSRF token: the role is checked by the server.
    forged = await page.request.post(
        f"{site.base}/ui/proposals/{proposal['id']}/approve",
        form={"csrf": await csrf_of(page), "reason": "I am only a viewer"},
        max_redirects=0,
    )
    assert forged.status == 403, await forged.text()
    refusal = await forged.text()
    # Refused for the role, not for a lost session or token (those are 403s as well).
    assert "denied" in refusal and "approve" in refusal, refusal
    assert "security token" not in refusal and "session has ended" not in refusal, refusal
    assert await status_of(site, proposal["id"]) == "pending_approval"
    await page.reload()
    assert await page.locator("#status").inner_text() == "pending_approval"


async def test_forms_without_the_csrf_token_or_from_another_origin_are_refused(
    site: WebGateway, tab: BrowserPage
) -> None:
    proposal = await site.pending_proposal()
    page = tab.page
    assert (await ui_login(page, site.base, "sam", PASSWORD)).status == 303
    await page.goto(f"{site.base}/ui/proposals/{proposal['id']}")
    token = await csrf_of(page)
    reject = f"{site.base}/ui/proposals/{proposal['id']}/reject"

    # The real form, its token taken out: the browser sends the session cookie, nothing else.
    form = page.locator("#decision-form")
    await form.locator("textarea[name=reason]").fill("no token")
    await form.locator("input[name=csrf]").evaluate("input => input.remove()")
    async with page.expect_response(lambda r: r.url == reject) as sent:
        await page.locator("#reject").click()
    assert (await sent.value).status == 403
    await page.wait_for_load_state()
    await screenshot(page, "no-token")

    assert "security token" in await page.locator("main").inner_text()
    other_port = f"http://127.0.0.1:{int(urlsplit(site.base).port or 80) + 1}"
    # (form fields, headers, what the refusal says): the session cookie goes with every one.
    refused: list[tuple[dict[str, str | float | bool], dict[str, str], str]] = [
        ({"reason": "no token at all"}, {}, "security token"),
        ({"csrf": "x" * 43, "reason": "garbage"}, {}, "security token"),
        ({"csrf": "", "reason": "empty"}, {}, "security token"),
        ({"csrf": token, "reason": "elsewhere"}, {"Origin": "http://evil.example"}, "another site"),
        ({"csrf": token, "reason": "another port"}, {"Origin": other_port}, "another site"),
    ]
    for fields, headers, says in refused:
        answer = await page.request.post(reject, form=fields, headers=headers, max_redirects=0)
        text = await answer.text()
        assert answer.status == 403 and says in text, (fields, headers, answer.status, text)
    assert await status_of(site, proposal["id"]) == "pending_approval"

    # The same session, token and origin do work: the refusals above were the locks', not
    # something else's.
    answer = await page.request.post(
        reject,
        form={"csrf": token, "reason": "the control case"},
        headers={"Origin": site.base},
        max_redirects=0,
    )
    assert answer.status == 303, await answer.text()
    assert await status_of(site, proposal["id"]) == "rejected"
    await page.goto(f"{site.base}/ui/proposals/{proposal['id']}")
    await screenshot(page, "rejected")


# -- what the pages load ---------------------------------------------------------------------------

PAGES = ["approvals", "twin", "whatif", "actions", "audit", "devices", "users", "tokens"]


async def test_pages_ask_nothing_of_other_hosts_and_carry_a_strict_csp(
    site: WebGateway, tab: BrowserPage
) -> None:
    proposal = await site.pending_proposal()
    page = tab.page
    login = await page.goto(f"{site.base}/ui/login")
    assert login is not None and login.status == 200
    await screenshot(page, "login")
    assert (await ui_login(page, site.base, "ada", PASSWORD)).status == 303
    paths = {f"/ui/{slug}": slug for slug in PAGES} | {
        f"/ui/proposals/{proposal['id']}": "proposal"
    }
    for path, name in paths.items():
        answer = await page.goto(site.base + path)
        assert answer is not None, path
        # A page not built yet may be 404; none may fail.
        assert answer.status < 500, (path, await page.content())
        await page.wait_for_load_state("load")
        await screenshot(page, name)
    # The proposal page's script has opened its event stream (/subscribe): requests made by
    # script count as much as those the HTML names.
    await page.locator("#live[data-state=on]").wait_for()
    assert any(urlsplit(url).path == "/subscribe" for url in tab.requests), tab.requests

    assert len(tab.requests) > len(paths), tab.requests  # pages, their CSS, JS and streams
    assert tab.foreign_requests(site.netloc) == []

    # Every answer carries the CSP (CSS, script and the event stream too), the pages above all.
    pages = 0
    for response in tab.responses:
        headers = await response.all_headers()
        csp = headers.get("content-security-policy", "")
        assert "frame-ancestors 'none'" in csp, (response.url, csp)
        assert "script-src 'self'" in csp and "style-src 'self'" in csp, (response.url, csp)
        assert "'unsafe-inline'" not in csp and "'unsafe-eval'" not in csp, (response.url, csp)
        assert headers.get("x-content-type-options") == "nosniff", response.url
        if headers.get("content-type", "").startswith("text/html"):
            pages += 1
            assert headers.get("cache-control") == "no-store", response.url
    assert pages >= len(paths) + 1, [r.url for r in tab.responses]  # + the login page
    violations = [m for m in tab.console if "content security policy" in m.lower()]
    assert violations == [], violations


# -- the first admin -------------------------------------------------------------------------------


async def test_the_first_admin_link_works_once(tmp_path: Path, browser: Browser) -> None:
    async with web_gateway(tmp_path, users={}) as fresh, recorded_page(browser) as tab:
        link = fresh.web.setup
        assert link is not None, "no setup link on a gateway without an admin"
        page = tab.page
        url = f"{fresh.base}/ui/setup/{link.secret}"

        wrong = await page.goto(f"{fresh.base}/ui/setup/{'x' * len(link.secret)}")
        assert wrong is not None and wrong.status == 404
        answer = await page.goto(url)
        assert answer is not None and answer.status == 200
        await screenshot(page, "setup-form")

        form = page.locator("main form")
        await form.locator("input[name=name]").fill("ada")
        await form.locator("input[name=password]").fill(PASSWORD)
        await form.locator("input[name=again]").fill(PASSWORD)
        await form.locator("button[type=submit]").click()
        await page.wait_for_url(f"{fresh.base}/ui/approvals")
        assert (await page.locator("header .who").inner_text()).strip() == "ada"
        assert await page.locator("nav a[href='/ui/users']").count() == 1  # an admin's nav
        await screenshot(page, "first-admin")

        again = await page.goto(url)
        assert again is not None and again.status == 404
        await screenshot(page, "link-spent")
        accounts = fresh.gateway.accounts
        assert accounts is not None
        users = await asyncio.to_thread(accounts.list_users)
        assert [(u.name, [g.role for g in u.grants]) for u in users] == [("ada", ["admin"])]
        assert tab.foreign_requests(fresh.netloc) == []
