"""The web UI's admin pages on a real gateway: actions and rollback, audit log, users, tokens.

The gateway reads the simulated oven PLC (plantsim, real OPC UA) judged by the repo's oven
policies; every page is fetched over a real socket by a browser of its own (cookie jar), logged
in through the login form, and every form is posted with the CSRF token read from the page. The
oven runs at ~182.7 °C with this seed and `tick_hz=0`, so its policies never fire on their own.
"""

from __future__ import annotations

import asyncio
import html
import json
import re
import sqlite3
from collections.abc import AsyncIterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer
from aiw_support import SETPOINT, aiw_site_config, make_tokens
from tests_support import eventually
from web_support import browser, csrf_of, login

from drivers.contract import Quality
from gateway.aiw.auth import AUTHENTICATOR
from gateway.app import Gateway
from gateway.control.db import control_db_path
from gateway.control.users import AccountError, parse_grant
from gateway.http import create_app
from gateway.http_proposals import LoginRation
from gateway.netguard import body_timeout
from plantsim import OvenDevice

PASSWORD = "correct horse battery"
HOSTILE = "<script>alert(1)</script>"

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]


@dataclass
class Site:
    oven: OvenDevice
    gateway: Gateway
    client: TestClient
    tokens: dict[str, dict[str, str]]

    async def user(self, name: str, *grants: str) -> None:
        """Make a user in control.db, as `opstwin user add` does."""
        accounts = self.gateway.accounts
        assert accounts is not None
        await asyncio.to_thread(accounts.add_user, name, PASSWORD, [parse_grant(g) for g in grants])

    def plc_setpoint(self) -> float:
        return float(self.oven.model.signals()["heater_setpoint"])

    async def audit_committed(self) -> None:
        """Wait until control.db's writer has committed every audit entry queued so far."""
        control = self.gateway.control
        assert control is not None
        await control.write_async(lambda conn: None)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def site(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Site]:
    async with OvenDevice(seed=4, tick_hz=0) as oven:
        gateway = Gateway(aiw_site_config(tmp_path_factory.mktemp("web-admin"), oven.port))
        app = create_app(gateway)
        # As `opstwin run` has it: every body is read (bounded) before any handler runs.
        app.middlewares.append(body_timeout(gateway.config.http.body_timeout_s))
        async with TestClient(TestServer(app)) as client:
            tokens = await make_tokens(gateway)
            site = Site(oven, gateway, client, tokens)
            await site.user("root", "admin")
            await site.user("vic", "viewer")
            await site.user("sue", "supervisor")
            await eventually(lambda: oven_good(gateway), what="every oven point GOOD")
            yield site


def oven_good(gateway: Gateway) -> bool:
    _, values = gateway.store.snapshot()
    return all(v.quality is Quality.GOOD for p, v in values.items() if p.startswith("line1/oven1/"))


@pytest.fixture(autouse=True)
def fresh_rations(request: pytest.FixtureRequest) -> None:
    """Every test starts with no refused logins counted against 127.0.0.1."""
    if "site" in request.fixturenames:
        authenticator = request.getfixturevalue("site").client.app[AUTHENTICATOR]
        authenticator.password_ration = LoginRation(max_failures=10, window_s=60.0)
        authenticator.token_ration = LoginRation(max_failures=30, window_s=60.0)


async def post(
    session: Any, path: str, form: dict[str, str], **kwargs: Any
) -> tuple[int, str, aiohttp.ClientResponse]:
    async with session.post(path, data=form, allow_redirects=False, **kwargs) as answer:
        return answer.status, await answer.text(), answer


async def get(session: Any, path: str, **kwargs: Any) -> tuple[int, str]:
    async with session.get(path, allow_redirects=False, **kwargs) as answer:
        return answer.status, await answer.text()


def rows(page: str, kind: str) -> list[dict[str, str]]:
    """The table rows of a page marked `data-<kind>=...`, as their data attributes."""
    found = []
    for tag in re.findall(rf"<tr data-{kind}=[^>]*>", page):
        found.append({k: html.unescape(v) for k, v in re.findall(r'data-([a-z]+)="([^"]*)"', tag)})
    return found


