"""GPU access for the node hooks and the node agent: one interface, two backends.

``RealNvml`` talks to the NVIDIA driver through nvidia-ml-py (``import pynvml``, done lazily
inside the backend so that importing this module stays cheap: it runs in every Prolog and
Epilog). Every value is read on its own and degrades on its own: a GPU without an energy
counter, a query the driver refuses (NotSupported, NoPermission, FunctionNotFound), accounting
mode switched off, or a GPU that fell off the bus (GpuIsLost) gives ``None`` for that value
plus a note, never an exception.

``FakeNvml`` is the stand-in for machines without NVIDIA GPUs (``[nvml] backend = "fake"``):
deterministic from the policy's ``nvml.fake_nodes`` entry for the node, so prolog/epilog deltas
are plausible and reproducible.

Which GPUs a job has: Slurm 22.05 sets ``SLURM_JOB_GPUS`` in Prolog/Epilog (only for GRES with
``File=`` devices) to a comma list of *GRES indices*: ``gres_common_epilog_set_env`` in
src/plugins/gres/common/gres_common.c (tag slurm-22-05-8-1) formats ``gres_device->index``,
the device's position in slurmd's device list for the node (the ``File=`` entries of
gres.conf in order, ranges expanded). That is neither the NVML enumeration index nor, in
general, the ``/dev/nvidiaN`` minor (``dev_num``); ``CUDA_VISIBLE_DEVICES`` carries the same
index unless gres.conf gives a UniqueId. With the usual ``File=/dev/nvidia[0-3]`` (and the
dev cluster's) index N is ``/dev/nvidiaN``, so we match by minor number (``numbering="minor"``).
With ``AutoDetect=nvml`` the list follows NVML, which numbers GPUs by PCI bus id: use
``numbering="pci"``. NVML enumeration order is never assumed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Protocol

FAKE_EPOCH = 1_704_067_200.0
"""2024-01-01T00:00:00Z: the fake energy counters count from here."""

_VENDOR_WORDS = frozenset({"nvidia", "tesla", "geforce", "quadro", "grid"})


class NvmlUnavailable(RuntimeError):
    """The backend cannot start at all (no nvidia-ml-py, no driver, nvmlInit failed)."""


class GpuDevice(NamedTuple):
    index: int
    """NVML enumeration index (informational only; never used to map Slurm's GPUs)."""
    minor: int | None
    """/dev/nvidiaN minor number."""
    uuid: str
    name: str
    gpu_type: str
    """Normalised short type name as used in rate cards and gres.conf: a100, h100, ..."""
    pci_bus_id: str | None
    memory_total: int | None
    """Bytes."""
    mig_enabled: bool = False
    """MIG mode is on: slices are reported as this parent GPU (no utilisation in MIG mode)."""


class AccountingStats(NamedTuple):
    """NVML accounting over the processes that started on a GPU since a given time."""

    processes: int
    util_mean: float | None
    """Percent, weighted by each process's run time."""
    util_max: float | None
    """Percent: the highest per-process mean (NVML keeps no finer maximum)."""
    mem_max_bytes: int | None
    busy_seconds: float


class GpuReading(NamedTuple):
    uuid: str
    ts: float
    energy_mj: int | None
    """Total energy counter since the driver loaded, millijoules (Volta and newer)."""
    util_gpu: float | None
    """Current utilisation, percent."""
    mem_used: int | None
    """Bytes."""
    power_w: float | None
    accounting: AccountingStats | None
    notes: tuple[str, ...] = ()
    """What could not be read, one short sentence each."""


class GpuBackend(Protocol):
    def devices(self) -> list[GpuDevice]: ...

    def read(self, uuid: str, since: float | None = None) -> GpuReading:
        """Read one GPU now; with ``since`` also summarise accounting from then on."""
        ...

    def close(self) -> None: ...


class Allocated(NamedTuple):
    """One entry of SLURM_JOB_GPUS and the device it names (None: not found on this node)."""

    token: str
    slurm_index: int | None
    device: GpuDevice | None


def gpu_type_from_name(name: str) -> str:
    """'NVIDIA A100-SXM4-80GB' -> 'a100', 'NVIDIA GeForce RTX 4090' -> 'rtx4090'."""
    words = [w for w in name.lower().replace("_", " ").split() if w not in _VENDOR_WORDS]
    if not words:
        return "unknown"
    first = words[0]
    if first in ("rtx", "gtx", "titan") and len(words) > 1:
        nxt = words[1].split("-")[0]
        first = first + nxt if nxt.isdigit() or first == "titan" else nxt
    short = "".join(c for c in first.split("-")[0] if c.isalnum())
    return short or "unknown"


def parse_job_gpus(text: str | None) -> list[str]:
    """Split SLURM_JOB_GPUS ("0,2", tolerating ranges "0-3" and UUIDs) into tokens."""
    tokens: list[str] = []
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        if sep and lo.isdigit() and hi.isdigit() and int(lo) <= int(hi) <= int(lo) + 1024:
            tokens.extend(str(i) for i in range(int(lo), int(hi) + 1))
        else:
            tokens.append(part)
    return tokens


def select_allocated(
    devices: list[GpuDevice], job_gpus: str | None, numbering: str = "minor"
) -> list[Allocated]:
    """Map SLURM_JOB_GPUS to devices by minor number ("minor") or PCI bus order ("pci").

    Falls back to PCI order when the driver reports no minor numbers at all. Tokens that look
    like UUIDs (GPU-..., MIG-...) match by UUID.
    """
    by_uuid = {d.uuid: d for d in devices}
    if numbering == "pci" or not any(d.minor is not None for d in devices):
        ordered = sorted(devices, key=lambda d: (d.pci_bus_id or "").upper())
        by_number = dict(enumerate(ordered))
    else:
        by_number = {d.minor: d for d in devices if d.minor is not None}
    out: list[Allocated] = []
    for token in parse_job_gpus(job_gpus):
        if token.isdigit():
            out.append(Allocated(token, int(token), by_number.get(int(token))))
        else:
            out.append(Allocated(token, None, by_uuid.get(token)))
    return out


def _field(obj: Any, name: str, default: Any) -> Any:
    """Read a setting from a pydantic model or from a plain TOML mapping."""
    if obj is None:
        return default
    value = obj.get(name, default) if isinstance(obj, Mapping) else getattr(obj, name, default)
    return default if value is None else value


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _log_note(note: str) -> None:
    import logging

    logging.getLogger("slurmgate.nvml").info("%s", note)


# -- real NVML ------------------------------------------------------------------------------


class RealNvml:
    """nvidia-ml-py backend. ``module`` lets tests inject a stand-in for ``pynvml``."""

    def __init__(self, module: Any = None, clock: Callable[[], float] = time.time) -> None:
        if module is None:
            try:
                import pynvml as module
            except ImportError as exc:
                raise NvmlUnavailable(
                    "nvidia-ml-py is not installed (pip install nvidia-ml-py)"
                ) from exc
        self._nv = module
        self._clock = clock
        try:
            module.nvmlInit()
        except Exception as exc:
            raise NvmlUnavailable(f"nvmlInit failed: {_error_name(exc)}") from exc
        self.notes: list[str] = []
        """Every degradation seen so far (also logged once each, logger slurmgate.nvml)."""
        self._pending: list[str] = []
        self._logged: set[str] = set()
        self._handles: dict[str, Any] = {}
        self._lost: set[str] = set()

    # One value, one call: failures become None plus a note.
    def _get(self, subject: str, what: str, fname: str, *args: Any, quiet: bool = False) -> Any:
        if subject in self._lost:
            return None
        fn = getattr(self._nv, fname, None)
        if fn is None:
            self._note(f"{subject}: no {what} ({fname} is missing from this nvidia-ml-py)")
            return None
        try:
            return fn(*args)
        except Exception as exc:
            name = _error_name(exc)
            if name == "GpuIsLost":
                self._lost.add(subject)
                self._note(f"{subject}: GPU is lost (fell off the bus?); no further readings")
            elif not quiet:
                self._note(f"{subject}: no {what} ({name})")
            return None

    def _note(self, note: str) -> None:
        self._pending.append(note)
        self.notes.append(note)
        if note not in self._logged:
            self._logged.add(note)
            _log_note(note)

    def devices(self) -> list[GpuDevice]:
        out: list[GpuDevice] = []
        count = self._get("nvml", "device count", "nvmlDeviceGetCount") or 0
        for i in range(int(count)):
            handle = self._get(f"GPU index {i}", "handle", "nvmlDeviceGetHandleByIndex", i)
            if handle is None:
                continue
            uuid = _text(self._get(f"GPU index {i}", "UUID", "nvmlDeviceGetUUID", handle))
            if not uuid:
                self._note(f"GPU index {i}: skipped, it has no readable UUID")
                continue
            name = _text(self._get(uuid, "name", "nvmlDeviceGetName", handle)) or "unknown"
            minor = self._get(uuid, "minor number", "nvmlDeviceGetMinorNumber", handle)
            pci = self._get(uuid, "PCI info", "nvmlDeviceGetPciInfo", handle)
            bus = _text(getattr(pci, "busId", None)) if pci is not None else None
            mem = self._get(uuid, "memory info", "nvmlDeviceGetMemoryInfo", handle)
            total = getattr(mem, "total", None) if mem is not None else None
            # NotSupported here just means a GPU without MIG: not worth a note.
            mig = self._get(uuid, "MIG mode", "nvmlDeviceGetMigMode", handle, quiet=True)
            mig_on = bool(mig) and _first(mig) == 1
            if mig_on:
                self._note(f"{uuid}: MIG is enabled; reporting the whole parent GPU")
            self._handles[uuid] = handle
            out.append(
                GpuDevice(
                    index=i,
                    minor=int(minor) if minor is not None else None,
                    uuid=uuid,
                    name=name,
                    gpu_type=gpu_type_from_name(name),
                    pci_bus_id=bus.upper() if bus else None,
                    memory_total=int(total) if total is not None else None,
                    mig_enabled=mig_on,
                )
            )
        return out

    def _handle(self, uuid: str) -> Any:
        handle = self._handles.get(uuid)
        if handle is not None:
            return handle
        handle = self._get(uuid, "handle", "nvmlDeviceGetHandleByUUID", uuid)
        if handle is None:
            return None
        is_mig = self._get(uuid, "MIG check", "nvmlDeviceIsMigDeviceHandle", handle, quiet=True)
        if uuid.startswith("MIG-") or (is_mig is not None and _truthy(is_mig)):
            parent = self._get(
                uuid, "MIG parent", "nvmlDeviceGetDeviceHandleFromMigDeviceHandle", handle
            )
            if parent is not None:
                self._note(f"{uuid}: MIG device; reporting its parent GPU")
                handle = parent
        self._handles[uuid] = handle
        return handle

    def read(self, uuid: str, since: float | None = None) -> GpuReading:
        self._pending = []
        ts = self._clock()
        handle = self._handle(uuid)
        if handle is None:
            return GpuReading(uuid, ts, None, None, None, None, None, tuple(self._pending))
        energy = self._get(uuid, "energy counter", "nvmlDeviceGetTotalEnergyConsumption", handle)
        util = self._get(uuid, "utilisation", "nvmlDeviceGetUtilizationRates", handle)
        mem = self._get(uuid, "memory use", "nvmlDeviceGetMemoryInfo", handle)
        power = self._get(uuid, "power draw", "nvmlDeviceGetPowerUsage", handle)
        accounting = self._accounting(uuid, handle, since) if since is not None else None
        return GpuReading(
            uuid=uuid,
            ts=ts,
            energy_mj=int(energy) if energy is not None else None,
            util_gpu=float(util.gpu) if util is not None else None,
            mem_used=int(mem.used) if mem is not None else None,
            power_w=power / 1000.0 if power is not None else None,
            accounting=accounting,
            notes=tuple(self._pending),
        )

    def _accounting(self, uuid: str, handle: Any, since: float) -> AccountingStats | None:
        mode = self._get(uuid, "accounting mode", "nvmlDeviceGetAccountingMode", handle)
        if mode is None:
            return None
        if mode != getattr(self._nv, "NVML_FEATURE_ENABLED", 1):
            self._note(f"{uuid}: accounting mode is off (enable with nvidia-smi -am 1)")
            return None
        pids = self._get(uuid, "accounting pids", "nvmlDeviceGetAccountingPids", handle)
        if pids is None:
            return None
        runs: list[tuple[float, float, int | None]] = []
        for pid in pids:
            # Records age out of the driver's buffer between listing and reading: no note.
            stats = self._get(
                uuid, "accounting stats", "nvmlDeviceGetAccountingStats", handle, pid, quiet=True
            )
            if stats is None:
                continue
            started = float(getattr(stats, "startTime", 0) or 0) / 1e6
            if started < since - 1.0:  # a process of an earlier job on this GPU
                continue
            mem = getattr(stats, "maxMemoryUsage", None)
            runs.append((
                float(stats.gpuUtilization),
                float(getattr(stats, "time", 0) or 0) / 1000.0,
                int(mem) if mem is not None else None,
            ))
        return summarise_processes(runs)

    def close(self) -> None:
        try:
            self._nv.nvmlShutdown()
        except Exception as exc:
            _log_note(f"nvmlShutdown failed: {_error_name(exc)}")


def summarise_processes(runs: list[tuple[float, float, int | None]]) -> AccountingStats:
    """(util percent, seconds, max memory bytes) per process -> one summary per GPU."""
    if not runs:
        return AccountingStats(0, 0.0, 0.0, 0, 0.0)
    total = sum(sec for _, sec, _ in runs)
    if total > 0:
        mean = sum(util * sec for util, sec, _ in runs) / total
    else:
        mean = sum(util for util, _, _ in runs) / len(runs)
    mems = [m for _, _, m in runs if m is not None]
    return AccountingStats(
        processes=len(runs),
        util_mean=mean,
        util_max=max(util for util, _, _ in runs),
        mem_max_bytes=max(mems) if mems else None,
        busy_seconds=total,
    )


def _error_name(exc: BaseException) -> str:
    name = type(exc).__name__
    return name.removeprefix("NVMLError_") if name.startswith("NVMLError_") else name


def _first(value: Any) -> Any:
    try:
        return value[0]
    except (TypeError, IndexError, KeyError):
        return value


def _truthy(value: Any) -> bool:
    return bool(getattr(value, "value", value))


# -- fake NVML ------------------------------------------------------------------------------


def uuid5_url(name: str) -> str:
    """``str(uuid.uuid5(uuid.NAMESPACE_URL, name))`` without importing uuid and OpenSSL's
    hashlib (together ~7 ms of a fake-backend prolog); CPython's built-in SHA-1 suffices."""
    try:
        from _sha1 import sha1  # type: ignore[import-not-found]
    except ImportError:  # another Python implementation
        from hashlib import sha1
    digest = bytearray(sha1(_NAMESPACE_URL + name.encode("utf-8")).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = digest.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


_NAMESPACE_URL = bytes.fromhex("6ba7b8119dad11d180b400c04fd430c8")


class FakeSpec(NamedTuple):
    gpu_type: str = "a100"
    count: int = 4
    power_watts: float = 300.0
    utilization: tuple[int, ...] = (90, 95, 60, 85)
    memory_gb: float = 80.0
    sample_seconds: float = 30.0


def fake_spec(nvml_settings: Any, node: str) -> FakeSpec:
    """The node's ``nvml.fake_nodes`` entry (pydantic model or TOML mapping), else defaults.

    The defaults mirror ``policies.config.FakeNode`` (a test keeps them equal); they are
    repeated here so the hooks need not import pydantic.
    """
    d = FakeSpec()
    entry = _field(_field(nvml_settings, "fake_nodes", {}), node, None)
    sample = float(_field(nvml_settings, "sample_seconds", d.sample_seconds))
    profile = _field(entry, "utilization", d.utilization)
    return FakeSpec(
        gpu_type=str(_field(entry, "gpu_type", d.gpu_type)).lower(),
        count=int(_field(entry, "count", d.count)),
        power_watts=float(_field(entry, "power_watts", d.power_watts)),
        utilization=tuple(int(u) for u in profile),
        memory_gb=float(_field(entry, "memory_gb", d.memory_gb)),
        sample_seconds=sample if sample > 0 else d.sample_seconds,
    )


class FakeNvml:
    """Deterministic GPUs for machines without NVIDIA hardware.

    UUIDs come from node and index (uuid5), minor = index, the energy counter is
    power_watts x seconds since FAKE_EPOCH, utilisation follows the profile by time bucket
    (bucket = ts // sample_seconds, offset by the GPU's index), memory use is proportional to
    utilisation. With ``since`` a reading also carries accounting over [since, now].
    """

    def __init__(
        self, node: str, nvml_settings: Any = None, clock: Callable[[], float] = time.time
    ) -> None:
        self.node = node
        self.spec = fake_spec(nvml_settings, node)
        self._clock = clock
        total = int(self.spec.memory_gb * 2**30)
        self._devices = [
            GpuDevice(
                index=i,
                minor=i,
                uuid="GPU-" + uuid5_url(f"slurmgate:fake:{node}:{i}"),
                name=f"NVIDIA {self.spec.gpu_type.upper()} (slurmgate fake)",
                gpu_type=self.spec.gpu_type,
                pci_bus_id=f"00000000:{0x18 + i:02X}:00.0",
                memory_total=total,
            )
            for i in range(max(self.spec.count, 0))
        ]
        self._by_uuid = {d.uuid: d for d in self._devices}

    def devices(self) -> list[GpuDevice]:
        return list(self._devices)

    def _util(self, bucket: int, index: int) -> int:
        profile = self.spec.utilization
        return profile[(bucket + index) % len(profile)]

    def read(self, uuid: str, since: float | None = None) -> GpuReading:
        ts = self._clock()
        dev = self._by_uuid.get(uuid)
        if dev is None:
            note = f"{uuid}: no such GPU on fake node {self.node}"
            return GpuReading(uuid, ts, None, None, None, None, None, (note,))
        spec = self.spec
        total = dev.memory_total or 0
        util = None
        if spec.utilization:
            util = self._util(int(ts // spec.sample_seconds), dev.index)
        return GpuReading(
            uuid=uuid,
            ts=ts,
            energy_mj=int(spec.power_watts * (ts - FAKE_EPOCH) * 1000),
            util_gpu=float(util) if util is not None else None,
            mem_used=int(total * util / 100) if util is not None else None,
            power_w=spec.power_watts,
            accounting=self._accounting(dev, since, ts) if since is not None else None,
        )

    def _accounting(self, dev: GpuDevice, since: float, now: float) -> AccountingStats | None:
        profile = self.spec.utilization
        if not profile or now < since:
            return None
        first = int(since // self.spec.sample_seconds)
        n = int(now // self.spec.sample_seconds) - first + 1
        cycles, rest = divmod(n, len(profile))
        partial = [self._util(first + k, dev.index) for k in range(rest)]
        util_sum = cycles * sum(profile) + sum(partial)
        util_max = max(profile) if cycles else max(partial)
        total = dev.memory_total or 0
        return AccountingStats(
            processes=1,
            util_mean=util_sum / n,
            util_max=float(util_max),
            mem_max_bytes=int(total * util_max / 100),
            busy_seconds=now - since,
        )

    def close(self) -> None:
        pass


def open_backend(
    policy: Any, node: str, clock: Callable[[], float] | None = None
) -> GpuBackend:
    """The backend the policy selects for this node.

    ``policy`` may be the whole Policy, its ``nvml`` section, or the TOML mapping of either.
    """
    section = _field(policy, "nvml", None)
    nvml = policy if section is None else section
    backend = _field(nvml, "backend", "real")
    if backend == "fake":
        return FakeNvml(node, nvml, clock or time.time)
    if backend == "real":
        return RealNvml(clock=clock or time.time)
    raise ValueError(f"nvml.backend must be 'real' or 'fake', not {backend!r}")
