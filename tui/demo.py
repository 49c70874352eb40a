"""`slurmgate tui --demo`: a fixed synthetic cluster for screenshots, tests and benchmarks.

Slurm is ``SyntheticSlurm`` (deterministic jobs and nodes); the accounting store is a
temporary SQLite file filled through the real ingest path (reservations, node_run and jobcomp
records, GPU samples) plus a handful of events. The clock is frozen at the synthetic
cluster's base time, so every screen is the same on every run. Actions change the synthetic
cluster and are recorded as events, as the daemon would.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Any

from db.ingest import ingest_records
from db.reports import quota_rows
from db.store import Store, open_store
from policies.config import Policy, parse_policy
from policies.fairshare import decayed_usage, factors
from policies.ledger import period_bounds
from slurm_plugin.slurm.client import SlurmClient
from slurm_plugin.slurm.synthetic import SyntheticSlurm
from tui.queue_model import CostEstimator, annotate
from tui.sources import Sources, Viewer

DEMO_NOW = 1_700_000_000.0
"""2023-11-14 22:13:20 UTC: SyntheticSlurm's base time, the demo's frozen clock."""
CLUSTER = "demo"
DAY = 86400.0

DEMO_POLICY = """
[daemon]
cluster = "demo"
admins = ["admin"]

[tags]
required = ["project", "cost_center"]

[teams.vision]
accounts = ["vision"]
members = ["alice", "carol"]
projects = ["vit-scaling", "detection"]
cost_center = "CC1001"
budget = 2200.0
share = 30

[teams.nlp]
accounts = ["nlp"]
members = ["bob", "erin"]
projects = ["llm-pretrain", "llm-eval"]
cost_center = "CC2002"
budget = 4000.0
share = 50

[teams.speech]
accounts = ["speech"]
members = ["dave"]
projects = ["asr-v2"]
cost_center = "CC3003"
budget = 1500.0
share = 10

[teams.robotics]
accounts = ["robotics"]
members = ["frank"]
projects = ["sim2real"]
cost_center = "CC4004"
budget = 600.0
share = 10

[rates]
currency = "$"
cpu_core_hour = 0.02
mem_gb_hour = 0.005
kwh = 0.15

[rates.gpu_hour]
a100 = 2.50
h100 = 4.00
l40s = 1.20

[partitions.gpu]
default_gpu_type = "a100"
max_time_minutes = 10080

[partitions.scavenger]
default_gpu_type = "a100"
max_time_minutes = 1440
price_factor = 0.3

[checkpoint]
checkpoint_root = "/shared/checkpoints"
"""

# (user, team, project); heavy users appear more than once
_RUNNERS = (("alice", "vision", "vit-scaling"), ("carol", "vision", "detection"),
            ("bob", "nlp", "llm-pretrain"), ("bob", "nlp", "llm-pretrain"),
            ("erin", "nlp", "llm-eval"), ("dave", "speech", "asr-v2"),
            ("frank", "robotics", "sim2real"), ("alice", "vision", "vit-scaling"))


def demo_policy(database: str = ":memory:") -> Policy:
    text = DEMO_POLICY.replace('cluster = "demo"',
                               f'cluster = "demo"\ndatabase = {json.dumps(database)}')
    return parse_policy(text, "<demo policy>")


def _record(kind: str, written_at: float, rng: random.Random, **fields: Any) -> dict[str, Any]:
    rid = uuid.UUID(int=rng.getrandbits(128)).hex
    return {"v": 1, "kind": kind, "record_id": rid, "cluster": CLUSTER, "written_at": written_at,
            **fields}


def _finished_runs(store: Store, policy: Policy, nodes: list[Any],
                   rng: random.Random) -> list[dict[str, Any]]:
    """Reservations plus node_run and jobcomp records of ~90 runs over the last 45 days."""
    records = []
    for i in range(90):
        user, team, project = rng.choice(_RUNNERS)
        node = rng.choice(nodes)
        gpu_type = next(iter(node.gpus_total))
        gpus = rng.choice((1, 1, 2, 4))
        end = DEMO_NOW - rng.uniform(600, 45 * DAY)
        hours = rng.choice((0.5, 1, 2, 4, 8, 12, 24))
        start = end - hours * 3600
        job_id = 100 + i
        state = "NODE_FAIL" if i % 23 == 5 else rng.choice(("COMPLETED",) * 5 + ("FAILED",))
        cost_center = policy.teams[team].cost_center
        store.add_reservation({
            "rid": f"rdemo{i:04d}", "cluster": CLUSTER, "job_id": job_id, "team": team,
            "project": project, "cost_center": cost_center, "user": user,
            "account": team, "partition": "gpu", "gpu_type": gpu_type, "gpus": gpus,
            "cpus": gpus * 8, "time_limit_min": int(hours * 60), "est_cost": 0.0,
            "period": period_bounds("month", start)[2],
            "tags": {"project": project, "cost_center": cost_center,
                     "experiment": f"{project}-e{i % 5 + 1}"},
        }, now=start - 400)  # made at submit, before the job was queued
        if i % 4 != 3:  # most training jobs report epochs through the checkpoint helper
            store.record_progress(CLUSTER, job_id, 0, uid=1000 + i,
                                  epoch=max(1, int(hours * 3)), now=end - 60)
        util = rng.choice((95.0, 88.0, 72.0, 40.0, 8.0))
        gpu_list = [{"index": g, "minor": g, "uuid": f"GPU-{node.name}-{g}",
                     "gpu_type": gpu_type, "energy_j": 300.0 * util / 100 * hours * 3600,
                     "util_mean": util, "util_max": min(100.0, util + 5),
                     "mem_max_bytes": 40 * 2**30, "gpu_seconds": hours * 3600}
                    for g in range(gpus)]
        records.append(_record("node_run", end, rng, job_id=job_id, restart_count=0,
                               node=node.name, user=user, account=team, start_ts=start,
                               end_ts=end, gpus=gpu_list))
        records.append(_record("jobcomp", end, rng, job_id=job_id, restart_count=0,
                               state=state, submit_ts=start - 300, start_ts=start, end_ts=end,
                               nodes=node.name, node_count=1, partition="gpu", uid=1000 + i,
                               user=user, account=team, exit_code="0:0", derived_ec="0:0",
                               time_limit_min=int(hours * 60) + 30, work_dir=f"/home/{user}"))
    return records


_QUEUE_UTIL = (35.0, 92.0, 61.0, 4.0, 78.0)
"""Mean utilisation of the first GPU of the finished queue jobs' runs, in job-id order; a
job's other GPUs alternate between the same and idle (2 of 4 used)."""


