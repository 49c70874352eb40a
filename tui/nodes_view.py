"""Nodes/GPUs view: node states, GPUs allocated vs total, utilisation with a trend of the last
hour's samples, failures in the last 7 days; drain/resume. GPUs that are allocated but show no
utilisation stand out in red. Under the highlighted node's GPU table, one sparkline per GPU
(tui.util_sparkline: textual's Sparkline on a 0-100 % scale) shows its utilisation minute by
minute over the last hour, from the gpu_samples table (Store.gpu_samples, in the worker).

Slurm 22.05's node record says how many GPUs of a type are allocated, not which: a node whose
busy GPUs (utilisation >= IDLE_PCT in the newest sample) are fewer than its allocated ones
has ``allocated - busy`` GPUs that are allocated but idle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import DataTable, Static

from db.reports import node_failures
from db.store import DatabaseError, StoreError
from slurm_plugin.slurm.client import Node
from tui import format as fmt
from tui.confirm import ConfirmScreen
from tui.keyed_table import KeyedTable, Row
from tui.sources import Sources
from tui.util_sparkline import UtilisationSparkline
from tui.view import View

WINDOW_S = 60 * 60.0
"""Utilisation trend window: the last hour."""
TREND_SLOTS = 16
MINUTES = 60
"""The per-GPU sparklines' slots: one a minute."""
IDLE_PCT = 5.0
FAILURE_DAYS = 7
NODE_COLUMNS = (("node", "Node"), ("state", "State"), ("gpus", "GPUs used"),
                ("util", "Util"), ("trend", "Trend 1h"), ("idle", "Idle alloc"),
                ("fail", "Fail 7d"), ("reason", "Reason"))
GPU_COLUMNS = (("gpu", "GPU"), ("type", "Type"), ("util", "Util"), ("mem", "Mem GiB"),
               ("note", "Note"))
STATE_STYLE = {"idle": "green", "mixed": "cyan", "allocated": "blue", "down": "bold red",
               "drained": "red", "draining": "yellow", "drain": "red"}


@dataclass
class GpuTrend:
    index: int
    gpu_type: str | None
    util: float | None = None
    mem_bytes: int | None = None
    slots: list[float | None] = field(default_factory=lambda: [None] * TREND_SLOTS)
    minutes: list[float | None] = field(default_factory=lambda: [None] * MINUTES)
    """Mean utilisation per minute of the window, oldest first (None: no sample)."""


@dataclass
class NodeInfo:
    node: Node
    gpus: list[GpuTrend]
    failures: int

    @property
    def allocated(self) -> int:
        return sum(self.node.gpus_used.values())

    @property
    def busy(self) -> int:
        return sum(1 for g in self.gpus if g.util is not None and g.util >= IDLE_PCT)

    @property
    def allocated_idle(self) -> int | None:
        if not any(g.util is not None for g in self.gpus):
            return None
        return max(0, self.allocated - self.busy)

    def trend(self) -> list[float | None]:
        out: list[float | None] = []
        for i in range(TREND_SLOTS):
            vals = [g.slots[i] for g in self.gpus if g.slots[i] is not None]
            out.append(sum(vals) / len(vals) if vals else None)  # type: ignore[arg-type]
        return out


