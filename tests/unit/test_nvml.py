"""GPU access: the real nvidia-ml-py path against a stand-in pynvml, and the fake backend."""

from __future__ import annotations

import logging
import types
from typing import Any

import pytest

from policies.config import FakeNode, Nvml, parse_policy
from slurm_plugin.node.nvml import (
    FAKE_EPOCH,
    FakeNvml,
    FakeSpec,
    GpuDevice,
    NvmlUnavailable,
    RealNvml,
    fake_spec,
    gpu_type_from_name,
    open_backend,
    parse_job_gpus,
    select_allocated,
    summarise_processes,
    uuid5_url,
)

# -- a stand-in for the pynvml module --------------------------------------------------------


class NVMLError(Exception):
    """Like pynvml's: one subclass per NVML_ERROR_* code."""


def _error(name: str) -> type[NVMLError]:
    return type(f"NVMLError_{name}", (NVMLError,), {})


NotSupported = _error("NotSupported")
NoPermission = _error("NoPermission")
GpuIsLost = _error("GpuIsLost")
DriverNotLoaded = _error("DriverNotLoaded")
NotFound = _error("NotFound")


class Handle:
    def __init__(self, gpu: int, mig: bool = False) -> None:
        self.gpu, self.mig = gpu, mig


def standin_pynvml(gpus: list[dict[str, Any]], missing: tuple[str, ...] = ()) -> Any:
    """A module object with the pynvml functions RealNvml uses. Each GPU dict holds its
    values and ``errors``: function name -> exception class to raise for that GPU."""
    m = types.ModuleType("pynvml_standin")
    m.NVMLError = NVMLError
    for cls in (NotSupported, NoPermission, GpuIsLost, DriverNotLoaded, NotFound):
        setattr(m, cls.__name__, cls)
    m.NVML_FEATURE_ENABLED = 1
    m.calls = []
    m.init_error = None

    def nvmlInit() -> None:
        if m.init_error:
            raise m.init_error()

    def nvmlShutdown() -> None:
        m.calls.append("shutdown")

    def per_gpu(fname: str, fn: Any) -> Any:
        def call(handle: Handle, *args: Any) -> Any:
            gpu = gpus[handle.gpu]
            m.calls.append((fname, handle.gpu, handle.mig))
            err = gpu.get("errors", {}).get(fname)
            if err:
                raise err()
            return fn(gpu, handle, *args)

        return call

    def by_uuid(uuid: str) -> Handle:
        for i, gpu in enumerate(gpus):
            if gpu["uuid"] == uuid:
                return Handle(i)
            if gpu.get("mig_uuid") == uuid:
                return Handle(i, mig=True)
        raise NotFound()

    functions: dict[str, Any] = {
        "nvmlInit": nvmlInit,
        "nvmlShutdown": nvmlShutdown,
        "nvmlDeviceGetCount": lambda: len(gpus),
        "nvmlDeviceGetHandleByIndex": lambda i: Handle(i),
        "nvmlDeviceGetHandleByUUID": by_uuid,
        "nvmlDeviceGetUUID": per_gpu("uuid", lambda g, h: g["uuid"]),
        "nvmlDeviceGetName": per_gpu("name", lambda g, h: g["name"]),
        "nvmlDeviceGetMinorNumber": per_gpu("minor", lambda g, h: g["minor"]),
        "nvmlDeviceGetPciInfo": per_gpu(
            "pci", lambda g, h: types.SimpleNamespace(busId=g["bus"].encode())
        ),
        "nvmlDeviceGetMemoryInfo": per_gpu(
            "nvmlDeviceGetMemoryInfo",
            lambda g, h: types.SimpleNamespace(total=g["total"], used=g["used"]),
        ),
        "nvmlDeviceGetMigMode": per_gpu("nvmlDeviceGetMigMode", lambda g, h: g.get("mig", [0, 0])),
        "nvmlDeviceIsMigDeviceHandle": lambda h: h.mig,
        "nvmlDeviceGetDeviceHandleFromMigDeviceHandle": lambda h: Handle(h.gpu),
        "nvmlDeviceGetTotalEnergyConsumption": per_gpu(
            "nvmlDeviceGetTotalEnergyConsumption", lambda g, h: g["energy_mj"]
        ),
        "nvmlDeviceGetUtilizationRates": per_gpu(
            "nvmlDeviceGetUtilizationRates",
            lambda g, h: types.SimpleNamespace(gpu=g["util"], memory=10),
        ),
        "nvmlDeviceGetPowerUsage": per_gpu("nvmlDeviceGetPowerUsage", lambda g, h: g["power_mw"]),
        "nvmlDeviceGetAccountingMode": per_gpu(
            "nvmlDeviceGetAccountingMode", lambda g, h: g.get("accounting", 0)
        ),
        "nvmlDeviceGetAccountingPids": per_gpu(
            "nvmlDeviceGetAccountingPids", lambda g, h: list(g.get("procs", {}))
        ),
        "nvmlDeviceGetAccountingStats": per_gpu(
            "nvmlDeviceGetAccountingStats", _accounting_stats
        ),
    }
    for name, fn in functions.items():
        if name not in missing:
            setattr(m, name, fn)
    return m


