"""Two daemons, one PostgreSQL ledger: budgets are never spent twice, and the once-only work
has exactly one leader per cluster, which moves when the leader goes.

The daemons here are real ``Daemon`` objects, each on its own connection to a real
PostgreSQL server (tests/postgres.py), deciding on threads at the same moment.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from db import shared_ledger
from db.leader import Leadership
from db.store import open_store
from policies.request import JobRequest
from slurm_plugin.daemon.service import Daemon, LedgerUnavailable
from tests.unit.test_db_ingest import make_policy
from tests.waiting import wait_for

ROOM = 9
"""Jobs the team's budget has room for: odd, so that two daemons deciding in lockstep
without the lock (each reading the same standing) would accept one job too many."""
JOB_HOURS = 1.0
"""Each job: 1 a100 GPU (2.0/h) for 60 min, 2 CPUs, 4 GB: a little over 2.0 reserved."""


def policy_for(tmp: Any, name: str, budget: float, cluster: str = "c1",
               scope: str = "cluster") -> Any:
    return make_policy(
        daemon={"cluster": cluster, "log_file": str(tmp / f"{name}.log")},
        budgets={"scope": scope},
        teams={"vision": {"accounts": ["vis"], "members": ["vera"], "budget": budget,
                          "soft_limit": 1.0, "hard_limit": 1.0}})


def job(n: int) -> JobRequest:
    return JobRequest.from_wire({
        "user": "vera", "account": "vis", "partition": "gpu", "name": f"j{n}",
        "time_limit": int(JOB_HOURS * 60), "tres_per_node": "gres/gpu:a100:1",
        "min_cpus": 2, "pn_min_memory": 4096,
        "comment": "project=p1,cost_center=CC-V"})


def accepted_reserve(d: Daemon) -> float:
    decision = d.decide(job(0), d.policy)
    assert decision.verdict == "accept", decision.reason
    return float(decision.reserve)


@pytest.fixture
def two_daemons(pg_url: str, tmp_path: Any) -> Iterator[tuple[Daemon, Daemon, float]]:
    probe = Daemon(str(tmp_path / "p.toml"), policy_for(tmp_path, "p", 1e9), None, None)
    each = accepted_reserve(probe)
    budget = ROOM * each + each / 2  # room for exactly ROOM jobs
    daemons = []
    for name in ("a", "b"):
        store = open_store(pg_url)
        daemons.append(Daemon(str(tmp_path / f"{name}.toml"),
                              policy_for(tmp_path, name, budget), store, None))
    for d in daemons:
        d.refresh_ledger()
    yield daemons[0], daemons[1], each
    for d in daemons:
        d.leadership.release()
        assert d.store is not None
        d.store.close()


def race(daemons: tuple[Daemon, Daemon], per_daemon: int) -> list[str]:
    """Both daemons decide ``per_daemon`` jobs each, all threads released at once."""
    verdicts: list[str] = []
    gate = threading.Barrier(2 * per_daemon)
    guard = threading.Lock()

    def one(d: Daemon, n: int) -> None:
        gate.wait()
        v = d.decide_and_record(job(n), origin="submit").verdict
        with guard:
            verdicts.append(v)

    threads = [threading.Thread(target=one, args=(d, i * 2 + k))
               for i in range(per_daemon) for k, d in enumerate(daemons)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return verdicts


def slow_standing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Widen the window between reading a team's standing and writing the reservation,
    the window two daemons would both decide in without the team lock."""
    real = shared_ledger.team_standing

    def slow(*a: Any, **kw: Any) -> tuple[float, float]:
        out = real(*a, **kw)
        time.sleep(0.05)
        return out

    monkeypatch.setattr(shared_ledger, "team_standing", slow)


def live_reserved(store: Any) -> tuple[int, float]:
    rows = store.live_reservations()
    return len(rows), sum(r["est_cost"] for r in rows)


def test_two_daemons_deciding_at_once_never_pass_the_hard_limit(
        two_daemons: tuple[Daemon, Daemon, float], monkeypatch: pytest.MonkeyPatch) -> None:
    a, b, each = two_daemons
    slow_standing(monkeypatch)
    verdicts = race((a, b), per_daemon=8)  # 16 jobs at once for room of 9
    assert verdicts.count("accept") == ROOM, verdicts
    count, held = live_reserved(a.store)
    assert count == ROOM and held == pytest.approx(ROOM * each)
    assert held <= a.policy.teams["vision"].budget


