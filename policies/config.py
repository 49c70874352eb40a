"""The policy file: one TOML document, validated by pydantic.

Every field has a docstring because admins read the error messages this module produces:
an invalid file names the file, the field and what is allowed (see ``load_policy``).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from policies import defaults
from policies.alerts import Alerts

DEFAULT_POLICY_PATH = defaults.POLICY_PATH


class PolicyError(Exception):
    """The policy file is missing, not TOML, or does not validate. The message says where."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LedgerConfigError(ValueError):
    """The ledger's location cannot be read from the policy; the message names the field."""


class DaemonSettings(_Model):
    socket: str = defaults.SOCKET
    """Unix socket the daemon listens on (job_submit.lua, hooks and the CLI connect here)."""
    database: str = defaults.DATABASE
    """The ledger: a SQLite file (one controller; the daemon is its only writer) or a
    ``postgresql://`` URL (a daemon on every controller host, one ledger; db/backend.py)."""
    decision_synchronous_commit: bool = False
    """PostgreSQL ledger: wait for the server's disk at every decision's commit (True), or
    not (False: the decision path skips the fsync wait; a database-server crash may lose
    the last ~0.6 s of reservations, never a run, a settlement or a credit, which always
    commit synchronously; a job whose reservation was lost is still charged at its end)."""
    database_url_file: str = ""
    """A file holding the ``postgresql://`` URL (with its password), readable only by the
    service user; when set it replaces ``database``."""
    spool_dir: str = defaults.SPOOL_DIR
    """Where hooks drop records when the daemon is unreachable (may be shared storage)."""
    log_file: str = ""
    """Structured decision log; empty means standard error."""
    slurm_user: str = "slurm"
    """SlurmUser of slurmctld: with root, the only peer allowed to ask for decisions and send
    job events."""
    admins: list[str] = ["root"]
    """Users allowed admin actions (approvals, holds, drains) and to see every team."""
    cluster: str = defaults.CLUSTER
    """Cluster name recorded with every run (a run is keyed cluster, job id, restart count)."""
    reconcile_seconds: float = 30.0
    """How often the daemon compares its reservations with Slurm's queue."""
    slurm_backend: Literal["cli", "pyslurm"] = "cli"
    """How slurmgate talks to Slurm: the CLI's JSON output, or pyslurm on Slurm 25.11."""
    metrics_listen: str = ""
    """host:port for Prometheus metrics; empty disables them (bind to 127.0.0.1 by default)."""
    metrics_token_file: str = ""
    """File holding the bearer token scrapers must send (Authorization: Bearer ...); required
    when metrics_listen is set, so local users cannot read every team's spend."""
    spool_squash_uid: int | None = None
    """On an NFS spool exported with root_squash, the uid root on the nodes becomes (usually
    65534): node records owned by it are accepted as written by a node's root."""
    quarantine_days: float = 30.0
    """How long quarantined spool records (and their .reason files) are kept."""
    max_user_connections: int = 256
    """Open connections from non-controller peers (researchers, admins' CLI) at once; root
    and the SlurmUser are never counted against it and always get a slot."""
    max_connections_per_user: int = 16
    """Open connections from one uid at once (root and the SlurmUser: no cap)."""
    user_requests_per_second: float = 20.0
    """Sustained requests per second from one uid (bursts of twice that); over it, a request
    is answered with a refusal that says when to retry. Root and the SlurmUser: no limit."""
    user_idle_timeout_s: float = 30.0
    """A non-controller connection with no complete request for this long is closed."""
    user_read_timeout_s: float = 5.0
    """A non-controller request line must arrive whole within this many seconds."""
    account_membership: Literal["daemon", "slurm"] = "daemon"
    """Who makes sure a user may charge an --account: "daemon" (the account maps to a team
    only when the user is a member or lead of it) or "slurm" (slurmdbd with
    AccountingStorageEnforce=associations already refuses foreign accounts)."""
    unchecked_running: Literal["finish", "requeue"] = "finish"
    """A job accepted unchecked (fail-open) that is already running when the daemon is back
    and fails the policy: left to finish and charged ("finish"), or requeued and held."""


    def ledger(self) -> str:
        """Where the ledger is: ``database_url_file``'s URL when set, else ``database``.
        Raises LedgerConfigError (naming the file) when that file cannot be read."""
        if not self.database_url_file:
            return self.database
        try:
            with open(self.database_url_file, encoding="utf-8") as f:
                url = f.read().strip()
        except OSError as exc:
            raise LedgerConfigError(f"daemon.database_url_file: cannot read "
                                    f"{self.database_url_file}: {exc.strerror}") from exc
        if not url.startswith(("postgresql://", "postgres://")):
            raise LedgerConfigError(f"daemon.database_url_file: {self.database_url_file} "
                                    "must hold one postgresql:// URL")
        return url

