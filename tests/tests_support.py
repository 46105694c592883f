"""Helpers shared by the test modules (on pytest's pythonpath; see pyproject.toml)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest


async def eventually(check: Callable[[], Any], within: float = 10.0, what: str = "") -> Any:
    """Poll `check` until it returns a truthy value; fail with `what` after `within` s."""
    deadline = time.monotonic() + within
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {within}s waiting for {what or check}")
        await asyncio.sleep(0.05)
