"""job_submit.lua as rendered: valid Lua 5.1, with user-controlled values safely quoted, one
decision per submission (no resend after a timeout), and the job_modify guards.

Each test runs the rendered script under plain lua5.1 with a stub `slurm` table
(tests/unit/lua_harness.py) and, where the daemon matters, a Python Unix-socket server.
"""

from __future__ import annotations

import re
import subprocess
import time

import pytest

from slurm_plugin.daemon.lua_shim import lua_string, render_lua
from tests.unit.lua_harness import (
    ACCESS_DENIED,
    LUA,
    LUAC,
    NICE_OFFSET,
    NO_VAL,
    SLURM_UID,
    StubDaemon,
    accept_reply,
    finish_lua,
    lua_call_modify,
    render,
    run_lua,
    start_lua,
)

# lua5.1 is installed by contrib/devcluster/cluster.sh (make test); never skipped there.
needs_lua = pytest.mark.skipif(LUA is None, reason="lua5.1 not installed (make test installs it)")

ID_RE = re.compile(r"^\d+\.\d{6}-[0-9a-f]+-\d+$")

SUBMIT_ONE = """
local job = { comment = "project=x", user_name = "alice", time_limit = NO_VAL,
              script = "#!/bin/sh" }
local t0 = now()
OUT.rc = slurm_job_submit(job, {}, 1000)
OUT.elapsed = now() - t0
OUT.admin_comment = job.admin_comment
OUT.time_limit = job.time_limit
OUT.nice = job.nice
"""


@needs_lua
@pytest.mark.parametrize("text", ['plain', 'with "quotes"', "new\nline", "back\\slash",
                                  "]] os.exit(1) --[[", "ünïcödé", "%s%n"])
def test_lua_string_round_trips(text):
    out = subprocess.run([LUA, "-e", f"io.write({lua_string(text)})"], capture_output=True,
                         timeout=10)
    assert out.returncode == 0, out.stderr
    assert out.stdout.decode("utf-8") == text


@needs_lua
@pytest.mark.parametrize("fail_mode", ["open", "closed"])
def test_rendered_script_compiles(tmp_path, fail_mode):
    script = tmp_path / "job_submit.lua"
    script.write_text(render_lua('/run/sg "x"\n.sock', 200, fail_mode, 64030))
    out = subprocess.run([LUAC or "luac5.1", "-p", str(script)],
                         capture_output=True, text=True, timeout=10)
    assert out.returncode == 0, out.stderr


@needs_lua
def test_shim_marks_unchecked_when_the_daemon_is_unreachable(tmp_path):
    script = render(tmp_path, tmp_path / "absent.sock", 50, "open")
    res = run_lua(script, SUBMIT_ONE)["out"]
    assert res["rc"] == 0 and res["admin_comment"] == "slurmgate:unchecked"


def test_render_refuses_bad_settings():
    with pytest.raises(ValueError):
        render_lua("/s", 200, "sometimes")
    with pytest.raises(ValueError):
        render_lua("/s", 0, "open")
    with pytest.raises(ValueError):
        render_lua("/s", 200, "open", -1)


# -- one decision per submission (M4) -------------------------------------------------------

@needs_lua
@pytest.mark.parametrize("fail_mode,rc,comment", [("open", 0, "slurmgate:unchecked"),
                                                  ("closed", -1, None)])
def test_a_receive_timeout_is_not_resent(tmp_path, fail_mode, rc, comment):
    sock = tmp_path / "d.sock"
    script = render(tmp_path, sock, 150, fail_mode)
    with StubDaemon(sock, lambda c, n, req: {"sleep": 0.5, "reply": accept_reply(req)}) as d:
        res = run_lua(script, SUBMIT_ONE)
        d.wait_quiet(0.8)  # a resend would arrive (and be answered) meanwhile
        assert len(d.requests) == 1, d.requests
    out = res["out"]
    assert out["rc"] == rc and out.get("admin_comment") == comment
    # one timeout, not two: the whole exchange ends by the deadline
    assert 0.12 <= out["elapsed"] < 0.27, out["elapsed"]
    assert any("receive: timeout" in line for line in res["log"]), res["log"]