def flash(page: str, element_id: str) -> str:
    """The text of the element with this id (a flash or the chain's status), tags removed."""
    found = re.search(rf'<p [^>]*id="{element_id}"[^>]*>(.*?)</p>', page, re.S)
    assert found is not None, f"no #{element_id} in the page"
    return html.unescape(re.sub(r"<[^>]+>", "", found.group(1)))


# -- users ---------------------------------------------------------------------------------------


async def test_an_admin_adds_a_user_who_can_then_log_in(site: Site):
    async with browser(site.client) as admin, browser(site.client) as new:
        csrf = await login(admin, "root", PASSWORD)
        status, page = await get(admin, "/ui/users")
        assert status == 200 and 'id="add-user"' in page
        form = {
            "csrf": csrf,
            "name": "bob",
            "password": PASSWORD,
            "role": "supervisor",
            "assets": "line1/*, line2/*",
        }
        status, page, _ = await post(admin, "/ui/users", form)
        assert status == 200, page
        assert "User bob added: supervisor:line1/*,line2/*." in flash(page, "done")
        assert {"user": "bob", "disabled": "no"} in rows(page, "user")

        await login(new, "bob", PASSWORD)
        # A supervisor of line 1 and 2: the actions page, but neither the users nor the audit.
        for path in ("/ui/users", "/ui/tokens", "/ui/audit"):
            status, _ = await get(new, path)
            assert status == 403, path
        _, page = await get(new, "/ui/actions")
        assert 'href="/ui/users"' not in page and 'href="/ui/tokens"' not in page

        # The same name again is the store's error on the page, not a 500.
        status, page, _ = await post(admin, "/ui/users", form)
        assert status == 400 and "exists already" in flash(page, "error")


async def test_disabling_a_user_ends_their_live_session(site: Site):
    await site.user("carol", "supervisor")
    async with browser(site.client) as admin, browser(site.client) as carol:
        csrf = await login(admin, "root", PASSWORD)
        await login(carol, "carol", PASSWORD)
        status, page, _ = await post(admin, "/ui/users/carol/disable", {"csrf": csrf})
        assert status == 200, page
        assert "carol is disabled; 1 live session ended" in flash(page, "done")
        assert {"user": "carol", "disabled": "yes"} in rows(page, "user")
        assert 'action="/ui/users/carol/disable"' not in page  # nothing left to disable

        status, _ = await get(carol, "/ui/actions")
        assert status == 303  # to the login page
        async with carol.get("/ui/actions") as answer:
            assert answer.url.path == "/ui/login"
        async with carol.get("/ui/login") as page_answer:
            token = csrf_of(await page_answer.text())
        status, page, _ = await post(
            carol, "/ui/login", {"csrf": token, "name": "carol", "password": PASSWORD}
        )
        assert status == 401 and "disabled" in page

        # An admin may not lock themselves out.
        status, page, _ = await post(admin, "/ui/users/root/disable", {"csrf": csrf})
        assert status == 400 and "may not disable yourself" in flash(page, "error")
        status, _ = await get(admin, "/ui/users")
        assert status == 200
        status, page, _ = await post(admin, "/ui/users/nobody/disable", {"csrf": csrf})
        assert status == 400 and "no user named 'nobody'" in flash(page, "error")


async def test_a_new_password_ends_the_users_sessions(site: Site):
    await site.user("dave", "viewer")
    async with browser(site.client) as admin, browser(site.client) as dave:
        csrf = await login(admin, "root", PASSWORD)
        await login(dave, "dave", PASSWORD)
        form = {"csrf": csrf, "password": "another long one", "again": "another long one"}
        status, page, _ = await post(admin, "/ui/users/dave/password", form)
        assert status == 200 and "dave has a new password" in flash(page, "done")
        status, _ = await get(dave, "/ui/actions")
        assert status == 303
        await login(dave, "dave", "another long one")

        mismatch = {**form, "again": "something else"}
        status, page, _ = await post(admin, "/ui/users/dave/password", mismatch)
        assert status == 400 and "differ" in flash(page, "error")
        short = {"csrf": csrf, "password": "short", "again": "short"}
        status, page, _ = await post(admin, "/ui/users/dave/password", short)
        assert status == 400 and "too short" in flash(page, "error")
        status, _ = await get(dave, "/ui/actions")
        assert status == 200  # a refused change ends no session


