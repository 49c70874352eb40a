"""The queue's filter dialog: team, user, partition and state, from the values in the queue."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Label, Select

from tui.queue_model import FILTER_FIELDS

Filters = dict[str, str | None]


class FilterScreen(ModalScreen[Filters | None]):
    """Dismisses with {field: value or None}, or None when cancelled."""

    BINDINGS = [Binding("escape", "cancel", "Cancel"), Binding("ctrl+s", "apply", "Apply")]

    def __init__(self, current: Filters, values: dict[str, list[str]]) -> None:
        super().__init__()
        self.current = current
        self.values = values

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label("Filter the queue (blank = any)")
            for name in FILTER_FIELDS:
                options = list(self.values.get(name, []))
                now = self.current.get(name)
                if now and now not in options:
                    options.append(now)
                with Horizontal(classes="field"):
                    yield Label(name.capitalize(), classes="field-label")
                    yield Select([(v, v) for v in options], value=now or Select.NULL,
                                 prompt="any", id=f"filter-{name}")
            with Horizontal(id="buttons"):
                yield Button("Apply", variant="primary", id="apply")
                yield Button("Clear", id="clear")
                yield Button("Cancel", id="cancel")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "apply":
            self.action_apply()
        elif event.button.id == "clear":
            self.dismiss(dict.fromkeys(FILTER_FIELDS))
        else:
            self.action_cancel()

    def action_apply(self) -> None:
        out: Filters = {}
        for name in FILTER_FIELDS:
            value = self.query_one(f"#filter-{name}", Select).value
            out[name] = value if isinstance(value, str) else None
        self.dismiss(out)

    def action_cancel(self) -> None:
        self.dismiss(None)
