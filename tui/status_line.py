"""The one-line status bar: who is looking, the latest notice, and errors with their retry."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static


class StatusLine(Static):
    """Errors per source stay until that source succeeds again; notices replace each other."""

    def __init__(self, who: str, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.who = who
        self.errors: dict[str, str] = {}
        self.notice = ""
        self.notice_is_error = False

    def on_mount(self) -> None:
        self._show()

    def report(self, source: str, error: str | None) -> None:
        if error is None:
            if self.errors.pop(source, None) is not None:
                self._show()
            return
        self.errors.pop(source, None)  # the newest error is shown first
        self.errors[source] = error
        self._show()

    def say(self, message: str, *, error: bool = False) -> None:
        self.notice = message
        self.notice_is_error = error
        self._show()

    @property
    def text(self) -> str:
        return self.render_text().plain

    def render_text(self) -> Text:
        out = Text(f" {self.who} ", style="bold reverse")
        out.append(" ")
        if self.errors:
            source, error = next(reversed(self.errors.items()))
            out.append(f"{source}: {error}", style="bold red")
            if len(self.errors) > 1:
                out.append(f" (+{len(self.errors) - 1} more)", style="red")
        elif self.notice:
            out.append(self.notice, style="bold red" if self.notice_is_error else "")
        return out

    def _show(self) -> None:
        self.update(self.render_text())