# -- who may, and forged forms -------------------------------------------------------------------


async def test_a_viewer_is_refused_the_admin_pages_and_their_forms(site: Site):
    accounts = site.gateway.accounts
    assert accounts is not None
    async with browser(site.client) as vic:
        csrf = await login(vic, "vic", PASSWORD)
        for path in ("/ui/users", "/ui/tokens"):
            status, _ = await get(vic, path)
            assert status == 403, path
        status, page = await get(vic, "/ui/actions")
        assert 'href="/ui/users"' not in page and 'href="/ui/tokens"' not in page

        # Forms a viewer's page never shows, forged with the viewer's own valid token.
        forged = [
            ("/ui/users", {"name": "eve", "password": PASSWORD, "role": "admin", "assets": "*"}),
            ("/ui/users/root/disable", {}),
            ("/ui/users/root/password", {"password": "pwned pwned", "again": "pwned pwned"}),
            ("/ui/tokens", {"name": "evetoken", "role": "admin", "assets": "*"}),
            ("/ui/tokens/exec1/revoke", {}),
        ]
        for path, form in forged:
            status, _, _ = await post(vic, path, {"csrf": csrf, **form})
            assert status == 403, path
    with pytest.raises(AccountError):
        await asyncio.to_thread(accounts.get_user, "eve")
    assert not (await asyncio.to_thread(accounts.get_user, "root")).disabled
    tokens = {t.name: t for t in await asyncio.to_thread(accounts.list_tokens)}
    assert "evetoken" not in tokens and tokens["exec1"].revoked is None
    async with browser(site.client) as admin:
        await login(admin, "root", PASSWORD)  # the password is still the old one
        await site.audit_committed()
        _, page = await get(admin, "/ui/audit?actor=vic&decision=denied")
        denied = {r["action"] for r in rows(page, "seq")}
        assert {"access.manage_users", "access.manage_tokens"} <= denied


async def test_a_post_without_the_csrf_token_is_refused(site: Site):
    accounts = site.gateway.accounts
    assert accounts is not None
    async with browser(site.client) as admin:
        csrf = await login(admin, "root", PASSWORD)
        form = {"name": "mallory", "password": PASSWORD, "role": "admin", "assets": "*"}
        for extra in ({}, {"csrf": "x" * 43}, {"csrf": ""}):
            status, page, _ = await post(admin, "/ui/users", {**form, **extra})
            assert status == 403 and "security token" in page
        status, page, _ = await post(
            admin, "/ui/users", {**form, "csrf": csrf}, headers={"Origin": "http://evil.example"}
        )
        assert status == 403 and "another site" in page
    with pytest.raises(AccountError):
        await asyncio.to_thread(accounts.get_user, "mallory")


# -- tokens --------------------------------------------------------------------------------------


async def test_a_tokens_secret_is_shown_once_and_works_until_revoked(site: Site):
    async with browser(site.client) as admin:
        csrf = await login(admin, "root", PASSWORD)
        form = {"csrf": csrf, "name": "lims-reader", "role": "viewer", "assets": "*"}
        status, page, _ = await post(admin, "/ui/tokens", form)
        assert status == 200, page
        found = re.search(
            r'<p class="secret"><code id="secret">(otw_[A-Za-z0-9_-]{43})</code>', page
        )
        assert found is not None, page
        secret = found.group(1)
        assert "will not be shown again" in page
        assert {"token": "lims-reader", "revoked": "no"} in rows(page, "token")

        _, listing = await get(admin, "/ui/tokens")
        assert secret not in listing and 'id="secret"' not in listing
        bearer = {"Authorization": f"Bearer {secret}"}
        async with site.client.get("/actions", headers=bearer) as answer:
            assert answer.status == 200, await answer.text()

        status, page, _ = await post(admin, "/ui/tokens/lims-reader/revoke", {"csrf": csrf})
        assert status == 200 and "lims-reader is revoked" in flash(page, "done")
        assert {"token": "lims-reader", "revoked": "yes"} in rows(page, "token")
        async with site.client.get("/actions", headers=bearer) as answer:
            assert answer.status == 401

        status, page, _ = await post(admin, "/ui/tokens", form)  # the name stays taken
        assert status == 400 and "is taken" in flash(page, "error")
        assert secret not in page