@needs_lua
def test_b_kept_connection_closed_before_reply_is_resent_once_with_same_id(tmp_path):
    """The daemon read the second request on the kept connection and went away (restart):
    the shim's receive sees "closed" and sends the same line again on a new connection."""
    sock = tmp_path / "d.sock"
    script = render(tmp_path, sock, 300, "closed")

    def behave(conn_no, n, req):
        if conn_no == 1 and n == 2:
            return {"close": True}
        return {"reply": accept_reply(req)}

    body = SUBMIT_ONE + "OUT.rc1 = OUT.rc\n" + SUBMIT_ONE
    with StubDaemon(sock, behave) as d:
        res = run_lua(script, body)
        d.wait_quiet(0.2)
        reqs = list(d.requests)
    assert res["out"]["rc1"] == 0 and res["out"]["rc"] == 0
    assert [c for c, _, _ in reqs] == [1, 1, 2]
    first, lost, resent = (r for _, _, r in reqs)
    assert lost["id"] == resent["id"] != first["id"]
    assert lost["deadline"] == resent["deadline"]
    assert lost == resent


@needs_lua
def test_b_send_to_a_closed_kept_connection_is_resent(tmp_path):
    """The daemon closed the kept connection after its reply: the next send fails ("closed",
    EPIPE) and the request goes out once on a new connection."""
    sock = tmp_path / "d.sock"
    script = render(tmp_path, sock, 300, "closed")
    body = SUBMIT_ONE + "OUT.rc1 = OUT.rc\nsleep(0.2)\n" + SUBMIT_ONE
    with StubDaemon(sock, close_after_reply=lambda c, n: c == 1) as d:
        res = run_lua(script, body)
        d.wait_quiet(0.2)
        reqs = list(d.requests)
    assert res["out"]["rc1"] == 0 and res["out"]["rc"] == 0
    assert [c for c, _, _ in reqs] == [1, 2]
    assert reqs[0][2]["id"] != reqs[1][2]["id"]


@needs_lua
def test_a_new_connection_closed_without_reply_is_not_resent(tmp_path):
    """On a connection made for this request, "closed" means the daemon died while it may
    have been deciding: follow the fail mode, don't ask again."""
    sock = tmp_path / "d.sock"
    script = render(tmp_path, sock, 300, "open")
    with StubDaemon(sock, lambda c, n, req: {"close": True}) as d:
        res = run_lua(script, SUBMIT_ONE)
        d.wait_quiet(0.3)
        assert len(d.requests) == 1
    assert res["out"]["rc"] == 0 and res["out"]["admin_comment"] == "slurmgate:unchecked"


@needs_lua
def test_c_ids_are_unique_within_and_across_processes(tmp_path):
    sock = tmp_path / "d.sock"
    script = render(tmp_path, sock, 500, "closed")
    body = SUBMIT_ONE + SUBMIT_ONE
    with StubDaemon(sock) as d:
        procs = [start_lua(script, body) for _ in range(2)]
        for p in procs:
            assert finish_lua(p)["out"]["rc"] == 0
        again = run_lua(script, body)["out"]
        assert again["rc"] == 0
        ids = [r["id"] for _, _, r in d.requests]
    assert len(ids) == 6 and len(set(ids)) == 6, ids
    assert all(isinstance(i, str) and ID_RE.match(i) for i in ids), ids
    prefixes = {i.rsplit("-", 1)[0] for i in ids}
    assert len(prefixes) == 3  # one per Lua process (slurmctld start)
    by_prefix = sorted(i for i in ids if i.startswith(ids[0].rsplit("-", 1)[0]))
    assert [i.rsplit("-", 1)[1] for i in by_prefix] == ["1", "2"]