class AllowedValues(_Model):
    values: list[str] = []
    """Exact values allowed for this key (case-sensitive)."""
    regex: str = ""
    """A regular expression the whole value must match."""
    description: str = ""
    """Shown to users when a value is wrong, e.g. 'cost centre code like CC1234'."""
    example: str = ""
    """A valid value used in the corrected example line of a rejection."""

    @field_validator("regex")
    @classmethod
    def _compiles(cls, v: str) -> str:
        if v:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from exc
        return v


class TagPolicy(_Model):
    required: list[str] = ["project"]
    """Keys every job must carry in --comment (key=value,key=value)."""
    allowed: dict[str, AllowedValues] = {}
    """Allowed values per key. 'project' is checked against the team's projects as well."""
    unknown: Literal["warn", "reject", "ignore"] = "warn"
    """What to do with keys that are neither required nor listed in 'allowed'."""
    max_length: int = 1024
    """Longest --comment accepted, in bytes."""


class Team(_Model):
    accounts: list[str] = []
    """Slurm accounts (--account) that belong to this team."""
    members: list[str] = []
    """Users whose jobs fall to this team when their account maps to no team."""
    leads: list[str] = []
    """Users who may see this team's data (members may too)."""
    projects: list[str] = []
    """Projects this team may charge; empty means any project value passes."""
    cost_center: str = ""
    """Default cost centre for chargeback when a job does not name one."""
    budget: float = 0.0
    """Budget per period in the rate card's currency; 0 means no budget is enforced."""
    soft_limit: float = 0.8
    """Fraction of the budget above which jobs are moved to the low-priority partition."""
    hard_limit: float = 1.0
    """Fraction of the budget above which jobs are rejected (approvals may lift it)."""
    share: float = 1.0
    """Fairshare shares: the team's slice of the cluster relative to the other teams."""

    @model_validator(mode="after")
    def _limits_ordered(self) -> Team:
        if self.soft_limit > self.hard_limit:
            raise ValueError("soft_limit must not be above hard_limit")
        if self.share <= 0:
            raise ValueError("share must be positive")
        return self


class Rates(_Model):
    currency: str = "$"
    """Symbol used in messages and reports."""
    gpu_hour: dict[str, float] = {}
    """Price of one GPU-hour by GPU type (e.g. a100 = 2.5)."""
    cpu_core_hour: float = 0.0
    """Price of one CPU core-hour."""
    mem_gb_hour: float = 0.0
    """Price of one GB-hour of memory."""
    kwh: float = 0.0
    """Price of one kWh of measured GPU energy (settlement only; 0 disables)."""


class Partition(_Model):
    default_gpu_type: str = ""
    """GPU type used to price untyped requests (--gres=gpu:2) in this partition."""
    max_time_minutes: int = 0
    """Time limit used to price a job without -t; 0 means such GPU jobs are rejected."""
    price_factor: float = 1.0
    """Multiplier on the rate card (e.g. 0.3 for a preemptible partition)."""
    shards_per_gpu: int = 8
    """gres/shard requests are priced as shards / shards_per_gpu GPUs."""
    gpu_types: list[str] = []
    """GPU types this partition's nodes have. An untyped request (--gres=gpu:2) may get any of
    them, so it is reserved at the dearest; empty: default_gpu_type, else the dearest type on
    the rate card."""


