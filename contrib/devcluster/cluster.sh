#!/usr/bin/env bash
# A real local Slurm cluster for slurmgate development and tests.
#
#   cluster.sh start | stop | restart | status | logs [N]
#   cluster.sh daemon start | stop | restart | reload     (reload = SIGHUP to the slurmgate daemon)
#   cluster.sh packages | install-packages                 (the Debian packages it needs)
#   DEVCLUSTER_HA=1 cluster.sh start | stop | restart | status | logs [N] | daemon ...
#   DEVCLUSTER_HA=1 cluster.sh ha status | kill-primary | start-primary | kill HOST | start HOST
#                                                          (two controllers: see ha.sh)
#
# Two slurmd (node1: 4x a100, node2: 4x h100, fake GPU char devices) plus slurmctld on this
# host, all configured under $DEVCLUSTER_DIR (default <repo>/.devcluster). Needs root and
# Debian 12 (Slurm 22.05), or a chroot of chroot.sh (Debian 13: 24.11, sid: 26.05): the Slurm
# release is read once from `slurmctld -V` and the config follows it.
# Permissions are production's (contrib/INSTALL.md): slurmctld and jobcomp run as the SlurmUser
# `slurm`, the slurmgate daemon as its service user (also `slurm`), slurmd with Prolog/Epilog as
# root, researchers as unprivileged users; the spool and the checkpoint root are writable by
# none of the researchers. `stop` cancels running jobs (pending ones survive), then ends
# slurmctld, slurmd, the slurmgate daemon and any leftover job processes of this cluster;
# munged is left running (other Slurm installs may share it).
#
# Environment:
#   DEVCLUSTER_DIR            state folder                       (<repo>/.devcluster)
#   SLURMGATE_VENV            venv holding the `slurmgate` CLI   (/opt/slurmgate/venv)
#   SLURMGATE_POLICY_EXAMPLE  policy.toml to render from         (<repo>/contrib/examples/policy.toml)
#   DEVCLUSTER_CTLD_PORT, DEVCLUSTER_NODE1_PORT, DEVCLUSTER_NODE2_PORT   (6817, 6818, 6819)
#   DEVCLUSTER_HA=1           the HA mode (primary + backup slurmctld, contrib/devcluster/ha.sh);
#                             its defaults: <repo>/.devcluster-ha and ports 6857, 6858, 6859
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
HA="${DEVCLUSTER_HA:-0}"
case "$HA" in
    0 | "") HA=0; DEFAULTS=(.devcluster 6817 6818 6819) ;;
    1) DEFAULTS=(.devcluster-ha 6857 6858 6859) ;;
    *) echo "devcluster: error: DEVCLUSTER_HA is 1 (the HA mode) or unset, not '$HA'" >&2; exit 2 ;;
esac
DIR="${DEVCLUSTER_DIR:-$REPO/${DEFAULTS[0]}}"
VENV="${SLURMGATE_VENV:-/opt/slurmgate/venv}"
POLICY_EXAMPLE="${SLURMGATE_POLICY_EXAMPLE:-$REPO/contrib/examples/policy.toml}"
CTLD_PORT="${DEVCLUSTER_CTLD_PORT:-${DEFAULTS[1]}}"
NODE1_PORT="${DEVCLUSTER_NODE1_PORT:-${DEFAULTS[2]}}"
NODE2_PORT="${DEVCLUSTER_NODE2_PORT:-${DEFAULTS[3]}}"
NODES=(node1 node2)
RESEARCHERS=(alice bob carol mallory)
SLURM_USER=slurm
PACKAGES=(slurmctld slurmd slurm-client munge lua-socket lua-cjson lua5.1 python3-venv postgresql)

SLURM_RELEASE=""   # e.g. 22.05.8; set by detect_slurm_release

CONF="$DIR/etc/slurm.conf"
SOCK="$DIR/run/slurmgate.sock"
# What the rendered policy names (the HA mode moves these to each controller host's own dirs).
LEDGER_DB="$DIR/var/slurmgate.db"
DAEMON_LOG="$DIR/log/slurmgate.log"
CKPT_ROOT=/var/tmp/slurmgate-ckpt
ENV_EXTRA=""   # more lines for env.sh
DAEMON_PID="$DIR/run/slurmgate.pid"
CTLD_PID="$DIR/run/slurmctld.pid"
export SLURM_CONF="$CONF"