def _accounting_stats(gpu: dict[str, Any], handle: Handle, pid: int) -> Any:
    proc = gpu["procs"][pid]
    if proc is None:
        raise NotFound()  # aged out of the driver's buffer
    util, seconds, mem, started = proc
    return types.SimpleNamespace(
        gpuUtilization=util, memoryUtilization=5, maxMemoryUsage=mem,
        time=int(seconds * 1000), startTime=int(started * 1e6), isRunning=0,
    )


def two_gpus(**extra: Any) -> list[dict[str, Any]]:
    """NVML enumerates them in the opposite order of their minor numbers on purpose."""
    base = {
        "name": "NVIDIA A100-SXM4-80GB", "total": 80 * 2**30, "used": 3 * 2**30,
        "energy_mj": 5_000_000, "util": 70, "power_mw": 250_000,
    }
    return [
        {**base, "uuid": "GPU-aaaa", "minor": 1, "bus": "00000000:3B:00.0", **extra},
        {**base, "uuid": "GPU-bbbb", "minor": 0, "bus": "00000000:1A:00.0", **extra},
    ]


def real(gpus: list[dict[str, Any]], **kw: Any) -> RealNvml:
    return RealNvml(module=standin_pynvml(gpus, **kw), clock=lambda: 1000.0)


# -- real path --------------------------------------------------------------------------------


def test_real_devices_and_healthy_reading() -> None:
    nv = real(two_gpus())
    devs = nv.devices()
    assert [(d.index, d.minor, d.uuid, d.gpu_type, d.pci_bus_id) for d in devs] == [
        (0, 1, "GPU-aaaa", "a100", "00000000:3B:00.0"),
        (1, 0, "GPU-bbbb", "a100", "00000000:1A:00.0"),
    ]
    assert devs[0].memory_total == 80 * 2**30
    r = nv.read("GPU-aaaa")
    assert (r.ts, r.energy_mj, r.util_gpu, r.mem_used, r.power_w) == (
        1000.0, 5_000_000, 70.0, 3 * 2**30, 250.0,
    )
    assert r.accounting is None and r.notes == ()
    nv.close()


def test_energy_not_supported_degrades_to_none_with_a_note(caplog: Any) -> None:
    gpus = two_gpus(errors={"nvmlDeviceGetTotalEnergyConsumption": NotSupported})
    nv = real(gpus)
    nv.devices()
    with caplog.at_level(logging.INFO, logger="slurmgate.nvml"):
        r = nv.read("GPU-bbbb")
    assert r.energy_mj is None
    assert r.util_gpu == 70.0 and r.power_w == 250.0  # the other values still come
    assert any("energy counter" in n and "NotSupported" in n for n in r.notes)
    assert "energy counter" in caplog.text