@needs_lua
def test_d_deadline_is_now_plus_timeout(tmp_path):
    sock = tmp_path / "d.sock"
    script = render(tmp_path, sock, 250, "closed")
    with StubDaemon(sock) as d:
        before = time.time()
        assert run_lua(script, SUBMIT_ONE)["out"]["rc"] == 0
        (_, arrived, req), = d.requests
    assert isinstance(req["deadline"], int | float) and not isinstance(req["deadline"], bool)
    assert before + 0.25 <= req["deadline"] + 0.001
    assert req["deadline"] - 0.25 <= arrived + 0.001  # stamped before it was sent
    assert arrived - (req["deadline"] - 0.25) < 0.1


# -- what is sent, what is applied ------------------------------------------------------------

@needs_lua
def test_request_fields_and_sentinels(tmp_path):
    sock = tmp_path / "d.sock"
    script = render(tmp_path, sock, 500, "closed")
    body = """
local job = { account = "vision", partition = "gpu", comment = "project=x", user_name = "alice",
  features = "h100|a100", admin_comment = "JS1:abc", time_limit = 60, min_nodes = 1,
  max_nodes = NO_VAL, num_tasks = NO_VAL, min_cpus = 8, job_id = 42, nice = NO_VAL,
  cpus_per_task = 4, ntasks_per_node = NO_VAL16, sockets_per_node = NO_VAL16,
  cores_per_socket = 2, threads_per_core = 1, shared = 0, requeue = NO_VAL16,
  min_mem_per_node = 4096, pn_min_memory = 4096, tres_per_node = "gres:gpu:a100:2",
  script = string.rep("x", 100000) }
OUT.rc = slurm_job_submit(job, {}, 1001)
"""
    with StubDaemon(sock) as d:
        assert run_lua(script, body)["out"]["rc"] == 0
        (_, _, req), = d.requests
    assert req["v"] == 1 and req["op"] == "submit"
    assert set(req) == {"v", "op", "id", "deadline", "job"}
    assert req["job"] == {
        "uid": 1001, "batch": True, "account": "vision", "partition": "gpu",
        "comment": "project=x", "features": "h100|a100", "admin_comment": "JS1:abc",
        "time_limit": 60, "min_nodes": 1, "min_cpus": 8, "cpus_per_task": 4,
        "cores_per_socket": 2, "threads_per_core": 1, "shared": 0, "min_mem_per_node": 4096,
        "tres_per_node": "gres:gpu:a100:2"}


@needs_lua
def test_f_set_fields_are_applied(tmp_path):
    sock = tmp_path / "d.sock"
    script = render(tmp_path, sock, 500, "closed")

    def behave(c, n, req):
        return {"reply": accept_reply(req, time_limit=90, nice=250, partition="scavenger",
                                      admin_comment="slurmgate:v2;team=vision",
                                      exc_nodes="gpu07", env={"SLURMGATE_CKPT": "/ckpt/x"})}

    body = """
local env = {}
local job = { comment = "project=x", time_limit = NO_VAL, environment = env }
OUT.rc = slurm_job_submit(job, {}, 1000)
OUT.time_limit, OUT.nice, OUT.partition = job.time_limit, job.nice, job.partition
OUT.admin_comment, OUT.exc_nodes = job.admin_comment, job.exc_nodes
OUT.ckpt = env.SLURMGATE_CKPT
"""
    with StubDaemon(sock, behave):
        out = run_lua(script, body)["out"]
    assert out == {"rc": 0, "time_limit": 90, "nice": NICE_OFFSET + 250,
                   "partition": "scavenger", "admin_comment": "slurmgate:v2;team=vision",
                   "exc_nodes": "gpu07", "ckpt": "/ckpt/x"}


