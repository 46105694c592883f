"""The lifecycle stack: reverse order, failures collected, every task awaited."""

from __future__ import annotations

import asyncio

import pytest

from gateway.lifecycle import Lifecycle, ShutdownError, wait_or_cancel


async def test_steps_run_newest_first_sync_and_async():
    life = Lifecycle()
    ran: list[str] = []

    async def later(name: str) -> None:
        await asyncio.sleep(0)
        ran.append(name)

    life.on_stop("store", lambda: ran.append("store"))
    life.on_stop("drivers", lambda: later("drivers"))
    life.on_stop("server", lambda: ran.append("server"))
    await life.aclose()
    assert ran == ["server", "drivers", "store"]


async def test_a_failing_step_stops_nothing_and_is_reported():
    life = Lifecycle()
    ran: list[str] = []

    def broken() -> None:
        raise RuntimeError("disk on fire")

    async def broken_async() -> None:
        raise OSError("socket gone")

    life.on_stop("store", lambda: ran.append("store"))
    life.on_stop("drivers", broken_async)
    life.on_stop("server", broken)
    with pytest.raises(ShutdownError) as caught:
        await life.aclose()
    assert ran == ["store"]  # ran although both later-registered steps failed before it
    assert [name for name, _ in caught.value.failures] == ["server", "drivers"]
    assert "disk on fire" in str(caught.value) and "socket gone" in str(caught.value)


async def test_tasks_are_cancelled_and_awaited():
    life = Lifecycle()
    cleaned = asyncio.Event()

    async def forever() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(0)  # cleanup that needs the loop: only runs if awaited
            cleaned.set()

    task = life.task(forever(), "forever")
    await asyncio.sleep(0)
    await life.aclose()
    assert task.done() and task.cancelled()
    assert cleaned.is_set()


async def test_a_task_that_died_is_reported_at_shutdown():
    life = Lifecycle()

    async def dies() -> None:
        raise ValueError("bad frame")

    life.task(dies(), "pump")
    await asyncio.sleep(0.01)
    with pytest.raises(ShutdownError, match="task pump: ValueError: bad frame"):
        await life.aclose()


async def test_wait_or_cancel_lets_finishing_tasks_finish():
    finished: list[str] = []

    async def quick() -> None:
        await asyncio.sleep(0.01)
        finished.append("quick")

    async def stuck() -> None:
        await asyncio.Event().wait()

    tasks = [asyncio.create_task(quick()), asyncio.create_task(stuck())]
    await wait_or_cancel(tasks, grace_s=0.2)
    assert finished == ["quick"]
    assert tasks[1].cancelled()
