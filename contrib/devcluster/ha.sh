# shellcheck shell=bash
# The HA mode of the dev cluster: `DEVCLUSTER_HA=1 cluster.sh ...` sources this file, which
# redefines cluster.sh's commands (start, stop, status, logs, daemon) and adds `ha`:
#
#   cluster.sh ha status          which controller is in control; `scontrol ping` (both)
#   cluster.sh ha kill-primary    the primary's host dies: SIGKILL to everything on ctl1
#   cluster.sh ha start-primary   ctl1 comes back (host, daemon, slurmctld) and takes control
#   cluster.sh ha kill HOST | start HOST           the same for ctl1 or ctl2
#
# On this one host it gives what a site with two controller hosts has:
#   * a PostgreSQL server (postgres.sh, $DIR/pg, port $DEVCLUSTER_PG_PORT, 6850): the one
#     ledger; its URL (with the password) in $DIR/etc/ledger.url, 0600 and the daemon's user's,
#     named by the policy's [daemon] database_url_file. DEVCLUSTER_HA_LEDGER=sqlite gives each
#     daemon a SQLite ledger of its own instead (no PostgreSQL; for checks of the Slurm side).
#   * two controller "hosts", ctl1 (127.0.0.1, primary) and ctl2 (127.0.0.2, backup): each
#     is a UTS + mount namespace held by a `sleep` (pid in $DIR/run/host-<name>.pid) with
#       - its own host name: slurmctld takes its role from the SlurmctldHost entry that its
#         host name matches;
#       - its own /etc/hosts (the host's, plus a marked block naming ctl1 and ctl2): with
#         CommunicationParameters=NoCtldInAddrAny each slurmctld binds only the address its
#         host name resolves to, so both listen on the one SlurmctldPort. Nothing on the host
#         itself changes (the clients and slurmds use the addresses in slurm.conf);
#       - its own local directories: $DIR/hosts/<name> bind-mounted over $DIR/host, which is
#         where slurm.conf and the policy put what is per host at a site (/run/slurmgate with
#         the daemon's socket, /var/log, /var/lib/slurmgate, slurmctld's pid file and log). So
#         the one job_submit.lua, which names the one socket path $DIR/host/run/slurmgate.sock,
#         reaches its own host's daemon on each controller. From the host (the "login node")
#         they are $DIR/hosts/ctl1/... and $DIR/hosts/ctl2/...; $DIR/host there is empty.
#     Shared by both, as a site's shared storage: $DIR/etc (slurm.conf, policy, lua),
#     StateSaveLocation ($DIR/var/slurmctld), the spool ($DIR/spool) and hooks.log.
#   * on each controller host its slurmctld (as SlurmUser slurm) and its slurmgate daemon (as
#     the service user slurm); the two slurmd (node1, node2) and munged run on the host as in
#     the default mode. The clients and slurmds try the SlurmctldHost entries in order.
#
# SlurmctldTimeout is DEVCLUSTER_HA_CTLD_TIMEOUT (4): the backup pings the primary every
# timeout/3 s and takes over when neither a ping nor the heartbeat file in StateSaveLocation
# (written every timeout/4 s) has been seen for more than the timeout; 22.05 accepts any value
# but the heartbeat interval is timeout/4 whole seconds, 0 (a busy loop of fsyncs) below 4.
# Measured on 22.05.8 with 4: the backup takes over 5.3-5.8 s after the primary's SIGKILL; an
# sbatch that reached the backup while it stood by is accepted up to 2 s later (it retries
# every timeout/2 s). A job accepted by the primary in its last seconds (state saves are
# batched, up to 5 s) is unknown to the backup: Slurm lost it, the ledger may not have.

# `make` exports DEVCLUSTER_DIR=<repo>/.devcluster: never run the HA cluster in the default
# cluster's state folder.
[[ "$DIR" != "$REPO/.devcluster" ]] \
    || die "the HA cluster needs its own state folder, not the default cluster's $DIR (unset DEVCLUSTER_DIR: <repo>/.devcluster-ha)"

