#!/usr/bin/env bash
# The team's MLflow tracking server, locally: a PostgreSQL backend store (Debian's `postgresql`, installed
# with apt-get when missing, initialised into a project-local data dir) and a shared artifact folder the
# server proxies (`mlflow-artifacts:/`), on 127.0.0.1. `down` stops exactly what `up` started.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
    cat <<EOF
Usage: infra/local/mlflow-server.sh up|down|status [options]

  up      install PostgreSQL if missing (apt-get, as root), initialise its data dir once, start it and
          the MLflow server; prints the tracking URI (for --set mlflow.tracking_uri=...)
  down    stop the MLflow server and PostgreSQL started from --dir (data is kept); idempotent
  status  say what runs and whether /health answers; exit 0 up, 1 degraded, 3 down

Options (up; --dir also for down/status):
  --port P        the MLflow server's port on 127.0.0.1 (default 5000)
  --pg-port P     PostgreSQL's port on 127.0.0.1 (default: chosen once, then kept in --dir)
  --workers W     MLflow server worker processes (default 1)
  --dir D         state: postgres/ (data), artifacts/ (the artifact root), logs/, pids
                  (default .infra/local/mlflow); every parent folder must be searchable by the
                  postgres user when run as root
  --timeout S     seconds to wait for each service (default 120)

Environment: PG_BIN (PostgreSQL's bin folder; default the newest /usr/lib/postgresql/*/bin),
MLFLOW_BIN (default .venv/bin/mlflow).
EOF
}

command=${1:-}
[[ $command == -h || $command == --help ]] && { usage; exit 0; }
[[ $command =~ ^(up|down|status)$ ]] || { echo "error: expected up, down or status, got '$command'" >&2; usage >&2; exit 2; }
shift
port=5000 pg_port="" workers=1 dir="$ROOT/.infra/local/mlflow" timeout=120
while [[ $# -gt 0 ]]; do
    case $1 in
        --port) port=${2:?--port needs a value}; shift 2 ;;
        --pg-port) pg_port=${2:?--pg-port needs a value}; shift 2 ;;
        --workers) workers=${2:?--workers needs a value}; shift 2 ;;
        --dir) dir=${2:?--dir needs a value}; shift 2 ;;
        --timeout) timeout=${2:?--timeout needs a value}; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "error: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
done
for value in "$port" "$workers" "$timeout" ${pg_port:+"$pg_port"}; do
    [[ $value =~ ^[0-9]+$ ]] || die "expected a whole number, got '$value'"
done
dir=$(absolute "$dir")
dir_option=""
[[ $dir == "$ROOT/.infra/local/mlflow" ]] || dir_option=" --dir $dir"
DATA="$dir/postgres"      # PostgreSQL's data dir; its unix socket lives here too
ARTIFACTS="$dir/artifacts"
PIDS="$dir/pids"          # name pid start-time: the postmaster, and the MLflow server's session leader
PGPASS="$dir/pgpass"      # the mlflow role's password, for libpq (never on a command line)
URL_FILE="$dir/url"
# Postgres names its processes "postgres: <cluster_name>: ...": a name of our own makes them findable.
CLUSTER_NAME="fssmeta-mlflow-$(cksum <<<"$dir" | cut -d' ' -f1)"
DB=mlflow DB_USER=mlflow

# PostgreSQL refuses to run as root: as root it runs as the `postgres` user the Debian package creates.
if [[ $EUID -eq 0 ]]; then PG_USER=postgres; else PG_USER=$(id -un); fi
as_pg() {
    if [[ $EUID -eq 0 ]]; then runuser -u "$PG_USER" -- "$@"; else "$@"; fi
}

record() { awk -v n="$1" '$1 == n {print $2, $3}' "$PIDS" 2>/dev/null || true; }  # record NAME: "pid start"