# -- actions and rollback ------------------------------------------------------------------------


async def test_an_action_is_listed_and_rolled_back_through_the_form(site: Site):
    before = site.plc_setpoint()
    async with site.client.post(
        "/proposals",
        json={"point": SETPOINT, "value": 178.5, "reason": "web admin test"},
        headers=site.tokens["exec1"],
    ) as answer:
        proposal = await answer.json()
        assert (answer.status, proposal["status"]) == (201, "succeeded"), proposal
    pid = proposal["id"]
    assert site.plc_setpoint() == pytest.approx(178.5)
    form_action = f'action="/ui/actions/{pid}/rollback"'

    async with browser(site.client) as sue, browser(site.client) as vic:
        csrf = await login(sue, "sue", PASSWORD)
        vic_csrf = await login(vic, "vic", PASSWORD)
        _, page = await get(sue, "/ui/actions")
        listed = rows(page, "action")
        assert listed[0] == {"action": pid, "status": "succeeded"}
        assert form_action in page
        _, page = await get(vic, "/ui/actions")
        assert rows(page, "action")[0]["action"] == pid and form_action not in page

        # A viewer's forged rollback: the engine refuses it; the PLC keeps the new value.
        status, _, _ = await post(
            vic, f"/ui/actions/{pid}/rollback", {"csrf": vic_csrf, "reason": "mine"}
        )
        assert status == 403
        status, page, _ = await post(
            sue, f"/ui/actions/{pid}/rollback", {"csrf": csrf, "reason": "   "}
        )
        assert status == 400 and "Give a reason" in flash(page, "error")
        assert site.plc_setpoint() == pytest.approx(178.5)

        status, _, answer = await post(
            sue, f"/ui/actions/{pid}/rollback", {"csrf": csrf, "reason": "test over"}
        )
        assert status == 303 and answer.headers["Location"] == f"/ui/proposals/{pid}"
        assert site.plc_setpoint() == pytest.approx(before)
        _, page = await get(sue, "/ui/actions?status=rolled_back")
        assert {"action": pid, "status": "rolled_back"} in rows(page, "action")
        assert form_action not in page

        status, page, _ = await post(
            sue, f"/ui/actions/{pid}/rollback", {"csrf": csrf, "reason": "again"}
        )
        assert status == 409 and "only a succeeded write rolls back" in flash(page, "error")
        status, _, _ = await post(
            sue, "/ui/actions/p-000000-999/rollback", {"csrf": csrf, "reason": "x"}
        )
        assert status == 404
        status, page = await get(sue, "/ui/actions?status=pending")
        assert status == 400 and "Status must be one of" in page

    async with browser(site.client) as admin:
        await login(admin, "root", PASSWORD)
        await site.audit_committed()
        _, page = await get(admin, f"/ui/audit?correlation={pid}")
        trail = [(r["action"], r["actor"]) for r in rows(page, "seq")]
        assert ("action.rolled_back", "sue") in trail
        assert ("access.rollback", "vic") in trail  # the forged one, denied and recorded
        assert all(r["action"] for r in rows(page, "seq"))


# -- the audit log -------------------------------------------------------------------------------


