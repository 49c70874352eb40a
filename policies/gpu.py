"""GPU requests: every shape a Slurm 22.05 job_desc can carry, read by one parser.

Where the GPUs of a job come from (job_desc field <- sbatch option):

- ``tres_per_node``   <- ``--gres=gpu[:type][:n]``, ``--gpus-per-node=[type:]n``: n on every node
- ``tres_per_job``    <- ``--gpus=[type:]n``: n across the whole job
- ``tres_per_task``   <- ``--gpus-per-task=[type:]n``: n for every task
- ``tres_per_socket`` <- ``--gpus-per-socket=[type:]n``: n for every socket of every node

Entries are comma separated and may be written ``gres:gpu:a100:2`` (22.05), ``gres/gpu:a100:2``
(23.02+), ``gres/gpu:a100=2`` (TRES notation) or ``gpu:a100:2`` (the old ``gres`` field). A
missing count means 1, as in Slurm. Entries for other resources (``cpu``, ``mem``,
``license/...``, other GRES such as ``nic`` or ``mps``) are skipped. ``shard`` entries are GPU
sharing and count as shards / shards_per_gpu of a GPU.

A job may use several of those options at once; each is a constraint Slurm's allocation has to
satisfy, so per GPU type the largest of them is the job's request. Types within one option add
up (``gres:gpu:a100:2,gres:gpu:h100:1`` is 3 GPUs of two types).

Untyped GPUs keep ``gpu_type=None`` here; pricing resolves them with the partition's default.
Job arrays: every task is a job of its own with this request; ``parse_array`` says how many.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from policies.request import JobRequest

MAX_GPUS_PER_ENTRY = 100_000
"""Larger counts are a typo (or a k/m/g suffix), not a request any cluster can meet."""
MAX_ARRAY_INDEX = 4_000_000
MAX_ARRAY_ITEMS = 64
"""Elements of one --array spec (a,b,c-d,...)."""
_EXACT_TABLE = 1 << 20
_ARRAY_ITEM = re.compile(r"(\d{1,8})(?:\s*-\s*(\d{1,8})(?:\s*:\s*(\d{1,8}))?)?", re.ASCII)
"""Slurm's MaxArraySize cannot exceed 4000001, so no array index is larger than this."""

_TYPE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
_SUFFIXED_COUNT_RE = re.compile(r"\d+[kKmMgGtTpP]")
_GPU_NAMES = ("gpu", "shard")

# job_desc field, what the user typed, how to write it, what the count multiplies by
_SOURCES = (
    ("tres_per_job", "--gpus", "--gpus=4 or --gpus=a100:4"),
    ("tres_per_node", "--gres / --gpus-per-node",
     "--gres=gpu:2, --gres=gpu:a100:2 or --gpus-per-node=a100:2"),
    ("tres_per_socket", "--gpus-per-socket", "--gpus-per-socket=1 or --gpus-per-socket=a100:1"),
    ("tres_per_task", "--gpus-per-task", "--gpus-per-task=1 or --gpus-per-task=a100:1"),
)


class GpuRequestError(ValueError):
    """A GPU or array request slurmgate cannot read; the message says how to write it."""


@dataclass(frozen=True)
class GpuRequest:
    """The GPUs of ONE job (or of one task of a job array).

    ``total`` is GPUs across all nodes (shards count as fractions of a GPU); ``per_node`` is
    total / nodes (an average when the request was per job). ``parts`` lists (type, GPUs) per
    type, untyped as None. ``gpu_type`` is the one type of the request, or None when it is
    untyped OR mixed: code that prices GPUs must use ``parts``.
    """

    gpu_type: str | None
    per_node: float
    nodes: int
    total: float
    parts: tuple[tuple[str | None, float], ...] = ()

    @property
    def mixed(self) -> bool:
        return len(self.parts) > 1


def _positive(value: int | None) -> int | None:
    return value if isinstance(value, int) and value > 0 else None


def job_nodes(req: JobRequest) -> int:
    """Nodes the job may get at most: ``-N min-max`` prices max, ``-N n`` n, nothing 1.

    With ``-n`` and ``--ntasks-per-node`` the node count follows from them. A job that gives
    ``-n`` without ``-N`` could be spread over more nodes by Slurm; that is not priced here
    (settlement charges what really ran).
    """
    nodes = _positive(req.min_nodes) or 1
    most = _positive(req.max_nodes)
    if most and most > nodes:
        nodes = most
    tasks, per_node = _positive(req.num_tasks), _positive(req.ntasks_per_node)
    if tasks and per_node:
        nodes = max(nodes, math.ceil(tasks / per_node))
    return nodes