postgres_members() {  # the postmaster we started and its children (each backend is its own session)
    local pid start stat ppid
    local -a fields
    read -r pid start <<<"$(record postgres)"
    [[ -n $pid ]] && stat=$(proc_fields "$pid") || return 0
    read -r -a fields <<<"$stat"
    [[ ${fields[19]} == "$start" && ${fields[0]} != Z ]] || return 0
    echo "$pid"
    for stat in /proc/[0-9]*/stat; do
        ppid=${stat#/proc/}
        ppid=${ppid%/stat}
        stat=$(proc_fields "$ppid") || continue
        read -r -a fields <<<"$stat"
        [[ ${fields[1]} == "$pid" && ${fields[0]} != Z ]] && echo "$ppid"
    done
    return 0
}

mlflow_members() {
    local pid start
    read -r pid start <<<"$(record mlflow)"
    [[ -n $pid ]] && session_members "$pid" "$start"
    return 0
}

find_postgres() {  # sets PG_BIN; installs Debian's postgresql when it is missing and we are root
    if [[ -n ${PG_BIN:-} ]]; then
        [[ -x $PG_BIN/initdb ]] || die "PG_BIN=$PG_BIN holds no initdb"
        return
    fi
    PG_BIN=$(find /usr/lib/postgresql -path '*/bin/initdb' 2>/dev/null | sort -V | tail -n 1 | xargs -r dirname)
    if [[ -z $PG_BIN ]]; then
        if [[ $EUID -ne 0 ]] || ! command -v apt-get >/dev/null; then
            die "PostgreSQL is not installed: run \`sudo apt-get install postgresql\` (or set PG_BIN)"
        fi
        note "installing PostgreSQL (apt-get install postgresql)"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >&2
        PG_BIN=$(find /usr/lib/postgresql -path '*/bin/initdb' | sort -V | tail -n 1 | xargs -r dirname)
        [[ -n $PG_BIN ]] || die "apt-get installed postgresql, but no /usr/lib/postgresql/*/bin/initdb"
    fi
    id "$PG_USER" >/dev/null 2>&1 || die "no user $PG_USER to run PostgreSQL as (the postgresql package creates it)"
}

init_postgres() {  # once: the data dir, owned by the PostgreSQL user, and the password file
    [[ -f $DATA/PG_VERSION ]] && return 0
    note "initialising PostgreSQL in $DATA"
    mkdir -p "$DATA"
    chmod 700 "$DATA"
    [[ $EUID -eq 0 ]] && chown "$PG_USER:" "$DATA"
    as_pg test -w "$DATA" ||
        die "$PG_USER cannot write $DATA: every parent folder must be searchable by it (chmod o+x), or pass --dir elsewhere"
    # peer: local socket logins as the OS user (our admin commands); scram: TCP logins with a password (MLflow)
    as_pg "$PG_BIN/initdb" -D "$DATA" -U "$PG_USER" --auth-local=peer --auth-host=scram-sha-256 \
        --encoding=UTF8 --locale=C >"$dir/logs/initdb.log" 2>&1 ||
        { tail -n 20 "$dir/logs/initdb.log" >&2; die "initdb failed; see $dir/logs/initdb.log"; }
}

start_postgres() {
    local log="$dir/logs/postgres.log" pid
    touch "$log"
    [[ $EUID -eq 0 ]] && chown "$PG_USER:" "$log"
    # pg_ctl starts the postmaster in a session of its own and waits until it accepts connections.
    as_pg "$PG_BIN/pg_ctl" -D "$DATA" -l "$log" -w -t "$timeout" \
        -o "-p $pg_port -k '$DATA' -c listen_addresses=127.0.0.1 -c cluster_name=$CLUSTER_NAME" start >&2 ||
        { tail -n 20 "$log" >&2; die "PostgreSQL did not start; see $log"; }
    pid=$(head -n 1 "$DATA/postmaster.pid")
    echo "postgres $pid $(start_time "$pid")" >>"$PIDS"
}

create_database() {  # idempotent: the mlflow role (its password from $PGPASS) and database
    local password
    password=$(cut -d: -f5 "$PGPASS")
    as_pg "$PG_BIN/psql" -h "$DATA" -p "$pg_port" -U "$PG_USER" -d postgres -v ON_ERROR_STOP=1 -qtA >&2 <<SQL
SELECT 'CREATE ROLE $DB_USER LOGIN' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$DB_USER')\\gexec
ALTER ROLE $DB_USER PASSWORD '$password';
SELECT 'CREATE DATABASE $DB OWNER $DB_USER' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '$DB')\\gexec
SQL
}

healthy() { "$PYTHON" - "$1" <<'EOF'
import sys, urllib.request
try:
    sys.exit(urllib.request.urlopen(sys.argv[1] + "/health", timeout=5).read().strip() != b"OK")
except OSError:
    sys.exit(1)
EOF
}