async def test_the_audit_page_verifies_the_chain_and_filters(site: Site):
    async with browser(site.client) as admin:
        csrf = await login(admin, "root", PASSWORD)
        form = {
            "csrf": csrf,
            "name": "frank",
            "password": PASSWORD,
            "role": "viewer",
            "assets": "*",
        }
        status, _, _ = await post(admin, "/ui/users", form)
        assert status == 200
        await site.audit_committed()

        status, page = await get(admin, "/ui/audit")
        assert status == 200
        chain = flash(page, "chain")
        assert chain.startswith("Chain verified:"), chain
        head = int(re.search(r"up to seq (\d+)", chain).group(1))  # type: ignore[union-attr]
        everything = rows(page, "seq")
        assert int(everything[0]["seq"]) == head  # newest first
        assert len({r["actor"] for r in everything}) > 1

        _, page = await get(admin, "/ui/audit?actor=root")
        mine = rows(page, "seq")
        assert mine and {r["actor"] for r in mine} == {"root"}
        assert len(mine) < len(everything)
        assert {"action": "user.added", "actor": "root"} in [
            {"action": r["action"], "actor": r["actor"]} for r in mine
        ]
        _, page = await get(admin, "/ui/audit?actor=root&action=user.add")
        assert {r["action"] for r in rows(page, "seq")} == {"user.added"}
        _, page = await get(admin, "/ui/audit?actor=nobody-at-all")
        assert rows(page, "seq") == [] and 'id="no-rows"' in page

        # Paging: below a seq, only older rows; a time window in the future holds none.
        _, page = await get(admin, f"/ui/audit?before={head}")
        assert all(int(r["seq"]) < head for r in rows(page, "seq"))
        _, page = await get(admin, "/ui/audit?from=2999-01-01T00:00")
        assert rows(page, "seq") == []
        for query, says in [("before=x", "sequence number"), ("to=yesterday", "not a date")]:
            status, page = await get(admin, f"/ui/audit?{query}")
            assert status == 400 and says in flash(page, "error")


async def test_a_scoped_reader_may_not_read_the_audit_log(site: Site):
    await site.user("lina", "viewer:line1/*")
    async with browser(site.client) as lina:
        await login(lina, "lina", PASSWORD)
        status, _ = await get(lina, "/ui/audit")
        assert status == 403


# -- hostile input -------------------------------------------------------------------------------


async def test_hostile_names_are_refused_and_escaped(site: Site):
    accounts = site.gateway.accounts
    assert accounts is not None
    async with browser(site.client) as admin:
        csrf = await login(admin, "root", PASSWORD)
        user = {
            "csrf": csrf,
            "name": HOSTILE,
            "password": PASSWORD,
            "role": "viewer",
            "assets": "*",
        }
        for path, form, echoed in [
            ("/ui/users", user, True),
            ("/ui/users", {**user, "name": "okname", "assets": HOSTILE}, True),
            ("/ui/users", {**user, "name": "okname2", "role": HOSTILE}, False),
            ("/ui/tokens", {"csrf": csrf, "name": HOSTILE, "role": "agent", "assets": "*"}, True),
        ]:
            status, page, _ = await post(admin, path, form)
            assert status == 400, (path, form)
            assert HOSTILE not in page
            # Where the page repeats what was typed (the error, the form), it is escaped.
            assert ("&lt;script&gt;" in page) is echoed
        status, page = await get(admin, f"/ui/audit?actor={HOSTILE}&correlation={HOSTILE}")
        assert status == 200 and HOSTILE not in page and "&lt;script&gt;" in page
    listed = await asyncio.to_thread(accounts.list_users)
    assert not any(u.name.startswith("okname") for u in listed)


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("/ui/users", "name"),
        ("/ui/users", "password"),
        ("/ui/users", "assets"),
        ("/ui/tokens", "name"),
        ("/ui/users/root/password", "password"),
    ],
)
async def test_very_long_fields_are_4xx_not_5xx(site: Site, path: str, field: str):
    async with browser(site.client) as admin:
        csrf = await login(admin, "root", PASSWORD)
        form = {
            "csrf": csrf,
            "name": "longfield",
            "password": PASSWORD,
            "again": PASSWORD,
            "role": "viewer",
            "assets": "*",
        }
        for size in (5_000, 400_000):
            value = "a" * size
            sent = {**form, field: value, **({"again": value} if field == "password" else {})}
            status, page, _ = await post(admin, path, sent)
            assert 400 <= status < 500, (size, page[:300])
            assert value[:4097] not in page  # neither echoed nor shown in full
        # Beyond the app's body limit (1 MiB): refused before any handler runs.
        status, _, _ = await post(admin, path, {**form, field: "a" * 2_000_000})
        assert status == 413
        status, _ = await get(admin, "/ui/audit?actor=" + "a" * 5000)
        assert status == 400


# -- tampering (last: it edits control.db behind the gateway's back, then repairs it) ------------