def trends(samples: list[dict[str, Any]], now: float) -> dict[str, list[GpuTrend]]:
    """Per node, per GPU index: newest utilisation and the mean per time slot of the window."""
    start = now - WINDOW_S
    slot_s = WINDOW_S / TREND_SLOTS
    sums: dict[tuple[str, int], list[list[float]]] = {}
    per_minute: dict[tuple[str, int], list[list[float]]] = {}
    out: dict[str, dict[int, GpuTrend]] = {}
    for s in samples:  # ordered by ts
        node, idx = s["node"], s["gpu_index"] if s["gpu_index"] is not None else -1
        g = out.setdefault(node, {}).get(idx)
        if g is None:
            g = out[node][idx] = GpuTrend(idx, s["gpu_type"])
            sums[(node, idx)] = [[] for _ in range(TREND_SLOTS)]
            per_minute[(node, idx)] = [[] for _ in range(MINUTES)]
        g.util, g.mem_bytes = s["util"], s["mem_used_bytes"]
        slot = min(TREND_SLOTS - 1, max(0, int((s["ts"] - start) / slot_s)))
        minute = min(MINUTES - 1, max(0, int((s["ts"] - start) / (WINDOW_S / MINUTES))))
        if s["util"] is not None:
            sums[(node, idx)][slot].append(s["util"])
            per_minute[(node, idx)][minute].append(s["util"])
    for (node, idx), slots in sums.items():
        out[node][idx].slots = [sum(v) / len(v) if v else None for v in slots]
        out[node][idx].minutes = [sum(v) / len(v) if v else None
                                  for v in per_minute[(node, idx)]]
    return {n: sorted(gs.values(), key=lambda g: g.index) for n, gs in out.items()}


def state_text(node: Node) -> Text:
    flags = [f for f in node.flags if f in ("DRAIN", "NOT_RESPONDING", "MAINTENANCE", "FAIL")]
    word = node.state + "".join(f"+{f.lower()}" for f in flags)
    style = "red" if node.drained else STATE_STYLE.get(node.state, "")
    return Text(word, style=style)


def gpus_text(node: Node) -> str:
    parts = [f"{t} {node.gpus_used.get(t, 0)}/{n}" for t, n in sorted(node.gpus_total.items())]
    return ", ".join(parts) or "-"


def node_cells(info: NodeInfo) -> tuple[str | Text, ...]:
    utils = [g.util for g in info.gpus if g.util is not None]
    idle = info.allocated_idle
    idle_cell = Text("-" if idle is None else str(idle), justify="right",
                     style="bold white on red" if idle else "")
    return (info.node.name, state_text(info.node), gpus_text(info.node),
            Text(f"{sum(utils) / len(utils):.0f}%" if utils else "-", justify="right"),
            fmt.sparkline(info.trend(), TREND_SLOTS), idle_cell,
            Text(str(info.failures) if info.failures else "", justify="right",
                 style="red" if info.failures else ""),
            info.node.reason or "")


def gpu_cells(info: NodeInfo, g: GpuTrend) -> tuple[str | Text, ...]:
    idle = g.util is not None and g.util < IDLE_PCT
    flagged = idle and bool(info.allocated_idle)
    note = Text("allocated but idle?" if flagged else "idle" if idle else "",
                style="bold red" if flagged else "dim")
    util = Text("-" if g.util is None else f"{g.util:.0f}%", justify="right",
                style="bold red" if flagged else "")
    mem = "-" if g.mem_bytes is None else f"{g.mem_bytes / 2**30:.1f}"
    return (str(g.index), g.gpu_type or "-", util, Text(mem, justify="right"), note)


