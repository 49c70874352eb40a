"""Background refresh of one data source, in the manner of dolphie's worker manager.

A ``Poller`` fetches in a thread worker and renders on the UI thread (``call_from_thread``);
only after the render does it arm the timer for the next fetch, so fetches never overlap and
a slow Slurm never queues up work. While ``paused()`` says so (a modal is open, the view is
hidden) a due fetch waits until ``resume()``. Errors back off: 5, 10, 20, 30, 30 ... seconds.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

from textual.timer import Timer
from textual.widget import Widget

BACKOFF_MIN_S = 5.0
BACKOFF_MAX_S = 30.0


def call_ui(app: Any, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """``app.call_from_thread`` that gives up quietly when the app is shutting down."""
    with contextlib.suppress(RuntimeError):
        app.call_from_thread(fn, *args, **kwargs)


def backoff(failures: int) -> float:
    """Seconds to wait after the n-th failure in a row (n >= 1)."""
    return min(BACKOFF_MAX_S, BACKOFF_MIN_S * 2 ** max(0, failures - 1))


class Poller:
    """Fetch with ``fetch()`` (any thread), render with ``render(data)`` (UI thread)."""

    def __init__(self, owner: Widget, name: str, fetch: Callable[[], Any],
                 render: Callable[[Any], None], interval: float,
                 paused: Callable[[], bool] = lambda: False,
                 report: Callable[[str, str | None], None] | None = None) -> None:
        self.owner = owner
        self.name = name
        self.fetch = fetch
        self.render = render
        self.interval = interval
        self.paused = paused
        self.report = report
        self.in_flight = False
        self.due = False
        self.again = False
        self.failures = 0
        self.last_ok: float | None = None
        self.last_fetch_s = 0.0
        self.last_render_s = 0.0
        self.renders = 0
        self._timer: Timer | None = None

    # -- control (UI thread) ---------------------------------------------------------------

    def start(self) -> None:
        self._tick()

    def request(self) -> None:
        """Fetch now (after the one in flight, if any); ignores the pause."""
        if self.in_flight:
            self.again = True
            return
        self._cancel_timer()
        self._launch()

    def resume(self) -> None:
        """Run a fetch that fell due while paused, or one that is stale."""
        if self.in_flight or self.paused():
            return
        stale = self.last_ok is None or time.monotonic() - self.last_ok >= self.interval
        if self.due or (stale and self.failures == 0):
            self.due = False
            self._cancel_timer()
            self._launch()

    def stop(self) -> None:
        self._cancel_timer()

    # -- internals -------------------------------------------------------------------------

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.stop()
            self._timer = None

    def _arm(self, delay: float) -> None:
        self._cancel_timer()
        if self.again:  # asked for while the last fetch ran: go again now
            self.again = False
            self.owner.call_later(self._tick)
            return
        self._timer = self.owner.set_timer(delay, self._tick, name=f"poll-{self.name}")

    def _tick(self) -> None:
        self._timer = None
        if self.paused():
            self.due = True
            return
        self._launch()

    def _launch(self) -> None:
        self.in_flight = True
        self.due = False
        self.owner.run_worker(self._work, name=f"fetch-{self.name}", group=f"fetch-{self.name}",
                              thread=True, exit_on_error=False)

    def _work(self) -> None:
        app = self.owner.app
        t0 = time.perf_counter()
        try:
            data = self.fetch()
        except Exception as exc:  # shown in the status line; the next try backs off
            self.last_fetch_s = time.perf_counter() - t0
            call_ui(app, self._failed, exc)
            return
        self.last_fetch_s = time.perf_counter() - t0
        call_ui(app, self._done, data)

    def _done(self, data: Any) -> None:
        t0 = time.perf_counter()
        try:
            self.render(data)
        except Exception as exc:  # a render bug must not stop the refresh loop
            self.last_render_s = time.perf_counter() - t0
            self._failed(exc)
            return
        self.last_render_s = time.perf_counter() - t0
        self.renders += 1
        self.in_flight = False
        self.failures = 0
        self.last_ok = time.monotonic()
        if self.report:
            self.report(self.name, None)
        self._arm(self.interval)

    def _failed(self, exc: BaseException) -> None:
        self.in_flight = False
        self.failures += 1
        wait = backoff(self.failures)
        if self.report:
            self.report(self.name, f"{exc} (retry in {wait:g} s)")
        self._arm(wait)
