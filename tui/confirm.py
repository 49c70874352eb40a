"""Confirmation dialog for admin actions; optionally asks for a reason (node drains)."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label


class ConfirmScreen(ModalScreen[str | None]):
    """Dismisses with the reason ("" when none is asked) on yes, None on no."""

    BINDINGS = [
        Binding("escape", "no", "Cancel"),
        Binding("n", "no", "No", show=False),
        Binding("y", "yes", "Yes", show=False),
    ]

    def __init__(self, question: str, *, reason: str | None = None) -> None:
        super().__init__()
        self.question = question
        self.default_reason = reason

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(self.question, id="question")
            if self.default_reason is not None:
                yield Input(self.default_reason, placeholder="reason", id="reason")
            with Horizontal(id="buttons"):
                yield Button("Yes (y)", variant="error", id="yes")
                yield Button("No (n)", variant="primary", id="no")

    def on_mount(self) -> None:
        if self.default_reason is not None:
            self.query_one("#reason", Input).focus()  # type the reason, enter confirms
        else:
            self.query_one("#no", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "yes":
            self.action_yes()
        else:
            self.action_no()

    def on_input_submitted(self) -> None:
        self.action_yes()

    def action_yes(self) -> None:
        if self.default_reason is None:
            self.dismiss("")
            return
        reason = self.query_one("#reason", Input).value.strip()
        if not reason:
            self.query_one("#question", Label).update(f"{self.question}\nA reason is required.")
            return
        self.dismiss(reason)

    def action_no(self) -> None:
        self.dismiss(None)