def _finished_queue_runs(store: Store, policy: Policy, queue: list[Any],
                         rng: random.Random) -> list[dict[str, Any]]:
    """The settled runs of the finished jobs Slurm still lists (their reservation made at
    submit, node_run and jobcomp records at the end), so the job detail has figures."""
    records: list[dict[str, Any]] = []
    period = period_bounds(policy.budgets.period, DEMO_NOW)[2]
    done = [q for q in queue if q.job.finished and q.admin.get("rid") and q.job.start_ts
            and q.job.end_ts and q.job.end_ts <= DEMO_NOW and q.job.nodes]
    for n, q in enumerate(done):
        j = q.job
        node = j.nodes.split(",")[0]
        seconds = j.end_ts - j.start_ts
        gpus = max(1, int(j.gpus))
        util = _QUEUE_UTIL[n % len(_QUEUE_UTIL)]
        tags = {"project": q.project or "", "experiment": f"{q.project}-e1", "ckpt": "yes"}
        store.add_reservation({
            "rid": q.admin["rid"], "cluster": CLUSTER, "job_id": j.job_id, "team": q.team,
            "project": q.project, "user": j.user, "account": j.account,
            "partition": j.partition, "gpu_type": j.gpu_type, "gpus": j.gpus,
            "time_limit_min": j.time_limit_min, "est_cost": q.est_cost or 0.0,
            "period": period, "tags": tags,
        }, now=j.submit_ts or j.start_ts)
        gpu_list = []
        for g in range(gpus):
            u = util if g % 2 == 0 else 0.0
            gpu_list.append({"index": g, "minor": g, "uuid": f"GPU-{node}-{g}",
                             "gpu_type": j.gpu_type, "energy_j": 300.0 * u / 100 * seconds,
                             "util_mean": u, "util_max": min(100.0, u + 5),
                             "mem_max_bytes": (20 if u else 1) * 2**30, "gpu_seconds": seconds})
        records.append(_record("node_run", j.end_ts, rng, job_id=j.job_id, restart_count=0,
                               node=node, user=j.user, account=j.account, start_ts=j.start_ts,
                               end_ts=j.end_ts, gpus=gpu_list))
        records.append(_record("jobcomp", j.end_ts, rng, job_id=j.job_id, restart_count=0,
                               state=j.state, submit_ts=j.submit_ts, start_ts=j.start_ts,
                               end_ts=j.end_ts, nodes=j.nodes, node_count=1,
                               partition=j.partition, uid=j.uid, user=j.user,
                               account=j.account, exit_code="0:0", derived_ec="0:0",
                               time_limit_min=j.time_limit_min, work_dir=f"/home/{j.user}"))
        store.record_progress(CLUSTER, j.job_id, 0, uid=j.uid, epoch=3 + n, now=j.end_ts)
    return records