def test_no_permission_and_missing_function() -> None:
    gpus = two_gpus(errors={"nvmlDeviceGetPowerUsage": NoPermission})
    nv = real(gpus, missing=("nvmlDeviceGetUtilizationRates",))  # an old nvidia-ml-py
    nv.devices()
    r = nv.read("GPU-aaaa")
    assert r.power_w is None and r.util_gpu is None
    assert r.energy_mj == 5_000_000
    assert any("NoPermission" in n for n in r.notes)
    assert any("nvmlDeviceGetUtilizationRates is missing" in n for n in r.notes)


def test_accounting_off_gives_none_and_says_how_to_enable() -> None:
    nv = real(two_gpus(accounting=0))
    r = nv.read("GPU-aaaa", since=900.0)
    assert r.accounting is None
    assert any("accounting mode is off" in n for n in r.notes)


def test_accounting_on_summarises_this_jobs_processes() -> None:
    procs = {
        11: (99, 500.0, 9 * 2**30, 100.0),  # an earlier job's process: ignored
        12: (80, 300.0, 20 * 2**30, 950.0),
        13: (40, 100.0, 30 * 2**30, 960.0),
        14: None,  # aged out between listing and reading: skipped quietly
    }
    nv = real(two_gpus(accounting=1, procs=procs))
    acct = nv.read("GPU-aaaa", since=900.0).accounting
    assert acct is not None
    assert acct.processes == 2
    assert acct.util_mean == pytest.approx((80 * 300 + 40 * 100) / 400)
    assert acct.util_max == 80.0 and acct.mem_max_bytes == 30 * 2**30
    assert acct.busy_seconds == pytest.approx(400.0)


def test_accounting_on_without_processes_means_idle() -> None:
    assert summarise_processes([]) == (0, 0.0, 0.0, 0, 0.0)
    nv = real(two_gpus(accounting=1, procs={}))
    assert nv.read("GPU-aaaa", since=900.0).accounting == (0, 0.0, 0.0, 0, 0.0)


def test_gpu_lost_stops_reading_that_gpu_but_not_the_others() -> None:
    gpus = two_gpus()
    gpus[0]["errors"] = {"nvmlDeviceGetTotalEnergyConsumption": GpuIsLost}
    nv = real(gpus)
    nv.devices()
    r = nv.read("GPU-aaaa", since=900.0)
    assert (r.energy_mj, r.util_gpu, r.mem_used, r.power_w, r.accounting) == (None,) * 5
    assert any("GPU is lost" in n for n in r.notes)
    again = nv.read("GPU-aaaa")  # no exception, no more calls on the lost GPU
    assert again.energy_mj is None
    other = nv.read("GPU-bbbb")
    assert other.energy_mj == 5_000_000


def test_device_without_uuid_is_skipped_and_others_listed() -> None:
    gpus = two_gpus()
    gpus[1]["errors"] = {"uuid": GpuIsLost}
    nv = real(gpus)
    assert [d.uuid for d in nv.devices()] == ["GPU-aaaa"]
    assert any("GPU index 1" in n for n in nv.notes)


def test_mig_reports_the_parent() -> None:
    gpus = two_gpus(mig=[1, 1])
    gpus[0]["mig_uuid"] = "MIG-1111"
    m = standin_pynvml(gpus)
    nv = RealNvml(module=m, clock=lambda: 1.0)
    assert all(d.mig_enabled for d in nv.devices())
    r = nv.read("MIG-1111")
    assert r.energy_mj == 5_000_000
    assert ("nvmlDeviceGetTotalEnergyConsumption", 0, False) in m.calls  # the parent handle
    assert any("parent" in n for n in r.notes)


def test_unknown_uuid_reads_as_nothing() -> None:
    r = real(two_gpus()).read("GPU-zzzz")
    assert r.energy_mj is None and r.notes


def test_init_failure_is_nvml_unavailable() -> None:
    m = standin_pynvml(two_gpus())
    m.init_error = DriverNotLoaded
    with pytest.raises(NvmlUnavailable, match="DriverNotLoaded"):
        RealNvml(module=m)


