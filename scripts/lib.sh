# What the measurement scripts (bench.sh, callgrind.sh, latency-path.sh,
# config-memory.sh) share. Sourced from the repository's root, after
# `set -euo pipefail`; SCRIPT names the caller in its messages.

# The release binaries: DETOUR (another build with DETOUR=path) and the load
# generator, built unless NO_BUILD is set.
release_binaries() {
    DETOUR=${DETOUR:-target/release/detour}
    LOADGEN=${LOADGEN:-target/release/examples/loadgen}
    if [[ -z "${NO_BUILD:-}" ]]; then
        cargo build --release --examples --bins
    fi
}

# A scratch directory, TMP, and the processes started into PIDS, all stopped
# (and the directory removed) when the script exits, Ctrl-C included. A
# script that defines `before_cleanup` has it run first (to keep files).
scratch_and_cleanup() {
    TMP=$(mktemp -d)
    PIDS=()
    trap cleanup EXIT
    trap 'exit 130' INT TERM
}

cleanup() {
    local pid
    if declare -F before_cleanup >/dev/null; then before_cleanup || true; fi
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$TMP"
}

# start_mock VAR FLAVOR: `$DETOUR mock --flavor FLAVOR --seed 1` on a free port,
# which it puts in VAR, stopped with the script (PIDS); returns once it listens.
# Its log: $TMP/mock-FLAVOR.log.
start_mock() {
    local -n port_out=$1
    port_out=$(free_port)
    "$DETOUR" mock --flavor "$2" --listen "127.0.0.1:$port_out" --seed 1 >"$TMP/mock-$2.log" 2>&1 &
    PIDS+=($!)
    wait_port "$port_out"
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Waits up to a minute for something to listen on 127.0.0.1:PORT.
wait_port() {
    local port=$1 i
    for i in $(seq 600); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "$SCRIPT: nothing listens on $port" >&2
    exit 1
}

# NGINX: the native floor, Debian's nginx-light, installed when missing. Its
# package would start the system service; a policy-rc.d that refuses keeps it
# stopped (the scripts run their own instance and never touch the system one).
ensure_nginx() {
    NGINX=$(command -v nginx || echo /usr/sbin/nginx)
    [[ -x "$NGINX" ]] && return 0
    echo "$SCRIPT: installing nginx-light (the native floor)" >&2
    local sudo="" policy_added=""
    [[ "$(id -u)" -eq 0 ]] || sudo="sudo"
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' | $sudo tee /usr/sbin/policy-rc.d >/dev/null
        $sudo chmod 755 /usr/sbin/policy-rc.d
        policy_added=1
    fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq nginx-light >/dev/null
    if [[ -n "$policy_added" ]]; then $sudo rm -f /usr/sbin/policy-rc.d; fi
    NGINX=$(command -v nginx || echo /usr/sbin/nginx)
}