async def test_a_tampered_audit_row_shows_the_chain_broken(site: Site):
    path = control_db_path(site.gateway.config.storage.path)
    async with browser(site.client) as admin:
        csrf = await login(admin, "root", PASSWORD)

        async def add(name: str) -> None:
            form = {
                "csrf": csrf,
                "name": name,
                "password": PASSWORD,
                "role": "viewer",
                "assets": "*",
            }
            status, page, _ = await post(admin, "/ui/users", form)
            assert status == 200, page

        await add("grace")
        _, page = await get(admin, "/ui/audit")  # a verification before the forgery, cached
        assert flash(page, "chain").startswith("Chain verified:")
        seq, original = await asyncio.to_thread(_added_row, path, "grace")
        entry = json.loads(original)
        assert entry["actor"] == "root"
        forged = original.replace('"actor":"root"', '"actor":"mallory"')
        await asyncio.to_thread(_rewrite, path, seq, forged)
        await add("heidi")  # the chain goes on after the forged row; its head moves

        # What was appended since the last full pass verifies (the forged row is older): the
        # page says so until the whole chain is checked again, which the operator asks for.
        _, page = await get(admin, "/ui/audit")
        assert flash(page, "chain").startswith("Chain verified:")
        status, _, answer = await post(admin, "/ui/audit/verify", {"csrf": csrf})
        assert status == 303 and answer.headers["Location"] == "/ui/audit"
        status, page = await get(admin, "/ui/audit")
        assert status == 200
        chain = flash(page, "chain")
        assert f"Chain BROKEN at seq {seq}:" in chain and "hash mismatch" in chain
        assert 'data-chain="broken"' in page and 'class="flash bad error"' in page

        # Put the row back: with the next entry the page says verified again.
        await asyncio.to_thread(_rewrite, path, seq, original)
        await add("ivan")
        _, page = await get(admin, "/ui/audit")
        assert flash(page, "chain").startswith("Chain verified:")


def _added_row(path: Path, name: str) -> tuple[int, str]:
    with closing(sqlite3.connect(path)) as conn:
        row = conn.execute(
            "SELECT seq, entry FROM audit WHERE json_extract(entry, '$.action') = 'user.added' "
            "AND json_extract(entry, '$.target') = ?",
            (name,),
        ).fetchone()
    assert row is not None, f"no user.added entry for {name}"
    return int(row[0]), str(row[1])


def _rewrite(path: Path, seq: int, entry: str) -> None:
    """Edit one audit row as a tamperer would: drop the append-only trigger, update, restore."""
    conn = sqlite3.connect(path, timeout=5.0, isolation_level=None)
    try:
        (trigger,) = conn.execute(
            "SELECT sql FROM sqlite_master WHERE type = 'trigger' AND name = 'audit_no_update'"
        ).fetchone()
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("DROP TRIGGER audit_no_update")
        conn.execute("UPDATE audit SET entry = ? WHERE seq = ?", (entry, seq))
        conn.execute(trigger)
        conn.execute("COMMIT")
    finally:
        conn.close()


# -- every form --------------------------------------------------------------------------------


async def test_every_form_of_the_ui_is_refused_without_the_sessions_csrf_token(site: Site):
    """Enumerated from the router, so that a form added later is covered: no POST of the UI
    acts on a logged-in admin's session without its CSRF token, or with another session's."""
    posts = sorted(
        resource.canonical
        for resource in site.client.app.router.resources()
        for route in resource
        if route.method == "POST" and resource.canonical.startswith("/ui/")
    )
    assert len(posts) >= 12, posts
    accounts = site.gateway.accounts
    assert accounts is not None
    users_before = [u.name for u in await asyncio.to_thread(accounts.list_users)]
    async with browser(site.client) as admin, browser(site.client) as other:
        await login(admin, "root", PASSWORD)
        foreign = await login(other, "sue", PASSWORD)
        for template in posts:
            path = (
                template.replace("{id}", "p-none-1")
                .replace("{name}", "vic")
                .replace("{secret}", "x" * 32)
            )
            form = {"name": "mallory", "password": PASSWORD, "reason": "forged", "value": "1"}
            for csrf in (None, "", foreign, "x" * 43):
                sent = form if csrf is None else {**form, "csrf": csrf}
                status, _, _ = await post(admin, path, sent)
                # 404 only where the route itself answers before any form (an unknown setup
                # link); everything else refuses the form.
                assert status == 403 or (status == 404 and "{secret}" in template), (
                    template,
                    csrf,
                    status,
                )
    users_after = [u.name for u in await asyncio.to_thread(accounts.list_users)]
    assert users_after == users_before, "no forged form changed anything"
    assert not accounts.get_user("vic").disabled