HA_HOSTS=(ctl1 ctl2)
declare -A HA_ADDR=([ctl1]=127.0.0.1 [ctl2]=127.0.0.2)
HA_PRIMARY=ctl1
PG_PORT="${DEVCLUSTER_PG_PORT:-6850}"
PG_DIR="$DIR/pg"
HA_LEDGER="${DEVCLUSTER_HA_LEDGER:-postgresql}"
[[ "$HA_LEDGER" == postgresql || "$HA_LEDGER" == sqlite ]] \
    || die "DEVCLUSTER_HA_LEDGER is postgresql (the default) or sqlite, not '$HA_LEDGER'"
CTLD_TIMEOUT="${DEVCLUSTER_HA_CTLD_TIMEOUT:-4}"
[[ "$CTLD_TIMEOUT" =~ ^[0-9]+$ ]] && ((CTLD_TIMEOUT >= 4)) \
    || die "DEVCLUSTER_HA_CTLD_TIMEOUT must be a whole number of seconds, at least 4"
URL_FILE="$DIR/etc/ledger.url"
LOCAL="$DIR/host"                  # a controller host's local directories, seen on that host
SOCK="$LOCAL/run/slurmgate.sock"
LEDGER_DB="$LOCAL/var/slurmgate.db"
DAEMON_LOG="$LOCAL/log/slurmgate.log"
CKPT_ROOT=/var/tmp/slurmgate-ckpt-ha   # not the default cluster's: its start prunes that one
HOSTS_BEGIN="# BEGIN slurmgate dev cluster HA controllers (contrib/devcluster/ha.sh)"
HOSTS_END="# END slurmgate dev cluster HA controllers"
SLURM_LOGS=(../hosts/ctl1/log/slurmctld.log ../hosts/ctl2/log/slurmctld.log
            slurmd-node1.log slurmd-node2.log)
ENV_EXTRA="export DEVCLUSTER_HA=1
"
unset DAEMON_PID CTLD_PID   # per host here: host_file HOST run/slurmgate.pid

host_file() { echo "$DIR/hosts/$1/$2"; }   # host_file HOST PATH: HOST's $LOCAL/PATH, from here
host_pidfile() { echo "$DIR/run/host-$1.pid"; }

# ---------------------------------------------------------------- process bookkeeping

host_pid() { live_pid "$(host_pidfile "$1")" "devcluster-host $1 $DIR "; }
ha_daemon_pid() { live_pid "$(host_file "$1" run/slurmgate.pid)" slurmgate; }
ha_ctld_pid() { live_pid "$(host_file "$1" run/slurmctld.pid)" slurmctld; }

# cluster.sh's stop_slurm asks whether a controller runs, to cancel the running jobs first:
# that needs one in control (squeue fails, and stops the script, when none answers).
ctld_pid() { active_controller >/dev/null; }

uses_postgresql() { [[ "$HA_LEDGER" == postgresql ]]; }
pg_running() { [[ -f "$PG_DIR/data/PG_VERSION" ]] && bash "$HERE/postgres.sh" status "$PG_DIR" >/dev/null 2>&1; }

any_component_running() {
    local h n
    for h in "${HA_HOSTS[@]}"; do
        host_pid "$h" >/dev/null || ha_daemon_pid "$h" >/dev/null || ha_ctld_pid "$h" >/dev/null \
            && return 0
    done
    for n in "${NODES[@]}"; do slurmd_pid "$n" >/dev/null && return 0; done
    return 1
}

all_components_running() {
    local h n
    for h in "${HA_HOSTS[@]}"; do
        host_pid "$h" >/dev/null && ha_daemon_pid "$h" >/dev/null && ha_ctld_pid "$h" >/dev/null \
            || return 1
    done
    for n in "${NODES[@]}"; do slurmd_pid "$n" >/dev/null || return 1; done
    if uses_postgresql; then pg_running || return 1; fi
}