def test_without_the_team_lock_the_same_race_overspends(
        two_daemons: tuple[Daemon, Daemon, float], monkeypatch: pytest.MonkeyPatch) -> None:
    """The control: the race above is real. Without lock_team both daemons read the same
    standing and accept past the limit, so the first test would catch a missing lock."""
    a, b, _ = two_daemons
    slow_standing(monkeypatch)
    monkeypatch.setattr(shared_ledger, "lock_team", lambda *a, **kw: None)
    verdicts = race((a, b), per_daemon=8)
    count, held = live_reserved(a.store)
    assert verdicts.count("accept") > ROOM and count > ROOM
    assert held > a.policy.teams["vision"].budget


def test_a_global_budget_is_shared_by_clusters_and_a_cluster_budget_is_not(
        pg_url: str, tmp_path: Any) -> None:
    probe = Daemon(str(tmp_path / "p.toml"), policy_for(tmp_path, "p", 1e9), None, None)
    each = accepted_reserve(probe)
    budget = 3 * each + each / 2
    for scope, expect in (("cluster", 6), ("global", 3)):
        url_daemons = []
        for cluster in ("east", "west"):
            store = open_store(pg_url)
            url_daemons.append(Daemon(str(tmp_path / f"{cluster}.toml"),
                                      policy_for(tmp_path, cluster, budget, cluster, scope),
                                      store, None))
        accepts = 0
        for n in range(5):
            for d in url_daemons:
                accepts += d.decide_and_record(job(n), origin="submit").verdict == "accept"
        assert accepts == expect, scope
        for d in url_daemons:
            assert d.store is not None
            with d.store.transaction():
                d.store.conn.execute("DELETE FROM reservations", {})
            d.store.close()


def test_an_unreachable_ledger_gives_no_verdict(pg_url: str, tmp_path: Any) -> None:
    """The decision raises LedgerUnavailable (the daemon answers ok=false; the shim follows
    its fail mode) and nothing is reserved."""
    store = open_store(pg_url)
    d = Daemon(str(tmp_path / "a.toml"), policy_for(tmp_path, "a", 1e6), store, None)
    other = open_store(pg_url)
    pid = store.conn.scalar("SELECT pg_backend_pid()")
    other.conn.execute("SELECT pg_terminate_backend(:p)", {"p": pid})
    with pytest.raises(LedgerUnavailable, match="ledger unreachable"):
        d.decide_and_record(job(1), origin="submit")
    assert other.live_reservations() == []
    other.close()


# -- the leader of the once-only work ---------------------------------------------------------

def test_one_leader_per_cluster_and_it_moves_when_the_leader_dies(pg_url: str) -> None:
    changes: list[tuple[str, bool]] = []
    a = Leadership(pg_url, "c1", on_change=lambda led, why: changes.append(("a", led)))
    b = Leadership(pg_url, "c1", on_change=lambda led, why: changes.append(("b", led)))
    other = Leadership(pg_url, "c2")
    assert a.check() and not b.check()
    assert a.check() and not b.check()  # held, not stacked: still exactly one
    assert other.check()  # another cluster has its own leader
    # the leader's session dies (its process or host went): the lock goes with it
    watcher = open_store(pg_url)
    watcher.conn.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE application_name = 'slurmgate-leader' AND pid IN ("
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND objid = :k)",
        {"k": __import__("db.leader", fromlist=["cluster_key"]).cluster_key("c1")})
    t0 = time.monotonic()
    wait_for(lambda: b.check(), 10, what="the other daemon to take the lead")
    took = time.monotonic() - t0
    assert not a.check()  # the old leader knows it lost the lead
    assert took < 10
    assert changes == [("a", True), ("b", True), ("a", False)]
    for x in (a, b, other):
        x.release()
    watcher.close()


def test_release_hands_over_at_once(pg_url: str) -> None:
    a, b = Leadership(pg_url, "c1"), Leadership(pg_url, "c1")
    assert a.check() and not b.check()
    a.release()
    assert b.check() and not a.check()
    b.release()


def test_sqlite_always_leads(tmp_path: Any) -> None:
    assert Leadership(str(tmp_path / "x.db"), "c1").check()


def test_an_unreachable_server_is_not_leadership(pg_url: str) -> None:
    bad = pg_url.rsplit(":", 1)[0] + ":1/slurmgate"  # nothing listens on port 1
    lead = Leadership(bad, "c1")
    assert lead.check() is False and lead.last_error
