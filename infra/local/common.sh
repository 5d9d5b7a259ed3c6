# shellcheck shell=bash
# Sourced by ray-cluster.sh and mlflow-server.sh: messages, tool lookup, free ports, and the process
# bookkeeping that lets `down` stop exactly the processes `up` started and nothing else.
#
# Every service is started as the leader of a new session (`setsid`). Whatever it spawns (Ray's
# gcs_server, raylet, agents and `ray::` workers, re-parented to init or not; uvicorn's workers;
# PostgreSQL's backends) inherits that session id, so "the processes of this service" is exactly "the
# processes whose session id is the leader's pid". The leader's start time is recorded too: a pid number
# is only reused once no process holds it as a session id, so a live pid with another start time means
# the session has ended and that number now belongs to someone else.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

die() { echo "error: $*" >&2; exit 1; }
note() { echo "$*" >&2; }  # narrative on stderr: stdout carries only the address, for $(...)

# find_tool NAME [OVERRIDE]: OVERRIDE if given, else the project's .venv/bin/NAME, else NAME on PATH.
find_tool() {
    local name=$1 override=${2:-}
    if [[ -n $override ]]; then
        command -v "$override" >/dev/null || die "$override (for $name) is not an executable"
        command -v "$override"
    elif [[ -x $ROOT/.venv/bin/$name ]]; then
        echo "$ROOT/.venv/bin/$name"
    elif command -v "$name" >/dev/null; then
        command -v "$name"
    else
        die "$name not found: run \`make setup\` (creates .venv) or put $name on PATH"
    fi
}

# free_port: a TCP port nothing listens on right now (the kernel's pick).
free_port() {
    "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

port_in_use() {
    "$PYTHON" -c 'import socket, sys; s = socket.socket(); sys.exit(s.connect_ex(("127.0.0.1", int(sys.argv[1]))) != 0)' "$1"
}

absolute() { realpath -m -- "$1"; }

# proc_fields PID: /proc/PID/stat after the command name (which may hold spaces and parentheses):
# index 0 state, 1 ppid, 2 process group, 3 session id, 19 start time (clock ticks since boot).
proc_fields() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    echo "${stat##*) }"
}

start_time() {
    local stat
    local -a fields
    stat=$(proc_fields "$1") || return 1
    read -r -a fields <<<"$stat"
    echo "${fields[19]}"
}

# session_members SID START: the live (not zombie) processes of the session SID led by a process that
# started at START. Prints nothing once that session is gone, even if the number SID is reused.
session_members() {
    local sid=$1 start=$2 stat pid
    local -a fields
    if [[ -e /proc/$sid ]] && [[ $(start_time "$sid" || true) != "$start" ]]; then
        return 0  # the leader's pid now belongs to another process: the session ended
    fi
    for stat in /proc/[0-9]*/stat; do
        pid=${stat#/proc/}
        pid=${pid%/stat}
        stat=$(proc_fields "$pid") || continue
        read -r -a fields <<<"$stat"
        if [[ ${fields[3]:-} == "$sid" && ${fields[0]} != Z ]]; then
            echo "$pid"
        fi
    done
}

# launch LOG CMD...: start CMD as the leader of a new session, stdout+stderr to LOG; prints "PID START".
launch() {
    local log=$1 pid
    shift
    # A background job of a non-interactive shell is no process-group leader, so setsid(1) calls setsid()
    # and execs CMD in place: $! is CMD's pid and its session id. Checked below rather than assumed.
    setsid "$@" >"$log" 2>&1 </dev/null &
    pid=$!
    local stat tries=0
    local -a fields
    while :; do  # until the forked shell has become setsid and called setsid()
        stat=$(proc_fields "$pid") || die "$1 exited at once; see $log"
        read -r -a fields <<<"$stat"
        [[ ${fields[3]} == "$pid" ]] && break
        ((++tries < 50)) || die "$1 (pid $pid) did not become a session leader (job control on?)"
        sleep 0.1
    done
    echo "$pid ${fields[19]}"
}

wait_until_gone() {  # wait_until_gone SECONDS MEMBERS-CMD...: 0 once MEMBERS-CMD prints no pid
    local deadline=$((SECONDS + $1))
    shift
    while [[ -n $("$@") ]]; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

# stop_members LABEL GRACE FIRST MEMBERS-CMD...: stop the processes MEMBERS-CMD lists (run again at every
# step, so only current members are ever signalled). FIRST says how to ask them to stop: a pid (SIGTERM
# to that leader alone, which stops its own children, as `ray start --block` does), `all` (SIGTERM to
# every member) or `asked` (the caller has already asked, e.g. `pg_ctl stop`). After GRACE seconds,
# SIGTERM and then SIGKILL to whatever is left.
stop_members() {
    local label=$1 grace=$2 first=$3 members signal
    shift 3
    members=$("$@")
    if [[ -z $members ]]; then
        if [[ $first == asked ]]; then note "$label: stopped"; else note "$label: not running"; fi
        return 0
    fi
    note "$label: stopping $(wc -l <<<"$members") process(es)"
    if [[ $first =~ ^[0-9]+$ ]] && grep -qx "$first" <<<"$members"; then
        kill -TERM "$first" 2>/dev/null || true
    elif [[ $first != asked ]]; then
        # shellcheck disable=SC2086  # one pid per word
        kill -TERM $members 2>/dev/null || true
    fi
    wait_until_gone "$grace" "$@" && return 0
    for signal in TERM KILL; do
        members=$("$@")
        [[ -z $members ]] && return 0
        note "$label: still running after ${grace}s, SIG$signal to: $(tr '\n' ' ' <<<"$members")"
        # shellcheck disable=SC2086
        kill -"$signal" $members 2>/dev/null || true
        wait_until_gone 10 "$@" && return 0
    done
    die "$label: processes survived SIGKILL: $("$@" | tr '\n' ' ')"
}

# strays PATTERN: processes outside our sessions whose command line contains PATTERN (a state folder of
# ours), other than this script and its callers. They are reported, never signalled: a command line
# naming our folder does not prove a process is ours (think `tail -f` on one of our logs).
strays() {
    local pattern=$1 file pid ancestors=" " p=$$
    while [[ $p -gt 1 ]]; do
        ancestors+="$p "
        p=$(proc_fields "$p" | cut -d' ' -f2) || break
    done
    # Listed before grep starts, so grep (whose own command line holds the pattern) is not among them.
    local -a files=(/proc/[0-9]*/cmdline)
    # -a: command lines are NUL-separated arguments, which grep would call binary
    while read -r file; do
        pid=${file#/proc/}
        pid=${pid%/cmdline}
        [[ $ancestors == *" $pid "* || $pid == "$BASHPID" ]] && continue
        echo "$pid $(tr '\0' ' ' <"$file" 2>/dev/null | cut -c1-160)"
    done < <(grep -lsaF -- "$pattern" "${files[@]}" || true)
    return 0
}

# wait_for_log LOG TEXT SID START SECONDS: until LOG holds TEXT; fails early when the session ends.
wait_for_log() {
    local log=$1 text=$2 sid=$3 start=$4 deadline=$(($5 + SECONDS))
    until grep -qF -- "$text" "$log" 2>/dev/null; do
        [[ -n $(session_members "$sid" "$start") ]] || { tail -n 30 "$log" >&2; return 1; }
        ((SECONDS < deadline)) || { tail -n 30 "$log" >&2; return 1; }
        sleep 0.5
    done
}