class Budgets(_Model):
    period: Literal["month", "quarter", "year"] = "month"
    """Budget period; spend and reservations reset at its start."""
    mode: Literal["chargeback", "showback"] = "chargeback"
    """showback: nothing is enforced as money, everything is still reported."""
    soft_partition: str = "scavenger"
    """Where jobs over the soft limit are moved (low priority, preemptible)."""
    array_concurrency: Literal["all", "throttle"] = "throttle"
    """Arrays reserve every task ('all') or only as many as the % throttle lets run."""
    scope: Literal["cluster", "global"] = "cluster"
    """With several clusters on one ledger: a team's budget is spent per cluster (each
    cluster's runs and reservations count against its own budget) or once across all."""


class Fairshare(_Model):
    half_life_hours: float = 168.0
    """Half-life of the team usage decay (Slurm's PriorityDecayHalfLife)."""
    nice_max: int = 10000
    """nice given to a team at factor 0; factor 1 gets 0."""


class Checkpoint(_Model):
    inject: Literal["all", "tagged", "off"] = "tagged"
    """Inject the checkpoint directory into every batch job, only jobs tagged ckpt=yes, or none."""
    checkpoint_root: str = "/shared/checkpoints"
    """Root of per-job checkpoint directories: ROOT/TEAM/USER/JOBNAME."""
    env_var: str = "SLURMGATE_CKPT_DIR"
    """Environment variable that names the checkpoint directory inside the job."""
    warn_signal: str = "USR1"
    """Signal sent to the batch shell before the time limit or preemption."""
    warn_seconds: int = 120
    """How long before the end the signal is sent."""


class Requeue(_Model):
    max_restarts: int = 3
    """Requeues allowed per job after node failures; then the job is held."""
    exclude_failed_nodes: bool = True
    """Exclude the node that failed from the requeued job."""
    credit_node_failure: bool = True
    """Do not charge the team for a run that died with its node."""
    credit_preemption: bool = False
    """Do not charge the team for runs preempted from the scavenger partition."""
    drain_after_failures: int = 3
    """Drain a node after this many failures within the window; 0 disables draining."""
    drain_window_hours: float = 24.0
    """Window for counting node failures."""


class FakeNode(_Model):
    gpu_type: str = "a100"
    """GPU type name of every fake device on this node."""
    count: int = 4
    """Number of fake devices (minor numbers 0..count-1)."""
    power_watts: float = 300.0
    """Mean power draw of a busy fake GPU."""
    utilization: list[int] = [90, 95, 60, 85]
    """Utilisation profile in percent, cycled over samples."""
    memory_gb: float = 80.0
    """Memory per device."""


class Node(_Model):
    state_dir: str = defaults.NODE_STATE_DIR
    """Node-local, root-only directory (mode 0700) for Prolog baselines and the fallback spool
    that keeps records a hook could not write to the shared spool."""


class Nvml(_Model):
    backend: Literal["real", "fake"] = defaults.NVML_BACKEND
    """'real' uses nvidia-ml-py; 'fake' is a deterministic stand-in for machines without GPUs."""
    fake_nodes: dict[str, FakeNode] = {}
    """Fake devices per node name (SLURMD_NODENAME); unnamed nodes get the defaults."""
    gpu_numbering: Literal["minor", "pci"] = defaults.GPU_NUMBERING
    """How SLURM_JOB_GPUS indices map to NVML devices: by /dev/nvidiaN minor number (gres.conf
    File=/dev/nvidia[0-N]) or by PCI bus order (AutoDetect=nvml)."""
    sample_seconds: float = 30.0
    """Node agent sampling interval."""
    raw_retention_days: int = 14
    """How long raw utilisation samples are kept before only hourly rollups remain."""


