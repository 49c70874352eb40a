#!/usr/bin/env bash
# Debian chroots that carry another Slurm release, so the dev cluster can run on it beside the
# host's.
#
#   chroot.sh build VERSION            build the chroot for Slurm VERSION, or reuse the cached one
#   chroot.sh run VERSION -- CMD...    run CMD as root inside it (the repo at the same path)
#   chroot.sh umount VERSION           stop its munged and unmount what `run` mounted
#   chroot.sh remove VERSION           umount, then delete it (the next build starts afresh)
#   chroot.sh path VERSION             print where it lives
#   chroot.sh versions                 list the Slurm versions this script knows
#
# `make test SLURM=24.11` (and cluster, demo, stop ...) is `build`, then `run ... make TARGET`.
#
# A chroot is Debian's own: `debootstrap --variant=minbase` of the suite that ships the Slurm
# release, then every package `make test` needs, installed inside by the same Makefile and
# cluster.sh code that installs them on a Debian 12 host (`make packages`): one list of
# packages. It is cached under $SLURMGATE_CHROOT_CACHE/<version>; a stamp file written last
# records the suite and the package list, and a chroot whose stamp is missing (a build that
# died half-way) or names another list is built again from scratch.
#
# Inside, the chroot has its own /etc, /run, /opt and /var: its own users, munged and key, its
# own venv at /opt/slurmgate/venv. Shared with the host: the kernel, the network (so each
# version gets its own ports), /proc, /sys, /dev and this repository, bind-mounted at the same
# path so that paths in configs and test output mean the same thing on both sides. Cluster
# state lives in <repo>/.devcluster-<version>, never in the host cluster's .devcluster.
#
# Environment:
#   SLURMGATE_CHROOT_CACHE    where chroots live       (/var/cache/slurmgate/chroots)
#   SLURMGATE_CHROOT_MIRROR   Debian mirror            (http://deb.debian.org/debian)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
CACHE="${SLURMGATE_CHROOT_CACHE:-/var/cache/slurmgate/chroots}"
MIRROR="${SLURMGATE_CHROOT_MIRROR:-http://deb.debian.org/debian}"
STAMP_NAME=.slurmgate-chroot-complete

# The Slurm releases we run, the Debian suite that ships each, and the first of the three
# ports (slurmctld, slurmd node1, slurmd node2) its dev cluster listens on. The host's own
# cluster uses 6817-6819. 22.05 (bookworm) is the Debian 12 host's Slurm, for hosts that have
# another one, and to try changes to the dev cluster without touching the host's.
declare -A SUITE_OF=([22.05]=bookworm [24.11]=trixie [26.05]=sid)
declare -A FIRST_PORT_OF=([22.05]=6847 [24.11]=6827 [26.05]=6837)

# Installed by debootstrap: enough to run `make packages` inside, plus what a Debian 12 server
# has and minbase leaves out (ps, mount, ...). Everything slurmgate itself needs comes from
# `make packages`.
BOOTSTRAP_PACKAGES=(make ca-certificates procps mount util-linux)

log() { echo "chroot: $*" >&2; }
die() { log "error: $*"; exit 1; }

usage() {
    echo "usage: $0 build|umount|remove|path VERSION | run VERSION -- CMD... | versions" >&2
    exit 2
}

# ---------------------------------------------------------------- naming

known_versions() { printf '%s\n' "${!SUITE_OF[@]}" | sort -V; }

check_version() {
    [[ -n "${1:-}" ]] || usage
    [[ -n "${SUITE_OF[$1]:-}" ]] \
        || die "no chroot for Slurm '$1'; known: $(known_versions | paste -sd' ')" \
            "(the table is SUITE_OF in $0)"
}

chroot_dir() { echo "$CACHE/$1"; }
stamp_file() { echo "$(chroot_dir "$1")/$STAMP_NAME"; }

