"""The submission path's trust rules, decided in-process: strict fields, who may charge a
team, who sees its figures, fields users cannot forge, one decision per submission."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from db.store import open_store
from policies.config import Policy, parse_policy
from policies.decision import decide
from policies.gpu import GpuRequestError, parse_array
from policies.ledger import Ledger
from policies.request import MAX_PARTITIONS, JobRequest, wire_problems
from policies.tags import (
    format_admin_comment,
    is_unchecked,
    merge_admin_comment,
    parse_admin_comment,
)
from slurm_plugin.daemon.service import Daemon
from slurm_plugin.protocol import Peer

POLICY = """
[daemon]
cluster = "c1"
database = ":memory:"
admins = ["root"]

[tags]
required = ["project"]

[teams.vision]
accounts = ["vision"]
members = ["alice", "carol"]
leads = ["carol"]
budget = 100.0

[teams.nlp]
accounts = ["nlp"]
members = ["bob"]
budget = 1000.0

[users]
root = "vision"

[rates]
gpu_hour = { a100 = 2.0, h100 = 4.0 }

[partitions.gpu]
default_gpu_type = "a100"
max_time_minutes = 120
"""


def policy(extra: str = "") -> Policy:
    return parse_policy(POLICY + extra)


def job(**fields: object) -> JobRequest:
    base: dict[str, object] = {"user": "alice", "comment": "project=p", "partition": "gpu",
                               "tres_per_node": "gres:gpu:1", "time_limit": 60}
    base.update(fields)
    return JobRequest.model_validate(base)


def decided(req: JobRequest, p: Policy | None = None, ledger: Ledger | None = None):
    return decide(req, p or policy(), rid="r1", ledger=ledger or Ledger())


# -- strict fields --------------------------------------------------------------------------

@pytest.mark.parametrize(("raw", "named"), [
    ({"account": "vision\udcff"}, "--account contains bytes that are not valid UTF-8"),
    ({"comment": "project=\udcfe"}, "--comment contains bytes that are not valid UTF-8"),
    ({"name": "x" * 5000}, "the job name (-J) is 5000 characters long"),
    ({"tres_per_node": "gres:gpu:1\x07"}, "--gres contains control characters"),
    ({"time_limit": 1.5}, "time_limit is not a whole number"),
    ({"min_nodes": 2.0 ** 70}, "min_nodes is out of range"),
    ({"partition": ",".join(f"p{i}" for i in range(MAX_PARTITIONS + 1))},
     f"--partition lists more than {MAX_PARTITIONS} partitions"),
    ({"array_inx": "1," * 600}, "--array is 1200 characters long"),
])
def test_unreadable_fields_are_named(raw: dict, named: str) -> None:
    problems = wire_problems(raw)
    assert any(named in p for p in problems), problems


def test_sentinels_and_plain_values_pass() -> None:
    assert wire_problems({"account": "vision", "time_limit": 4294967294, "nice": 2 ** 31,
                          "comment": "project=p", "name": "train ü"}) == []


def test_arrays_are_counted_without_listing_them() -> None:
    t0 = time.perf_counter()
    assert parse_array(",".join(["0-4000000"] * 64)) == (4_000_001, None)
    assert parse_array("0-9,5-14%3") == (15, 3)
    assert parse_array("0-15:4,0-3") == (7, None)
    assert time.perf_counter() - t0 < 1.0  # the old expansion took seconds for this
    with pytest.raises(GpuRequestError, match="at most 64"):
        parse_array(",".join(["1"] * 65))


# -- who may charge a team, who sees its figures ---------------------------------------------

def test_account_of_another_team_is_refused_naming_the_users_teams() -> None:
    d = decided(job(account="nlp"))
    assert d.verdict == "reject"
    assert "--account=nlp bills team nlp" in d.message
    assert "your teams: vision (--account=vision)" in d.message


def test_members_charge_their_team_and_slurm_mode_trusts_associations() -> None:
    assert decided(job(user="bob", account="nlp", comment="project=q")).team == "nlp"
    trusting = policy().model_copy(update={"daemon": policy().daemon.model_copy(
        update={"account_membership": "slurm"})})
    d = decided(job(account="nlp"), trusting)
    assert (d.verdict, d.team) == ("accept", "nlp")
    assert "spent" not in d.message  # alice may charge it (Slurm says so), not see it


def test_budget_figures_only_for_the_teams_people() -> None:
    ledger = Ledger(spent={"vision": 99.0})
    member = decided(job(time_limit=60), ledger=ledger)
    assert "$99.00 spent" in member.message or "99.00 spent" in member.message
    trusting = policy().model_copy(update={"daemon": policy().daemon.model_copy(
        update={"account_membership": "slurm"})})
    outsider = decide(job(user="bob", account="vision"), trusting, rid="r1", ledger=ledger)
    assert outsider.verdict == "reject" and "hard limit" in outsider.message
    assert "99" not in outsider.message and "100.00" not in outsider.message


# -- fields users cannot forge ---------------------------------------------------------------

def test_reserved_keys_are_refused_as_tags() -> None:
    d = decided(job(comment="project=p,team=nlp,rid=rdeadbeefdeadbeef"))
    assert d.verdict == "reject"
    assert "tag 'team' is written by slurmgate itself" in d.message
    assert "tag 'rid' is written by slurmgate itself" in d.message


def test_a_reserved_key_is_named_whatever_its_value() -> None:
    d = decided(job(comment="project=p,tags=team=nlp"))
    assert d.verdict == "reject" and "tag 'tags' is written by slurmgate itself" in d.message


def test_admin_comment_reads_the_first_segment_and_keeps_other_tools_text() -> None:
    ours = format_admin_comment("vision", "rabc", {"project": "p"})
    merged = merge_admin_comment("JS1:H4sIAAAA slurmgate:unchecked", ours)
    assert merged == ours + " JS1:H4sIAAAA"
    forged = merged + " slurmgate:v2;team=nlp;rid=rzzz"
    assert parse_admin_comment(forged) == {"team": "vision", "rid": "rabc", "project": "p"}
    assert parse_admin_comment("slurmgate:v2;team=a;rid=b;team=c") == {"team": "a", "rid": "b"}
    assert parse_admin_comment("slurmgate:v2;team=a;rid=b;tags=team=z,project=p") == {
        "team": "a", "rid": "b", "project": "p"}
    assert is_unchecked("JS1:x slurmgate:unchecked") and not is_unchecked(ours)


def test_accepted_job_gets_its_segment_merged_with_what_is_there() -> None:
    d = decided(job(admin_comment="JS1:abc"))
    assert d.set_fields["admin_comment"].startswith("slurmgate:v2;team=vision;rid=r1;")
    assert d.set_fields["admin_comment"].endswith(" JS1:abc")


def test_job_without_limit_gets_the_one_it_was_priced_at() -> None:
    d = decided(job(time_limit=None))
    assert d.verdict == "accept" and d.set_fields["time_limit"] == 120
    assert "time_limit" not in decided(job(time_limit=30)).set_fields


# -- one decision per submission (the daemon) ------------------------------------------------

ROOT = Peer(pid=1, uid=0, gid=0)


@pytest.fixture
def daemon(tmp_path: Path) -> Daemon:
    p = policy()
    return Daemon(str(tmp_path / "policy.toml"), p, open_store(":memory:"), None)


def submit(d: Daemon, **req: object) -> dict:
    body = {"uid": 0, "comment": "project=p", "partition": "gpu",
            "tres_per_node": "gres:gpu:1", "time_limit": 60}
    return d.op_submit({"op": "submit", "job": body, **req}, ROOT)


def test_a_resend_gets_the_first_reply_and_no_second_reservation(daemon: Daemon) -> None:
    deadline = time.time() + 5
    first = submit(daemon, id="t-1-1", deadline=deadline)
    again = submit(daemon, id="t-1-1", deadline=deadline)
    assert first["verdict"] == "accept" and again == first
    assert len(daemon.ledger.reservations) == 1
    assert daemon.store is not None and len(daemon.store.live_reservations()) == 1
    other = submit(daemon, id="t-1-2", deadline=deadline)
    assert other["set"]["admin_comment"] != first["set"]["admin_comment"]
    assert len(daemon.store.live_reservations()) == 2


def test_a_request_past_its_deadline_is_dropped_unreserved(daemon: Daemon) -> None:
    late = submit(daemon, id="t-2-1", deadline=time.time() - 1)
    assert late == {"ok": False, "late": True,
                    "error": "request arrived after its deadline; not decided"}
    assert daemon.store is not None and daemon.store.live_reservations() == []


def test_the_user_is_the_submit_uid_not_the_name_sent(daemon: Daemon) -> None:
    resp = daemon.op_submit({"op": "submit", "job": {"uid": 0, "user": "bob",
                                                     "comment": "project=p"}}, ROOT)
    assert resp["verdict"] == "accept" and "team=vision" in resp["set"]["admin_comment"]
    no_uid = daemon.op_submit({"op": "submit", "job": {"user": "alice"}}, ROOT)
    assert no_uid["verdict"] == "reject" and "no valid submit uid" in no_uid["msg"]


def test_bad_bytes_are_a_reject_not_an_error(daemon: Daemon) -> None:
    resp = submit(daemon, id="t-3-1", job={"uid": 0, "account": "vision\udcff"})
    assert resp["ok"] is True and resp["verdict"] == "reject"
    assert "--account contains bytes that are not valid UTF-8" in resp["msg"]


def test_a_failed_write_keeps_the_verdict_and_the_hold_on_the_budget(daemon: Daemon) -> None:
    assert daemon.store is not None

    def broken(row: dict) -> None:
        raise OSError("disk full")

    daemon.store.add_reservation = broken  # type: ignore[method-assign]
    resp = submit(daemon, id="t-4-1")
    assert resp["verdict"] == "accept"
    assert sum(daemon.ledger.reserved.values()) > 0
