"""The TUI against the real dev cluster (Slurm 22.05): what squeue shows, filters, sorting,
search, admin actions that change the job in Slurm, the cursor across refreshes, and the
Quotas view against `slurmgate quota --json`.

Quotas and actions go through a slurmgate daemon started here from the working tree, on its
own socket, database and spool (seeded with one settled run), against the shared cluster's
Slurm: the shared daemon is left alone. The test runs as root, whom the daemon treats as an
admin. Every job a test submits is cancelled.
"""

from __future__ import annotations

import json
import pwd
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from db.ingest import ingest_records
from db.store import open_store
from policies.config import load_policy
from policies.cost import format_money
from policies.ledger import period_bounds
from slurm_plugin.protocol import DaemonUnavailable, call
from tests.conftest import REPO, Cluster
from tests.unit.test_tui_support import column, drive, in_thread, loaded, rows, until
from tests.waiting import wait_for
from tui.app import Intervals, SlurmgateApp
from tui.sources import LiveSources, viewer_for

pytestmark = pytest.mark.slurm
INTERVALS = Intervals(queue=5, nodes=5, quotas=5, chargeback=60, events=5)
PENDING = "--begin=now+3600"
"""Keeps a job pending (reason BeginTime) without using GPUs."""


@dataclass
class PrivateDaemon:
    policy: Path
    socket: str
    database: Path
    env: dict[str, str]


def _policy_copy(src: str, d: Path) -> str:
    paths = {"socket": d / "gate.sock", "database": d / "gate.db", "spool_dir": d / "spool",
             "log_file": d / "gate.log"}
    for key, value in paths.items():
        src, n = re.subn(rf"(?m)^{key}\s*=.*$", f'{key} = "{value}"', src, count=1)
        assert n == 1, f"dev policy has no {key} line"
    return src


def _seed(database: Path, policy_path: Path) -> None:
    """One settled run of team nlp in the current period, so spend is not zero."""
    policy = load_policy(policy_path)
    cluster = policy.daemon.cluster
    now = time.time()
    start_period = period_bounds(policy.budgets.period, now)[0]
    end = max(start_period + 120, now - 600)
    start = end - 60
    store = open_store(database)
    store.add_reservation({"rid": "rtuitest", "cluster": cluster, "job_id": 900001,
                           "team": "nlp", "project": "llm-pretrain", "user": "bob",
                           "account": "nlp", "partition": "gpu", "gpu_type": "h100",
                           "gpus": 2, "cpus": 4, "time_limit_min": 10, "est_cost": 1.5,
                           "period": period_bounds(policy.budgets.period, start)[2]},
                          now=start - 600)
    base = {"v": 1, "cluster": cluster, "written_at": end, "job_id": 900001}
    gpus = [{"index": i, "uuid": f"GPU-tui-{i}", "gpu_type": "h100", "energy_j": 5000.0,
             "util_mean": 50.0, "util_max": 90.0, "gpu_seconds": 60.0} for i in range(2)]
    records = [
        {**base, "kind": "node_run", "record_id": "tui-node-run", "restart_count": 0,
         "node": "node2", "user": "bob", "account": "nlp", "start_ts": start, "end_ts": end,
         "gpus": gpus},
        {**base, "kind": "jobcomp", "record_id": "tui-jobcomp", "restart_count": 0,
         "state": "COMPLETED", "submit_ts": start - 30, "start_ts": start, "end_ts": end,
         "nodes": "node2", "node_count": 1, "partition": "gpu", "user": "bob",
         "account": "nlp"},
    ]
    result = ingest_records(store, records, policy)
    assert not result.errors, result.errors
    store.close()


@pytest.fixture(scope="module")
def daemon(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateDaemon]:
    d = tmp_path_factory.mktemp("tui-daemon")
    policy = d / "policy.toml"
    policy.write_text(_policy_copy(cluster.policy_path.read_text(), d))
    _seed(d / "gate.db", policy)
    env = {**cluster.env, "PYTHONPATH": str(REPO), "SLURMGATE_CONFIG": str(policy)}
    log = (d / "daemon.out").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "slurm_plugin.cli", "--config", str(policy),
                             "daemon"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    sock = str(d / "gate.sock")

    def answers() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"private daemon exited: {(d / 'daemon.out').read_text()}")
        try:
            return bool(call(sock, {"op": "ping"}, timeout=2).get("ok"))
        except DaemonUnavailable:
            return False

    try:
        wait_for(answers, 30, 0.2, what="the private slurmgate daemon")
        yield PrivateDaemon(policy, sock, d / "gate.db", env)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


