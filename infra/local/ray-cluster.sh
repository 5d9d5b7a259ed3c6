#!/usr/bin/env bash
# A real multi-node Ray cluster on one machine: a head and N worker nodes, each a `ray start --block` in
# its own session with its own temp dir, CPU count and object store. `down` stops exactly those sessions
# (never `ray stop`, which kills every Ray process on the machine, other users' and jobs' included).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
    cat <<EOF
Usage: infra/local/ray-cluster.sh up|down|status [options]

  up      start a head node and N worker nodes; prints the cluster address (for --set ray.address=...)
  down    stop the nodes this script started (by their recorded session ids); idempotent
  status  list the nodes and their processes, then \`ray status\`; exit 0 up, 1 degraded, 3 down

Options (up; --dir also for down/status):
  --workers N           worker nodes besides the head (default 2)
  --cpus-per-node C     CPUs each worker node offers Ray (default 1)
  --head-cpus C         CPUs the head offers (default: --cpus-per-node; 0 keeps work off the head)
  --gpus-per-node G     GPUs each node offers (default 0; nodes on one machine would share the same GPUs)
  --object-store-mb M   object store per node, in MiB (default 256; Ray's minimum is 75)
  --port P              the head's GCS port (default 6379)
  --dashboard-port P    the dashboard on 127.0.0.1 (default: a free port)
  --no-dashboard        no dashboard (saves ~0.2 GiB; Ray's State API and job submission need it)
  --dir D               state: pids, logs, address, the nodes' Ray temp dirs (default .infra/local/ray;
                        when D is long, the temp dirs go under /tmp: Ray's socket paths must stay short)
  --timeout S           seconds to wait for each node (default 120)

Authentication is off (RAY_AUTH_MODE=disabled). Ray binds the node's network address, not loopback (it
replaces 127.0.0.1 by it): use this only on a machine whose network you trust.
EOF
}

command=${1:-}
[[ $command == -h || $command == --help ]] && { usage; exit 0; }
[[ $command =~ ^(up|down|status)$ ]] || { echo "error: expected up, down or status, got '$command'" >&2; usage >&2; exit 2; }
shift
workers=2 cpus=1 head_cpus="" gpus=0 object_store_mb=256 port=6379 dashboard_port="" dashboard=true
dir="$ROOT/.infra/local/ray" timeout=120
while [[ $# -gt 0 ]]; do
    case $1 in
        --workers) workers=${2:?--workers needs a value}; shift 2 ;;
        --cpus-per-node) cpus=${2:?--cpus-per-node needs a value}; shift 2 ;;
        --head-cpus) head_cpus=${2:?--head-cpus needs a value}; shift 2 ;;
        --gpus-per-node) gpus=${2:?--gpus-per-node needs a value}; shift 2 ;;
        --object-store-mb) object_store_mb=${2:?--object-store-mb needs a value}; shift 2 ;;
        --port) port=${2:?--port needs a value}; shift 2 ;;
        --dashboard-port) dashboard_port=${2:?--dashboard-port needs a value}; shift 2 ;;
        --no-dashboard) dashboard=false; shift ;;
        --dir) dir=${2:?--dir needs a value}; shift 2 ;;
        --timeout) timeout=${2:?--timeout needs a value}; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "error: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
done
for value in "$workers" "$cpus" "$gpus" "$object_store_mb" "$port" "$timeout" ${head_cpus:+"$head_cpus"} \
             ${dashboard_port:+"$dashboard_port"}; do
    [[ $value =~ ^[0-9]+$ ]] || die "expected a whole number, got '$value'"
done
((object_store_mb >= 75)) || die "--object-store-mb $object_store_mb: Ray needs at least 75"
head_cpus=${head_cpus:-$cpus}
dir=$(absolute "$dir")
dir_option=""
[[ $dir == "$ROOT/.infra/local/ray" ]] || dir_option=" --dir $dir"
PIDS="$dir/pids"          # one line per node: name pid start-time (the session it leads)
ADDRESS_FILE="$dir/address"
TEMP_ROOT_FILE="$dir/temp_root"  # where the nodes' Ray temp dirs are: $dir, or under /tmp if $dir is long

# The nodes' environment: no token auth (local cluster), no usage stats, no drain on SIGTERM (Ray waits
# up to 30 s by default for a node's work to move elsewhere, for Serve; `down` stops every node anyway).
# RAY_ADDRESS (set in up) reaches every worker process: code there that looks for "the" local cluster
# (Ray Train's placement-group cleaner asks the State API) must find this one, not fail when another Ray
# runs on the machine ("Found multiple active Ray instances").
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-0}

node_alive() { [[ -n $(session_members "$2" "$3") ]]; }  # node_alive NAME PID START

any_alive() {
    local name pid start
    [[ -f $PIDS ]] || return 1
    while read -r name pid start; do
        node_alive "$name" "$pid" "$start" && return 0
    done <"$PIDS"
    return 1
}

down() {
    local name pid start left
    if [[ ! -f $PIDS ]]; then
        note "no Ray cluster recorded in $dir: nothing to stop"
        return 0
    fi
    # Worker nodes first (the file lists the head first): a head that goes first leaves them retrying.
    while read -r name pid start; do
        stop_members "ray node $name" 60 "$pid" session_members "$pid" "$start"
    done < <(tac "$PIDS")
    left=$(strays "$(cat "$TEMP_ROOT_FILE" 2>/dev/null || echo "$dir")/")
    rm -f "$PIDS" "$ADDRESS_FILE"
    if [[ -n $left ]]; then
        die "processes outside the stopped sessions still name our node dirs (not signalled: they may not be ours):
$left"
    fi
    note "Ray cluster in $dir stopped"
}

status() {
    local name pid start members state=3 alive=0 total=0
    if [[ ! -f $PIDS ]]; then
        note "no Ray cluster recorded in $dir"
        return 3
    fi
    while read -r name pid start; do
        total=$((total + 1))
        members=$(session_members "$pid" "$start" | wc -l)
        ((members > 0)) && alive=$((alive + 1))
        note "$(printf '%-10s session %-8s %s process(es)' "$name" "$pid" "$members")"
    done <"$PIDS"
    ((alive == total)) && state=0
    ((alive > 0 && alive < total)) && state=1
    if ((alive > 0)); then
        cat "$ADDRESS_FILE"
        "$RAY" status --address "$(cat "$ADDRESS_FILE")" >&2 || true
    fi
    return $state
}

# start_node NAME RAY-START-ARGS...: launch one node in its own session and record it.
start_node() {
    local name=$1 temp record
    temp="$(cat "$TEMP_ROOT_FILE")/$1"
    shift
    mkdir -p "$temp" "$dir/logs"
    record=$(launch "$dir/logs/$name.log" "$RAY" start --block --temp-dir "$temp" --disable-usage-stats \
        --object-store-memory $((object_store_mb * 1024 * 1024)) --num-gpus "$gpus" \
        --dashboard-agent-listen-port 0 --min-worker-port 0 --max-worker-port 0 "$@")
    echo "$name $record" >>"$PIDS"
    note "ray node $name: session $(cut -d' ' -f1 <<<"$record"), log $dir/logs/$name.log"
}

wait_node() {  # wait_node NAME: until its `ray start` says the node runs
    local name=$1 pid start
    read -r _ pid start < <(grep "^$name " "$PIDS")
    # printed once the node runs and (head) its address file is written
    wait_for_log "$dir/logs/$name.log" "will now block forever" "$pid" "$start" "$timeout" ||
        die "ray node $name did not start (log above: $dir/logs/$name.log)"
}

alive_nodes() {  # the count of ALIVE nodes Ray's GCS reports
    "$RAY" status --address "$1" 2>/dev/null | sed -n '/^Active:/,/^Pending:/p' | grep -c ' node_' || true
}

up() {
    if any_alive; then
        note "a Ray cluster from $dir is already running (\`$0 down$dir_option\` first to change it):"
        cat "$ADDRESS_FILE"
        return 0
    fi
    rm -f "$PIDS" "$ADDRESS_FILE"
    # Ray puts sockets at <temp dir>/session_<date>_<time>_<micro>_<pid>/sockets/plasma_store, and a socket
    # path must stay below 108 characters: node temp dirs of up to 43 characters are safe.
    local temp_root=$dir
    if ((${#dir} + ${#workers} + 8 > 43)); then
        temp_root="/tmp/fssmeta-ray-$(id -u)-$(cksum <<<"$dir" | cut -d' ' -f1)"
        note "$dir is too long for Ray's socket paths: the nodes' temp dirs go to $temp_root"
    fi
    mkdir -p "$dir"
    echo "$temp_root" >"$TEMP_ROOT_FILE"
    port_in_use "$port" && die "port $port is in use (another Ray head?); pass --port with a free one"
    local client_port extra=() address i
    client_port=$(free_port)
    if [[ $dashboard == true ]]; then
        dashboard_port=${dashboard_port:-$(free_port)}
        extra=(--include-dashboard true --dashboard-host 127.0.0.1 --dashboard-port "$dashboard_port")
    else
        # Even without the dashboard Ray runs its minimal head on --dashboard-port (8265 by default,
        # no retries): give it a free port so two clusters on one machine do not collide.
        extra=(--include-dashboard false --dashboard-port "${dashboard_port:-$(free_port)}")
    fi
    export RAY_ADDRESS="127.0.0.1:$port"  # Ray resolves 127.0.0.1 to the node's address
    trap 'note "up failed: stopping the nodes it started"; down' EXIT
    start_node head --head --port "$port" --num-cpus "$head_cpus" --ray-client-server-port "$client_port" \
        "${extra[@]}"
    wait_node head
    address=$(cat "$temp_root/head/ray_current_cluster")
    echo "$address" >"$ADDRESS_FILE"
    for ((i = 1; i <= workers; i++)); do
        start_node "worker-$i" --address "$address" --num-cpus "$cpus"
    done
    for ((i = 1; i <= workers; i++)); do
        wait_node "worker-$i"
    done
    local deadline=$((SECONDS + timeout))
    until [[ $(alive_nodes "$address") -eq $((workers + 1)) ]]; do
        ((SECONDS < deadline)) || die "the cluster at $address did not report $((workers + 1)) alive nodes"
        sleep 1
    done
    trap - EXIT
    note "Ray cluster up: head ($head_cpus CPU) + $workers worker node(s) ($cpus CPU each) at $address"
    [[ $dashboard == true ]] && note "dashboard: http://127.0.0.1:$dashboard_port"
    note "train on it:  fssmeta train --ray --set ray.address=$address --set ray.num_workers=N"
    note "stop it:      $0 down$dir_option"
    echo "$address"
}

RAY=$(find_tool ray "${RAY_BIN:-}")
PYTHON=$(find_tool python3 "${PYTHON_BIN:-}")
case $command in
    up) up ;;
    down) down ;;
    status) status ;;
esac
