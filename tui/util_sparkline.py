"""A GPU's utilisation over the last hour as textual's Sparkline, on a fixed 0-100 % scale.

Textual's Sparkline scales bars to the data's own minimum and maximum, so a GPU idling
between 1 and 3 % would look as busy as one at 100 %. Here each column is handed over as a
pair (its value, an anchor): the first pair's anchor is 0, the second's 100, the others
repeat the value, and the summary function takes the first of each pair. The scale is then
always 0-100 % and every column shows its own value. Minutes without a sample count as 0 %.
"""

from __future__ import annotations

from collections.abc import Sequence

from textual.app import RenderResult
from textual.renderables.sparkline import Sparkline as SparklineRenderable
from textual.widgets import Sparkline


def _first(pair: Sequence[float]) -> float:
    return pair[0]


def columns(slots: Sequence[float | None], width: int) -> list[float]:
    """``slots`` (oldest first) resampled to ``width`` columns: the mean of each column's
    samples, 0 where it has none; clipped to 0-100."""
    n = len(slots)
    out = []
    for i in range(width):
        lo, hi = i * n // width, max(i * n // width + 1, (i + 1) * n // width)
        vals = [v for v in slots[lo:hi] if v is not None]
        out.append(min(100.0, max(0.0, sum(vals) / len(vals))) if vals else 0.0)
    return out


def anchored(values: Sequence[float]) -> list[float]:
    """(value, anchor) pairs, flattened; anchors 0 and 100 in the first two pairs."""
    data: list[float] = []
    for i, v in enumerate(values):
        data += [v, 0.0 if i == 0 else 100.0 if i == 1 else v]
    return data


class UtilisationSparkline(Sparkline):
    DEFAULT_CSS = """
    UtilisationSparkline > .sparkline--max-color { color: $success; }
    UtilisationSparkline > .sparkline--min-color { color: $error 70%; }
    """

    def __init__(self, slots: Sequence[float | None] = (), *, id: str | None = None,
                 classes: str | None = None) -> None:
        super().__init__(None, summary_function=_first, id=id, classes=classes)
        self.slots: list[float | None] = list(slots)

    def set_slots(self, slots: Sequence[float | None]) -> None:
        self.slots = list(slots)
        self.refresh()

    def render(self) -> RenderResult:
        width = max(2, self.size.width)
        _, base = self.background_colors
        lo = base + self.get_component_styles("sparkline--min-color").color
        hi = base + self.get_component_styles("sparkline--max-color").color
        data = anchored(columns(self.slots, width)) if self.slots else []
        return SparklineRenderable(data, width=width, height=self.size.height,
                                   min_color=lo.rich_color, max_color=hi.rich_color,
                                   summary_function=_first)