def job_tasks(req: JobRequest, nodes: int | None = None) -> int:
    """Tasks of the job: ``-n``, else ``--ntasks-per-node`` x nodes, else one per node."""
    if nodes is None:
        nodes = job_nodes(req)
    if tasks := _positive(req.num_tasks):
        return tasks
    if per_node := _positive(req.ntasks_per_node):
        return per_node * nodes
    return nodes


def sockets_per_node(req: JobRequest) -> int:
    """Sockets per node for ``--gpus-per-socket``.

    Taken from the request's ``sockets_per_node`` when the job_desc carries one (JobRequest has
    no such field yet), else 1: a job on two-socket nodes that does not say
    ``--sockets-per-node=2`` is priced for one socket per node.
    """
    return _positive(getattr(req, "sockets_per_node", None)) or 1


def _count(text: str, entry: str, option: str, how: str) -> int:
    def fail(why: str) -> GpuRequestError:
        return GpuRequestError(
            f"{option}: cannot read GPU request '{entry}': {why}. Write it as {how}."
        )

    text = text.strip()
    if _SUFFIXED_COUNT_RE.fullmatch(text):
        raise fail(
            f"count '{text}' has a unit suffix (Slurm reads k/m/g as x1024, so it would ask "
            f"for {int(text[:-1]) * 1024 ** ('kmgtp'.index(text[-1].lower()) + 1)} GPUs); "
            "give the plain number of GPUs"
        )
    if not text.isdigit() or not text.isascii():
        raise fail(f"count '{text}' is not a whole number of GPUs")
    value = int(text)
    if value > MAX_GPUS_PER_ENTRY:
        raise fail(f"{value} GPUs is more than any cluster has (at most {MAX_GPUS_PER_ENTRY})")
    return value


def parse_gres_entries(text: str | None, option: str = "--gres", how: str = "--gres=gpu:2"
                       ) -> list[tuple[str, str | None, int]]:
    """(name, type, count) for every gpu/shard entry of one tres_per_* string."""
    found: list[tuple[str, str | None, int]] = []
    if not text:
        return found
    for raw in text.split(","):
        entry = raw.strip()
        if not entry:
            continue
        body = entry
        if entry[:5].lower() in ("gres:", "gres/"):
            body = entry[5:]
        elif "/" in entry:
            continue  # another TRES kind, e.g. license/matlab=1 or bb/...
        if "=" in body:
            left, _, count_text = body.rpartition("=")
            fields = left.split(":")
        else:
            fields = body.split(":")
            count_text = None
        name = fields[0].strip()
        if name not in _GPU_NAMES:
            continue  # cpu, mem, node, other GRES

        def fail(why: str, entry: str = entry) -> GpuRequestError:
            return GpuRequestError(
                f"{option}: cannot read GPU request '{entry}': {why}. Write it as {how}."
            )

        rest = [f.strip() for f in fields[1:]]
        gpu_type: str | None = None
        if count_text is not None:  # name[:type]=count
            if len(rest) > 1:
                raise fail("too many ':' fields before '='")
            if rest:
                gpu_type = rest[0]
            count = _count(count_text, entry, option, how)
        elif not rest:  # name
            count = 1
        elif len(rest) == 1:  # name:count or name:type
            only = rest[0]
            if only.isdigit() or _SUFFIXED_COUNT_RE.fullmatch(only):
                count = _count(only, entry, option, how)
            else:
                gpu_type, count = only, 1
        elif len(rest) == 2:  # name:type:count
            gpu_type = rest[0]
            count = _count(rest[1], entry, option, how)
        else:
            raise fail(f"expected {name}[:type][:count], got {len(rest) + 1} ':' fields")
        if gpu_type is not None and not _TYPE_RE.fullmatch(gpu_type):
            what = "an empty GPU type" if not gpu_type else f"GPU type '{gpu_type}'"
            raise fail(f"{what} is not a valid name (letters, digits, '_', '.', '-')")
        found.append((name, gpu_type, count))
    return found


