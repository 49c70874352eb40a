"""Wall time of the node hooks as whole processes, against a bare interpreter start.

Every Prolog and Epilog pays a Python start-up; this measures what slurmgate adds on top.
Runs the prolog and epilog with the fake NVML backend in a temporary spool (nudging a socket
nobody listens on, as when the daemon is down), interleaved with ``python3 -c pass`` so both
see the same machine load, and reports median and p95 per process plus the ratio to the
baseline. Then what the prolog imports beyond the interpreter's own start-up
(``python3 -X importtime``).

    python3 bench/bench_hooks.py [--runs 50]

Prints a Markdown section for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HOOK = "import sys; from slurm_plugin.node.hooks import main; sys.exit(main(sys.argv[1:]))"
CLI = "import sys; from slurm_plugin.cli import main; sys.exit(main(sys.argv[1:]))"


def timed(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if p.returncode != 0 or p.stderr:
        raise SystemExit(f"{cmd} failed ({p.returncode}): {p.stderr}")
    return elapsed


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def import_times(env: dict[str, str], runs: int) -> dict[str, float]:
    """Median cumulative import time (ms) of each top-level import a prolog run makes after
    the interpreter's own start-up (site), lazy imports included."""
    samples: dict[str, list[float]] = {}
    code = HOOK.replace("sys.argv[1:]", "['prolog']")
    for i in range(runs):
        run_env = {**env, "SLURM_JOB_ID": str(9000 + i)}
        p = subprocess.run([sys.executable, "-X", "importtime", "-c", code],
                           env=run_env, cwd=REPO, capture_output=True, text=True, check=True)
        after_site = False
        totals: dict[str, float] = {}
        for line in p.stderr.splitlines():
            if not line.startswith("import time:") or line.count("|") != 2:
                continue
            _, cumulative, name = line.split("|")
            if not cumulative.strip().isdigit() or name.startswith("  "):
                continue  # header, or a nested import (counted in its parent)
            name = name.strip()
            if name == "site":
                after_site = True
            elif after_site:
                totals[name] = int(cumulative) / 1000
        totals["(all of the above)"] = sum(totals.values())
        for name, ms in totals.items():
            samples.setdefault(name, []).append(ms)
    return {name: statistics.median(v) for name, v in samples.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=50)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="sg-bench-") as tmp:
        cfg = Path(tmp, "policy.toml")
        cfg.write_text(
            f'[daemon]\nspool_dir = "{tmp}/spool"\nsocket = "{tmp}/nobody.sock"\n'
            'cluster = "bench"\n[nvml]\nbackend = "fake"\n'
        )
        base_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO),
                    "SLURMGATE_CONFIG": str(cfg), "SLURMD_NODENAME": "node1",
                    "SLURM_JOB_GPUS": "0,1,2,3", "SLURM_JOB_USER": "alice",
                    "SLURM_JOB_RESTART_COUNT": "0"}
        rows: dict[str, list[float]] = {
            "python3 -c pass": [], "prolog": [], "epilog": [], "prolog via slurmgate CLI": [],
            "python3 -S -c pass (no site)": [], "prolog, python3 -S": [],
        }
        py = sys.executable
        for i in range(args.runs):
            env = {**base_env, "SLURM_JOB_ID": str(1000 + i)}
            rows["python3 -c pass"].append(timed([py, "-c", "pass"], env))
            rows["prolog"].append(timed([py, "-c", HOOK, "prolog"], env))
            rows["epilog"].append(timed([py, "-c", HOOK, "epilog"], env))
            env["SLURM_JOB_ID"] = str(5000 + i)
            rows["prolog via slurmgate CLI"].append(timed([py, "-c", CLI, "hook", "prolog"], env))
            # This interpreter's site imports a lot (.pth files); -S shows the hook's share
            # against a lean start-up, closer to a clean virtualenv.
            env["SLURM_JOB_ID"] = str(7000 + i)
            rows["python3 -S -c pass (no site)"].append(timed([py, "-S", "-c", "pass"], env))
            rows["prolog, python3 -S"].append(timed([py, "-S", "-c", HOOK, "prolog"], env))
        records = len(list(Path(tmp, "spool").glob("node_run.*.json")))
        if records != args.runs:
            raise SystemExit(f"expected {args.runs} node_run records, found {records}")
        imports = import_times(base_env, runs=15)

    base = statistics.median(rows["python3 -c pass"])
    base_s = statistics.median(rows["python3 -S -c pass (no site)"])
    print(f"Command: `python3 bench/bench_hooks.py --runs {args.runs}`  ")
    print(f"Python {platform.python_version()}, {os.cpu_count()} CPUs, {platform.platform()}; "
          "fake NVML backend, 4 GPUs per job, daemon socket absent.\n")
    print("| process | median ms | p95 ms | median / baseline (same flags) |")
    print("|---|---:|---:|---:|")
    for name, values in rows.items():
        med = statistics.median(values)
        ref = base_s if "-S" in name else base
        print(f"| {name} | {med * 1000:.1f} | {p95(values) * 1000:.1f} | {med / ref:.2f} |")
    print("\nImports a prolog makes after interpreter start-up (`python3 -X importtime`, "
          "cumulative, median of 15 runs; lazy imports included):\n")
    print("| module | ms |")
    print("|---|---:|")
    for name, ms in sorted(imports.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {ms:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
