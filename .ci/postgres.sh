#!/usr/bin/env bash
# A throwaway PostgreSQL server for the sweep tests (tests/test_sweep.py) and for trying a
# many-machine sweep on one box. Prints the SQLAlchemy URL of a fresh database on stdout.
#
#   .ci/postgres.sh [DIR]        start a server whose files live in DIR (default: a new temp dir)
#   .ci/postgres.sh stop DIR     stop it (its files stay in DIR)
#
# Idempotent: installs Debian's `postgresql` with apt-get when initdb is missing (as root, or with
# passwordless sudo as on CI runners); a server already running in DIR is reused. It listens on
# 127.0.0.1 only, on a free port, with trust authentication: for tests, never for a shared
# database. Run as root, the server runs as the `postgres` user (PostgreSQL refuses root).
set -euo pipefail

find_bin() {
    if command -v initdb >/dev/null 2>&1; then dirname "$(readlink -f "$(command -v initdb)")"; return; fi
    ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1
}

as_owner() {  # run a PostgreSQL binary as the cluster's owner
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

BIN=$(find_bin)
if [ -z "$BIN" ] || [ ! -x "$BIN/initdb" ]; then
    SUDO=""
    if [ "$(id -u)" != 0 ] && sudo -n true 2>/dev/null; then SUDO="sudo -n"; fi  # CI runners: passwordless sudo
    if { [ "$(id -u)" != 0 ] && [ -z "$SUDO" ]; } || ! command -v apt-get >/dev/null 2>&1; then
        echo "postgres.sh: PostgreSQL is not installed and cannot be installed here (needs apt-get as root)" >&2
        exit 1
    fi
    echo "postgres.sh: installing postgresql with apt-get …" >&2
    $SUDO apt-get update -qq >&2
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
    BIN=$(find_bin)
fi

if [ "${1:-}" = stop ]; then
    DIR=${2:?usage: postgres.sh stop DIR}
    as_owner "$BIN/pg_ctl" -D "$DIR/data" -m fast -w stop >&2
    exit 0
fi

DIR=${1:-$(mktemp -d "${TMPDIR:-/tmp}/spellxfer-pg.XXXXXX")}
mkdir -p "$DIR"
if [ "$(id -u)" = 0 ]; then chown postgres "$DIR"; fi

if [ -f "$DIR/port" ] && as_owner "$BIN/pg_ctl" -D "$DIR/data" status >/dev/null 2>&1; then
    PORT=$(cat "$DIR/port")
else
    PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    if [ ! -d "$DIR/data" ]; then
        # --no-sync: a test cluster does not need its files on disk before the server starts
        as_owner "$BIN/initdb" -D "$DIR/data" -U spellxfer -A trust --no-sync >"$DIR/initdb.log" 2>&1 \
            || { cat "$DIR/initdb.log" >&2; exit 1; }
    fi
    # fsync off: a crash loses a test database, nothing else; the socket lives in DIR, not /run
    as_owner "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w -t 60 \
        -o "-h 127.0.0.1 -p $PORT -k $DIR -c fsync=off -c max_connections=200" start >&2 \
        || { cat "$DIR/server.log" >&2; exit 1; }
    echo "$PORT" > "$DIR/port"
    as_owner "$BIN/psql" -h 127.0.0.1 -p "$PORT" -U spellxfer -d postgres -qAt \
        -c "SELECT 1 FROM pg_database WHERE datname = 'spellxfer'" | grep -q 1 \
        || as_owner "$BIN/createdb" -h 127.0.0.1 -p "$PORT" -U spellxfer spellxfer
fi
echo "postgresql+psycopg://spellxfer@127.0.0.1:$PORT/spellxfer"
