"""Bounded waiting: tests poll a condition with a timeout, never sleep blindly."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(cond: Callable[[], T], timeout: float = 30.0, interval: float = 0.1,
             what: str = "condition") -> T:
    """Return cond()'s first truthy value; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: T = cond()
    while not last:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)
        last = cond()
    return last
