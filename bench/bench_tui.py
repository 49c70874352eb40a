"""TUI benchmark: UI-thread time per queue refresh at 1,000 / 10,000 / 100,000 jobs, memory,
and SVG screenshots of every view in demo mode (bench/screenshots/).

    /opt/slurmgate/venv/bin/python bench/bench_tui.py [--sizes 1000,10000,100000] [--refreshes 5]

Each size runs in its own process (so peak RSS belongs to that size) against SyntheticSlurm,
headless at 80x24. Per refresh it records:

- apply: time on the UI thread applying the new rows (key diff into the DataTable, info line,
  detail pane): what `Poller` measures around the render callback;
- stall: the longest gap between ticks of a 5 ms UI-thread heartbeat while the refresh ran
  (fetch in the worker thread, apply, repaint): how long a key press could wait;
- fetch: time in the worker thread (squeue stand-in, annotate, filter, sort, format rows).

The first load (500 rows added) is reported apart from the refreshes that follow it.

The queue shows at most 500 rows ("Showing 500 of N"). Not a timed test: numbers go to
bench/RESULTS.md by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from slurm_plugin.slurm.synthetic import SyntheticSlurm  # noqa: E402
from tui.app import Intervals, SlurmgateApp  # noqa: E402
from tui.demo import DEMO_NOW, DemoSources  # noqa: E402

SCREENSHOTS = REPO / "bench" / "screenshots"
VIEWS = ("queue", "nodes", "quotas", "chargeback", "events")


async def _until(pilot, cond, timeout: float = 120.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("benchmark app did not finish in time")
        await pilot.pause(0.01)


async def _measure(n_jobs: int, refreshes: int) -> dict:
    slurm = SyntheticSlurm(n_jobs, n_nodes=256, seed=1, base_ts=DEMO_NOW,
                           clock=lambda: DEMO_NOW)
    sources = DemoSources(slurm=slurm, fill_store=False)
    app = SlurmgateApp(sources, intervals=Intervals(queue=3600, nodes=3600, quotas=3600,
                                                    chargeback=3600, events=3600))
    beats: list[float] = []
    out: dict = {"jobs": n_jobs, "apply_ms": [], "stall_ms": [], "fetch_ms": []}
    async with app.run_test(size=(80, 24)) as pilot:
        queue = app.view("queue")
        poller = queue.fetcher
        await _until(pilot, lambda: poller.renders >= 1)
        out["first_apply_ms"] = poller.last_render_s * 1000
        out["first_fetch_ms"] = poller.last_fetch_s * 1000
        app.set_interval(0.005, lambda: beats.append(time.perf_counter()))
        for i in range(refreshes):
            # vary the data a little, as a live queue does: one job changes per refresh
            slurm.hold(1001 + i) if slurm.job(1001 + i).pending else None
            await pilot.pause(0.05)
            start_renders = poller.renders
            beats.clear()
            t0 = time.perf_counter()
            poller.request()
            await _until(pilot, lambda s=start_renders: poller.renders > s)
            await pilot.pause(0.05)  # let the repaint happen inside the window
            ticks = [t0, *[b for b in beats if b >= t0]]
            gaps = [b - a for a, b in zip(ticks, ticks[1:], strict=False)]
            out["apply_ms"].append(poller.last_render_s * 1000)
            out["fetch_ms"].append(poller.last_fetch_s * 1000)
            out["stall_ms"].append(max(gaps) * 1000 if gaps else 0.0)
        out["shown"] = queue.result.query.limit if queue.result else 0
        out["info"] = app.screen_text().splitlines()[2].strip()
    sources.close()
    out["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


async def _screenshots() -> list[str]:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    written = []
    for size in ((80, 24), (120, 36)):
        for n, view in enumerate(VIEWS, 1):
            sources = DemoSources()
            app = SlurmgateApp(sources, export_dir="/tmp")
            async with app.run_test(size=size) as pilot:
                await pilot.press(str(n))
                poller = app.view(view).fetcher
                await _until(pilot, lambda p=poller: p.renders >= 1 and not p.in_flight)
                queue = app.view("queue")  # the detail pane's ledger read, when it made one
                await _until(pilot, lambda q=queue: q.ledger_reads == 0)
                await pilot.pause(0.2)
                suffix = "" if size == (80, 24) else f"-{size[0]}x{size[1]}"
                path = SCREENSHOTS / f"{n}-{view}{suffix}.svg"
                path.write_text(app.export_screenshot(title=f"slurmgate tui --demo: {view}"))
                written.append(str(path.relative_to(REPO)))
            sources.close()
    return written


def _summary(r: dict) -> str:
    def stat(name: str) -> str:
        v = r[name]
        return f"median {statistics.median(v):.1f} / max {max(v):.1f}"

    return (f"| {r['jobs']:,} | {r['first_apply_ms']:.1f} | {stat('apply_ms')} "
            f"| {stat('stall_ms')} | {stat('fetch_ms')} | {r['max_rss_mb']:.0f} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1000,10000,100000")
    p.add_argument("--refreshes", type=int, default=5)
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)
    p.add_argument("--no-screenshots", action="store_true")
    args = p.parse_args()
    if args.one is not None:
        print(json.dumps(asyncio.run(_measure(args.one, args.refreshes))))
        return 0
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()}")
    print("| jobs | first load: UI apply ms | refresh: UI apply ms | refresh: UI stall ms "
          "| refresh: worker ms | max RSS MB |")
    print("|---:|---:|---|---|---|---:|")
    for n in (int(s) for s in args.sizes.split(",")):
        res = subprocess.run([sys.executable, __file__, "--one", str(n), "--refreshes",
                              str(args.refreshes)], capture_output=True, text=True, check=True)
        print(_summary(json.loads(res.stdout.strip().splitlines()[-1])), flush=True)
    if not args.no_screenshots:
        for path in asyncio.run(_screenshots()):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