log() { echo "devcluster: $*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------- process bookkeeping

slurmd_pidfile() { echo "$DIR/run/slurmd-$1.pid"; }

# Prints the pid from FILE if that process is alive and its command line contains PATTERN
# (guards against a stale pid file whose number was reused).
live_pid() {
    local file="$1" pattern="$2" pid
    [[ -s "$file" ]] || return 1
    pid="$(tr -dc '0-9' <"$file")"
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 1
    tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" | grep -q -- "$pattern" || return 1
    echo "$pid"
}

daemon_pid() { live_pid "$DAEMON_PID" "slurmgate"; }
ctld_pid() { live_pid "$CTLD_PID" "slurmctld"; }
slurmd_pid() { live_pid "$(slurmd_pidfile "$1")" "slurmd"; }

any_component_running() {
    local n
    daemon_pid >/dev/null && return 0
    ctld_pid >/dev/null && return 0
    for n in "${NODES[@]}"; do slurmd_pid "$n" >/dev/null && return 0; done
    return 1
}

all_components_running() {
    local n
    daemon_pid >/dev/null && ctld_pid >/dev/null || return 1
    for n in "${NODES[@]}"; do slurmd_pid "$n" >/dev/null || return 1; done
}

# Polls CMD every 0.2 s for at most SECONDS seconds.
wait_until() {
    local seconds="$1"; shift
    local deadline=$((SECONDS + seconds))
    until "$@"; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

pid_gone() { ! kill -0 "$1" 2>/dev/null; }

# TERM, wait up to 20 s, then KILL.
terminate() {
    local pid="$1" name="$2"
    kill -TERM "$pid" 2>/dev/null || return 0
    if ! wait_until 20 pid_gone "$pid"; then
        log "$name ($pid) ignored SIGTERM, killing"
        kill -KILL "$pid" 2>/dev/null || true
        wait_until 5 pid_gone "$pid" || die "$name ($pid) will not exit"
    fi
}

# slurmstepd and job tasks outlive slurmd; they inherit SLURM_CONF=<our slurm.conf>, which is
# how we tell them from processes of any other Slurm on the host.
cluster_job_pids() {
    local env_file pid
    for env_file in /proc/[0-9]*/environ; do
        pid="${env_file#/proc/}"; pid="${pid%/environ}"
        [[ "$pid" != "$$" ]] || continue
        tr '\0' '\n' 2>/dev/null <"$env_file" | grep -qxF "SLURM_CONF=$CONF" || continue
        if [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == slurmstepd ]]; then echo "$pid"; continue; fi
        tr '\0' '\n' 2>/dev/null <"$env_file" | grep -q '^SLURM_JOB_ID=' && echo "$pid"
    done
    return 0
}

# ---------------------------------------------------------------- host preparation

install_missing_packages() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed' \
            || missing+=("$p")
    done
    ((${#missing[@]} == 0)) && return 0
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# ---------------------------------------------------------------- the Slurm release

detect_slurm_release() {
    [[ -z "$SLURM_RELEASE" ]] || return 0
    command -v slurmctld >/dev/null || die "slurmctld not installed (run: $0 install-packages)"
    SLURM_RELEASE="$(slurmctld -V | awk '{print $2}')"
    [[ "$SLURM_RELEASE" =~ ^[0-9]+\.[0-9]+ ]] \
        || die "cannot read the Slurm release from 'slurmctld -V' ($(slurmctld -V))"
}

# slurm_at_least 24.05: true when the installed Slurm is that release or newer.
slurm_at_least() {
    detect_slurm_release
    [[ "$(printf '%s\n%s\n' "$1" "$SLURM_RELEASE" | sort -V | head -n1)" == "$1" ]]
}

munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

ensure_munged() {
    if [[ ! -s /etc/munge/munge.key ]]; then
        log "creating /etc/munge/munge.key"
        mkdir -p /etc/munge
        mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null \
            || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    munge_works && return 0
    log "starting munged"
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
    runuser -u munge -- /usr/sbin/munged
    wait_until 10 munge_works || die "munged does not answer (see /var/log/munge/munged.log)"
}

ensure_researchers() {
    local u
    for u in "${RESEARCHERS[@]}"; do
        id -u "$u" >/dev/null 2>&1 || useradd -m -s /bin/bash "$u"
    done
}

make_fake_gpus() {
    local n i dev
    for n in "${NODES[@]}"; do
        mkdir -p "$DIR/dev/$n"
        for i in 0 1 2 3; do
            dev="$DIR/dev/$n/nvidia$i"
            [[ -c "$dev" ]] || { rm -f "$dev"; mknod -m 0666 "$dev" c 195 "$i"; }
        done
    done
}

ensure_slurm_user() {
    id -u "$SLURM_USER" >/dev/null 2>&1 && return 0
    log "creating the SlurmUser $SLURM_USER"
    useradd --system --user-group --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin "$SLURM_USER"
}

# Owner, group and mode of everything a daemon or hook writes, as contrib/INSTALL.md says.
make_state_dirs() {
    local n s="$SLURM_USER"
    install -d -m 0755 "$DIR" "$DIR/etc" "$DIR/bin" "$DIR/dev" "$DIR/log"
    # run/ holds the daemon's socket, var/ its database and lock: the service user writes both.
    install -d -m 0775 -o root -g "$s" "$DIR/run" "$DIR/var"
    install -d -m 0700 -o "$s" -g "$s" "$DIR/var/slurmctld"
    chown -R "$s:$s" "$DIR/var/slurmctld"
    # a database left by an older dev cluster (daemon as root) becomes the service user's
    chown -f "$s:$s" "$DIR"/var/slurmgate.db* 2>/dev/null || true
    for n in "${NODES[@]}"; do install -d -m 0755 "$DIR/var/slurmd/$n"; done
    local f
    for f in slurmctld.log slurmgate.log hooks.log; do
        [[ -e "$DIR/log/$f" ]] || install -m 0640 /dev/null "$DIR/log/$f"
        chown "$s:$s" "$DIR/log/$f"
    done
    chmod 0660 "$DIR/log/hooks.log"   # jobcomp (slurm) and Prolog/Epilog (root) append here
    # The spool (INSTALL "Spool layout and permissions"): users can create nothing in it.
    install -d -m 0775 -o root -g "$s" "$DIR/spool"
    install -d -m 0770 -o root -g "$s" "$DIR/spool/node" "$DIR/spool/node/tmp"
    install -d -m 0770 -o "$s" -g "$s" "$DIR/spool/ctld" "$DIR/spool/ctld/tmp"
    install -d -m 0750 -o "$s" -g "$s" "$DIR/spool/quarantine"
    # node-local state (baselines, fallback spool): root only
    install -d -m 0700 -o root -g root "$DIR/var/node"
    # checkpoint_root of the dev policy: the Prolog creates team/user dirs (owned by the user,
    # 0700) below it; nobody else can create anything here.
    local ckpt="$CKPT_ROOT"
    if [[ -d "$ckpt" && ( -L "$ckpt" || "$(stat -c '%u %a' "$ckpt")" != "0 755" ) ]]; then
        # an older dev cluster made it 1777: what users made below it is not to be trusted
        log "recreating $ckpt (was $(stat -c '%U %a' "$ckpt"))"
        rm -rf "$ckpt"
    fi
    install -d -m 0755 -o root -g root "$ckpt"
    # team directories are root's; anything else at that level is a leftover nobody vouches for
    find "$ckpt" -mindepth 1 -maxdepth 1 ! -user root -exec rm -rf {} +
    make_fake_gpus
}

# ---------------------------------------------------------------- rendering

# Replaces DEST with the content of SRC only if it differs (keeps mtimes stable on no-op starts).
install_if_changed() {
    local src="$1" dest="$2" mode="$3"
    if [[ -f "$dest" ]] && cmp -s "$src" "$dest"; then
        rm -f "$src"
    else
        chmod "$mode" "$src"
        mv -f "$src" "$dest"
    fi
}

sed_escape() { printf '%s' "$1" | sed -e 's/[\\|&]/\\&/g'; }

expand_template() {  # expand_template NAME: NAME.in with this cluster's values, on stdout
    sed -e "s|@DIR@|$(sed_escape "$DIR")|g" \
        -e "s|@CTLD_PORT@|$CTLD_PORT|g" \
        -e "s|@NODE1_PORT@|$NODE1_PORT|g" \
        -e "s|@NODE2_PORT@|$NODE2_PORT|g" \
        "$HERE/$1.in"
}

render_template() {
    local name="$1" tmp
    tmp="$(mktemp "$DIR/etc/.$name.XXXXXX")"
    expand_template "$name" >"$tmp"
    install_if_changed "$tmp" "$DIR/etc/$name" 0644
}

# slurmd starts its cgroup plugin even with proctrack/linuxproc and task/none, and will not
# start without /sys/fs/cgroup (seen on 22.05 and 24.11 in a chroot). `CgroupPlugin=disabled`
# turns that off from 24.05 on (cgroup.conf(5) of 23.11 lists only cgroup/v1, cgroup/v2 and
# autodetect); older releases need /sys/fs/cgroup, which the host and chroot.sh provide.
render_cgroup_conf() {
    if slurm_at_least 24.05; then
        write_file "$DIR/etc/cgroup.conf" 0644 <<EOF
# Written by contrib/devcluster/cluster.sh for Slurm $SLURM_RELEASE -- edits here are overwritten.
# The dev cluster tracks job processes with proctrack/linuxproc and confines nothing.
CgroupPlugin=disabled
EOF
    else
        rm -f "$DIR/etc/cgroup.conf"
    fi
}

render_slurm_conf() {
    render_template slurm.conf
    render_template gres.conf
    render_cgroup_conf
}

# Plain `sbatch` (no SLURM_CONF) should reach this cluster, but never clobber a real config.
link_etc_slurm_conf() {
    local etc=/etc/slurm/slurm.conf
    if [[ -L "$etc" || ! -e "$etc" ]]; then
        mkdir -p /etc/slurm
        ln -sfn "$CONF" "$etc"
    elif [[ "$(readlink -f "$etc")" != "$CONF" ]]; then
        log "note: $etc is a real file; use 'source $DIR/env.sh' to reach the dev cluster"
    fi
}

write_file() {  # write_file PATH MODE <content on stdin>
    local tmp
    tmp="$(mktemp "$(dirname "$1")/.$(basename "$1").XXXXXX")"
    cat >"$tmp"
    install_if_changed "$tmp" "$1" "$2"
}

write_hook_wrapper() {
    local hook="$1"
    write_file "$DIR/bin/slurmgate-$hook" 0755 <<EOF
#!/bin/bash
# Slurm $hook hook. Always exits 0: a failing Prolog drains the node and holds the job.
# A hung hook is cut off for the same reason.
{
    timeout -k 5 "\${SLURMGATE_HOOK_TIMEOUT:-30}" "$DIR/bin/slurmgate" hook $hook "\$@"
    rc=\$?
    ((rc == 0)) || echo "\$(date '+%F %T') slurmgate-$hook job=\${SLURM_JOB_ID:-\${JOBID:-?}} exit=\$rc"
} </dev/null >>"$DIR/log/hooks.log" 2>&1
exit 0
EOF
}

write_wrappers() {
    write_file "$DIR/bin/slurmgate" 0755 <<EOF
#!/bin/bash
export SLURMGATE_CONFIG="$DIR/etc/policy.toml"
export SLURM_CONF="$CONF"
exec "$VENV/bin/slurmgate" "\$@"
EOF
    write_hook_wrapper prolog
    write_hook_wrapper epilog
    write_hook_wrapper jobcomp
    {
        cat <<EOF
# shellcheck shell=bash
# source me: points Slurm clients and the slurmgate CLI at the dev cluster
export DEVCLUSTER_DIR="$DIR"
export SLURMGATE_VENV="$VENV"
export SLURM_CONF="$CONF"
export SLURMGATE_CONFIG="$DIR/etc/policy.toml"
case ":\$PATH:" in *":$DIR/bin:"*) ;; *) export PATH="$DIR/bin:\$PATH" ;; esac
EOF
        printf '%s' "$ENV_EXTRA"
    } | write_file "$DIR/env.sh" 0644
}

render_policy() {
    [[ -f "$POLICY_EXAMPLE" ]] || die "missing $POLICY_EXAMPLE (set SLURMGATE_POLICY_EXAMPLE)"
    local d tmp
    d="$(sed_escape "$DIR")"
    tmp="$(mktemp "$DIR/etc/.policy.toml.XXXXXX")"
    sed -E \
        -e "s|^([[:space:]]*socket[[:space:]]*=[[:space:]]*)\"[^\"]*\"|\1\"$(sed_escape "$SOCK")\"|" \
        -e "s|^([[:space:]]*database[[:space:]]*=[[:space:]]*)\"[^\"]*\"|\1\"$(sed_escape "$LEDGER_DB")\"|" \
        -e "s|^([[:space:]]*spool_dir[[:space:]]*=[[:space:]]*)\"[^\"]*\"|\1\"$d/spool\"|" \
        -e "s|^([[:space:]]*log_file[[:space:]]*=[[:space:]]*)\"[^\"]*\"|\1\"$(sed_escape "$DAEMON_LOG")\"|" \
        -e "s|^([[:space:]]*slurm_user[[:space:]]*=[[:space:]]*)\"[^\"]*\"|\1\"$SLURM_USER\"|" \
        -e "s|^([[:space:]]*state_dir[[:space:]]*=[[:space:]]*)\"[^\"]*\"|\1\"$d/var/node\"|" \
        -e "s|^([[:space:]]*checkpoint_root[[:space:]]*=[[:space:]]*)\"[^\"]*\"|\1\"$(sed_escape "$CKPT_ROOT")\"|" \
        -e '/^\[nvml\]/,/^\[/ s|^([[:space:]]*backend[[:space:]]*=[[:space:]]*)"real"|\1"fake"|' \
        "$POLICY_EXAMPLE" >"$tmp"
    grep -qF "\"$SOCK\"" "$tmp" \
        || log "warning: no 'socket = ...' line in $POLICY_EXAMPLE; the daemon may listen elsewhere"
    chmod 0644 "$tmp"
    mv -f "$tmp" "$DIR/etc/policy.toml"
}

render_job_submit_lua() {
    local tmp
    tmp="$(mktemp "$DIR/etc/.job_submit.lua.XXXXXX")"
    "$DIR/bin/slurmgate" --socket "$SOCK" lua --timeout-ms 200 --fail-mode open >"$tmp" \
        || { rm -f "$tmp"; die "'slurmgate lua' failed"; }
    install_if_changed "$tmp" "$DIR/etc/job_submit.lua" 0644
}

# ---------------------------------------------------------------- components

start_daemon() {
    if daemon_pid >/dev/null; then return 0; fi
    [[ -x "$VENV/bin/slurmgate" ]] || die "$VENV/bin/slurmgate missing (run 'make install')"
    [[ -f "$DIR/etc/policy.toml" ]] || render_policy
    rm -f "$SOCK"
    log "starting slurmgate daemon"
    # Not a process-group leader in a non-interactive shell, so setsid does not fork: $! is
    # the daemon's own pid (the wrapper execs the console script).
    # As the service user; setpriv execs, so $! stays the daemon's pid.
    setsid setpriv --reuid "$SLURM_USER" --regid "$SLURM_USER" --init-groups -- \
        "$DIR/bin/slurmgate" daemon </dev/null >>"$DIR/log/slurmgate.log" 2>&1 &
    echo $! >"$DAEMON_PID"
    if ! wait_until 15 test -S "$SOCK"; then
        tail -n 20 "$DIR/log/slurmgate.log" >&2 || true
        die "slurmgate daemon did not create $SOCK within 15 s"
    fi
}

stop_daemon() {
    local pid
    if pid="$(daemon_pid)"; then
        log "stopping slurmgate daemon ($pid)"
        terminate "$pid" "slurmgate daemon"
    fi
    rm -f "$DAEMON_PID" "$SOCK"
}

reload_daemon() {
    local pid
    pid="$(daemon_pid)" || die "slurmgate daemon is not running"
    kill -HUP "$pid"
    log "sent SIGHUP to slurmgate daemon ($pid)"
}

start_slurmctld() {
    if ctld_pid >/dev/null; then return 0; fi
    log "starting slurmctld"
    slurmctld -f "$CONF" || { tail -n 20 "$DIR/log/slurmctld.log" >&2; die "slurmctld failed"; }
    wait_until 15 ctld_pid >/dev/null || die "slurmctld did not stay up (see $DIR/log/slurmctld.log)"
    wait_until 30 scontrol ping >/dev/null 2>&1 || die "slurmctld does not answer scontrol ping"
}

start_slurmd() {
    local node="$1"
    if slurmd_pid "$node" >/dev/null; then return 0; fi
    log "starting slurmd $node"
    slurmd -f "$CONF" -N "$node" \
        || { tail -n 20 "$DIR/log/slurmd-$node.log" >&2; die "slurmd $node failed"; }
    wait_until 15 slurmd_pid "$node" >/dev/null \
        || die "slurmd $node did not stay up (see $DIR/log/slurmd-$node.log)"
}

# What Slurm says about its config when it starts: a key a newer release dropped or renamed is
# an error or fatal line in these logs, not a failed start.
SLURM_LOGS=(slurmctld.log slurmd-node1.log slurmd-node2.log)
CONFIG_COMPLAINTS='fatal|Parsing error|unrecognized|deprecated|obsolete|no longer (supported|used|valid)'

log_sizes() {
    local f
    for f in "${SLURM_LOGS[@]}"; do stat -c %s "$DIR/log/$f" 2>/dev/null || echo 0; done
}

report_config_complaints() {  # report_config_complaints SIZE-BEFORE-START...
    local sizes=("$@") i f lines line
    for i in "${!SLURM_LOGS[@]}"; do
        f="$DIR/log/${SLURM_LOGS[$i]}"
        [[ -f "$f" ]] || continue
        lines="$(tail -c +"$((${sizes[$i]:-0} + 1))" "$f" | grep -E "$CONFIG_COMPLAINTS" || true)"
        [[ -z "$lines" ]] && continue
        log "warning: Slurm $SLURM_RELEASE complained while starting (${SLURM_LOGS[$i]}):"
        while IFS= read -r line; do echo "    $line" >&2; done <<<"$lines"
    done
}

node_states() { sinfo -h -N -o '%N %T' 2>/dev/null | sort -u; }

# Waits until every node is idle (or busy with jobs), resuming nodes left down or drained.
wait_for_nodes() {
    local deadline=$((SECONDS + 60)) states bad
    while :; do
        states="$(node_states)"
        bad="$(awk '$2 !~ /^(idle|mixed|allocated|completing)$/ {print $1}' <<<"$states")"
        if [[ -n "$states" && -z "$bad" ]]; then return 0; fi
        if grep -Eq ' (down|drain|drained|draining|fail)' <<<"$states"; then
            scontrol update nodename="$(grep -E ' (down|drain|drained|draining|fail)' <<<"$states" \
                | awk '{print $1}' | paste -sd,)" state=resume 2>/dev/null || true
        fi
        ((SECONDS < deadline)) || { echo "$states" >&2; die "nodes not idle after 60 s"; }
        sleep 0.5
    done
}

running_job_ids() { squeue -h -t RUNNING,SUSPENDED,CONFIGURING,COMPLETING -o %i 2>/dev/null; }
no_running_jobs() { [[ -z "$(running_job_ids)" ]]; }

# Job processes would outlive slurmd and come back as ghost RUNNING jobs on the next start, so
# running jobs are cancelled (Epilog and jobcomp still run). Pending jobs survive a restart;
# draining first keeps them from starting in the freed slots. `start` resumes the nodes.
cancel_running_jobs() {
    local ids
    ids="$(running_job_ids | paste -sd' ')"
    [[ -n "$ids" ]] || return 0
    scontrol update nodename="$(IFS=,; echo "${NODES[*]}")" state=drain reason="devcluster stop" \
        2>/dev/null || true
    log "cancelling running jobs: $ids"
    # shellcheck disable=SC2086
    scancel $ids 2>/dev/null || true
    wait_until 30 no_running_jobs || log "warning: jobs still running: $(running_job_ids | paste -sd' ')"
}

stop_slurm() {
    if ctld_pid >/dev/null; then cancel_running_jobs; fi
    # Controller first: stopped slurmds would leave it waiting on RPCs to them at shutdown.
    stop_controllers
    stop_slurmds
}

stop_controllers() {
    local pid
    if pid="$(ctld_pid)"; then
        log "stopping slurmctld ($pid)"
        terminate "$pid" slurmctld
    fi
}

# The slurmds, then whatever job processes of this cluster outlived them.
stop_slurmds() {
    local pid n slurmds=()
    for n in "${NODES[@]}"; do
        if pid="$(slurmd_pid "$n")"; then
            log "stopping slurmd $n ($pid)"
            kill -TERM "$pid" 2>/dev/null || true
            slurmds+=("$pid")
        fi
    done
    for pid in "${slurmds[@]}"; do terminate "$pid" slurmd; done
    local leftovers
    leftovers="$(cluster_job_pids | paste -sd' ')"
    if [[ -n "$leftovers" ]]; then
        log "killing leftover job processes: $leftovers"
        # shellcheck disable=SC2086
        kill -KILL $leftovers 2>/dev/null || true
        wait_until 5 bash -c "! kill -0 $leftovers 2>/dev/null" || log "warning: some job processes survive"
    fi
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
    ensure_munged
    ensure_researchers
    ensure_slurm_user
    make_state_dirs
    render_slurm_conf
    write_wrappers
    link_etc_slurm_conf
    # Tests may edit etc/policy.toml; only a cold start re-renders it from the example.
    if ((fresh)) || [[ ! -f "$DIR/etc/policy.toml" ]]; then render_policy; fi
    [[ -x "$VENV/bin/slurmgate" ]] || die "$VENV/bin/slurmgate missing (run 'make install')"
    render_job_submit_lua
    start_daemon
    local sizes
    mapfile -t sizes < <(log_sizes)
    start_slurmctld
    local n
    for n in "${NODES[@]}"; do start_slurmd "$n"; done
    wait_for_nodes
    report_config_complaints "${sizes[@]}"
    log "up (Slurm $SLURM_RELEASE): $(node_states | paste -sd' ')  (source $DIR/env.sh)"
}

cmd_stop() {
    stop_slurm
    stop_daemon
    log "stopped (munged left running)"
}

component_line() {
    local name="$1" pid
    if pid="$("${@:2}")"; then
        printf '%-12s running (pid %s)\n' "$name" "$pid"
    else
        printf '%-12s stopped\n' "$name"
    fi
}

cmd_status() {
    local n rc=0
    if munge_works; then printf '%-12s running\n' munged; else printf '%-12s stopped\n' munged; fi
    component_line slurmgate daemon_pid
    component_line slurmctld ctld_pid
    for n in "${NODES[@]}"; do component_line "slurmd $n" slurmd_pid "$n"; done
    if ctld_pid >/dev/null; then
        echo
        sinfo -N -o '%N %P %T %G' || true
    fi
    all_components_running || rc=3
    return "$rc"
}

cmd_logs() {
    local lines="${1:-50}" f
    shopt -s nullglob
    for f in "$DIR"/log/*.log; do
        echo "==> $f <=="
        tail -n "$lines" "$f"
        echo
    done
}

cmd_packages() { printf '%s\n' "${PACKAGES[@]}"; }

cmd_install_packages() {
    [[ $EUID -eq 0 ]] || die "must run as root"
    install_missing_packages
}

cmd_daemon() {
    case "${1:-}" in
        start) start_daemon ;;
        stop) stop_daemon ;;
        restart) stop_daemon; start_daemon ;;
        reload) reload_daemon ;;
        *) die "usage: $0 daemon start|stop|restart|reload" ;;
    esac
}

main() {
    case "${1:-}" in
        start) cmd_start ;;
        stop) cmd_stop ;;
        restart) cmd_stop; cmd_start ;;
        status) cmd_status ;;
        logs) cmd_logs "${2:-50}" ;;
        daemon) cmd_daemon "${2:-}" ;;
        packages) cmd_packages ;;
        install-packages) cmd_install_packages ;;
        *) echo "usage: $0 start|stop|restart|status|logs [N]|daemon start|stop|restart|reload|packages|install-packages" >&2
           exit 2 ;;
    esac
}

# The HA mode redefines the commands (and what they start) for two controller hosts.
if ((HA)); then
    # shellcheck source=contrib/devcluster/ha.sh
    source "$HERE/ha.sh"
fi

main "$@"