# Runs CMD on controller host HOST (in its namespaces; the working directory becomes /).
in_host() {
    local h="$1" pid
    shift
    pid="$(host_pid "$h")" || die "controller host $h is not up"
    nsenter --target "$pid" --uts --mount -- "$@"
}

# The controller in control: the heartbeat file in StateSaveLocation names the SlurmctldHost
# index of the slurmctld that writes it (every timeout/4 s, only while in control).
heartbeat() {  # prints "SECONDS-AGO INDEX"
    local hex
    hex="$(od -An -v -tx1 -N16 "$DIR/var/slurmctld/heartbeat" 2>/dev/null | tr -d ' \n')"
    ((${#hex} == 32)) || return 1
    echo "$(($(date +%s) - 16#${hex:0:16})) $((16#${hex:16:16}))"
}

# The heartbeat alone is not enough: a slurmctld stuck while giving up control (see
# restart_backup_slurmctld) goes on writing it but answers nothing, not even a ping.
active_controller() {
    local beat ago inx h
    beat="$(heartbeat)" || return 1
    read -r ago inx <<<"$beat"
    ((ago <= CTLD_TIMEOUT)) || return 1
    h="${HA_HOSTS[$inx]:-}"
    [[ -n "$h" ]] && ha_ctld_pid "$h" >/dev/null && controller_answers_ping "$h" || return 1
    echo "$h"
}

controller_is_active() { [[ "$(active_controller)" == "$1" ]]; }
controller_answers_ping() { timeout 30 scontrol ping 2>/dev/null | grep -q " at $1 is UP"; }
slurm_answers() { sinfo -h -o %P >/dev/null 2>&1; }

# ---------------------------------------------------------------- host preparation

make_ha_dirs() {
    local s="$SLURM_USER" h d f
    install -d -m 0755 "$DIR/hosts" "$LOCAL"
    for h in "${HA_HOSTS[@]}"; do
        d="$DIR/hosts/$h"
        install -d -m 0755 "$d" "$d/log"
        # run/: the daemon's socket and pid, slurmctld's pid; var/: a SQLite ledger and its lock
        install -d -m 0775 -o root -g "$s" "$d/run" "$d/var"
        chown -f "$s:$s" "$d"/var/slurmgate.db* 2>/dev/null || true
        for f in slurmctld.log slurmgate.log; do
            [[ -e "$d/log/$f" ]] || install -m 0640 /dev/null "$d/log/$f"
            chown "$s:$s" "$d/log/$f"
        done
        printf '%s\n' "$h" | write_file "$d/HOSTNAME" 0644
    done
}

# cluster.sh's make_state_dirs, then the hosts' directories.
eval "$(declare -f make_state_dirs | sed '1s/^make_state_dirs /make_state_dirs_default /')"
make_state_dirs() {
    make_state_dirs_default
    make_ha_dirs
    # the default layout's controller logs: here each controller host has its own
    local f
    for f in slurmctld.log slurmgate.log; do [[ -s "$DIR/log/$f" ]] || rm -f "$DIR/log/$f"; done
}

# The controller hosts' /etc/hosts: the host's own lines (any block of ours left out), then
# the controllers' names. Bind-mounted in their namespaces only.
render_controller_hosts() {
    {
        awk -v b="$HOSTS_BEGIN" -v e="$HOSTS_END" '$0 == b { skip = 1 } !skip { print } $0 == e { skip = 0 }' /etc/hosts
        echo "$HOSTS_BEGIN"
        local h
        for h in "${HA_HOSTS[@]}"; do printf '%s\t%s\n' "${HA_ADDR[$h]}" "$h"; done
        echo "$HOSTS_END"
    } | write_file "$DIR/etc/hosts" 0644
}

# slurm.conf.in with two SlurmctldHost entries, per-host pid and log files, the backup's
# timeout and NoCtldInAddrAny. Each edit must have happened: a changed template fails here.
render_ha_slurm_conf() {
    local tmp l want
    tmp="$(mktemp "$DIR/etc/.slurm.conf.XXXXXX")"
    expand_template slurm.conf | sed -E \
        -e "1s|^# Rendered by .*|# Rendered by contrib/devcluster/cluster.sh (HA mode, ha.sh) from slurm.conf.in -- edits here are overwritten.|" \
        -e "s|^SlurmctldHost=localhost\$|# The primary and the backup, each on a controller host of its own (ha.sh).\\
SlurmctldHost=ctl1(${HA_ADDR[ctl1]})\\
SlurmctldHost=ctl2(${HA_ADDR[ctl2]})|" \
        -e "s|^(SlurmctldPort=.*)\$|\\1\\
# Each slurmctld binds only the address its host name resolves to: both use the one port.\\
CommunicationParameters=NoCtldInAddrAny|" \
        -e "s|^SlurmctldPidFile=.*|SlurmctldPidFile=$(sed_escape "$LOCAL")/run/slurmctld.pid|" \
        -e "s|^SlurmctldLogFile=.*|SlurmctldLogFile=$(sed_escape "$LOCAL")/log/slurmctld.log|" \
        -e "s|^SlurmctldTimeout=.*|SlurmctldTimeout=$CTLD_TIMEOUT|" \
        >"$tmp"
    for want in "SlurmctldHost=ctl1(${HA_ADDR[ctl1]})" "SlurmctldHost=ctl2(${HA_ADDR[ctl2]})" \
        "CommunicationParameters=NoCtldInAddrAny" "SlurmctldPidFile=$LOCAL/run/slurmctld.pid" \
        "SlurmctldLogFile=$LOCAL/log/slurmctld.log" "SlurmctldTimeout=$CTLD_TIMEOUT"; do
        grep -qxF -- "$want" "$tmp" || { rm -f "$tmp"; die "slurm.conf.in changed: no '$want' in the HA slurm.conf"; }
    done
    l="$(grep -c '^SlurmctldHost=' "$tmp")"
    ((l == 2)) || { rm -f "$tmp"; die "the HA slurm.conf has $l SlurmctldHost lines, not 2"; }
    install_if_changed "$tmp" "$CONF" 0644
}

render_slurm_conf() {
    render_ha_slurm_conf
    render_template gres.conf
    render_cgroup_conf
}

# The policy's ledger follows DEVCLUSTER_HA_LEDGER: with PostgreSQL, [daemon] names the URL
# file (database_url_file replaces database); with SQLite it does not, and each daemon's
# ledger is its host's $LOCAL/var/slurmgate.db. Only that line is touched (tests edit the rest).
set_policy_ledger() {
    local policy="$DIR/etc/policy.toml" tmp
    tmp="$(mktemp "$DIR/etc/.policy.toml.XXXXXX")"
    sed -E '/^[[:space:]]*database_url_file[[:space:]]*=/d' "$policy" >"$tmp"
    if uses_postgresql; then
        sed -i -E "/^\\[daemon\\]/,/^\\[/ s|^([[:space:]]*database[[:space:]]*=.*)\$|\\1\\
database_url_file = \"$(sed_escape "$URL_FILE")\"|" "$tmp"
        grep -qF "database_url_file = \"$URL_FILE\"" "$tmp" \
            || { rm -f "$tmp"; die "no 'database = ...' line in [daemon] of $policy"; }
    fi
    install_if_changed "$tmp" "$policy" 0644
}

start_postgres() {
    uses_postgresql || return 0
    if ! pg_running; then log "starting PostgreSQL on 127.0.0.1:$PG_PORT ($PG_DIR)"; fi
    bash "$HERE/postgres.sh" start "$PG_DIR" "$PG_PORT"
    # The URL holds the role's password: the daemon's user (and root) read it, nobody else.
    bash "$HERE/postgres.sh" url "$PG_DIR" "$PG_PORT" | write_file "$URL_FILE" 0600
    chown "$SLURM_USER:$SLURM_USER" "$URL_FILE"
}

stop_postgres() {
    [[ -f "$PG_DIR/data/PG_VERSION" ]] || return 0
    if pg_running; then log "stopping PostgreSQL ($PG_DIR)"; fi
    bash "$HERE/postgres.sh" stop "$PG_DIR"
}

# ---------------------------------------------------------------- controller hosts

# A controller host: `unshare` gives a `sleep` its own UTS and mount namespaces (mounts made
# there stay there), in which it names itself, mounts the controllers' /etc/hosts and its
# local directories; everything of that host is then started in them with nsenter.
start_host() {
    local h="$1"
    host_pid "$h" >/dev/null && return 0
    log "starting controller host $h (${HA_ADDR[$h]}; $LOCAL is $DIR/hosts/$h there)"
    # Not a process-group leader, so setsid does not fork, and neither does unshare (no
    # --fork): $! is the pid that ends up as the `sleep`.
    # shellcheck disable=SC2016
    setsid unshare --uts --mount --propagation private -- /bin/bash -c '
        set -e
        hostname "$1"
        mount --bind "$2/etc/hosts" /etc/hosts
        mount --bind "$2/hosts/$1" "$3"
        exec -a "devcluster-host $1 $2" sleep infinity' devcluster-host "$h" "$DIR" "$LOCAL" \
        </dev/null >>"$DIR/log/hosts.log" 2>&1 &
    echo $! >"$(host_pidfile "$h")"
    wait_until 10 host_ready "$h" || { tail -n 5 "$DIR/log/hosts.log" >&2; die "controller host $h did not come up"; }
}

host_ready() {
    host_pid "$1" >/dev/null || return 1
    [[ "$(in_host "$1" hostname 2>/dev/null)" == "$1" ]] \
        && [[ "$(in_host "$1" cat "$LOCAL/HOSTNAME" 2>/dev/null)" == "$1" ]] \
        && in_host "$1" getent hosts "$1" | grep -q "^${HA_ADDR[$1]//./\\.}[[:space:]]"
}

# Every process of the host's mount namespace (its sleep, slurmctld, daemon, hooks).
host_processes() {
    local h="$1" pid ns p
    pid="$(host_pid "$h")" || return 0
    ns="$(readlink "/proc/$pid/ns/mnt")" || return 0
    [[ "$ns" != "$(readlink /proc/$$/ns/mnt)" ]] || die "controller host $h shares our mount namespace"
    for p in /proc/[0-9]*; do
        [[ "$(readlink "$p/ns/mnt" 2>/dev/null)" == "$ns" ]] && echo "${p#/proc/}"
    done
    return 0
}

# The host dies: SIGKILL, at once, to everything on it (nothing saves state, no goodbye RPC).
kill_host() {
    local h="$1" pids
    pids="$( { host_processes "$h"; ha_ctld_pid "$h" || true; ha_daemon_pid "$h" || true; } | sort -un | paste -sd' ')"
    if [[ -z "$pids" ]]; then
        log "controller host $h is not running"
        return 0
    fi
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null || true
    echo "killed $h at $(date +%s.%N): pids $pids"
    wait_until 10 bash -c "! kill -0 $pids 2>/dev/null" || die "processes of $h survive SIGKILL: $pids"
    # A host that comes back has an empty /run: no stale pid file (slurmctld would signal
    # whatever process has that pid now) and no stale socket.
    rm -f "$(host_pidfile "$h")" "$(host_file "$h" run)"/*
}

# After its slurmctld and daemon: what is left on the host (e.g. an squeue of the daemon's
# that outlived it), then the host's own process.
stop_host() {
    local h="$1" pid others
    pid="$(host_pid "$h")" || { rm -f "$(host_pidfile "$h")"; return 0; }
    others="$(host_processes "$h" | grep -vxF "$pid" | paste -sd' ')" || true
    if [[ -n "$others" ]]; then
        log "ending what is left on $h: $others"
        # shellcheck disable=SC2086
        kill -TERM $others 2>/dev/null || true
        wait_until 10 bash -c "! kill -0 $others 2>/dev/null" \
            || { kill -KILL $others 2>/dev/null || true; }
    fi
    terminate "$pid" "controller host $h"
    rm -f "$(host_pidfile "$h")"
}

start_host_daemon() {
    local h="$1" sock pid
    ha_daemon_pid "$h" >/dev/null && return 0
    [[ -x "$VENV/bin/slurmgate" ]] || die "$VENV/bin/slurmgate missing (run 'make install')"
    pid="$(host_pid "$h")" || die "controller host $h is not up"
    sock="$(host_file "$h" run/slurmgate.sock)"
    rm -f "$sock"
    log "starting slurmgate daemon on $h"
    # setsid, nsenter (no pid namespace) and setpriv all exec: $! is the daemon's pid.
    setsid nsenter --target "$pid" --uts --mount -- \
        setpriv --reuid "$SLURM_USER" --regid "$SLURM_USER" --init-groups -- \
        "$DIR/bin/slurmgate" daemon </dev/null >>"$(host_file "$h" log/slurmgate.log)" 2>&1 &
    echo $! >"$(host_file "$h" run/slurmgate.pid)"
    if ! wait_until 30 test -S "$sock"; then
        tail -n 20 "$(host_file "$h" log/slurmgate.log)" >&2 || true
        die "the slurmgate daemon on $h did not create its socket within 30 s"
    fi
}

stop_host_daemon() {
    local h="$1" pid
    if pid="$(ha_daemon_pid "$h")"; then
        log "stopping slurmgate daemon on $h ($pid)"
        terminate "$pid" "slurmgate daemon on $h"
    fi
    rm -f "$(host_file "$h" run/slurmgate.pid)" "$(host_file "$h" run/slurmgate.sock)"
}

# The primary waits until it is in control (it takes control back from a backup that has
# it), a backup until it answers pings (it stands by).
start_host_slurmctld() {
    local h="$1"
    if ! ha_ctld_pid "$h" >/dev/null; then
        # slurmctld signals the pid its pid file names: never one that is not a slurmctld
        rm -f "$(host_file "$h" run/slurmctld.pid)"
        log "starting slurmctld on $h"
        in_host "$h" slurmctld -f "$CONF" \
            || { tail -n 20 "$(host_file "$h" log/slurmctld.log)" >&2; die "slurmctld on $h failed"; }
        wait_until 15 ha_ctld_pid "$h" >/dev/null \
            || die "slurmctld on $h did not stay up (see $(host_file "$h" log/slurmctld.log))"
    fi
    if [[ "$h" == "$HA_PRIMARY" ]]; then
        wait_until 60 controller_is_active "$h" && wait_until 30 slurm_answers \
            || die "slurmctld on $h is not in control (see $(host_file "$h" log/slurmctld.log))"
        local b
        for b in "${HA_HOSTS[@]}"; do
            if [[ "$b" != "$h" ]] && ! slurm_at_least 23.02.3 && has_had_control "$b"; then
                restart_backup_slurmctld "$b"
            fi
        done
    else
        wait_until 30 controller_answers_ping "$h" || die "slurmctld on $h does not answer scontrol ping"
    fi
}

# Whether HOST's running slurmctld has taken control since it started (its log says so).
has_had_control() {
    ha_ctld_pid "$1" >/dev/null || return 1
    awk -v host="$1" '
        /slurmctld version .* started/ { had = 0 }
        $0 ~ ("BackupController[0-9]+ " host " taking over") { had = 1 }
        END { exit !had }' "$(host_file "$1" log/slurmctld.log)"
}

# Before 23.02.3 a backup slurmctld that has taken control and handed it back once hangs the
# next time it hands control back: main_sched_fini() joins the main scheduler's thread id of
# the first time again (Slurm bug 16669, fixed by "Set thread_id_sched to 0 after
# pthread_join"), a thread long gone whose id a live thread now has. The hung slurmctld goes
# on writing the heartbeat but answers nothing, and the primary takes control after 30 s
# with "backup not completely done relinquishing control. Old state possible". So there,
# once the primary has control back, the backup's slurmctld is restarted: a new process
# standing by, which has never had control.
restart_backup_slurmctld() {
    local h="$1" pid
    pid="$(ha_ctld_pid "$h")" || return 0
    log "restarting slurmctld on $h (it has had control: before Slurm 23.02.3 a backup hands control back only once)"
    terminate "$pid" "slurmctld on $h"
    start_host_slurmctld "$h"
}

stop_controllers() {
    local h pid
    # The backups first: a primary stopped first would be taken over after SlurmctldTimeout.
    for h in ctl2 ctl1; do
        if pid="$(ha_ctld_pid "$h")"; then
            log "stopping slurmctld on $h ($pid)"
            terminate "$pid" "slurmctld on $h"
        fi
    done
}

start_controller_host() {  # the host, its daemon, its slurmctld
    start_host "$1"
    start_host_daemon "$1"
    start_host_slurmctld "$1"
}

# ---------------------------------------------------------------- commands

cmd_start() {
    [[ $EUID -eq 0 ]] || die "must run as root"
    if [[ -d "$DIR" ]] && all_components_running; then
        log "already running"
        return 0
    fi
    local fresh=1
    any_component_running && fresh=0
    install_missing_packages
    detect_slurm_release
    command -v unshare >/dev/null && command -v nsenter >/dev/null || die "unshare/nsenter missing (util-linux)"
    ensure_munged
    ensure_researchers
    ensure_slurm_user
    make_state_dirs
    render_slurm_conf
    render_controller_hosts
    write_wrappers
    # /etc/slurm/slurm.conf stays the default cluster's: use $DIR/env.sh (SLURM_CONF) here.
    start_postgres
    if ((fresh)) || [[ ! -f "$DIR/etc/policy.toml" ]]; then render_policy; fi
    set_policy_ledger
    [[ -x "$VENV/bin/slurmgate" ]] || die "$VENV/bin/slurmgate missing (run 'make install')"
    render_job_submit_lua
    local h sizes
    for h in "${HA_HOSTS[@]}"; do
        start_host "$h"
        start_host_daemon "$h"
    done
    mapfile -t sizes < <(log_sizes)
    for h in "${HA_HOSTS[@]}"; do start_host_slurmctld "$h"; done
    local n
    for n in "${NODES[@]}"; do start_slurmd "$n"; done
    wait_for_nodes
    report_config_complaints "${sizes[@]}"
    log "up (Slurm $SLURM_RELEASE, HA: ctl1 ${HA_ADDR[ctl1]} in control, ctl2 ${HA_ADDR[ctl2]} standing by, ledger $HA_LEDGER): $(node_states | paste -sd' ')  (source $DIR/env.sh)"
}

cmd_stop() {
    stop_slurm
    local h
    for h in "${HA_HOSTS[@]}"; do
        stop_host_daemon "$h"
        stop_host "$h"
    done
    stop_postgres
    log "stopped (munged left running)"
}

host_line() {
    local h="$1" role="backup" state="down" line pid
    [[ "$h" == "$HA_PRIMARY" ]] && role="primary"
    if ha_ctld_pid "$h" >/dev/null; then
        if controller_is_active "$h"; then state="in control"
        elif controller_answers_ping "$h"; then state="standing by"
        else state="no answer"; fi
    fi
    line="$(printf '%-5s %-7s %-10s %-12s' "$h" "$role" "${HA_ADDR[$h]}" "$state")"
    if pid="$(host_pid "$h")"; then line+="  host $pid"; else line+="  host down"; fi
    if pid="$(ha_ctld_pid "$h")"; then line+="  slurmctld $pid"; else line+="  slurmctld stopped"; fi
    if pid="$(ha_daemon_pid "$h")"; then line+="  slurmgate $pid"; else line+="  slurmgate stopped"; fi
    echo "$line"
}

cmd_ha_status() {
    local h active rc=0
    for h in "${HA_HOSTS[@]}"; do host_line "$h"; done
    if active="$(active_controller)"; then echo "active: $active"; else echo "active: none"; rc=1; fi
    timeout 60 scontrol ping || true
    return "$rc"
}

cmd_status() {
    local n rc=0
    if munge_works; then printf '%-16s running\n' munged; else printf '%-16s stopped\n' munged; fi
    if uses_postgresql; then
        if pg_running; then printf '%-16s running (127.0.0.1:%s)\n' postgresql "$PG_PORT"
        else printf '%-16s stopped\n' postgresql; fi
    else
        printf '%-16s not used (DEVCLUSTER_HA_LEDGER=sqlite)\n' postgresql
    fi
    for n in "${NODES[@]}"; do component_line "slurmd $n" slurmd_pid "$n"; done
    echo
    cmd_ha_status || true
    if active_controller >/dev/null; then
        echo
        sinfo -N -o '%N %P %T %G' || true
    fi
    all_components_running || rc=3
    return "$rc"
}

cmd_logs() {
    local lines="${1:-50}" f
    shopt -s nullglob
    for f in "$DIR"/log/*.log "$DIR"/hosts/*/log/*.log; do
        echo "==> $f <=="
        tail -n "$lines" "$f"
        echo
    done
}

cmd_daemon() {
    local action="${1:-}" hosts=("${HA_HOSTS[@]}") h pid
    if [[ -n "${2:-}" ]]; then hosts=("$2"); fi
    for h in "${hosts[@]}"; do
        [[ -n "${HA_ADDR[$h]:-}" ]] || die "no controller host '$h' (${HA_HOSTS[*]})"
        case "$action" in
            start) start_host "$h"; start_host_daemon "$h" ;;
            stop) stop_host_daemon "$h" ;;
            restart) stop_host_daemon "$h"; start_host "$h"; start_host_daemon "$h" ;;
            reload)
                pid="$(ha_daemon_pid "$h")" || die "the slurmgate daemon on $h is not running"
                kill -HUP "$pid"
                log "sent SIGHUP to the slurmgate daemon on $h ($pid)" ;;
            *) die "usage: $0 daemon start|stop|restart|reload [ctl1|ctl2]" ;;
        esac
    done
}

cmd_ha() {
    local h="${2:-}"
    case "${1:-}" in
        status) cmd_ha_status ;;
        kill-primary) kill_host "$HA_PRIMARY" ;;
        start-primary) [[ $EUID -eq 0 ]] || die "must run as root"; start_controller_host "$HA_PRIMARY" ;;
        kill | start)
            [[ -n "$h" && -n "${HA_ADDR[$h]:-}" ]] || die "usage: $0 ha $1 ctl1|ctl2"
            if [[ "$1" == kill ]]; then kill_host "$h"
            else [[ $EUID -eq 0 ]] || die "must run as root"; start_controller_host "$h"; fi ;;
        *) die "usage: $0 ha status|kill-primary|start-primary|kill HOST|start HOST" ;;
    esac
}

main() {
    case "${1:-}" in
        start) cmd_start ;;
        stop) cmd_stop ;;
        restart) cmd_stop; cmd_start ;;
        status) cmd_status ;;
        logs) cmd_logs "${2:-50}" ;;
        daemon) cmd_daemon "${2:-}" "${3:-}" ;;
        ha) cmd_ha "${2:-}" "${3:-}" ;;
        packages) cmd_packages ;;
        install-packages) cmd_install_packages ;;
        *) echo "usage: DEVCLUSTER_HA=1 $0 start|stop|restart|status|logs [N]|daemon start|stop|restart|reload [HOST]|ha status|kill-primary|start-primary|kill HOST|start HOST|packages|install-packages" >&2
           exit 2 ;;
    esac
}