async def test_hostile_cookies_and_login_forms_get_the_login_page_or_4xx_never_5xx(site: Site):
    client = site.client
    for cookie in ("", "x", "A" * 4000, "%00%ff", "\u00e9\u00e8", "otw_" * 200):
        async with client.get(
            "/ui/approvals", headers={"Cookie": f"otw_session={cookie}"}, allow_redirects=False
        ) as answer:
            assert answer.status == 303, (cookie[:20], answer.status)
            assert answer.headers["Location"].startswith("/ui/login")
    # A session cookie on a JSON write is no credential (writes take no CSRF token).
    async with browser(client) as supervisor:
        await login(supervisor, "sue", PASSWORD)
        async with supervisor.post(
            "/proposals", json={"point": "line1/oven1/heater_setpoint", "value": 181, "reason": "x"}
        ) as answer:
            assert answer.status == 401, await answer.text()
    # Login forms that are not forms: a file upload (multipart), a JSON body, no body, a huge
    # or NUL-bearing name.
    async with client.get("/ui/login") as page:
        token = csrf_of(await page.text())
    attempts: list[dict[str, Any]] = [
        {"json": {"csrf": token, "name": "sue", "password": PASSWORD}},
        {},
        {"data": {"csrf": token, "name": "n" * 100_000, "password": "p"}},
        {"data": {"csrf": token, "name": "sue\x00", "password": "p\x00"}},
    ]
    upload = aiohttp.FormData()
    upload.add_field("csrf", token)
    upload.add_field("name", b"sue", filename="name.txt")
    upload.add_field("password", PASSWORD)
    attempts.append({"data": upload})
    for kwargs in attempts:
        async with client.post("/ui/login", allow_redirects=False, **kwargs) as answer:
            assert 400 <= answer.status < 500, (kwargs, answer.status, await answer.text())


async def test_hostile_what_if_point_and_proposal_requests_get_4xx_never_5xx(site: Site):
    proposals_before = len(site.gateway.engine.proposals)  # type: ignore[union-attr]
    async with browser(site.client) as sue:
        csrf = await login(sue, "sue", PASSWORD)
        setpoint = "line1/oven1/heater_setpoint"
        for point, value in (
            (setpoint, "nan"),
            (setpoint, "inf"),
            (setpoint, "1e999"),
            (setpoint, "abc"),
            (setpoint, ""),
            (setpoint, "5000"),  # outside the point's range
            ("no/such/point", "1"),
            (HOSTILE, "1"),
            ("line1/oven1/temperature", "1"),  # not writable
        ):
            status, page, _ = await post(
                sue, "/ui/whatif", {"csrf": csrf, "point": point, "value": value}
            )
            assert status == 400, (point, value, status)
            assert HOSTILE not in page
        for form in (
            {"point": setpoint, "value": "nan", "reason": "x"},
            {"point": "no/such/point", "value": "1", "reason": "x"},
            {"point": setpoint, "value": "181", "reason": ""},
            {"point": setpoint, "value": "181", "reason": "r" * 5000},
        ):
            status, _, _ = await post(sue, "/ui/whatif/propose", {"csrf": csrf, **form})
            assert 400 <= status < 500, (form, status)
        for path, expected in (
            ("/ui/points/no/such/point", 404),
            (f"/ui/points/{setpoint}?window=bogus", 200),  # the default window instead
            ("/ui/proposals/" + "p" * 500, 404),
            ("/ui/proposals/%3Cscript%3E", 404),
        ):
            status, page = await get(sue, path)
            assert status == expected, (path, status)
            assert "<script>" not in page  # the hostile id is escaped, never markup
    assert len(site.gateway.engine.proposals) == proposals_before  # type: ignore[union-attr]
