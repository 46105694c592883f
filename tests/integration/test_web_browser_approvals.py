"""The operator's path through the web UI in a real browser: a proposal appears live in the
approvals queue, its page draws the fan chart, an approval with a reason writes the simulated
PLC and the page shows the verified read-back; the twin follows the PLC live; what-if draws the
simulated fan before anything is proposed.

Headless Chromium (Debian's, through Playwright) against one real gateway for the module: the
simulated oven PLC over real OPC UA, real users and an agent token in control.db, the pages'
live updates over the gateway's own SSE stream with `http.read_access: token` (the session is
the only credential the page's script has). Screenshots go to test-results/web/.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from browser_support import (
    PASSWORD,
    SETPOINT,
    BrowserPage,
    WebGateway,
    chromium,
    recorded_page,
    screenshot,
    ui_login,
    web_gateway,
)
from playwright.async_api import Browser, expect
from tests_support import eventually

pytestmark = pytest.mark.asyncio(loop_scope="module")

SVG = "{http://www.w3.org/2000/svg}"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def site(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[WebGateway]:
    async with web_gateway(tmp_path_factory.mktemp("web-approvals")) as gateway:
        yield gateway


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser(site: WebGateway) -> AsyncIterator[Browser]:
    async with chromium() as browser:
        yield browser


@pytest_asyncio.fixture(loop_scope="module")
async def tab(site: WebGateway, browser: Browser) -> AsyncIterator[BrowserPage]:
    async with recorded_page(browser) as tab:
        yield tab


async def test_a_supervisor_sees_a_proposal_arrive_reads_its_fan_and_approves_it(
    site: WebGateway, tab: BrowserPage
) -> None:
    page = tab.page
    answer = await ui_login(page, site.base, "sam", PASSWORD)
    assert answer.status == 303
    await expect(page).to_have_url(f"{site.base}/ui/approvals")
    await expect(page.locator("#live")).to_have_text("live")  # the SSE stream is open
    before = await page.locator("#pending tbody tr").count()

    # An agent proposes while the page is open: the row appears without a reload.
    proposal = await site.pending_proposal()
    row = page.locator(f"#pending tr[data-proposal='{proposal['id']}']")
    await expect(row).to_be_visible(timeout=10_000)
    assert await page.locator("#pending tbody tr").count() == before + 1
    await expect(row).to_contain_text(SETPOINT)
    await expect(row).to_contain_text("agent1")
    # Counting down in the browser (app.js), not a figure frozen at render time.
    countdown = row.locator(".countdown")
    await expect(countdown).to_have_text(re.compile(r"1[0-5] min \d+ s"))
    first = await countdown.inner_text()
    await expect(countdown).not_to_have_text(first, timeout=3000)
    await screenshot(page, "queue")

    await row.locator("a").first.click()
    await expect(page).to_have_url(f"{site.base}/ui/proposals/{proposal['id']}")
    fan = page.locator("figure.fan svg").first
    await expect(fan).to_be_visible()
    svg = ET.fromstring(await fan.evaluate("e => e.outerHTML"))
    classes = [e.get("class", "") for e in svg.iter()]
    assert any("fan-outer" in c for c in classes) and any("fan-inner" in c for c in classes)
    assert any("fan-median" in c for c in classes)
    assert any(c.split()[0] == "limit" for c in classes if c), "the policy's limits are drawn"
    assert any("now-value" in c for c in classes), "the value now is marked"
    await expect(page.locator("#breakdown")).to_contain_text("quality")
    await expect(page.locator("#inputs")).to_contain_text("line1/oven1/temperature")
    await screenshot(page, "proposal")

    # The reason is required: the browser will not send the form without one.
    await page.locator("#approve").click()
    assert page.url.endswith(f"/ui/proposals/{proposal['id']}")
    assert site.engine.get(proposal["id"]).status == "pending_approval"

    target = proposal["value"]
    await page.locator("textarea[name=reason]").fill("fan stays inside the band; approved")
    await page.locator("#approve").click()
    outcome = page.locator("#outcome")
    await expect(outcome).to_contain_text("Written and verified", timeout=15_000)
    await expect(page.locator("#status")).to_have_text("succeeded")
    await expect(outcome).to_contain_text(f"{target:g}")
    assert site.oven.model.signals()["heater_setpoint"] == pytest.approx(target)
    assert site.engine.get(proposal["id"]).approver == "sam"
    await screenshot(page, "approved")
    assert tab.foreign_requests(site.netloc) == []
    assert not [m for m in tab.console if m.startswith(("error", "pageerror"))], tab.console


async def test_the_twin_page_follows_the_plc_live(site: WebGateway, tab: BrowserPage) -> None:
    page = tab.page
    await ui_login(page, site.base, "sam", PASSWORD)
    await page.goto(f"{site.base}/ui/twin")
    await expect(page.locator("#live")).to_have_text("live")
    cell = page.locator(f"td[data-point-value='{SETPOINT}']")
    shown = float(await cell.inner_text())
    new = shown + 2.0
    # A write through the gateway (as an approved change makes); the page is not reloaded.
    await site.gateway.write_point(SETPOINT, new)
    await expect(cell).to_have_text(f"{new:g}", timeout=10_000)
    quality = page.locator(f"[data-point-quality='{SETPOINT}']")
    await expect(quality).to_have_text("GOOD")
    assert await page.locator("svg.spark-chart").count() > 0, "sparklines are drawn"
    await screenshot(page, "twin")

    await page.locator(f"a[href='/ui/points/{SETPOINT}']").click()
    await page.locator("a[href='?window=15m']").click()
    await expect(page.locator("figure.history svg")).to_be_visible()
    await screenshot(page, "point")
    assert tab.foreign_requests(site.netloc) == []


async def test_what_if_draws_the_fan_before_anything_is_proposed(
    site: WebGateway, tab: BrowserPage
) -> None:
    page = tab.page
    await ui_login(page, site.base, "sam", PASSWORD)
    await page.goto(f"{site.base}/ui/whatif")
    proposals_before = len(site.engine.proposals)
    current = site.gateway.store.get(SETPOINT).value
    await page.locator("select[name=point]").select_option(SETPOINT)
    await page.locator("input[name=value]").fill(f"{current - 3:g}")
    await page.locator("#whatif-form button[type=submit]").click()
    result = page.locator("#whatif-result")
    await expect(result).to_contain_text("paths safe and better", timeout=15_000)
    await expect(result.locator("svg.fan-chart")).to_be_visible()
    await screenshot(page, "whatif")
    assert len(site.engine.proposals) == proposals_before, "a what-if proposes nothing"
    assert site.oven.model.signals()["heater_setpoint"] == pytest.approx(current)

    # Out of the point's range: refused before any simulation, with the range named.
    await page.goto(f"{site.base}/ui/whatif")
    await page.locator("input[name=value]").fill("5000")
    await page.locator("#whatif-form button[type=submit]").click()
    await expect(page.locator(".error")).to_contain_text("outside")

    # Then propose it: the gate judges a supervisor's proposal like any other.
    await page.locator("input[name=value]").fill(f"{current - 3:g}")
    await page.locator("#whatif-form button[type=submit]").click()
    await page.locator("#whatif-result input[name=reason]").fill("try a cooler cure")
    await page.locator("#whatif-result button[type=submit]").click()
    await page.wait_for_url("**/ui/proposals/*")
    await eventually(lambda: len(site.engine.proposals) == proposals_before + 1, what="a proposal")
    newest = site.engine.recent(limit=1)[0]
    assert newest.proposal.proposer.name == "sam" and newest.source == "web"
    await expect(page.locator("h1")).to_contain_text(newest.id)
    await screenshot(page, "proposed")


@pytest.mark.parametrize(("width", "height"), [(1280, 800), (390, 844)], ids=["tablet", "phone"])
async def test_the_pages_fit_a_tablet_and_a_phone(
    site: WebGateway, browser: Browser, width: int, height: int
) -> None:
    """No page is wider than the screen (wide tables scroll inside their own box) and the fan
    chart shrinks to fit: a tablet in landscape, a phone held upright."""
    proposal = await site.pending_proposal(value_offset=-1.0)
    context = await browser.new_context(viewport={"width": width, "height": height})
    try:
        page = await context.new_page()
        await ui_login(page, site.base, "sam", PASSWORD)
        for path in (
            "/ui/approvals",
            f"/ui/proposals/{proposal['id']}",
            "/ui/twin",
            f"/ui/points/{SETPOINT}",
            "/ui/actions",
            "/ui/audit",
        ):
            await page.goto(site.base + path)
            overflow = await page.evaluate(
                "document.documentElement.scrollWidth - document.documentElement.clientWidth"
            )
            assert overflow <= 0, f"{path} is {overflow} px wider than a {width} px screen"
            name = "proposal" if "/proposals/" in path else path.strip("/").replace("/", "-")
            await screenshot(page, name)
        fan = page.locator("figure.fan svg")
        await page.goto(f"{site.base}/ui/proposals/{proposal['id']}")
        box = await fan.first.bounding_box()
        assert box is not None and box["width"] <= width
    finally:
        await context.close()
        # Leave nothing waiting for the next test's queue.
        await site.engine.reject(
            await site.gateway.accounts.authenticate_user_async("sam", PASSWORD),  # type: ignore[union-attr]
            proposal["id"],
            reason="layout test",
        )
