#!/usr/bin/env bash
# Instructions on a request's latency path: what detour runs between reading
# the client's request and writing its answer, beside nginx's for the same
# proxying, counted by valgrind's callgrind, and the L1 cache misses they
# make in callgrind's simulated caches. Work after the answer's write (the log
# line, metrics) does not delay the client; work on the path runs on cold
# caches. Sessions 11-13 found the added p50 at a low rate following the
# instructions (about 1 us per 1,000); session 14 cut 5.7k of them without
# moving it, and found the gap to nginx in line with the misses instead
# (BENCHMARKS.md "Session 14"): the misses are the figure to cut. Not a timed
# test, and not in CI.
#
# Each proxy runs under callgrind with a dump at every socket read and
# write of its worker thread (--dump-after=recv*, --dump-before=writev,
# --dump-before=write, --separate-threads=yes). One connection sends
# non-streamed requests at 50 per second (each one arrives at an idle
# proxy, as at 500 req/s on 32 connections); each request then cuts into:
#
#   request   the client's request read -> the request written to the mock
#   wait      that write -> the mock's answer read (the rest of the poll, the
#             park, the wake-up and the poll back down to the read)
#   answer    the answer read -> the answer written to the client
#   after     the answer written -> the next request read (deferred work:
#             log line, metrics; then the park)
#
# "before the write" is request + wait + answer. "L1 miss I / D" is the
# instruction and the data (read and write) L1 misses before the write, in
# caches that stay warm between requests: the lines the path needs beyond
# what L1 holds, a floor for what a cold core fetches. Medians per request.
#
# Usage: scripts/latency-path.sh     (about 1 minute)
# Knobs: NO_BUILD=1 DETOUR=path RATE=50 DURATION=4 KEEP_DUMPS=dir
set -euo pipefail
cd "$(dirname "$0")/.."
SCRIPT=latency-path
source scripts/lib.sh

RATE=${RATE:-50}
DURATION=${DURATION:-4}
for tool in valgrind callgrind_control python3 jq; do
    command -v "$tool" >/dev/null || { echo "latency-path: $tool is required" >&2; exit 1; }
done
ensure_nginx
release_binaries
scratch_and_cleanup
before_cleanup() {
    if [[ -n "${KEEP_DUMPS:-}" ]]; then
        mkdir -p "$KEEP_DUMPS" && cp -r "$TMP"/dumps-* "$KEEP_DUMPS"/ 2>/dev/null
    fi
}

start_mock MOCK_PORT openai

# Dumps go beside the config's directory, never into it: the config watcher
# would wake for each dump file written.
mkdir -p "$TMP/conf" "$TMP/dumps-detour" "$TMP/dumps-nginx" "$TMP/nginx"
DETOUR_PORT=$(free_port)
cat >"$TMP/conf/detour.toml" <<EOF
[server]
listen = "127.0.0.1:$DETOUR_PORT"

[[providers]]
name = "openai"
kind = "openai"
base_url = "http://127.0.0.1:$MOCK_PORT/v1"

[[routes]]
model = "bench"
targets = [{ provider = "openai", model = "gpt-4o-mini" }]
EOF