# What the stamp of a complete chroot for VERSION says: the suite and every package asked for.
wanted_stamp() {
    local version="$1" packages
    packages="$(make -s --no-print-directory -C "$REPO" print-packages SLURM=)" \
        || die "'make print-packages' failed in $REPO"
    echo "suite=${SUITE_OF[$version]}"
    echo "packages=$({ printf '%s\n' "${BOOTSTRAP_PACKAGES[@]}"; echo "$packages"; } \
        | grep -v '^$' | sort -u | paste -sd' ')"
}

is_complete() {
    local stamp
    stamp="$(stamp_file "$1")"
    [[ -f "$stamp" ]] && [[ "$(sed -n '1,2p' "$stamp")" == "$(wanted_stamp "$1")" ]]
}

# ---------------------------------------------------------------- mounts

is_mounted() { awk -v t="$1" '$5 == t { found = 1 } END { exit !found }' /proc/self/mountinfo; }

# Mount points at or below DIR, deepest first.
mounts_below() {
    local dir="$1"
    awk -v d="$dir" '$5 == d || index($5, d "/") == 1 { print $5 }' /proc/self/mountinfo | sort -r
}

mount_once() {  # mount_once TARGET MOUNT-ARGUMENTS...
    local target="$1"; shift
    is_mounted "$target" && return 0
    mkdir -p "$target"
    mount "$@" "$target" || die "cannot mount $target (mount $*)"
}

# /sys comes with what is mounted below it (22.05's slurmd will not start without
# /sys/fs/cgroup, even with proctrack/linuxproc) as a slave: unmounting the chroot's copies can
# never unmount the host's. /dev is bound alone, its pts and a fresh shm on top.
mount_host_filesystems() {
    local root="$1"
    mount_once "$root/proc" -t proc proc
    if ! is_mounted "$root/sys"; then
        mount_once "$root/sys" --rbind /sys
        mount --make-rslave "$root/sys"
    fi
    mount_once "$root/dev" --bind /dev
    mount_once "$root/dev/pts" --bind /dev/pts
    mount_once "$root/dev/shm" -t tmpfs -o mode=1777,nosuid,nodev tmpfs
    mount_once "$root$REPO" --bind "$REPO"
}

