"""Asks for a custom date range (UTC days, end inclusive) for the chargeback view."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Label

Range = tuple[float, float, str]


def parse_range(text: str) -> Range:
    """'2025-10-01 2025-10-15' -> (start_ts, end_ts, label); the end day is included."""
    parts = text.replace("..", " ").split()
    if len(parts) != 2:
        raise ValueError("give two dates, e.g. 2025-10-01 2025-10-15")
    try:
        a, b = (datetime.strptime(p, "%Y-%m-%d").replace(tzinfo=UTC) for p in parts)
    except ValueError:
        raise ValueError("dates look like 2025-10-01 (year-month-day)") from None
    if b < a:
        raise ValueError("the second date must not be before the first")
    return a.timestamp(), (b + timedelta(days=1)).timestamp(), f"{parts[0]}_{parts[1]}"


class RangeScreen(ModalScreen[Range | None]):
    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label("Chargeback for the days (UTC, both included):", id="question")
            yield Input(placeholder="2025-10-01 2025-10-15", id="range")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        try:
            self.dismiss(parse_range(event.value))
        except ValueError as exc:
            self.query_one("#question", Label).update(f"{exc}; escape cancels")

    def action_cancel(self) -> None:
        self.dismiss(None)