@needs_lua
@pytest.mark.parametrize("bad", [0, -5, 1.5, "60", 4294967295])
def test_f_invalid_time_limit_is_not_applied(tmp_path, bad):
    sock = tmp_path / "d.sock"
    script = render(tmp_path, sock, 500, "closed")
    with StubDaemon(sock, lambda c, n, req: {"reply": accept_reply(req, time_limit=bad)}):
        res = run_lua(script, SUBMIT_ONE)
    assert res["out"]["rc"] == 0 and res["out"]["time_limit"] == NO_VAL
    if not isinstance(bad, str):
        assert any("invalid time_limit" in line for line in res["log"])


# -- job_modify guards (M2) ---------------------------------------------------------------------

NEWLY_GUARDED = [
    ("min_cpus", "16"), ("cpus_per_task", "4"), ("ntasks_per_node", "8"),
    ("pn_min_cpus", "4"), ("min_mem_per_node", "65536"), ("min_mem_per_cpu", "8192"),
    ("pn_min_memory", "65536"), ("sockets_per_node", "2"), ("cores_per_socket", "16"),
    ("threads_per_core", "2"), ("features", '"h100"'), ("cluster_features", '"west"'),
    ("shared", "0"), ("exc_nodes", '""'), ("exc_nodes", '"gpu07"'), ("wckey", '"x"'),
    ("qos", '"high"'), ("cpus_per_tres", '"gres/gpu:8"'), ("mem_per_tres", '"gres/gpu:80G"'),
]
OLD_GUARDED = [
    ("partition", '"gpu"'), ("comment", '"project=y"'), ("account", '"nlp"'),
    ("tres_per_job", '"gres/gpu:8"'), ("tres_per_node", '"gres/gpu:8"'),
    ("tres_per_socket", '"gres/gpu:1"'), ("tres_per_task", '"gres/gpu:1"'),
    ("min_nodes", "4"), ("max_nodes", "4"), ("num_tasks", "4"), ("array_inx", '"0-9%2"'),
    ("min_nodes", "4294967295"),  # NumNodes=ALL is INFINITE: a change, not "unset"
]


def _modify(tmp_path, desc: str, uid: int, rec: str | None = None,
            fail_mode: str = "open") -> dict:
    script = render(tmp_path, tmp_path / "absent.sock", 200, fail_mode)
    rec = rec if rec is not None else "{ nice = NICE_OFFSET + 100 }"
    return run_lua(script, lua_call_modify(desc, rec, uid))


@needs_lua
@pytest.mark.parametrize("field,value", NEWLY_GUARDED + OLD_GUARDED)
def test_e_modify_refuses_guarded_fields_for_users(tmp_path, field, value):
    res = _modify(tmp_path, f"{{ {field} = {value} }}", 1000)
    assert res["out"]["rc"] == ACCESS_DENIED
    user = [line for line in res["log"] if line.startswith("user: ")]
    assert len(user) == 1
    shown = "memory" if field in ("min_mem_per_node", "min_mem_per_cpu", "pn_min_memory") \
        else f"({field})"
    assert shown in user[0] and "scancel" in user[0], user
    assert any(line.startswith("info: ") and "uid 1000" in line for line in res["log"])


@needs_lua
@pytest.mark.parametrize("uid", [0, SLURM_UID])
@pytest.mark.parametrize("field,value", NEWLY_GUARDED + OLD_GUARDED)
def test_e_modify_allows_guarded_fields_for_controllers(tmp_path, uid, field, value):
    res = _modify(tmp_path, f"{{ {field} = {value}, nice = NICE_OFFSET }}", uid)
    assert res["out"]["rc"] == 0 and res["log"] == []


@needs_lua
def test_e_modify_names_every_refused_field(tmp_path):
    res = _modify(tmp_path, '{ min_cpus = 4, features = "h100", account = "nlp" }', 1000)
    (user,) = [line for line in res["log"] if line.startswith("user: ")]
    for name in ("NumCPUs (min_cpus)", "Features/--constraint (features)", "Account (account)"):
        assert name in user
    assert "cost" in user and "team" in user


