"""Helpers for the TUI tests (driving a headless app, waiting on its state) and their tests.

No async pytest plugin is installed: a test calls ``drive(app, scenario)``, which runs the
app headless and awaits ``scenario(pilot)`` inside it. Waiting polls with a bound (``until``);
Slurm-side waits go through ``tests.waiting.wait_for`` in a thread (``in_thread``), so the
app keeps running meanwhile.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
from textual.app import App
from textual.css.query import NoMatches
from textual.pilot import Pilot

from tui.keyed_table import KeyedTable

T = TypeVar("T")


def drive(app: App, scenario: Callable[[Pilot], Awaitable[T]], size: tuple[int, int] = (80, 24)
          ) -> T:
    async def main() -> T:
        async with app.run_test(size=size) as pilot:
            return await scenario(pilot)

    return asyncio.run(main())


async def until(pilot: Pilot, cond: Callable[[], T], timeout: float = 30.0,
                what: str = "condition", interval: float = 0.05) -> T:
    """Return cond()'s first truthy value; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await pilot.pause(interval)


async def in_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    return await asyncio.to_thread(fn, *args, **kwargs)


async def loaded(pilot: Pilot, view: str, renders: int = 1, timeout: float = 30.0) -> Any:
    """The view (switched to), once its refresh has rendered ``renders`` times."""
    app: Any = pilot.app

    def started() -> bool:  # the app is composed and the queue (the first view) has data
        try:
            queue = app.view("queue")
        except NoMatches:
            return False
        # ... and its detail pane shows the ledger of the selected job
        return queue.fetcher.renders >= 1 and queue.ledger_reads == 0

    await until(pilot, started, timeout, "the app to start")
    app.action_show(view)
    v = app.view(view)
    await until(pilot, lambda: v.fetcher.renders >= renders and not v.fetcher.in_flight,
                timeout, f"{view} view to load")
    await until(pilot, lambda: app.focused is not None and v in app.focused.ancestors,
                timeout, f"the focus in the {view} view")
    return v


def rows(table: KeyedTable) -> dict[str, list[str]]:
    """Plain text of every row, by key, in display order."""
    return {key: [str(getattr(c, "plain", c)) for c in table.get_row(key)] for key in table.keys}


def column(table: KeyedTable, name: str) -> list[str]:
    i = [k.value for k in table.columns].index(name)
    return [cells[i] for cells in rows(table).values()]


def test_until_gives_up_with_what_it_waited_for() -> None:
    async def scenario(pilot: Pilot) -> None:
        with pytest.raises(AssertionError, match="waiting for the impossible"):
            await until(pilot, lambda: False, timeout=0.2, what="the impossible")
        assert await until(pilot, lambda: 42, what="an answer") == 42

    drive(App(), scenario)
