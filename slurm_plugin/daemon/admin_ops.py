"""Admin requests on the daemon socket: approvals, job and node actions, reconcile on demand.

Every one checks that the peer (SO_PEERCRED) is a slurmgate admin and is audited as an event.
"""

from __future__ import annotations

import time
from typing import Any

from slurm_plugin.daemon.peers import Forbidden, user_name
from slurm_plugin.daemon.state import DaemonState
from slurm_plugin.protocol import Peer


class AdminOps(DaemonState):
    def op_approve(self, req: dict[str, Any], peer: Peer) -> dict[str, Any]:
        if not self.is_admin(peer):
            raise Forbidden(f"only slurmgate admins may approve; you are {user_name(peer.uid)} "
                            "(admins are listed in [daemon] admins)")
        team = req.get("team")
        if team not in self.policy.teams:
            return {"ok": False, "error": f"unknown team {team!r}"}
        amount, hours = req.get("amount"), req.get("gpu_hours")
        if (amount is None) == (hours is None):
            return {"ok": False, "error": "give exactly one of --amount or --gpu-hours"}
        value = amount if amount is not None else hours
        if not isinstance(value, int | float) or not value > 0:
            return {"ok": False, "error": "the approved amount must be a positive number"}
        expires = req.get("expires_at")
        if not isinstance(expires, int | float) or expires <= time.time():
            return {"ok": False, "error": "expires must be in the future"}
        reason = str(req.get("reason") or "")[:500]
        if not reason:
            return {"ok": False, "error": "an approval needs a --reason"}
        with self.lock:
            aid = self.need_store().add_approval(team=team, expires_at=float(expires),
                                                 amount=amount, gpu_hours=hours, reason=reason,
                                                 created_by=user_name(peer.uid))
        self.log.write("approval", id=aid, team=team, amount=amount, gpu_hours=hours,
                       by=user_name(peer.uid))
        return {"ok": True, "id": aid}

    def op_approvals(self, req: dict[str, Any], peer: Peer) -> dict[str, Any]:
        visible = set(self.visible_teams(peer))
        reader = self.reader()
        if reader is not None:  # beside the decisions, not under their lock
            rows = reader.approvals(active_only=not req.get("all"))
        else:
            with self.lock:
                rows = self.need_store().approvals(active_only=not req.get("all"))
        return {"ok": True, "approvals": [r for r in rows if r["team"] in visible]}

    JOB_ACTIONS = ("hold", "release", "requeue", "cancel")
    NODE_ACTIONS = ("drain", "resume")

    def op_action(self, req: dict[str, Any], peer: Peer) -> dict[str, Any]:
        """An admin's action on a job or node, done through the Slurm client and audited."""
        who = user_name(peer.uid)
        if not self.is_admin(peer):
            raise Forbidden(f"only slurmgate admins may act on jobs and nodes; you are {who}")
        slurm = self.slurm
        if slurm is None:
            return {"ok": False, "error": "the daemon has no Slurm client configured"}
        action = req.get("action")
        reason = str(req.get("reason") or f"by {who} via slurmgate")[:200]
        if action in self.JOB_ACTIONS:
            job_id = req.get("job_id")
            if not isinstance(job_id, int) or isinstance(job_id, bool) or job_id <= 0:
                return {"ok": False, "error": "job_id must be a positive integer"}
            target: dict[str, Any] = {"job_id": job_id}
            do = (lambda: slurm.hold(job_id, reason)) if action == "hold" else (
                lambda: getattr(slurm, action)(job_id))
        elif action in self.NODE_ACTIONS:
            node = req.get("node")
            if not isinstance(node, str) or not node.replace("-", "").replace("_", "").isalnum():
                return {"ok": False, "error": "node must be a node name"}
            target = {"node": node}
            do = (lambda: slurm.drain(node, f"slurmgate: {reason}")) if action == "drain" \
                else (lambda: slurm.resume(node))
        else:
            return {"ok": False, "error": f"unknown action {action!r}; one of "
                    f"{', '.join(self.JOB_ACTIONS + self.NODE_ACTIONS)}"}
        try:
            do()
        except Exception as exc:  # Slurm said no: tell the admin why, in Slurm's words
            self.log.write("admin_action_failed", action=action, by=who, error=str(exc),
                           **target)
            return {"ok": False, "error": f"{action} failed: {exc}"}
        with self.lock:
            self.need_store().add_event(
                "admin_action", cluster=self.policy.daemon.cluster, actor=who,
                message=f"{action} {target}: {reason}", detail=target | {"action": action},
                **target)
        self.log.write("admin_action", action=action, by=who, **target)
        return {"ok": True}

    def op_reconcile(self, req: dict[str, Any], peer: Peer) -> dict[str, Any]:
        if not self.is_admin(peer):
            raise Forbidden(f"only slurmgate admins may reconcile; you are {user_name(peer.uid)}")
        if not self.leadership.check():
            return {"ok": False, "error": "this daemon is the standby: another controller's "
                                          "daemon leads the once-only work; run reconcile there"}
        self.ingest_wakeup.set()
        return {"ok": True, "result": self.reconcile_once()}