@needs_lua
def test_e_modify_unset_sentinels_and_free_fields_pass(tmp_path):
    desc = ("{ min_cpus = NO_VAL, max_nodes = NO_VAL, min_nodes = NO_VAL, num_tasks = NO_VAL, "
            "cpus_per_task = NO_VAL16, ntasks_per_node = NO_VAL16, pn_min_cpus = NO_VAL16, "
            "sockets_per_node = NO_VAL16, cores_per_socket = NO_VAL16, "
            "threads_per_core = NO_VAL16, shared = NO_VAL16, pn_min_memory = slurm.NO_VAL64, "
            "nice = NO_VAL, time_limit = 30, time_min = 10, name = \"renamed\", "
            "dependency = \"afterok:1\" }")
    res = _modify(tmp_path, desc, 1000)
    assert res["out"]["rc"] == 0 and res["log"] == []
    # a 16-bit field widened to 32 bits in some release: NO_VAL still reads as unset
    res = _modify(tmp_path, "{ cpus_per_task = NO_VAL, shared = NO_VAL }", 1000)
    assert res["out"]["rc"] == 0


@needs_lua
@pytest.mark.parametrize("current,asked,ok", [
    (100, 200, True), (100, 100, True), (100, 50, False), (100, 0, False),
    (0, 10, True), (-50, 0, True), (500, 499, False)])
def test_e_nice_may_go_up_not_down(tmp_path, current, asked, ok):
    res = _modify(tmp_path, f"{{ nice = NICE_OFFSET + {asked} }}", 1000,
                  rec=f"{{ nice = NICE_OFFSET + {current} }}")
    if ok:
        assert res["out"]["rc"] == 0 and res["log"] == []
    else:
        assert res["out"]["rc"] == ACCESS_DENIED
        (user,) = [line for line in res["log"] if line.startswith("user: ")]
        assert "Nice" in user and f"it is {current}, asked {asked}" in user


@needs_lua
def test_e_a_held_jobs_nice_cannot_change(tmp_path):
    # Slurm 22.05 recomputes the priority on a nice change, lifting an admin hold
    res = _modify(tmp_path, "{ nice = NICE_OFFSET + 200 }", 1000,
                  rec="{ nice = NICE_OFFSET + 100, priority = 0 }")
    assert res["out"]["rc"] == ACCESS_DENIED
    (user,) = [line for line in res["log"] if line.startswith("user: ")]
    assert "the job is held" in user
    res = _modify(tmp_path, "{ nice = NICE_OFFSET + 200 }", 1000,
                  rec="{ nice = NICE_OFFSET + 100, priority = 5000 }")
    assert res["out"]["rc"] == 0


@needs_lua
@pytest.mark.parametrize("rec", ["{}", "nil", "{ nice = NO_VAL16 }"])
def test_e_nice_change_refused_when_current_nice_unreadable(tmp_path, rec):
    res = _modify(tmp_path, "{ nice = NICE_OFFSET + 1000 }", 1000, rec=rec)
    assert res["out"]["rc"] == ACCESS_DENIED
    res = _modify(tmp_path, "{ time_limit = 10 }", 1000, rec=rec)
    assert res["out"]["rc"] == 0


@needs_lua
@pytest.mark.parametrize("fail_mode", ["open", "closed"])
def test_g_modify_error_fails_closed_for_users(tmp_path, fail_mode):
    boom = 'setmetatable({}, { __index = function(t, k) error("boom " .. k) end })'
    res = _modify(tmp_path, boom, 1000, fail_mode=fail_mode)
    assert res["out"]["rc"] == ACCESS_DENIED
    assert any(line.startswith("error: ") and "boom" in line for line in res["log"])
    assert any(line.startswith("user: ") and "refused" in line for line in res["log"])
    for uid in (0, SLURM_UID):
        assert _modify(tmp_path, boom, uid, fail_mode=fail_mode)["out"]["rc"] == 0