class Idle(_Model):
    """The idle-GPU policy: a running job whose allocated GPUs stay below a utilisation
    threshold is warned, then cancelled or requeued (rules: policies.idle)."""

    enabled: bool = False
    """Judge running GPU jobs by the node agent's samples (the agent must run on the nodes)."""
    threshold_percent: float = 5.0
    """A GPU is idle while its utilisation stays below this many percent."""
    min_idle_fraction: float = 1.0
    """A job is idle only while at least this fraction of its GPUs are idle (1.0: all of
    them; 0.5: half of an 8-GPU job; 7 of 8 busy is never idle unless this is 1/8 or less)."""
    warn_after_minutes: list[float] = [60.0, 105.0]
    """Warn the job's user (an idle_warning event) when it has been idle this long; each
    threshold once per run. Each must be below act_after_minutes."""
    act_after_minutes: float = 120.0
    """Apply ``action`` when the job has been idle this long (an idle_action event)."""
    action: Literal["none", "cancel", "requeue"] = "cancel"
    """What happens at act_after_minutes: nothing beyond the warnings, scancel, or a requeue
    (the job waits in the queue again and its next run starts with a fresh count)."""
    scan_seconds: float = 900.0
    """How often the daemon judges the running jobs (15 min in production). Each round works
    on the queue a reconcile pass read, so it runs at most every daemon.reconcile_seconds."""
    dry_run: bool = False
    """Report only: the events say what would have happened, and nothing is cancelled or
    requeued."""
    exempt_users: list[str] = []
    """Users whose jobs are never judged."""
    exempt_teams: list[str] = []
    """Teams whose jobs are never judged (names from [teams])."""
    exempt_partitions: list[str] = []
    """Partitions whose jobs are never judged (e.g. an interactive or debug partition)."""
    exempt_interactive: bool = True
    """Jobs without a batch script (salloc, srun outside sbatch: Slurm's BatchFlag=0) are
    never judged: a person sits behind them."""

    @model_validator(mode="after")
    def _thresholds_make_sense(self) -> Idle:
        if not 0 < self.threshold_percent <= 100:
            raise ValueError("threshold_percent must be above 0 and at most 100")
        if not 0 < self.min_idle_fraction <= 1:
            raise ValueError("min_idle_fraction must be above 0 and at most 1")
        if self.act_after_minutes <= 0:
            raise ValueError("act_after_minutes must be positive")
        if self.scan_seconds <= 0:
            raise ValueError("scan_seconds must be positive")
        warns = self.warn_after_minutes
        rising = all(a < b for a, b in zip(warns, warns[1:], strict=False))
        if any(w <= 0 for w in warns) or not rising:
            raise ValueError("warn_after_minutes must be positive and increasing, e.g. "
                             "[60, 105]")
        if warns and warns[-1] >= self.act_after_minutes:
            raise ValueError(f"warn_after_minutes ({warns[-1]:g}) must be below "
                             f"act_after_minutes ({self.act_after_minutes:g}): the warning "
                             "comes before the action")
        return self


class Export(_Model):
    out_dir: str = defaults.EXPORT_DIR
    """Where nightly exports are written."""


class Reports(_Model):
    """The per-job report (`slurmgate job`) and the efficiency figures of `slurmgate report`
    and the exports. Thresholds decide when the job report gives advice."""

    team_members_see_team_jobs: bool = False
    """Members may read the job reports of every job of their team (leads and admins always
    may; everyone sees their own jobs)."""
    experiment_tag: str = "experiment"
    """Tag key whose distinct values count as experiments ("experiments per 1k" in reports);
    empty disables the figure."""
    gpu_used_percent: float = 10.0
    """A GPU whose mean utilisation over a run is below this (percent) counts as not used."""
    low_gpu_util_percent: float = 50.0
    """Advice on low GPU utilisation below this mean (percent) over the used GPUs."""
    short_run_fraction: float = 0.25
    """Advice on a shorter -t when a job used less than this fraction of its time limit..."""
    short_run_min_limit_minutes: int = 60
    """...and its limit was at least this long (short limits are not worth advice)."""

    @field_validator("gpu_used_percent", "low_gpu_util_percent")
    @classmethod
    def _percent(cls, v: float) -> float:
        if not 0.0 <= v <= 100.0:
            raise ValueError("must be a percentage between 0 and 100")
        return v

    @field_validator("short_run_fraction")
    @classmethod
    def _fraction(cls, v: float) -> float:
        if not 0.0 <= v <= 1.0:
            raise ValueError("must be a fraction between 0 and 1")
        return v

    @field_validator("experiment_tag")
    @classmethod
    def _tag_key(cls, v: str) -> str:
        # the syntax of policies.tags.KEY_RE (tags imports this module; a test keeps the two
        # equal)
        if v and not re.fullmatch(r"[a-z][a-z0-9_]{0,31}", v):
            raise ValueError("must be a tag key: a lower-case letter, then up to 31 lower-case "
                             "letters, digits or '_'")
        return v


