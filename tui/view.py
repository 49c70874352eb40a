"""Base of the five views: each owns the pollers of its data and an info line."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, cast

from textual.containers import Vertical
from textual.widgets import Static

from tui.refresh import Poller
from tui.sources import Sources


class Gate(Protocol):
    """What a view asks of the app it runs in (``tui.app.SlurmgateApp``): which view is on
    screen, whether a dialog is open, the status line, and admin actions."""

    active_view: str

    @property
    def modal_open(self) -> bool: ...

    def report(self, source: str, error: str | None) -> None: ...

    def say(self, message: str, *, error: bool = False) -> None: ...

    def act(self, request: dict[str, Any], poller: Poller) -> None: ...


class View(Vertical):
    """Refreshes only while it is the active tab and no dialog is open."""

    def __init__(self, sources: Sources, *, id: str) -> None:
        super().__init__(id=id)
        self.sources = sources
        self.pollers: list[Poller] = []

    @property
    def gate(self) -> Gate:  # the typed app
        return cast(Gate, self.app)

    @property
    def shown(self) -> bool:
        return self.gate.active_view == self.id and not self.gate.modal_open

    def poller(self, name: str, fetch: Callable[[], Any], render: Callable[[Any], None],
               interval: float) -> Poller:
        p = Poller(self, name, fetch, render, interval, paused=lambda: not self.shown,
                   report=lambda source, error: self.gate.report(source, error))
        self.pollers.append(p)
        return p

    def on_mount(self) -> None:
        # Textual calls on_mount of every class in the MRO: subclasses set up first, then this.
        for p in self.pollers:
            p.start()

    def activated(self) -> None:
        for p in self.pollers:
            p.resume()

    def refresh_now(self) -> None:
        for p in self.pollers:
            p.request()

    def set_info(self, text: str) -> None:
        self.query_one(".info", Static).update(text)

    def focus_main(self) -> None:
        """Focus the view's main table."""