start_mlflow() {
    local url="http://127.0.0.1:$port" record pid start deadline
    "$(dirname "$MLFLOW")/python" -c 'import psycopg2' 2>/dev/null ||
        die "psycopg2 is missing next to $MLFLOW: pip install -c constraints.txt psycopg2-binary"
    mkdir -p "$ARTIFACTS"
    # No job-execution workers (0.45 GiB instead of 1.6), no telemetry; libpq reads the password file.
    record=$(MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false MLFLOW_DISABLE_TELEMETRY=true PGPASSFILE="$PGPASS" \
        launch "$dir/logs/mlflow.log" "$MLFLOW" server \
        --backend-store-uri "postgresql+psycopg2://$DB_USER@127.0.0.1:$pg_port/$DB" \
        --artifacts-destination "$ARTIFACTS" --host 127.0.0.1 --port "$port" --workers "$workers")
    echo "mlflow $record" >>"$PIDS"
    read -r pid start <<<"$record"
    deadline=$((SECONDS + timeout))
    until healthy "$url"; do
        [[ -n $(session_members "$pid" "$start") ]] ||
            { tail -n 30 "$dir/logs/mlflow.log" >&2; die "the MLflow server exited; see $dir/logs/mlflow.log"; }
        ((SECONDS < deadline)) ||
            { tail -n 30 "$dir/logs/mlflow.log" >&2; die "$url/health did not answer within ${timeout}s"; }
        sleep 0.5
    done
    echo "$url" >"$URL_FILE"
}

up() {
    if [[ -n $(mlflow_members) && -n $(postgres_members) && -f $URL_FILE ]]; then
        note "the MLflow server from $dir is already running (\`$0 down --dir $dir\` first to change it):"
        cat "$URL_FILE"
        return 0
    elif [[ -n $(mlflow_members)$(postgres_members) ]]; then
        die "the MLflow server from $dir is partly running; \`$0 down --dir $dir\` first"
    fi
    rm -f "$PIDS" "$URL_FILE"
    mkdir -p "$dir/logs"
    find_postgres
    port_in_use "$port" && die "port $port is in use; pass --port with a free one"
    pg_port=${pg_port:-$(cat "$dir/pg_port" 2>/dev/null || free_port)}
    port_in_use "$pg_port" && die "PostgreSQL's port $pg_port is in use; pass --pg-port with a free one"
    echo "$pg_port" >"$dir/pg_port"
    if [[ ! -f $PGPASS ]]; then
        (umask 077 && echo "127.0.0.1:*:$DB:$DB_USER:$("$PYTHON" -c 'import secrets; print(secrets.token_hex(16))')" >"$PGPASS")
    fi
    init_postgres
    trap 'note "up failed: stopping what it started"; down' EXIT
    start_postgres
    create_database
    start_mlflow
    trap - EXIT
    note "MLflow server up at http://127.0.0.1:$port (backend: PostgreSQL on 127.0.0.1:$pg_port, artifacts: $ARTIFACTS)"
    note "track to it:  fssmeta train --set mlflow.tracking_uri=http://127.0.0.1:$port --set 'mlflow.artifact_location=\"\"'"
    note "stop it:      $0 down$dir_option"
    cat "$URL_FILE"
}

down() {
    local left
    if [[ ! -f $PIDS ]]; then
        note "no MLflow server recorded in $dir: nothing to stop"
        return 0
    fi
    stop_members "mlflow server" 30 all mlflow_members
    if [[ -n $(postgres_members) ]]; then
        find_postgres
        as_pg "$PG_BIN/pg_ctl" -D "$DATA" -m fast -w -t 60 stop >&2 || true  # checked below
    fi
    stop_members "postgres" 30 asked postgres_members
    left=$(strays "$dir/"; strays "postgres: $CLUSTER_NAME:")
    rm -f "$PIDS" "$URL_FILE"
    [[ -z $left ]] || die "processes outside what was stopped still name $dir (not signalled: they may not be ours):
$left"
    note "MLflow server and PostgreSQL from $dir stopped (data kept in $DATA and $ARTIFACTS)"
}

status() {
    local url state=3 running=0
    [[ -n $(postgres_members) ]] && { note "postgres: running (pid $(record postgres | cut -d' ' -f1))"; running=$((running + 1)); }
    [[ -n $(mlflow_members) ]] && { note "mlflow server: running (session $(record mlflow | cut -d' ' -f1))"; running=$((running + 1)); }
    url=$(cat "$URL_FILE" 2>/dev/null || true)
    if ((running == 2)) && [[ -n $url ]] && healthy "$url"; then
        state=0
        echo "$url"
    elif ((running > 0)); then
        state=1
        note "degraded: ${url:-no URL} does not answer /health, or a service is down"
    else
        note "no MLflow server running from $dir"
    fi
    return $state
}

MLFLOW=$(find_tool mlflow "${MLFLOW_BIN:-}")
PYTHON=$(find_tool python3 "${PYTHON_BIN:-}")
case $command in
    up) up ;;
    down) down ;;
    status) status ;;
esac