def _gpu_samples(nodes: list[Any], rng: random.Random) -> list[dict[str, Any]]:
    """One sample a minute for the last hour; node 2's first allocated GPU sits idle."""
    records = []
    for n_i, node in enumerate(nodes):
        gpu_type, total = next(iter(node.gpus_total.items()))
        used = node.gpus_used.get(gpu_type, 0)
        for step in range(60):
            ts = DEMO_NOW - (59 - step) * 60.0
            gpus = []
            for g in range(total):
                busy = g < used and not (n_i == 1 and g == 0)
                wave = (step * (g + 2) * 7 + n_i * 5) % 11 * 4.0
                util = min(100.0, 55 + wave) if busy else 0.0
                gpus.append({"uuid": f"GPU-{node.name}-{g}", "index": g, "gpu_type": gpu_type,
                             "util": round(util, 1),
                             "mem_used_bytes": (30 + 5 * g) * 2**30 if g < used else 0,
                             "power_w": 90.0 + 3 * util})
            records.append(_record("gpu_sample", ts, rng, node=node.name, ts=ts, gpus=gpus))
    return records


def _events(nodes: list[Any]) -> list[dict[str, Any]]:
    bad = nodes[2].name
    h = 3600.0
    return [
        {"ts": DEMO_NOW - 50 * h, "kind": "node_fail", "cluster": CLUSTER, "job_id": 105,
         "node": bad, "team": "nlp", "message": f"{bad} stopped responding; job 105 requeued"},
        {"ts": DEMO_NOW - 20 * h, "kind": "node_fail", "cluster": CLUSTER, "job_id": 128,
         "node": bad, "team": "vision", "message": f"{bad} stopped responding; job 128 requeued"},
        {"ts": DEMO_NOW - 19.5 * h, "kind": "drain", "cluster": CLUSTER, "node": bad,
         "actor": "slurmgate", "message": f"drained {bad}: 2 failures in 24 h"},
        {"ts": DEMO_NOW - 6 * h, "kind": "reject", "cluster": CLUSTER, "team": "robotics",
         "user": "frank", "message": "missing tag cost_center; e.g. --comment "
         "project=sim2real,cost_center=CC1234"},
        {"ts": DEMO_NOW - 3 * h, "kind": "admin_action", "cluster": CLUSTER, "job_id": 1007,
         "actor": "admin", "message": "hold {'job_id': 1007}: by admin via slurmgate"},
        {"ts": DEMO_NOW - 1 * h, "kind": "reject", "cluster": CLUSTER, "team": "speech",
         "user": "dave", "message": "team speech is over its hard limit ($1,500.00)"},
        {"ts": DEMO_NOW - 0.5 * h, "kind": "quarantine", "cluster": CLUSTER,
         "message": "node_run.demo.99.0.gpu002.json: end_ts is before start_ts"},
        {"ts": DEMO_NOW - 0.3 * h, "kind": "idle_warning", "cluster": CLUSTER, "job_id": 1003,
         "node": nodes[1].name, "team": "nlp", "user": "bob", "actor": "slurmgate",
         "message": "job 1003: 1 of 4 GPUs below 10% for 60 min; idle cost so far $12.40"},
        {"ts": DEMO_NOW - 0.2 * h, "kind": "idle_action", "cluster": CLUSTER, "job_id": 998,
         "node": nodes[3].name, "team": "vision", "user": "carol", "actor": "slurmgate",
         "message": "job 998 cancelled: 2 of 2 GPUs below 10% for 120 min"},
        {"ts": DEMO_NOW - 0.1 * h, "kind": "alert_failed", "cluster": CLUSTER, "team": "nlp",
         "actor": "slurmgate",
         "message": "budget_80 mail to nlp leads: smtp.example.org:587 unreachable, gave up"},
    ]


def fill(store: Store, policy: Policy, slurm: SlurmClient) -> None:
    """The fixed demo history: settled runs, live reservations, GPU samples, events."""
    rng = random.Random(20231114)
    nodes = sorted(slurm.nodes(), key=lambda n: n.name)
    store.add_events(_events(nodes))
    estimator = CostEstimator(policy)
    queue = annotate(slurm.jobs(), policy, {}, estimator)
    records = _finished_runs(store, policy, nodes, rng) + _gpu_samples(nodes, rng)
    records += _finished_queue_runs(store, policy, queue, random.Random(1001))
    result = ingest_records(store, records, policy, now=DEMO_NOW)
    if result.errors:
        raise RuntimeError(f"demo data did not ingest: {result.errors[0][1]}")
    for key in result.settled:  # the daemon's failure handler confirms node failures
        store.confirm_failure_credit(*key, now=DEMO_NOW)
    period = period_bounds(policy.budgets.period, DEMO_NOW)[2]
    for q in queue:
        if q.job.finished or not q.admin.get("rid"):
            continue
        store.add_reservation({
            "rid": q.admin["rid"], "cluster": CLUSTER, "job_id": q.job.job_id, "team": q.team,
            "project": q.project, "user": q.job.user, "account": q.job.account,
            "partition": q.job.partition, "gpu_type": q.job.gpu_type, "gpus": q.job.gpus,
            "time_limit_min": q.job.time_limit_min, "est_cost": q.est_cost or 0.0,
            "period": period, "tags": {"project": q.project or ""},
        }, now=q.job.submit_ts or DEMO_NOW)