def parse_gpu_request(req: JobRequest, shards_per_gpu: int = 8) -> GpuRequest:
    """The GPUs one job (one array task) asks for, whatever option it used.

    Raises GpuRequestError for a GPU entry that cannot be read; no GPUs gives total 0.
    """
    if shards_per_gpu <= 0:
        raise ValueError("shards_per_gpu must be positive")
    nodes = job_nodes(req)
    multiplier = {
        "tres_per_job": 1,
        "tres_per_node": nodes,
        "tres_per_socket": sockets_per_node(req) * nodes,
        "tres_per_task": job_tasks(req, nodes),
    }
    wanted: dict[str | None, float] = {}
    for field, option, how in _SOURCES:
        this_option: dict[str | None, float] = {}
        for name, gpu_type, count in parse_gres_entries(getattr(req, field), option, how):
            gpus = count if name == "gpu" else count / shards_per_gpu
            this_option[gpu_type] = this_option.get(gpu_type, 0.0) + gpus * multiplier[field]
        for gpu_type, gpus in this_option.items():
            wanted[gpu_type] = max(wanted.get(gpu_type, 0.0), gpus)
    parts = tuple(
        (t, g) for t, g in sorted(wanted.items(), key=lambda kv: kv[0] or "") if g > 0
    )
    total = float(sum(g for _, g in parts))
    types = {t for t, _ in parts}
    gpu_type = next(iter(types)) if len(types) == 1 else None
    return GpuRequest(gpu_type=gpu_type, per_node=total / nodes, nodes=nodes, total=total,
                      parts=parts)


def parse_array(array_inx: str | None) -> tuple[int, int | None]:
    """(number of tasks, % throttle or None) of ``--array``; no array is (1, None).

    Accepts ``0-99``, ``1,3,5``, ``0-15:4``, ``0-99%10`` and combinations; repeated indices
    count once, as in Slurm. ``%0`` means no throttle.
    """
    if array_inx is None or not array_inx.strip():
        return 1, None
    text = array_inx.strip()
    how = "--array=0-99, --array=1,3,5, --array=0-15:4 or --array=0-99%10"

    def fail(why: str) -> GpuRequestError:
        return GpuRequestError(f"--array: cannot read '{text}': {why}. Write it as {how}.")

    spec, sep, throttle_text = text.partition("%")
    throttle: int | None = None
    if sep:
        throttle_text = throttle_text.strip()
        if not (throttle_text.isdigit() and throttle_text.isascii()):
            raise fail(f"the throttle after '%' must be a whole number, not '{throttle_text}'")
        throttle = int(throttle_text) or None
    items = spec.split(",")
    if len(items) > MAX_ARRAY_ITEMS:
        raise fail(f"it has {len(items)} elements; at most {MAX_ARRAY_ITEMS} are accepted")
    ranges: list[range] = []
    for raw in items:
        item = raw.strip()
        m = _ARRAY_ITEM.fullmatch(item)
        if not m:
            raise fail(f"'{item[:40]}' is not an index, a range a-b or a stepped range a-b:step"
                       if item else "an empty element between commas")
        start = int(m.group(1))
        end = int(m.group(2)) if m.group(2) is not None else start
        step = int(m.group(3)) if m.group(3) is not None else 1
        if end < start:
            raise fail(f"range '{item}' ends before it starts")
        if step == 0:
            raise fail(f"range '{item}' has step 0")
        if end > MAX_ARRAY_INDEX:
            raise fail(f"index {end} is above Slurm's largest possible index {MAX_ARRAY_INDEX}")
        ranges.append(range(start, end + 1, step))
    return count_indices(ranges), throttle


def count_indices(ranges: list[range]) -> int:
    """How many distinct indices the ranges hold, without listing them: plain ranges are
    merged as intervals; stepped ones are counted exactly against the rest when their indices
    fit a small table, else added up (an upper bound: an overlapping stepped spec reserves a
    little more, never less)."""
    plain = sorted((r.start, r.stop) for r in ranges if r.step == 1)
    stepped = [r for r in ranges if r.step != 1]
    merged: list[tuple[int, int]] = []
    for lo, hi in plain:
        if merged and lo <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    count = sum(hi - lo for lo, hi in merged)
    if not stepped:
        return count
    top = max(r.stop for r in ranges)
    if top <= _EXACT_TABLE:
        seen = bytearray(top)
        for lo, hi in merged:
            seen[lo:hi] = b"\x01" * (hi - lo)
        for r in stepped:
            seen[r.start:r.stop:r.step] = b"\x01" * len(r)
        return seen.count(1)
    return count + sum(len(r) for r in stepped)