# The chroot is on the host's network: it names hosts as the host does (/etc/hosts: bookworm's
# minbase has none, and Slurm must resolve localhost), and apt and pip reach the registries as
# the host does: its name servers, and the certificate authorities the site added
# (/usr/local/share/ca-certificates, e.g. a TLS proxy's).
share_host_network_setup() {
    local root="$1" ca changed=0
    cp -L /etc/hosts "$root/etc/hosts"
    cp -L /etc/resolv.conf "$root/etc/resolv.conf"
    mkdir -p "$root/usr/local/share/ca-certificates"
    for ca in /usr/local/share/ca-certificates/*.crt; do
        [[ -f "$ca" ]] || continue
        cmp -s "$ca" "$root$ca" && continue
        cp "$ca" "$root$ca"
        changed=1
    done
    if ((changed)); then
        chroot "$root" update-ca-certificates >/dev/null 2>&1 \
            || die "update-ca-certificates failed inside $root"
    fi
}

# Proxy settings travel into the chroot when the host has them.
proxy_environment() {
    local v
    for v in http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY; do
        [[ -n "${!v:-}" ]] && printf '%s=%s\n' "$v" "${!v}"
    done
    return 0
}

# Processes whose root directory is the chroot (munged, slurmctld, slurmd, jobs, the daemon).
processes_inside() {
    local root="$1" p
    for p in /proc/[0-9]*; do
        [[ "$(readlink "$p/root" 2>/dev/null)" == "$root" ]] || continue
        echo "${p#/proc/} $(cat "$p/comm" 2>/dev/null)"
    done
    return 0
}

# end_inside ROOT REGEX WHY: SIGTERM each process in ROOT whose command name matches REGEX and
# wait up to 5 s for it (then SIGKILL)
end_inside() {
    local root="$1" names="$2" why="$3" pid comm
    while read -r pid comm; do
        [[ "$comm" =~ ^($names)$ ]] || continue
        log "stopping $comm ($pid) $why in $root"
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    done < <(processes_inside "$root")
}

stop_munged_inside() { end_inside "$1" munged "(the chroot's own munged)"; }

cluster_processes_inside() { processes_inside "$1" | awk '$2 != "munged"'; }
nothing_but_munged_inside() { [[ -z "$(cluster_processes_inside "$1")" ]]; }

unmount_chroot() {
    local version="$1" root others m
    root="$(chroot_dir "$version")"
    # a Slurm client the cluster's stop just ran may take a moment to exit
    for _ in $(seq 25); do nothing_but_munged_inside "$root" && break; sleep 0.2; done
    # one still waiting on the stopped controller (squeue retries for its MessageTimeout, and
    # a stopped daemon's reconcile may have left one behind) is ended: nothing answers it
    end_inside "$root" "squeue|sinfo|scontrol|sbatch|scancel|sacct|srun" \
        "(left waiting on the stopped cluster)"
    others="$(cluster_processes_inside "$root")"
    [[ -z "$others" ]] || die "still running in the $version chroot: $(paste -sd, <<<"$others");" \
        "stop its cluster first: make stop SLURM=$version"
    stop_munged_inside "$root"
    while read -r m; do
        [[ -n "$m" ]] || continue
        umount "$m" || die "cannot unmount $m (still in use? see: fuser -vm $m)"
    done < <(mounts_below "$root")
}

# ---------------------------------------------------------------- building

ensure_debootstrap() {
    command -v debootstrap >/dev/null && return 0
    log "installing debootstrap"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
}

# rm -rf of a chroot with the repo still bind-mounted inside would delete the repo: never.
remove_chroot() {
    local version="$1" root
    root="$(chroot_dir "$version")"
    [[ -e "$root" ]] || return 0
    unmount_chroot "$version"
    [[ -z "$(mounts_below "$root")" ]] || die "$root still has mounts; not removing it"
    log "removing $root"
    rm -rf --one-file-system "$root"
}

# Services must not start while apt installs them: nothing inside runs an init system.
forbid_service_starts() {
    printf '#!/bin/sh\n# chroot.sh: no service starts inside the dev chroot\nexit 101\n' \
        >"$1/usr/sbin/policy-rc.d"
    chmod 0755 "$1/usr/sbin/policy-rc.d"
}

# A Debian mirror may be a frozen snapshot (CI's is): sid's Release file then carries a
# Valid-Until date in the past and apt refuses it. Signatures are still checked.
accept_snapshot_mirror() {
    printf '%s\n' '// chroot.sh: the mirror may be a snapshot whose Release file has expired' \
        'Acquire::Check-Valid-Until "false";' >"$1/etc/apt/apt.conf.d/99slurmgate-snapshot"
}

# The suite must still ship the release asked for (sid moves on).
check_slurm_release() {
    local version="$1" root got
    root="$(chroot_dir "$version")"
    got="$(chroot "$root" slurmctld -V 2>/dev/null | awk '{print $2}')" \
        || die "no slurmctld in $root after the build"
    [[ "$got" == "$version" || "$got" == "$version".* ]] \
        || die "Debian ${SUITE_OF[$version]} now ships Slurm $got, not $version;" \
            "update SUITE_OF in $0"
    log "Slurm $got in $root"
}

# The same `make packages` a Debian host would run, inside.
install_what_make_test_needs() {
    local root="$1" build_log="$2" proxies
    log "installing what make test needs (make packages, inside)"
    mapfile -t proxies < <(proxy_environment)
    if ! chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
        LANG=C.UTF-8 "${proxies[@]}" make -s --no-print-directory -C "$REPO" packages SLURM= \
        >>"$build_log" 2>&1; then
        tail -n 20 "$build_log" >&2
        die "'make packages' failed inside $root (log: $build_log)"
    fi
}

cmd_build() {
    local version="$1" root build_log started=$SECONDS
    check_version "$version"
    [[ $EUID -eq 0 ]] || die "must run as root (debootstrap, mount and chroot need it)"
    root="$(chroot_dir "$version")"
    build_log="$CACHE/$version.build.log"
    mkdir -p "$CACHE"
    exec 9>"$CACHE/.$version.lock"
    flock 9   # one build of a version at a time
    if is_complete "$version"; then return 0; fi
    if [[ -e "$root" ]]; then
        log "$root is incomplete or its package list changed: building it again"
        remove_chroot "$version"
    fi
    ensure_debootstrap
    log "debootstrap ${SUITE_OF[$version]} into $root (Slurm $version; log: $build_log)"
    debootstrap --variant=minbase --include="$(IFS=,; echo "${BOOTSTRAP_PACKAGES[*]}")" \
        "${SUITE_OF[$version]}" "$root" "$MIRROR" >"$build_log" 2>&1 \
        || { tail -n 20 "$build_log" >&2; die "debootstrap failed (full log: $build_log)"; }
    forbid_service_starts "$root"
    accept_snapshot_mirror "$root"
    mount_host_filesystems "$root"
    share_host_network_setup "$root"
    install_what_make_test_needs "$root" "$build_log"
    check_slurm_release "$version"
    wanted_stamp "$version" >"$root/$STAMP_NAME.tmp"
    echo "built=$(date -u +%FT%TZ) seconds=$((SECONDS - started))" >>"$root/$STAMP_NAME.tmp"
    mv -f "$root/$STAMP_NAME.tmp" "$(stamp_file "$version")"
    log "built $root in $((SECONDS - started)) s"
}

# ---------------------------------------------------------------- running

cmd_run() {
    local version="${1:-}" root first_port workdir=/
    check_version "$version"
    shift
    [[ "${1:-}" == -- ]] && shift
    (($# > 0)) || usage
    [[ $EUID -eq 0 ]] || die "must run as root"
    root="$(chroot_dir "$version")"
    [[ -f "$(stamp_file "$version")" ]] \
        || die "no chroot for Slurm $version at $root; build it: $0 build $version"
    mount_host_filesystems "$root"
    share_host_network_setup "$root"
    local proxies
    mapfile -t proxies < <(proxy_environment)
    [[ "$PWD" == "$REPO" || "$PWD" == "$REPO"/* ]] && workdir="$PWD"
    first_port="${FIRST_PORT_OF[$version]}"
    exec chroot "$root" /usr/bin/env -i -C "$workdir" \
        PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        HOME=/root LANG=C.UTF-8 TERM="${TERM:-dumb}" \
        SLURMGATE_CHROOT="$version" \
        DEVCLUSTER_DIR="$REPO/.devcluster-$version" \
        SLURM_CONF="$REPO/.devcluster-$version/etc/slurm.conf" \
        DEVCLUSTER_CTLD_PORT="$first_port" \
        DEVCLUSTER_NODE1_PORT="$((first_port + 1))" \
        DEVCLUSTER_NODE2_PORT="$((first_port + 2))" \
        "${proxies[@]}" "$@"
}

cmd_umount() {
    check_version "${1:-}"
    [[ $EUID -eq 0 ]] || die "must run as root"
    unmount_chroot "$1"
}

cmd_remove() {
    check_version "${1:-}"
    [[ $EUID -eq 0 ]] || die "must run as root"
    exec 9>"$CACHE/.$1.lock"
    flock 9
    remove_chroot "$1"
}

main() {
    local command="${1:-}"
    shift || true
    case "$command" in
        build) cmd_build "${1:-}" ;;
        run) cmd_run "$@" ;;
        umount) cmd_umount "${1:-}" ;;
        remove) cmd_remove "${1:-}" ;;
        path) check_version "${1:-}"; chroot_dir "$1" ;;
        versions) known_versions ;;
        *) usage ;;
    esac
}

main "$@"