def test_installed_nvidia_ml_py() -> None:
    """The real module: on a machine without a driver it must fail cleanly at start; with
    GPUs it must list them and read each one."""
    pytest.importorskip("pynvml")
    try:
        nv = RealNvml()
    except NvmlUnavailable as exc:
        assert "nvmlInit failed" in str(exc)
        return
    try:
        for dev in nv.devices():
            assert dev.uuid.startswith(("GPU-", "MIG-"))
            r = nv.read(dev.uuid, since=0.0)
            assert r.uuid == dev.uuid
            assert r.energy_mj is None or r.energy_mj >= 0
    finally:
        nv.close()


# -- names and mapping ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "short"),
    [
        ("NVIDIA A100-SXM4-80GB", "a100"),
        ("NVIDIA A100 80GB PCIe", "a100"),
        ("NVIDIA H100 80GB HBM3", "h100"),
        ("NVIDIA H100 PCIe", "h100"),
        ("NVIDIA H200", "h200"),
        ("NVIDIA GH200 480GB", "gh200"),
        ("Tesla V100-SXM2-16GB", "v100"),
        ("Tesla T4", "t4"),
        ("NVIDIA L40S", "l40s"),
        ("NVIDIA A10G", "a10g"),
        ("NVIDIA GeForce RTX 4090", "rtx4090"),
        ("Quadro RTX 8000", "rtx8000"),
        ("NVIDIA RTX A6000", "a6000"),
        ("NVIDIA A100-SXM4-40GB MIG 1g.5gb", "a100"),
        ("NVIDIA", "unknown"),
        ("", "unknown"),
    ],
)
def test_gpu_type_from_name(name: str, short: str) -> None:
    assert gpu_type_from_name(name) == short


def _dev(index: int, minor: int | None, bus: str) -> GpuDevice:
    return GpuDevice(index, minor, f"GPU-{index}", "x", "a100", bus, None)


def test_job_gpus_map_by_minor_not_nvml_order() -> None:
    devs = [_dev(0, 2, "00000000:81:00.0"), _dev(1, 0, "00000000:01:00.0"),
            _dev(2, 1, "00000000:41:00.0")]
    got = select_allocated(devs, "0,2")
    assert [(a.slurm_index, a.device.uuid if a.device else None) for a in got] == [
        (0, "GPU-1"), (2, "GPU-0"),
    ]
    pci = select_allocated(devs, "0,2", numbering="pci")
    assert [a.device.uuid for a in pci if a.device] == ["GPU-1", "GPU-0"]


def test_job_gpus_odd_values() -> None:
    devs = [_dev(0, 0, "a"), _dev(1, 1, "b")]
    assert parse_job_gpus(None) == [] and parse_job_gpus(" ") == []
    assert parse_job_gpus("0-2,5") == ["0", "1", "2", "5"]
    got = select_allocated(devs, "1,7,GPU-0,bogus")
    assert [(a.token, a.slurm_index, a.device.uuid if a.device else None) for a in got] == [
        ("1", 1, "GPU-1"), ("7", 7, None), ("GPU-0", None, "GPU-0"), ("bogus", None, None),
    ]
    # no minor numbers at all (driver refused them): PCI order
    nominor = [_dev(0, None, "00000000:02:00.0"), _dev(1, None, "00000000:01:00.0")]
    assert select_allocated(nominor, "0")[0].device.uuid == "GPU-1"


# -- fake backend -----------------------------------------------------------------------------


def test_fake_defaults_match_the_policy_model() -> None:
    d = FakeNode()
    assert FakeSpec()[:5] == (d.gpu_type, d.count, d.power_watts, tuple(d.utilization),
                              d.memory_gb)
    assert FakeSpec().sample_seconds == Nvml().sample_seconds


