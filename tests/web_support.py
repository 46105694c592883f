"""Helpers for tests of the web UI: a browser of its own (cookie jar) and a login through the form.

Pages are read as a browser gets them; the CSRF tokens come out of the pages' hidden inputs, so
a test that passes has posted exactly what a browser would post.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
from aiohttp.test_utils import TestClient

__all__ = ["browser", "csrf_of", "login"]

_CSRF = re.compile(r'<input type="hidden" name="csrf" value="([^"]+)">')


def csrf_of(html: str) -> str:
    """The CSRF token of a page's forms (every form of a page carries the same one)."""
    found = _CSRF.search(html)
    assert found is not None, f"no CSRF input in the page: {html[:500]}"
    return found.group(1)


@asynccontextmanager
async def browser(client: TestClient) -> AsyncIterator[aiohttp.ClientSession]:
    """A second browser on the same server: its own cookies, so its own session."""
    jar = aiohttp.CookieJar(unsafe=True)  # cookies for 127.0.0.1, as a browser keeps them
    async with aiohttp.ClientSession(base_url=str(client.make_url("/")), cookie_jar=jar) as s:
        yield s


async def login(client: Any, name: str, password: str) -> str:
    """Log in through the form (pre-login cookie and token first); the session's CSRF token."""
    async with client.get("/ui/login") as page:
        assert page.status == 200, await page.text()
        token = csrf_of(await page.text())
    form = {"csrf": token, "name": name, "password": password, "next": "/ui/actions"}
    async with client.post("/ui/login", data=form, allow_redirects=False) as answer:
        assert answer.status == 303, f"login of {name} refused: {await answer.text()}"
        assert answer.headers["Location"] == "/ui/actions"
    async with client.get("/ui/actions", allow_redirects=False) as page:
        assert page.status == 200, f"{name} is not logged in: {page.status}"
        return csrf_of(await page.text())
