"""Start-up and shutdown as a stack: what started last stops first, and one failure stops nothing.

Each subsystem registers its own teardown right after it starts, so a start that fails halfway
unwinds exactly what had started, and adding a subsystem never means editing a hand-kept list of
stop calls in the right order. Teardown keeps going past a failing step (a driver that cannot
close must not keep the database from being flushed); the failures are logged where they happen
and raised together at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import AsyncExitStack
from typing import Any, TypeVar

from gateway.errors import GatewayError

log = logging.getLogger(__name__)

__all__ = ["Lifecycle", "ShutdownError", "wait_or_cancel"]

T = TypeVar("T")


class ShutdownError(GatewayError):
    """One or more teardown steps failed; every other step still ran."""

    def __init__(self, failures: list[tuple[str, BaseException]]) -> None:
        text = "; ".join(f"{name}: {type(exc).__name__}: {exc}" for name, exc in failures)
        super().__init__(f"{len(failures)} shutdown step(s) failed: {text}")
        self.failures = failures


class Lifecycle:
    """A stack of named teardown steps, run in reverse order by `aclose`."""

    def __init__(self) -> None:
        self._stack = AsyncExitStack()
        self._failures: list[tuple[str, BaseException]] = []

    def on_stop(self, name: str, step: Callable[[], Awaitable[object] | object]) -> None:
        """Run `step()` at teardown (awaited if it returns an awaitable); failures are collected."""

        async def run() -> None:
            try:
                result = step()
                if inspect.isawaitable(result):
                    await result
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.exception("shutdown: %s failed", name)
                self._failures.append((name, exc))

        self._stack.push_async_callback(run)

    def task(self, coro: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
        """Start a background task that teardown cancels and awaits."""
        task = asyncio.create_task(coro, name=name)
        self.on_stop(f"task {name}", lambda: _cancel_and_wait(task))
        return task

    async def aclose(self) -> None:
        """Run every teardown step, newest first; raise ShutdownError if any failed."""
        await self._stack.aclose()
        failures, self._failures = self._failures, []
        if failures:
            raise ShutdownError(failures)


async def _cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel a task and wait until it has really ended; re-raise what it died of."""
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise  # we are being cancelled ourselves: never swallow that
    # Anything else the task died of propagates to on_stop's collector.


async def wait_or_cancel(tasks: list[asyncio.Task[Any]], grace_s: float) -> None:
    """Give tasks `grace_s` seconds to end by themselves, then cancel and await the rest."""
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=grace_s)
    for task in pending:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
