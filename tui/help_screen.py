"""The key reference (``?``)."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

HELP = """\
[b]slurmgate[/b] admin console: everything works from the keyboard

[b]Everywhere[/b]
  1-5     Queue, Nodes, Quotas, Chargeback, Events
  r       refresh this view now        ?  this help     q  quit
  tab     next widget                  arrows, pgup/pgdn, home/end

[b]Queue[/b]
  /       search: job, user, team, project, state, reason, nodes
  f  c    filter by team, user, partition, state / clear filters
  s  S    sort by the next column / reverse (or click a header)
  h  u    hold / release the job
  R  x    requeue / cancel the job (admins; asks first)

[b]Nodes[/b]
  d  u    drain (asks for a reason) / resume the node
          red "Idle alloc": allocated GPUs showing no utilisation

[b]Chargeback[/b]
  p  t    this or last month / custom dates
  d  e    depth: team, +project, +user / export the rows to CSV

[b]Events[/b]
  k  K    next kind / all kinds

Admin actions go through the slurmgate daemon, which records who
did them. Slurm is asked for the whole queue once per refresh.
"""


class HelpScreen(ModalScreen[None]):
    BINDINGS = [
        Binding("escape", "close", "Close"),
        Binding("question_mark", "close", "Close", show=False),
        Binding("q", "close", "Close", show=False),
    ]

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help"):
            yield Static(HELP)

    def action_close(self) -> None:
        self.dismiss(None)