@pytest.mark.parametrize("name", ["slurmgate:fake:node1:0", "x", "", "nöde:7"])
def test_fake_uuids_are_standard_uuid5(name: str) -> None:
    import uuid

    assert uuid5_url(name) == str(uuid.uuid5(uuid.NAMESPACE_URL, name))


def test_fake_is_deterministic_and_node_specific() -> None:
    settings = {"backend": "fake", "fake_nodes": {"node2": {"gpu_type": "h100", "count": 2}}}
    a = FakeNvml("node2", settings, clock=lambda: FAKE_EPOCH + 3600)
    b = FakeNvml("node2", settings, clock=lambda: FAKE_EPOCH + 3600)
    assert a.devices() == b.devices()
    assert [d.gpu_type for d in a.devices()] == ["h100", "h100"]
    assert [d.minor for d in a.devices()] == [0, 1]
    uuid = a.devices()[1].uuid
    assert a.read(uuid) == b.read(uuid)
    other = FakeNvml("node1", settings).devices()
    assert len(other) == 4 and {d.uuid for d in other}.isdisjoint(d.uuid for d in a.devices())
    assert other[0].gpu_type == "a100"


def test_fake_energy_and_utilisation_follow_the_spec() -> None:
    settings = {"fake_nodes": {"n": {"power_watts": 400, "utilization": [10, 20, 30]}},
                "sample_seconds": 10}
    now = [FAKE_EPOCH + 1000.0]
    nv = FakeNvml("n", settings, clock=lambda: now[0])
    uuid = nv.devices()[0].uuid
    r0 = nv.read(uuid)
    now[0] += 60.0
    r1 = nv.read(uuid, since=r0.ts)
    assert r1.energy_mj - r0.energy_mj == 400 * 60 * 1000
    assert r0.util_gpu == [10, 20, 30][int(r0.ts // 10) % 3]
    acct = r1.accounting
    assert acct is not None
    buckets = range(int(r0.ts // 10), int(r1.ts // 10) + 1)
    expected = [[10, 20, 30][b % 3] for b in buckets]
    assert acct.util_mean == pytest.approx(sum(expected) / len(expected))
    assert acct.util_max == 30.0 and acct.busy_seconds == 60.0
    # a long run: the closed form agrees with counting every bucket
    now[0] = r0.ts + 7 * 86400 + 5
    long = nv.read(uuid, since=r0.ts).accounting
    buckets = range(int(r0.ts // 10), int(now[0] // 10) + 1)
    assert long.util_mean == pytest.approx(sum([10, 20, 30][b % 3] for b in buckets)
                                           / len(buckets))


def test_fake_unknown_uuid_and_empty_profile() -> None:
    nv = FakeNvml("n", {"fake_nodes": {"n": {"utilization": []}}}, clock=lambda: FAKE_EPOCH)
    r = nv.read(nv.devices()[0].uuid, since=FAKE_EPOCH)
    assert r.util_gpu is None and r.accounting is None and r.energy_mj == 0
    assert nv.read("GPU-nope").notes


def test_fake_spec_from_pydantic_and_from_toml_agree() -> None:
    text = """
[nvml]
backend = "fake"
sample_seconds = 15
[nvml.fake_nodes.node1]
gpu_type = "h100"
count = 8
power_watts = 700
utilization = [50, 100]
memory_gb = 94
"""
    import tomllib

    policy = parse_policy(text)
    from_model = fake_spec(policy.nvml, "node1")
    from_toml = fake_spec(tomllib.loads(text)["nvml"], "node1")
    assert from_model == from_toml == FakeSpec("h100", 8, 700.0, (50, 100), 94.0, 15.0)
    assert isinstance(open_backend(policy, "node1"), FakeNvml)
    assert isinstance(open_backend(tomllib.loads(text), "node1"), FakeNvml)
    assert len(open_backend(policy.nvml, "node1").devices()) == 8


def test_open_backend_rejects_unknown_backend() -> None:
    with pytest.raises(ValueError, match="real' or 'fake"):
        open_backend({"backend": "magic"}, "n")