@pytest.fixture
def slurm_env(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Slurm client in this process finds the dev cluster."""
    monkeypatch.setenv("SLURM_CONF", cluster.env["SLURM_CONF"])


@pytest.fixture
def jobs(cluster: Cluster) -> Iterator[list[int]]:
    """Ids of jobs a test submits; all cancelled afterwards."""
    ids: list[int] = []
    yield ids
    cluster.scancel(*ids)


def _app(daemon: PrivateDaemon, uid: int | None = None, **kw) -> tuple[SlurmgateApp, LiveSources]:  # noqa: ANN003, E501
    policy = load_policy(daemon.policy)
    sources = LiveSources(policy, viewer=viewer_for(policy, uid))
    return SlurmgateApp(sources, intervals=INTERVALS, **kw), sources


def _run(app: SlurmgateApp, sources: LiveSources, scenario) -> None:  # noqa: ANN001
    try:
        drive(app, scenario)
    finally:
        sources.close()


def _submit(cluster: Cluster, jobs: list[int], user: str, *args: str,
            wrap: str = "sleep 60") -> int:
    job_id = cluster.submit_ok(user, *args, wrap=wrap)
    jobs.append(job_id)
    return job_id


async def _showing(pilot, queue, *job_ids: int, timeout: float = 30) -> None:  # noqa: ANN001
    """Refresh until every job is in the table."""
    wanted = {str(j) for j in job_ids}

    def there() -> bool:
        if wanted <= set(queue.table.keys):
            return True
        if not queue.fetcher.in_flight:
            queue.fetcher.request()
        return False

    await until(pilot, there, timeout, f"jobs {sorted(wanted)} in the queue view")


async def _confirm(pilot, key: str) -> None:  # noqa: ANN001
    await pilot.press(key)
    await until(pilot, lambda: pilot.app.modal_open, 5, f"the dialog for {key!r}")
    await pilot.press("y")
    await until(pilot, lambda: not pilot.app.modal_open, 5, "the dialog to close")


def _slurm(cluster: Cluster, job_id: int, test, what: str, timeout: float = 60) -> dict:  # noqa: ANN001, E501
    return wait_for(lambda: (j := cluster.job(job_id)) is not None and test(j) and j,
                    timeout, 0.3, what=f"job {job_id}: {what}")


def test_queue_shows_the_jobs_squeue_shows(cluster: Cluster, daemon: PrivateDaemon,
                                           slurm_env: None, jobs: list[int]) -> None:
    ids = [_submit(cluster, jobs, "alice", "--gres=gpu:a100:1", PENDING) for _ in range(2)]
    app, sources = _app(daemon)

    async def scenario(pilot) -> None:  # noqa: ANN001
        queue = await loaded(pilot, "queue")
        await _showing(pilot, queue, *ids)
        before = set(await in_thread(cluster.jobs))
        renders = queue.fetcher.renders
        queue.fetcher.request()
        await until(pilot, lambda: queue.fetcher.renders > renders, 30, "a refresh")
        after = set(await in_thread(cluster.jobs))
        shown = {int(k) for k in queue.table.keys}
        assert before & after <= shown, "a job squeue showed throughout is missing"
        assert shown <= before | after, "the view shows a job squeue never showed"
        cells = rows(queue.table)[str(ids[0])]
        assert cells[1:9] == ["alice", "vision", "vit-scaling", "gpu", "PENDING", "BeginTime",
                              "a100x1", "(1)"]
        assert cells[11].startswith("$")
        assert f"of {len(shown):,} jobs" in app.screen_text()

    _run(app, sources, scenario)


def test_filter_sort_and_search(cluster: Cluster, daemon: PrivateDaemon, slurm_env: None,
                                jobs: list[int]) -> None:
    mine = _submit(cluster, jobs, "alice", "--gres=gpu:a100:1", PENDING)
    bobs = _submit(cluster, jobs, "bob", "--gres=gpu:h100:1", PENDING)
    app, sources = _app(daemon)

    async def scenario(pilot) -> None:  # noqa: ANN001
        queue = await loaded(pilot, "queue")
        await _showing(pilot, queue, mine, bobs)
        table = queue.table

        await pilot.press("slash", *str(mine), "enter")
        await until(pilot, lambda: str(bobs) not in table.keys, 10, "the search to apply")
        assert str(mine) in table.keys
        assert all(str(mine) in " ".join(r) for r in rows(table).values())
        await pilot.press("escape")
        await until(pilot, lambda: str(bobs) in table.keys, 10, "the search to clear")

        await pilot.press("f")
        await until(pilot, lambda: app.modal_open, 5, "the filter dialog")
        await pilot.press("tab", "enter", *"bob", "enter", "ctrl+s")
        await until(pilot, lambda: queue.query_state.user == "bob", 10, "the user filter")
        await until(pilot, lambda: str(mine) not in table.keys, 10, "the filter to apply")
        assert str(bobs) in table.keys and set(column(table, "user")) == {"bob"}
        assert "user=bob" in app.screen_text()
        await pilot.press("c")
        await until(pilot, lambda: str(mine) in table.keys, 10, "the filters to clear")

        await pilot.press("s")  # job id -> user
        await until(pilot, lambda: queue.result.query.sort == "user", 10, "sort by user")
        users = [u.lower() for u in column(table, "user")]
        assert users == sorted(users)
        await pilot.press("S")
        await until(pilot, lambda: queue.result.query.reverse, 10, "reversed sort")
        users = [u.lower() for u in column(table, "user")]
        assert users == sorted(users, reverse=True)

    _run(app, sources, scenario)


def test_hold_release_requeue_cancel_change_the_job_in_slurm(
        cluster: Cluster, daemon: PrivateDaemon, slurm_env: None, jobs: list[int]) -> None:
    waiting = _submit(cluster, jobs, "alice", "--gres=gpu:a100:1", PENDING)
    running = _submit(cluster, jobs, "alice", "--gres=gpu:a100:1")
    cluster.wait_state(running, "RUNNING", timeout=120)
    app, sources = _app(daemon)

    async def scenario(pilot) -> None:  # noqa: ANN001
        queue = await loaded(pilot, "queue")
        await _showing(pilot, queue, waiting, running)
        table = queue.table

        assert table.select_key(str(waiting))
        await _confirm(pilot, "h")
        await in_thread(_slurm, cluster, waiting, lambda j: j["state_reason"] == "JobHeldAdmin",
                        "held")
        await until(pilot, lambda: rows(table)[str(waiting)][5] == "HELD", 30, "HELD shown")
        assert table.cursor_key == str(waiting)
        await _confirm(pilot, "u")
        await in_thread(_slurm, cluster, waiting,
                        lambda j: j["state_reason"] not in ("JobHeldAdmin", "JobHeldUser"),
                        "released")

        assert table.select_key(str(running))
        await _confirm(pilot, "R")
        await in_thread(_slurm, cluster, running, lambda j: j["restart_cnt"] >= 1, "requeued")
        await _confirm(pilot, "x")
        await in_thread(_slurm, cluster, running, lambda j: j["job_state"] == "CANCELLED",
                        "cancelled")
        assert table.select_key(str(waiting))
        await _confirm(pilot, "x")
        await in_thread(_slurm, cluster, waiting, lambda j: j["job_state"] == "CANCELLED",
                        "cancelled")
        assert "failed" not in app.status.text, app.status.text

        events = await loaded(pilot, "events")

        def audited() -> bool:
            found = [r for r in rows(events.table).values()
                     if r[1] == "admin_action" and r[2] in (str(waiting), str(running))]
            if len(found) < 5 and not events.fetcher.in_flight:
                events.fetcher.request()
            return len(found) >= 5 and all(r[6] == "root" for r in found)

        await until(pilot, audited, 30, "the five actions in the event log, by root")

    _run(app, sources, scenario)


def test_cursor_stays_on_its_job_across_refreshes(
        cluster: Cluster, daemon: PrivateDaemon, slurm_env: None, jobs: list[int]) -> None:
    first, middle, last = (_submit(cluster, jobs, "alice", "--gres=gpu:a100:1", PENDING)
                           for _ in range(3))
    app, sources = _app(daemon)

    async def scenario(pilot) -> None:  # noqa: ANN001
        queue = await loaded(pilot, "queue")
        await _showing(pilot, queue, first, middle, last)
        table = queue.table
        assert table.select_key(str(middle))
        row = table.cursor_row
        queue.set_query(sort="id", reverse=True)  # the middle job moves to another row
        await until(pilot, lambda: queue.result.query.reverse, 10, "reversed order")
        assert table.cursor_key == str(middle) and table.cursor_row != row
        newer = await in_thread(_submit, cluster, jobs, "bob", "--gres=gpu:h100:1", PENDING)
        await in_thread(cluster.scancel, first)
        await pilot.press("r")
        await _showing(pilot, queue, newer)
        await until(pilot, lambda: rows(table).get(str(first), ["", "", "", "", "", ""])[5]
                    != "PENDING", 30, "the cancelled job to change")
        assert table.cursor_key == str(middle)
        assert queue.selected().job.job_id == middle

    _run(app, sources, scenario)


def test_quota_view_matches_slurmgate_quota(cluster: Cluster, daemon: PrivateDaemon,
                                            slurm_env: None) -> None:
    out = subprocess.run([sys.executable, "-m", "slurm_plugin.cli", "--config",
                          str(daemon.policy), "quota", "--json"], cwd=REPO, env=daemon.env,
                         capture_output=True, text=True, timeout=60, check=True)
    cli = json.loads(out.stdout)
    app, sources = _app(daemon)

    async def scenario(pilot) -> None:  # noqa: ANN001
        quotas = await loaded(pilot, "quotas")
        shown = rows(quotas.table)
        assert sorted(shown) == sorted(r["team"] for r in cli["teams"])
        cur = cli["currency"]
        for r in cli["teams"]:
            cells = dict(zip([k.value for k in quotas.table.columns], shown[r["team"]],
                             strict=True))
            for key in ("budget", "spent", "reserved", "remaining"):
                assert cells[key] == format_money(r[key], cur), (r["team"], key)
            assert cells["soft"] == format_money(r["soft_limit"], cur)
            assert cells["hard"] == format_money(r["hard_limit"], cur)
            assert cells["fairshare"] == f"{r['fairshare']:.3f}"
        assert any(r["spent"] > 0 for r in cli["teams"]), "the seeded run is not counted"
        assert f"Budget period {cli['period']}" in app.screen_text()

    _run(app, sources, scenario)


def test_a_user_sees_only_their_teams_and_gets_no_actions(
        cluster: Cluster, daemon: PrivateDaemon, slurm_env: None, jobs: list[int]) -> None:
    mine = _submit(cluster, jobs, "alice", "--gres=gpu:a100:1", PENDING)
    bobs = _submit(cluster, jobs, "bob", "--gres=gpu:h100:1", PENDING)
    app, sources = _app(daemon, uid=pwd.getpwnam("alice").pw_uid)
    assert not sources.viewer.admin and sources.viewer.teams == {"vision"}

    async def scenario(pilot) -> None:  # noqa: ANN001
        queue = await loaded(pilot, "queue")
        await _showing(pilot, queue, mine)
        assert str(bobs) not in queue.table.keys
        assert set(column(queue.table, "team")) == {"vision"}
        assert table_key_actions_hidden(app)
        queue.table.select_key(str(mine))
        await pilot.press("h")
        await pilot.pause(0.2)
        assert not app.modal_open
        assert "read-only" in app.status.text

    _run(app, sources, scenario)
    job = cluster.job(mine)
    assert job is not None and job["state_reason"] != "JobHeldAdmin"


def table_key_actions_hidden(app: SlurmgateApp) -> bool:
    keys = {b.binding.key for b in app.active_bindings.values()}
    return not keys & {"h", "u", "R", "x"}
