"""The daemon's structured log: one JSON object per line."""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any, TextIO


class EventLog:
    """Structured log: one JSON object per line (ts, event, fields)."""

    def __init__(self, path: str = "") -> None:
        self._lock = threading.Lock()
        # kept open for the daemon's lifetime: one append-only structured log
        self._out: TextIO = (open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
                             if path else sys.stderr)

    def write(self, event: str, **fields: Any) -> None:
        line = json.dumps({"ts": round(time.time(), 6), "event": event, **fields}, default=str)
        with self._lock:
            self._out.write(line + "\n")
            self._out.flush()
