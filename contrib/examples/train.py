"""A Python training loop that survives requeue (run by train_python.sbatch).

It resumes from the latest complete checkpoint in $SLURMGATE_CKPT_DIR, saves every SAVE_EVERY
steps, and on SIGUSR1 (time-limit warning, ``#SBATCH --signal=B:USR1@60``) or SIGTERM
(preemption) saves and stops. Prints "RESUMED_FROM=<step>" once at the start, "STEP <n>" per
step and "DONE steps=<N> restarts=<k>" at the end. Environment: TOTAL_STEPS (60),
STEP_SECONDS (1), SAVE_EVERY (1), REQUEUE_ON_USR1 (0).

Real training saves its model the same way, e.g.::

    ckpt.save(step, lambda d: torch.save(state, d / "model.pt"))
    ...
    last = ckpt.latest()
    state = torch.load(last.path / "model.pt") if last else None
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from slurm_plugin import checkpoint as ckpt


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    try:
        return int(raw) if raw else default
    except ValueError:
        sys.exit(f"{name}={raw!r} is not an integer")


def _work(seconds: float) -> None:
    """Stand-in for a training step; returns early when a save was requested."""
    end = time.monotonic() + seconds
    while not ckpt.should_save() and (left := end - time.monotonic()) > 0:
        time.sleep(min(left, 0.05))


def main() -> int:
    total = _env_int("TOTAL_STEPS", 60)
    step_seconds = float(os.environ.get("STEP_SECONDS") or 1)
    save_every = max(1, _env_int("SAVE_EVERY", 1))

    ckpt.on_signal()  # SIGUSR1 and SIGTERM only set a flag; the loop saves at a clean point
    try:
        state = ckpt.load_json(default={"step": 0, "sum": 0})
    except ckpt.CheckpointError as e:  # e.g. a directory that is not yours: never start over
        sys.exit(f"cannot resume: {e}")
    try:
        step, total_sum = int(state["step"]), int(state["sum"])
    except (TypeError, KeyError, ValueError):
        sys.exit(f"checkpoint {ckpt.latest().path} is not from this script; move it away")
    print(f"RESUMED_FROM={step}", flush=True)
    saved = step

    while step < total:
        _work(step_seconds)
        if ckpt.should_save():
            break
        step += 1
        total_sum += step
        if step % save_every == 0:
            ckpt.save_json(step, {"step": step, "sum": total_sum})
            saved = step
        print(f"STEP {step}", flush=True)

    if saved < step:
        ckpt.save_json(step, {"step": step, "sum": total_sum})
        saved = step
    sig = ckpt.requested()
    if sig is not None and step < total:
        print(f"caught {sig.name} at step {step}; checkpoint step {saved} saved",
              file=sys.stderr, flush=True)
        if sig == signal.SIGUSR1:
            job = os.environ.get("SLURM_JOB_ID")
            if os.environ.get("REQUEUE_ON_USR1") == "1" and job:
                subprocess.run(["scontrol", "requeue", job], check=False)
            return 0
        return 128 + sig.value
    print(f"STATE sum={total_sum}", flush=True)
    print(f"DONE steps={total} restarts={ckpt.restart_count()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