class DemoSources(Sources):
    demo = True

    def __init__(self, n_jobs: int = 60, n_nodes: int = 6, *,
                 slurm: SlurmClient | None = None, fill_store: bool = True,
                 cluster: str | None = None) -> None:
        self.tmpdir = tempfile.mkdtemp(prefix="slurmgate-demo-")
        self.db_path = str(Path(self.tmpdir) / "demo.db")
        policy = demo_policy(self.db_path)
        slurm = slurm or SyntheticSlurm(n_jobs, n_nodes, seed=7, gpus_per_node=4,
                                        base_ts=DEMO_NOW, cluster=CLUSTER,
                                        clock=lambda: DEMO_NOW)
        viewer = Viewer("admin", True, frozenset(policy.teams))
        super().__init__(policy, slurm, viewer, clock=lambda: DEMO_NOW, cluster=cluster)
        self.writer = open_store(self.db_path)
        self.writer_lock = threading.Lock()
        if fill_store:
            nodes = sorted(slurm.nodes(), key=lambda n: n.name)
            if len(nodes) > 4:
                slurm.drain(nodes[4].name, "fan failure, ticket 4711")
            fill(self.writer, policy, slurm)

    def quota(self) -> dict[str, Any]:
        """What the daemon's quota op answers for ``quota_request()``, computed from the demo
        store: the request's cluster, else the daemon's (its cluster with a budget per
        cluster, every cluster with global budgets)."""
        policy = self.policy
        scope = policy.budgets.scope
        cluster = self.quota_request().get("cluster") or (
            policy.daemon.cluster if scope == "cluster" else None)
        start, end, label = period_bounds(policy.budgets.period, DEMO_NOW)
        with self.writer_lock:
            used = {r["team"]: r for r in quota_rows(self.writer, start, end, period=label,
                                                      cluster=cluster)}
            half_life = policy.fairshare.half_life_hours
            usage = decayed_usage(self.writer.team_usage_gpu_hours(
                DEMO_NOW - 10 * half_life * 3600), DEMO_NOW, half_life)
        fair = factors(policy, usage)
        rows = []
        for team, t in sorted(policy.teams.items()):
            spent = used.get(team, {}).get("net", 0.0)
            reserved = used.get(team, {}).get("reserved", 0.0)
            rows.append({"team": team, "budget": t.budget, "spent": round(spent, 6),
                         "reserved": round(reserved, 6),
                         "remaining": round(t.budget - spent - reserved, 6),
                         "soft_limit": t.soft_limit * t.budget,
                         "hard_limit": t.hard_limit * t.budget,
                         "fairshare": round(fair.get(team, 1.0), 6), "share": t.share})
        return {"ok": True, "period": label, "currency": policy.rates.currency,
                "mode": policy.budgets.mode, "scope": scope, "cluster": cluster, "teams": rows}

    def action(self, request: dict[str, Any]) -> str:
        action = request["action"]
        if "job_id" in request:
            target: dict[str, Any] = {"job_id": request["job_id"]}
            getattr(self.slurm, action)(request["job_id"])
        elif action == "drain":
            target = {"node": request["node"]}
            self.slurm.drain(request["node"], request.get("reason") or "by admin")
        else:
            target = {"node": request["node"]}
            self.slurm.resume(request["node"])
        with self.writer_lock:
            self.writer.add_event("admin_action", cluster=CLUSTER, actor=self.viewer.user,
                                  ts=self.clock(), message=f"{action} {target} (demo)",
                                  detail={"action": action, **target}, **target)
        return f"{action} {next(iter(target.values()))}: done (demo)"

    def close(self) -> None:
        super().close()
        with self.writer_lock:
            self.writer.close()
        shutil.rmtree(self.tmpdir, ignore_errors=True)


def demo_sources(n_jobs: int = 60, n_nodes: int = 6, *,
                 cluster: str | None = None) -> DemoSources:
    return DemoSources(n_jobs, n_nodes, cluster=cluster)