class Policy(_Model):
    daemon: DaemonSettings = DaemonSettings()
    tags: TagPolicy = TagPolicy()
    teams: dict[str, Team] = {}
    users: dict[str, str] = {}
    """user -> team, used when the job's account maps to no team."""
    rates: Rates = Rates()
    partitions: dict[str, Partition] = {}
    budgets: Budgets = Budgets()
    fairshare: Fairshare = Fairshare()
    checkpoint: Checkpoint = Checkpoint()
    requeue: Requeue = Requeue()
    node: Node = Node()
    nvml: Nvml = Nvml()
    export: Export = Export()
    alerts: Alerts = Alerts()
    """Mail and webhook alerts (policies/alerts.py); off by default."""
    reports: Reports = Reports()
    idle: Idle = Idle()

    @model_validator(mode="after")
    def _references_exist(self) -> Policy:
        for user, team in self.users.items():
            if team not in self.teams:
                raise ValueError(
                    f"users.{user} names team '{team}', which is not defined; "
                    f"defined teams: {', '.join(sorted(self.teams)) or '(none)'}"
                )
        seen: dict[str, str] = {}
        for name, team_cfg in self.teams.items():
            for account in team_cfg.accounts:
                if account in seen:
                    raise ValueError(
                        f"account '{account}' belongs to both teams '{seen[account]}' and '{name}'"
                    )
                seen[account] = name
        return self

    @model_validator(mode="after")
    def _idle_exemptions_exist(self) -> Policy:
        unknown = [t for t in self.idle.exempt_teams if t not in self.teams]
        if unknown:
            raise ValueError(
                f"idle.exempt_teams names team(s) {', '.join(unknown)}, not defined; "
                f"defined teams: {', '.join(sorted(self.teams)) or '(none)'}")
        return self

    # -- lookups used on the decision path -------------------------------------------------

    def team_for(self, account: str | None, user: str | None) -> str | None:
        """Team of a job: its Slurm account first, then the user map, then team membership."""
        if account:
            for name, team in self.teams.items():
                if account in team.accounts:
                    return name
        if user:
            if user in self.users:
                return self.users[user]
            for name, team in self.teams.items():
                if user in team.members:
                    return name
        return None

    def member_teams(self, user: str) -> list[str]:
        """Teams a user may charge: member, lead, or mapped to in [users] (admins included
        only where they are members)."""
        mine = {n for n, t in self.teams.items() if user in t.members or user in t.leads}
        if user in self.users:
            mine.add(self.users[user])
        return sorted(mine)

    def teams_of_user(self, user: str) -> list[str]:
        """Teams whose data this user may see: an admin's are all of them."""
        if user in self.daemon.admins:
            return sorted(self.teams)
        return self.member_teams(user)


def _format_error(path: str, exc: ValidationError) -> str:
    lines = [f"{path}: invalid policy ({exc.error_count()} problem(s)):"]
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown setting (check the spelling; see contrib/examples/policy.toml)"
        elif err["type"] == "literal_error":
            msg = f"must be one of {err.get('ctx', {}).get('expected', '')}"
        lines.append(f"  - {where}: {msg}")
    return "\n".join(lines)


def parse_policy(text: str, path: str = "<policy>") -> Policy:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{path}: not valid TOML: {exc}") from exc
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        raise PolicyError(_format_error(path, exc)) from exc


def load_policy(path: str | Path) -> Policy:
    """Read and validate a policy file; raise PolicyError with a readable message."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(f"{p}: cannot read policy file: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise PolicyError(f"{p}: policy file is not UTF-8: {exc}") from exc
    return parse_policy(text, str(p))

