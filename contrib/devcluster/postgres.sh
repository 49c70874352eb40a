#!/usr/bin/env bash
# A PostgreSQL server for the dev cluster and the tests: Debian's postgresql package, one
# server per state directory, on a loopback port, run as the `postgres` system user (the
# server refuses root). It holds one role and one database, both `slurmgate`; the role's
# password is generated once and kept in DIR/password (0600, root).
#
#   postgres.sh start DIR PORT   initialise DIR/data once, start, wait until it answers
#   postgres.sh stop DIR         fast shutdown (open connections are cut)
#   postgres.sh kill DIR         SIGKILL the postmaster (a database host that died)
#   postgres.sh url DIR PORT     the slurmgate role's postgresql:// URL
#   postgres.sh status DIR
set -euo pipefail

die() { echo "postgres.sh: $*" >&2; exit 1; }

pg_bin() {
    local d
    d="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)"
    [[ -n "$d" && -x "$d/pg_ctl" ]] \
        || die "PostgreSQL is not installed (apt-get install postgresql; make packages does)"
    echo "$d"
}

as_postgres() { runuser -u postgres -- "$@"; }

cmd_start() {
    local dir="$1" port="$2" bin data
    bin="$(pg_bin)"
    data="$dir/data"
    mkdir -p "$dir"
    if [[ ! -s "$dir/password" ]]; then
        (umask 077; head -c 18 /dev/urandom | base64 | tr -d '/+=' > "$dir/password")
    fi
    if [[ ! -f "$data/PG_VERSION" ]]; then
        install -d -o postgres -g postgres -m 0700 "$data"
        local pw
        pw="$(mktemp)"; chown postgres "$pw"; chmod 0600 "$pw"
        cat "$dir/password" > "$pw"
        as_postgres "$bin/initdb" -D "$data" -U postgres --auth-local=peer \
            --auth-host=scram-sha-256 --pwfile="$pw" -E UTF8 --locale=C.UTF-8 >/dev/null \
            || { rm -f "$pw"; die "initdb failed in $data"; }
        rm -f "$pw"
        cat >> "$data/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$data'
max_connections = 200
shared_buffers = 128MB
EOF
    fi
    if ! as_postgres "$bin/pg_ctl" -D "$data" status >/dev/null 2>&1; then
        as_postgres "$bin/pg_ctl" -D "$data" -l "$data/server.log" -w -t 60 \
            -o "-p $port" start >/dev/null || { tail -n 20 "$data/server.log" >&2; die "start failed"; }
    fi
    local psql=("$bin/psql" -h "$data" -p "$port" -U postgres -d postgres -qAt -v ON_ERROR_STOP=1)
    if [[ "$(as_postgres "${psql[@]}" -c "SELECT 1 FROM pg_roles WHERE rolname = 'slurmgate'")" != 1 ]]; then
        as_postgres "${psql[@]}" -c "CREATE ROLE slurmgate LOGIN CREATEDB PASSWORD '$(cat "$dir/password")'"
        as_postgres "${psql[@]}" -c "CREATE DATABASE slurmgate OWNER slurmgate"
    fi
}

cmd_stop() {
    local dir="$1" bin
    bin="$(pg_bin)"
    [[ -f "$dir/data/PG_VERSION" ]] || return 0
    as_postgres "$bin/pg_ctl" -D "$dir/data" -m fast -w -t 30 stop >/dev/null 2>&1 || true
}

cmd_kill() {
    local pidfile="$1/data/postmaster.pid"
    [[ -f "$pidfile" ]] || return 0
    kill -9 "$(head -n1 "$pidfile")" 2>/dev/null || true
}

cmd_url() {
    local dir="$1" port="$2"
    [[ -s "$dir/password" ]] || die "no server in $dir (postgres.sh start $dir $port)"
    echo "postgresql://slurmgate:$(cat "$dir/password")@127.0.0.1:$port/slurmgate"
}

cmd_status() {
    local bin
    bin="$(pg_bin)"
    as_postgres "$bin/pg_ctl" -D "$1/data" status
}

case "${1:-}" in
    start) [[ $# -eq 3 ]] || die "usage: $0 start DIR PORT"; cmd_start "$2" "$3" ;;
    stop) [[ $# -eq 2 ]] || die "usage: $0 stop DIR"; cmd_stop "$2" ;;
    kill) [[ $# -eq 2 ]] || die "usage: $0 kill DIR"; cmd_kill "$2" ;;
    url) [[ $# -eq 3 ]] || die "usage: $0 url DIR PORT"; cmd_url "$2" "$3" ;;
    status) [[ $# -eq 2 ]] || die "usage: $0 status DIR"; cmd_status "$2" ;;
    *) echo "usage: $0 start|stop|kill|url|status DIR [PORT]" >&2; exit 2 ;;
esac
