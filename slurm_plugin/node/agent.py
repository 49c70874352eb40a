"""`slurmgate agent`: optional per-node sampler of GPU utilisation and memory.

Every ``nvml.sample_seconds`` it reads each GPU once and drops one ``gpu_sample`` record into
the spool's node/ (then nudges the daemon; a sample the shared spool cannot take waits in the
node's fallback spool, which each round forwards first), so the TUI can show live utilisation
and the daemon can keep raw samples for ``nvml.raw_retention_days`` and hourly rollups beyond.

Each reading of a GPU some job holds carries that job's id (``job_id``), read each round from
the node's Prolog baselines (``hooks.gpu_holders``): the daemon's idle-GPU policy judges a job
by the samples of its own GPUs. The agent must run as the user the Prolog runs as (root) to
read them; without them the samples go untagged.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from typing import Any

from policies.records import gpu_sample_record, sample_gpu
from slurm_plugin.node.hooks import HookConfigError, emit, gpu_holders, load_settings
from slurm_plugin.node.nvml import open_backend
from slurm_plugin.protocol import nudge


def sample_once(settings: Any, node: str, backend: Any) -> dict[str, Any]:
    now = time.time()
    holders = gpu_holders(settings.state_dir, node)
    gpus = []
    for dev in backend.devices():
        r = backend.read(dev.uuid)
        gpus.append(sample_gpu(
            uuid=dev.uuid, index=dev.index, gpu_type=dev.gpu_type,
            util=float(r.util_gpu) if r.util_gpu is not None else 0.0,
            mem_used_bytes=int(r.mem_used or 0),
            power_w=r.power_w, job_id=holders.get(dev.uuid),
        ))
    return gpu_sample_record(cluster=settings.cluster, node=node, ts=now, gpus=gpus)


def run(config_path: str, node: str | None = None, interval: float | None = None,
        once: bool = False) -> int:
    try:
        settings = load_settings(config_path)
    except HookConfigError as exc:
        print(f"slurmgate agent: {exc}", file=sys.stderr)
        return 2
    node = node or os.environ.get("SLURMD_NODENAME") or socket.gethostname().split(".")[0]
    every = interval or float(settings.nvml.get("sample_seconds", 30.0))
    if every <= 0:
        print("slurmgate agent: the sampling interval must be positive", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    backend = open_backend(settings.nvml, node)
    try:
        while True:
            try:
                notes: list[str] = []
                path = emit(settings, sample_once(settings, node, backend), notes)
                for note in notes:
                    print(f"slurmgate agent: {note}", file=sys.stderr)
                nudge(settings.socket)
                if once:
                    print(path)
                    return 0
            except Exception as exc:  # keep sampling; one bad read loses one sample
                print(f"slurmgate agent: sample failed: {exc!r}", file=sys.stderr)
                if once:
                    return 1
            if stop.wait(every):
                return 0
    finally:
        backend.close()