NGINX_PORT=$(free_port)
cat >"$TMP/nginx/nginx.conf" <<EOF
daemon off;
master_process off;
worker_processes 1;
pid $TMP/nginx/nginx.pid;
error_log $TMP/nginx/error.log warn;
events { worker_connections 1024; }
http {
    access_log $TMP/nginx/access.log;
    client_body_temp_path $TMP/nginx/body;
    proxy_temp_path $TMP/nginx/proxy;
    fastcgi_temp_path $TMP/nginx/fastcgi;
    uwsgi_temp_path $TMP/nginx/uwsgi;
    scgi_temp_path $TMP/nginx/scgi;
    upstream mock { server 127.0.0.1:$MOCK_PORT; keepalive 16; }
    server {
        listen 127.0.0.1:$NGINX_PORT;
        location / { proxy_pass http://mock; proxy_http_version 1.1; proxy_set_header Connection ""; proxy_buffering off; }
    }
}
EOF

# measure NAME PORT MODEL COMMAND...: runs COMMAND under callgrind, loads it,
# prints its row.
measure() {
    local name=$1 port=$2 model=$3
    shift 3
    local dumps="$TMP/dumps-$name"
    RUST_LOG=info valgrind --tool=callgrind --cache-sim=yes --instr-atstart=no --separate-threads=yes \
        --dump-after='recv*' --dump-before=writev --dump-before=write \
        --callgrind-out-file="$dumps/cg" "$@" >"$TMP/$name.log" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    wait_port "$port"
    local url="http://127.0.0.1:$port/v1/chat/completions" body
    body="{\"model\":\"$model\",\"messages\":[{\"role\":\"user\",\"content\":\"hello\"}]}"
    for _ in $(seq 50); do
        curl -sf -o /dev/null "$url" -H 'content-type: application/json' -d "$body" || true
    done
    callgrind_control -i on "$pid" >/dev/null 2>&1
    local line
    line=$("$LOADGEN" --url "$url" --model "$model" --connections 1 --rate "$RATE" \
        --duration "$DURATION" --warmup 0 --threads 1 --label "$name")
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    python3 - "$dumps" "$name" "$(jq -r .requests_total <<<"$line")" "$(jq -r .errors <<<"$line")" <<'PY'
import glob, os, re, statistics, sys
dumps, name, requests, errors = sys.argv[1:]
# The thread that served the requests wrote the most dumps: cg.<part>-<thread>.
parts = {}
for path in glob.glob(os.path.join(dumps, "cg.*-*")):
    m = re.search(r"cg\.(\d+)-(\d+)$", path)
    if m:
        parts.setdefault(m.group(2), []).append((int(m.group(1)), path))
thread = max(parts, key=lambda t: len(parts[t]))
seq = []
for _, path in sorted(parts[thread]):
    trigger = total = None
    with open(path) as f:
        for line in f:
            if line.startswith("desc: Trigger:"):
                trigger = line.split("--dump-", 1)[-1].strip()
            elif line.startswith("totals:"):
                # Ir Dr Dw I1mr D1mr D1mw ILmr DLmr DLmw; trailing zeros
                # are left out.
                counts = [int(x) for x in line.split()[1:]] + [0] * 9
                total = (counts[0], counts[3], counts[4] + counts[5])
                break
    if trigger and total is not None:
        seq.append((trigger, total))
# A request: a read of the client's request ends one interval, then a
# write (to the mock), a read (its answer), a write (to the client), any
# writes after that (nginx's access log), and the next request's read.
rows = []
i = 0
while i < len(seq) and not seq[i][0].startswith("after=recv"):
    i += 1
while i + 4 < len(seq):
    a, p, b = seq[i + 1], seq[i + 2], seq[i + 3]
    if not (a[0] == "before=writev" and p[0].startswith("after=recv") and b[0] == "before=writev"):
        i += 1
        continue
    j, after = i + 4, 0
    while j < len(seq) and not seq[j][0].startswith("after=recv"):
        after += seq[j][1][0]
        j += 1
    if j == len(seq):
        break
    rows.append((a[1], p[1], b[1], after + seq[j][1][0]))
    i = j
if len(rows) < 20:
    sys.exit(f"latency-path: only {len(rows)} whole requests in {name}'s dumps")
rows = rows[5:-5]
med = [statistics.median(r[k][0] for r in rows) for k in range(3)]
after = statistics.median(r[3] for r in rows)
# L1 misses before the write, instruction and data (simulated caches).
i1, d1 = (statistics.median(sum(r[k][m] for k in range(3)) for r in rows) for m in (1, 2))
print(f"{name:<8} {requests:>4} requests ({errors} errors)  {med[0]:>8,.0f} {med[1]:>8,.0f} {med[2]:>8,.0f}  {sum(med):>10,.0f}  {after:>8,.0f}  {i1:>6,.0f} {d1:>6,.0f}")
PY
}

echo "detour: $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD 2>/dev/null || echo ' (uncommitted changes)'), $(valgrind --version), non-streamed, $RATE req/s on one connection"
echo
printf '%-8s %-24s  %8s %8s %8s  %10s  %8s  %13s\n' "" "" request wait answer "before write" after "L1 miss I / D"
measure detour "$DETOUR_PORT" bench "$DETOUR" serve --config "$TMP/conf/detour.toml"
measure nginx "$NGINX_PORT" gpt-4o-mini "$NGINX" -p "$TMP/nginx" -c "$TMP/nginx/nginx.conf"
