#!/usr/bin/env bash
# What the config costs in memory (issue 12 item 5): detour's idle RSS with a
# small config, and with a generated large one (PROVIDERS providers, ROUTES
# routes, KEYS keys each with an rpm limit), then the cost per key. Also the
# per-request cost with each config (loadgen at 64 connections, one key with
# an rpm), so that a large config must stay flat per request.
#
# Usage: scripts/config-memory.sh      (about a minute; NO_BUILD=1 to skip the build)
# Knobs: PROVIDERS=200 ROUTES=2001 KEYS=20000 DURATION=5 MOCK_PORT=18801 DETOUR_PORT=18802 DETOUR=path
set -euo pipefail
cd "$(dirname "$0")/.."
SCRIPT=config-memory
source scripts/lib.sh

PROVIDERS=${PROVIDERS:-200}
ROUTES=${ROUTES:-2001}
KEYS=${KEYS:-20000}
DURATION=${DURATION:-5}
MOCK_PORT=${MOCK_PORT:-18801}
DETOUR_PORT=${DETOUR_PORT:-18802}

release_binaries
scratch_and_cleanup

# The large config: providers p0..pN (all the mock), routes r0..rN over two
# providers each plus "bench", keys k0..kN each with an rpm, and the bench key.
python3 - "$TMP" "$PROVIDERS" "$ROUTES" "$KEYS" "$MOCK_PORT" "$DETOUR_PORT" <<'PY'
import sys
tmp, providers, routes, keys, mock, port = sys.argv[1], *map(int, sys.argv[2:])
head = f'[server]\nlisten = "127.0.0.1:{port}"\n\n'
bench = ('[[providers]]\nname = "mock"\nkind = "openai"\n'
         f'base_url = "http://127.0.0.1:{mock}/v1"\n\n'
         '[[routes]]\nmodel = "bench"\ntargets = [{ provider = "mock", model = "gpt-4o-mini" }]\n\n'
         '[[keys]]\nkey = "bench-key"\ntenant = "bench"\nrpm = 1000000000\n\n')
with open(f"{tmp}/small.toml", "w") as f:
    f.write(head + bench)
def write(name, with_keys):
    with open(f"{tmp}/{name}.toml", "w") as f:
        f.write(head + bench)
        for i in range(providers):
            f.write(f'[[providers]]\nname = "p{i}"\nkind = "openai"\n'
                    f'base_url = "http://127.0.0.1:{mock}/v1"\n\n')
        for i in range(routes - 1):
            a, b = i % providers, (i + 1) % providers
            f.write(f'[[routes]]\nmodel = "r{i}"\ntargets = [{{ provider = "p{a}", model = "m" }}, '
                    f'{{ provider = "p{b}", model = "m" }}]\n\n')
        for i in range(keys if with_keys else 0):
            f.write(f'[[keys]]\nkey = "dk-generated-key-{i:08}"\ntenant = "t{i % 500}"\nrpm = 600\n\n')
write("large", True)
write("nokeys", False)
PY

"$DETOUR" mock --flavor openai --listen "127.0.0.1:$MOCK_PORT" --seed 1 >"$TMP/mock.log" 2>&1 &
PIDS+=($!)

rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }
hwm_kib() { awk '/^VmHWM:/ { print $2 }' "/proc/$1/status"; }
wait_port "$MOCK_PORT"

# measure NAME: idle RSS after start (KiB), req/s at 64 connections, RSS
# after the load, and the peak RSS of loading the config (before the load).
measure() {
    RUST_LOG=info "$DETOUR" serve --config "$TMP/$1.toml" >"$TMP/$1.log" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    wait_port "$DETOUR_PORT"
    sleep 2
    local idle hwm
    idle=$(rss_kib "$pid")
    hwm=$(hwm_kib "$pid")
    local rps
    rps=$("$LOADGEN" --url "http://127.0.0.1:$DETOUR_PORT/v1/chat/completions" --model bench \
        --api-key bench-key --connections 64 --duration "$DURATION" --warmup 1 --threads 1 | jq .rps)
    echo "$1 $idle $rps $(rss_kib "$pid") $hwm"
    kill "$pid"
    wait "$pid" 2>/dev/null || true
}

read -r _ small_idle small_rps small_peak small_hwm < <(measure small)
read -r _ nokeys_idle _ _ nokeys_hwm < <(measure nokeys)
read -r _ large_idle large_rps large_peak large_hwm < <(measure large)
echo "config: $PROVIDERS providers, $ROUTES routes, $KEYS keys with an rpm each ($(wc -c <"$TMP/large.toml") bytes)"
echo "idle RSS: small $((small_idle / 1024)) MiB, providers and routes only $((nokeys_idle / 1024)) MiB, large $((large_idle / 1024)) MiB"
echo "peak RSS while loading: small $((small_hwm / 1024)) MiB, providers and routes only $((nokeys_hwm / 1024)) MiB, large $((large_hwm / 1024)) MiB"
echo "per key (large - providers and routes only): $(((large_idle - nokeys_idle) * 1024 / KEYS)) bytes"
echo "per key (all of the difference counted against the keys): $(((large_idle - small_idle) * 1024 / KEYS)) bytes"
echo "64 conns, key with an rpm: small $small_rps req/s, large $large_rps req/s (RSS after: $((small_peak / 1024)) / $((large_peak / 1024)) MiB)"