class NodesView(View):
    BINDINGS = [
        Binding("d", "node('drain')", "Drain"),
        Binding("u", "node('resume')", "Resume"),
    ]

    def __init__(self, sources: Sources, *, interval: float) -> None:
        super().__init__(sources, id="nodes")
        self.infos: dict[str, NodeInfo] = {}
        self.fetcher = self.poller("sinfo", self._fetch, self._show_data, interval)

    def compose(self) -> ComposeResult:
        yield Static("Loading nodes...", classes="info")
        yield KeyedTable(id="nodes-table")
        yield Static("", id="gpus-title")
        yield KeyedTable(id="gpus-table")
        yield Vertical(id="gpu-sparklines")

    def on_mount(self) -> None:
        self.table.set_columns(NODE_COLUMNS)
        self.query_one("#gpus-table", KeyedTable).set_columns(GPU_COLUMNS)

    @property
    def table(self) -> KeyedTable:
        return self.query_one("#nodes-table", KeyedTable)

    def focus_main(self) -> None:
        self.table.focus()

    def _fetch(self) -> tuple[list[NodeInfo], str | None, float]:
        now = self.sources.clock()
        nodes = self.sources.nodes()
        samples: list[dict[str, Any]] = []
        failures: dict[str, int] = {}
        error = None
        try:
            with self.sources.store() as store:
                samples = store.gpu_samples(now - WINDOW_S, now)
                # Slurm's nodes are this cluster's; node names repeat across clusters
                failures = {r["node"]: int(r["failures"])
                            for r in node_failures(store, now - FAILURE_DAYS * 86400,
                                                   cluster=self.sources.slurm_cluster)}
        except (StoreError, *DatabaseError) as exc:
            error = f"no utilisation or failures: {exc}"
        by_node = trends(samples, now)
        infos = [NodeInfo(n, by_node.get(n.name, []), failures.get(n.name, 0))
                 for n in sorted(nodes, key=lambda n: n.name)]
        return infos, error, now

    def _show_data(self, data: tuple[list[NodeInfo], str | None, float]) -> None:
        infos, error, now = data
        self.gate.report("gpu samples", error)
        self.infos = {i.node.name: i for i in infos}
        rows: list[Row] = [(i.node.name, node_cells(i)) for i in infos]
        self.table.sync(rows)
        total = sum(sum(i.node.gpus_total.values()) for i in infos)
        used = sum(i.allocated for i in infos)
        idle = sum(i.allocated_idle or 0 for i in infos)
        drained = sum(1 for i in infos if i.node.drained or i.node.state == "down")
        self.set_info(f"{self.sources.slurm_cluster}: {len(infos)} nodes, {drained} "
                      f"drained/down | GPUs {used}/{total} "
                      f"allocated, {idle} allocated but idle | "
                      f"{fmt.clock(now)[-5:]} UTC")
        self._show_gpus()

    @on(DataTable.RowHighlighted, "#nodes-table")
    def _highlighted(self) -> None:
        self._show_gpus()

    def _show_gpus(self) -> None:
        key = self.table.cursor_key
        info = self.infos.get(key) if key else None
        table = self.query_one("#gpus-table", KeyedTable)
        title = self.query_one("#gpus-title", Static)
        if info is None:
            title.update("")
            table.sync([])
            self._show_sparklines([])
            return
        title.update(Text(f"GPUs of {info.node.name} ({gpus_text(info.node)}); "
                          "utilisation, last hour, 0-100 %", style="bold"))
        table.sync([(str(g.index), gpu_cells(info, g)) for g in info.gpus])
        self._show_sparklines(info.gpus)

    def _show_sparklines(self, gpus: list[GpuTrend]) -> None:
        """One row per GPU: its label and its last hour; rows are kept and reused."""
        box = self.query_one("#gpu-sparklines", Vertical)
        have = list(box.children)
        for extra in have[len(gpus):]:
            extra.remove()
        for i, g in enumerate(gpus):
            util = "-" if g.util is None else f"{g.util:.0f}%"
            label = f"GPU {g.index} {util:>4}"
            if i < len(have):
                have[i].query_one(Static).update(label)
                have[i].query_one(UtilisationSparkline).set_slots(g.minutes)
            else:
                box.mount(Horizontal(Static(label, classes="gpu-label"),
                                     UtilisationSparkline(g.minutes), classes="gpu-spark"))

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        return action != "node" or self.sources.viewer.admin

    def action_node(self, action: str) -> None:
        key = self.table.cursor_key
        if key is None:
            self.gate.say("No node selected.", error=True)
            return
        info = self.infos[key]
        question = (f"{action.capitalize()} node {key} ({info.node.state}, "
                    f"{info.allocated} GPUs allocated)?")
        reason = f"drained by {self.sources.viewer.user}" if action == "drain" else None

        def confirmed(given: str | None) -> None:
            if given is None:
                return
            request: dict[str, Any] = {"action": action, "node": key}
            if given:
                request["reason"] = given
            self.gate.act(request, self.fetcher)

        self.app.push_screen(ConfirmScreen(question, reason=reason), confirmed)
