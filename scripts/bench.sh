#!/usr/bin/env bash
# The detour benchmark: one mock upstream, and in front of it the native floor
# (an nginx reverse proxy, Debian's nginx-light, its own instance on a free
# port) and detour. examples/loadgen.rs runs directly against the mock, then
# through nginx, then through detour, back to back, for each scenario:
#
#   non-streamed and streamed  x  {16 conns closed loop, 64 conns closed loop,
#                                  RATE req/s open loop over RATE_CONNS conns}
#   + the failover path: RATE req/s through a detour route whose first target
#     refuses the connection and whose second is the mock
#
# It prints a table (req/s, ratios to direct and to nginx, p50/p99/p99.9,
# added latency over direct, CPU ms per 1,000 requests of nginx and detour,
# detour peak and idle RSS), checks the targets (issue 12), and
# writes the raw JSON lines to bench-results/<timestamp>.jsonl and the summary
# to bench-results/<timestamp>.summary.json. Each scenario runs ROUNDS times;
# the figures are medians over rounds, each round's direct and detour runs paired.
# Results and how to read them: BENCHMARKS.md.
#
# Usage: scripts/bench.sh            (about 6 minutes on a quiet machine, after the
#                                    builds: about 12 more for scripts/pgo.sh)
# Knobs (environment):
#   DURATION=5 WARMUP=1        measured / warm-up seconds per loadgen run
#   ROUNDS=3                   repetitions of the whole set; figures are medians
#   RATE=500 RATE_CONNS=32     the fixed-rate scenarios
#   RUST_LOG=info              detour's log level; its log goes to a file, as in
#                              production (one line per request at info)
#   NGINX_WORKERS=$(nproc)     nginx worker processes (detour uses every core too)
#   NGINX_CPUS=                taskset CPU list for nginx ("" = unpinned, as detour)
#   MOCK_CPUS=1                taskset CPU list for the mock ("" = unpinned)
#   LOADGEN_CPUS=0             taskset CPU list for the load generator ("" = unpinned)
#   DETOUR_CPUS=               taskset CPU list for detour ("" = unpinned, the default)
#   LOADGEN_THREADS=1          loadgen runtime threads
#   BODY_BYTES=                request bodies of about this many bytes (the cost
#                              per request byte, e.g. BODY_BYTES=100000); unset,
#                              a few dozen
#   MOCK_PORT=18791 DETOUR_PORT=18792 NGINX_PORT=18793 DEAD_PORT=18794 (nothing listens)
#   QUIET_PCT=10 QUIET_WAIT=120  before each run, wait up to QUIET_WAIT s for the
#                              machine to be under QUIET_PCT % busy (other jobs
#                              skew results; the table's last column shows them)
#   NOISE_PCT=10               a round whose runs saw other processes use more than
#                              this % of the machine is left out of the medians,
#                              unless no cleaner round exists
#   BUILD=pgo                  the detour measured: pgo, the production build
#                              (scripts/pgo.sh, profile-guided: target/pgo/release/detour),
#                              or plain (`cargo build --release`: target/release/detour)
#   NO_BUILD=1                 skip the builds (`cargo build --release --examples --bins`,
#                              and scripts/pgo.sh for BUILD=pgo)
#   DETOUR=path                the detour binary to measure (overrides BUILD)
#   ONLY=plain-c64,stream-c64  run only these scenarios (names as in the table)
#   MAIN_BENCH=1               the scenarios above (0: only the Redis comparison)
#   REDIS_BENCH=1              then limits on Redis against limits in memory
#                              (issue 11): two more detour processes whose key
#                              has rpm/tpm/max_concurrent, one on its own
#                              redis-server (REDIS_PORT=18795; DETOUR_MEM_PORT=18796,
#                              DETOUR_REDIS_PORT=18797, DETOUR_CONC_PORT=18798),
#                              at RATE req/s and 64 conns
set -euo pipefail
cd "$(dirname "$0")/.."
SCRIPT=bench
source scripts/lib.sh

DURATION=${DURATION:-5}
ROUNDS=${ROUNDS:-3}
WARMUP=${WARMUP:-1}
RATE=${RATE:-500}
RATE_CONNS=${RATE_CONNS:-32}
MOCK_CPUS=${MOCK_CPUS-1}
LOADGEN_CPUS=${LOADGEN_CPUS-0}
DETOUR_CPUS=${DETOUR_CPUS-}
LOADGEN_THREADS=${LOADGEN_THREADS:-1}
QUIET_PCT=${QUIET_PCT:-10}
NOISE_PCT=${NOISE_PCT:-10}
QUIET_WAIT=${QUIET_WAIT:-120}
MOCK_PORT=${MOCK_PORT:-18791}
DETOUR_PORT=${DETOUR_PORT:-18792}
NGINX_PORT=${NGINX_PORT:-18793}
DEAD_PORT=${DEAD_PORT:-18794}
MAIN_BENCH=${MAIN_BENCH:-1}
REDIS_BENCH=${REDIS_BENCH:-1}
REDIS_PORT=${REDIS_PORT:-18795}
DETOUR_MEM_PORT=${DETOUR_MEM_PORT:-18796}
DETOUR_REDIS_PORT=${DETOUR_REDIS_PORT:-18797}
DETOUR_CONC_PORT=${DETOUR_CONC_PORT:-18798}
NGINX_WORKERS=${NGINX_WORKERS:-$(nproc)}
NGINX_CPUS=${NGINX_CPUS-}
DETOUR_LOG=${RUST_LOG:-info}

command -v jq >/dev/null || { echo "bench: jq is required" >&2; exit 1; }

ensure_nginx

if [[ "$REDIS_BENCH" == 1 ]] && ! command -v redis-server >/dev/null; then
    echo "bench: installing redis-server (the shared-limits comparison)" >&2
    sudo=""
    [[ "$(id -u)" -eq 0 ]] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq redis-server >/dev/null
fi

BUILD=${BUILD:-pgo}
[[ -n "${DETOUR:-}" ]] && BUILD=given
release_binaries
# The mock is always the plain build: its speed is the baseline of every figure.
MOCK_BIN=target/release/detour
case "$BUILD" in
    pgo)
        [[ -n "${NO_BUILD:-}" ]] || NO_BUILD=1 scripts/pgo.sh
        DETOUR=target/pgo/release/detour
        ;;
    plain | given) ;;
    *) echo "bench: BUILD is pgo or plain, not '$BUILD'" >&2; exit 1 ;;
esac
[[ -x "$DETOUR" ]] || {
    echo "bench: no detour binary at $DETOUR (build it: scripts/pgo.sh, or cargo build --release)" >&2
    exit 1
}
scratch_and_cleanup

# Replaces the (sub)shell with "$@", under taskset when a CPU list is given, so
# that `$!` is the program's PID. Call it only in a subshell: `... &` or `$(...)`.
exec_pinned() {
    local cpus=$1
    shift
    if [[ -n "$cpus" ]]; then
        exec taskset -c "$cpus" "$@"
    else
        exec "$@"
    fi
}

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_listening() {
    local port=$1 pid=$2 name=$3 i
    for i in $(seq 100); do
        if ! port_free "$port"; then return 0; fi
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "bench: $name exited; its log:" >&2
            cat "$TMP/$name.log" >&2
            exit 1
        fi
        sleep 0.05
    done
    echo "bench: $name is not listening on $port" >&2
    exit 1
}

for port in "$MOCK_PORT" "$DETOUR_PORT" "$NGINX_PORT" "$DEAD_PORT"; do
    port_free "$port" || { echo "bench: port $port is in use (set MOCK_PORT/DETOUR_PORT/NGINX_PORT/DEAD_PORT)" >&2; exit 1; }
done

cat >"$TMP/detour.toml" <<EOF
[server]
listen = "127.0.0.1:$DETOUR_PORT"

[[providers]]
name = "mock"
kind = "openai"
base_url = "http://127.0.0.1:$MOCK_PORT/v1"

[[providers]]
name = "dead"
kind = "openai"
base_url = "http://127.0.0.1:$DEAD_PORT/v1"

[[routes]]
model = "bench"
targets = [{ provider = "mock", model = "gpt-4o-mini" }]

# The failover path: every request is refused by "dead", then served by the
# mock. The breaker never opens and the budget always allows the retry, so that
# each request pays for the failover; no backoff between the two attempts.
[[routes]]
model = "bench-failover"
targets = [{ provider = "dead", model = "gpt-4o-mini" }, { provider = "mock", model = "gpt-4o-mini" }]
retries = { budget = 10.0, max_attempts = 2, backoff = "0ms" }
breaker = { consecutive_failures = 4000000000, failure_rate = 1.0, min_requests = 4000000000 }
EOF

# nginx as a plain reverse proxy: keep-alive to the mock, no buffering (streams
# pass as they come), an access log line per request to a file, as detour's.
mkdir -p "$TMP/nginx"
chmod 755 "$TMP"
cat >"$TMP/nginx/nginx.conf" <<EOF
daemon off;
worker_processes $NGINX_WORKERS;
pid $TMP/nginx/nginx.pid;
error_log $TMP/nginx/error.log warn;
events { worker_connections 4096; }
http {
    access_log $TMP/nginx/access.log;
    client_body_temp_path $TMP/nginx/body;
    proxy_temp_path $TMP/nginx/proxy;
    fastcgi_temp_path $TMP/nginx/fastcgi;
    uwsgi_temp_path $TMP/nginx/uwsgi;
    scgi_temp_path $TMP/nginx/scgi;
    upstream mock {
        server 127.0.0.1:$MOCK_PORT;
        keepalive 128;
    }
    server {
        listen 127.0.0.1:$NGINX_PORT;
        location / {
            proxy_pass http://mock;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }
    }
}
EOF

exec_pinned "$MOCK_CPUS" "$MOCK_BIN" mock --flavor openai --listen "127.0.0.1:$MOCK_PORT" --seed 1 \
    >"$TMP/mock.log" 2>&1 &
MOCK_PID=$!
PIDS+=("$MOCK_PID")
# The default log level (one line per request at info), to a file, as in production.
exec_pinned "$DETOUR_CPUS" env RUST_LOG="$DETOUR_LOG" "$DETOUR" serve --config "$TMP/detour.toml" \
    >"$TMP/detour.log" 2>&1 &
DETOUR_PID=$!
PIDS+=("$DETOUR_PID")
exec_pinned "$NGINX_CPUS" "$NGINX" -p "$TMP/nginx" -c "$TMP/nginx/nginx.conf" -e "$TMP/nginx/error.log" \
    >"$TMP/nginx.log" 2>&1 &
NGINX_PID=$!
PIDS+=("$NGINX_PID")
wait_listening "$MOCK_PORT" "$MOCK_PID" mock
wait_listening "$DETOUR_PORT" "$DETOUR_PID" detour
wait_listening "$NGINX_PORT" "$NGINX_PID" nginx

TICK=$(getconf CLK_TCK)
# utime + stime of a process, in clock ticks (fields 14 and 15 of /proc/PID/stat;
# the command name in field 2 may hold spaces, so count from the closing paren).
cpu_ticks() { sed 's/.*) //' "/proc/$1/stat" | awk '{ print $12 + $13 }'; }
# The same for a process and its children (nginx: the master and its workers).
tree_cpu_ticks() {
    local total child
    total=$(cpu_ticks "$1")
    for child in $(pgrep -P "$1"); do
        total=$((total + $(cpu_ticks "$child" 2>/dev/null || echo 0)))
    done
    echo "$total"
}
peak_rss_kib() {
    local total=0 pid
    for pid in "$1" $(pgrep -P "$1"); do
        total=$((total + $(awk '/^VmHWM:/ { print $2 }' "/proc/$pid/status" 2>/dev/null || echo 0)))
    done
    echo "$total"
}
rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }
# Detour's resident memory before any request: the idle figure.
sleep 1
IDLE_RSS_KIB=$(rss_kib "$DETOUR_PID")

mkdir -p bench-results
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT=bench-results/$STAMP.jsonl
: >"$OUT"

CPU_MODEL=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
echo "machine: $(nproc) CPUs ($CPU_MODEL), $(uname -sr)"
echo "detour: $BUILD build $DETOUR, built $(date -u -r "$DETOUR" +%Y-%m-%dT%H:%M:%SZ) from $(git rev-parse --short HEAD 2>/dev/null || echo 'a tree with no commit')$(git diff --quiet HEAD 2>/dev/null || echo ' (uncommitted changes)')"
echo "nginx: $("$NGINX" -v 2>&1 | sed 's/.*: //'), $NGINX_WORKERS worker(s); detour log level: $DETOUR_LOG (to a file)"
echo "pinning: mock=${MOCK_CPUS:-none} loadgen=${LOADGEN_CPUS:-none} (threads $LOADGEN_THREADS) detour=${DETOUR_CPUS:-none} nginx=${NGINX_CPUS:-none}"
echo "runs: ${WARMUP}s warm-up + ${DURATION}s measured each, $ROUNDS round(s); raw results: $OUT"
echo

# user + nice + system ticks of the whole machine, and steal ticks.
machine_ticks() { awk '/^cpu / { print $2 + $3 + $4, $9; exit }' /proc/stat; }
NCPU=$(nproc)

# Waits (up to QUIET_WAIT seconds) until the machine is less than QUIET_PCT % busy
# over one second; runs anyway after that.
wait_quiet() {
    local waited=0 b0 b1 pct _
    while :; do
        read -r b0 _ < <(machine_ticks)
        sleep 1
        read -r b1 _ < <(machine_ticks)
        pct=$(((b1 - b0) * 100 / (TICK * NCPU)))
        ((pct < QUIET_PCT)) && return 0
        if ((waited >= QUIET_WAIT)); then
            echo "  machine still ${pct}% busy after ${QUIET_WAIT}s; running anyway" >&2
            return 0
        fi
        ((waited == 0)) && echo "  waiting for the machine to be quiet (${pct}% busy) ..." >&2
        waited=$((waited + 1))
    done
}

# run_loadgen SCENARIO TARGET URL MODEL PID LOADGEN-ARGS...
# Runs one loadgen against the server process PID and appends its JSON line to
# $OUT, with: the server's CPU time during the run (and per 1,000 requests, warm-up
# included), its peak RSS so far, and `other_cpu_pct`, the share of the machine
# used by processes other than the mock, detour and the loadgen (noise).
run_loadgen() {
    local scenario=$1 target=$2 url=$3 model=$4 pid=$5
    shift 5
    local before after m0 m1 d0 d1 t0 t1 line busy0 steal0 busy1 steal1
    wait_quiet
    read -r busy0 steal0 < <(machine_ticks)
    local n0 n1
    m0=$(cpu_ticks "$MOCK_PID") d0=$(cpu_ticks "$DETOUR_PID") n0=$(tree_cpu_ticks "$NGINX_PID")
    before=$(tree_cpu_ticks "$pid")
    t0=$(date +%s%N)
    line=$(exec_pinned "$LOADGEN_CPUS" "$LOADGEN" --url "$url" --model "$model" \
        --duration "$DURATION" --warmup "$WARMUP" --threads "$LOADGEN_THREADS" \
        ${BODY_BYTES:+--body-bytes "$BODY_BYTES"} \
        --label "$scenario/$target" "$@")
    t1=$(date +%s%N)
    m1=$(cpu_ticks "$MOCK_PID") d1=$(cpu_ticks "$DETOUR_PID") n1=$(tree_cpu_ticks "$NGINX_PID")
    after=$(tree_cpu_ticks "$pid")
    read -r busy1 steal1 < <(machine_ticks)
    jq -c --arg scenario "$scenario" --arg target "$target" \
        --argjson cpu_ms "$(((after - before) * 1000 / TICK))" \
        --argjson peak_rss_kib "$(peak_rss_kib "$pid")" \
        --argjson ours "$(((m1 - m0) + (d1 - d0) + (n1 - n0)))" --argjson busy "$((busy1 - busy0))" \
        --argjson steal "$((steal1 - steal0))" \
        --argjson capacity "$(((t1 - t0) / 1000000 * TICK * NCPU / 1000))" \
        --argjson round "${ROUND:-1}" --arg build "$BUILD" \
        '. + {scenario: $scenario, target: $target, round: $round, build: $build,
              server_cpu_ms: $cpu_ms,
              server_cpu_ms_per_1k: (if .requests_total > 0
                  then ($cpu_ms * 1000 / .requests_total * 10 | round / 10) else null end),
              server_peak_rss_kib: $peak_rss_kib,
              other_cpu_pct: ((($busy - $ours - (.loadgen_cpu_ticks // 0)) / $capacity * 100)
                  | if . < 0 then 0 else round end),
              steal_pct: ($steal / $capacity * 100 | round)}' <<<"$line" >>"$OUT"
}

# scenario|connections|rate|detour's model (the failover run has no nginx pair)
SCENARIOS=(
    "plain-c16|16||bench"
    "plain-c64|64||bench"
    "plain-rate$RATE|$RATE_CONNS|$RATE|bench"
    "stream-c16|16||bench"
    "stream-c64|64||bench"
    "stream-rate$RATE|$RATE_CONNS|$RATE|bench"
    "failover-rate$RATE|$RATE_CONNS|$RATE|bench-failover"
)
if [[ "$MAIN_BENCH" == 1 ]]; then
for round in $(seq "$ROUNDS"); do
    for spec in "${SCENARIOS[@]}"; do
        IFS='|' read -r scenario conns rate model <<<"$spec"
        [[ -n "${ONLY:-}" && ",$ONLY," != *",$scenario,"* ]] && continue
        args=(--connections "$conns")
        [[ -n "$rate" ]] && args+=(--rate "$rate")
        [[ "$scenario" == stream-* ]] && args+=(--stream)
        echo "round $round/$ROUNDS: $scenario" >&2
        ROUND=$round run_loadgen "$scenario" direct \
            "http://127.0.0.1:$MOCK_PORT/v1/chat/completions" gpt-4o-mini "$MOCK_PID" "${args[@]}"
        if [[ "$model" == bench ]]; then
            ROUND=$round run_loadgen "$scenario" nginx \
                "http://127.0.0.1:$NGINX_PORT/v1/chat/completions" gpt-4o-mini "$NGINX_PID" "${args[@]}"
        fi
        ROUND=$round run_loadgen "$scenario" detour \
            "http://127.0.0.1:$DETOUR_PORT/v1/chat/completions" "$model" "$DETOUR_PID" "${args[@]}"
    done
done
echo >&2

# The summary: per scenario, each round's direct, nginx and detour runs are
# grouped (they ran back to back), and every figure is the median over rounds.
# "Added" latency is proxy pX - direct pX within a round (a difference of
# percentiles). Ratios to nginx are detour / nginx within a round.
SUMMARY=bench-results/$STAMP.summary.json
jq -s '
  def median: map(select(. != null)) | sort
    | if length == 0 then null
      elif length % 2 == 1 then .[length / 2 | floor]
      else (.[length / 2 - 1] + .[length / 2]) / 2 end;
  def r1: if . == null then null else (. * 10 | round / 10) end;
  def r2: if . == null then null else (. * 100 | round / 100) end;
  def lat: {p50_us: map(.p50_us) | median, p99_us: map(.p99_us) | median,
            p999_us: map(.p999_us) | median,
            ttfb_p50_us: map(.ttfb_p50_us) | median, ttfb_p99_us: map(.ttfb_p99_us) | median};
  group_by(.scenario) | map(
    (group_by(.round) | map({d: map(select(.target == "direct"))[0],
                             n: map(select(.target == "nginx"))[0],
                             g: map(select(.target == "detour"))[0]})
                      | map(select(.d != null and .g != null))) as $all
    | ($all | map(select([.d.other_cpu_pct, .g.other_cpu_pct, (.n.other_cpu_pct // 0)] | max <= $noise))) as $clean
    | (if ($clean | length) > 0 then $clean else $all end) as $p
    | ($p | map(select(.n != null))) as $pn
    | { scenario: $p[0].d.scenario, stream: $p[0].d.stream,
        rounds: ($p | length), rounds_dropped: (($all | length) - ($p | length)),
        direct_rps: ($p | map(.d.rps) | median), nginx_rps: ($pn | map(.n.rps) | median),
        detour_rps: ($p | map(.g.rps) | median),
        ratio_pct: ($p | map(.g.rps / .d.rps * 100) | median | r1),
        nginx_ratio_pct: ($pn | map(.n.rps / .d.rps * 100) | median | r1),
        vs_nginx_pct: ($pn | map(.g.rps / .n.rps * 100) | median | r1),
        vs_nginx_pct_rounds: ($pn | map(.g.rps / .n.rps * 100 | r1)),
        direct: ($p | map(.d) | lat + {mock_cpu_ms_per_1k: map(.server_cpu_ms_per_1k) | median}),
        nginx: ($pn | map(.n) | lat),
        detour: ($p | map(.g) | lat),
        added_p50_us: ($p | map(.g.p50_us - .d.p50_us) | median),
        added_p50_us_rounds: ($p | map(.g.p50_us - .d.p50_us)),
        added_p99_us: ($p | map(.g.p99_us - .d.p99_us) | median),
        added_p99_us_rounds: ($p | map(.g.p99_us - .d.p99_us)),
        added_p999_us: ($p | map(.g.p999_us - .d.p999_us) | median),
        nginx_added_p50_us: ($pn | map(.n.p50_us - .d.p50_us) | median),
        nginx_added_p99_us: ($pn | map(.n.p99_us - .d.p99_us) | median),
        detour_cpu_ms_per_1k: ($p | map(.g.server_cpu_ms_per_1k) | median | r1),
        detour_cpu_ms_per_1k_rounds: ($p | map(.g.server_cpu_ms_per_1k)),
        nginx_cpu_ms_per_1k: ($pn | map(.n.server_cpu_ms_per_1k) | median | r1),
        cpu_vs_nginx: ($pn | map(if (.n.server_cpu_ms_per_1k // 0) > 0
                                 then .g.server_cpu_ms_per_1k / .n.server_cpu_ms_per_1k
                                 else null end) | median | r2),
        detour_peak_rss_mib: ($p | map(.g.server_peak_rss_kib) | max / 1024 | r1),
        errors: ($p | map(.d.errors + .g.errors + (.n.errors // 0)) | add),
        other_cpu_pct_max: ($p | map(.d.other_cpu_pct, .g.other_cpu_pct, (.n.other_cpu_pct // 0)) | max),
        other_cpu_pct_rounds: ($all | map([.d.other_cpu_pct, .g.other_cpu_pct, (.n.other_cpu_pct // 0)] | max)),
        steal_pct_max: ($p | map(.d.steal_pct, .g.steal_pct) | max) })
  | {idle_rss_mib: ($idle_kib / 1024 | r1), scenarios: .}' \
    --argjson noise "$NOISE_PCT" --argjson idle_kib "$IDLE_RSS_KIB" "$OUT" >"$SUMMARY"

echo "Medians over the rounds used. added = proxy pX - direct pX, paired per round."
echo "vs nginx = detour req/s / nginx req/s; CPU x nginx = detour CPU per request /"
echo "nginx CPU per request (all its processes). CPU per 1k counts warm-up requests"
echo "too. other CPU % = the largest share of the machine used by other processes"
echo "during a used round (noise); rounds where it exceeded ${NOISE_PCT}% are dropped"
echo "when a cleaner round exists."
echo
jq -r '
  def v: if . == null then "-" else tostring end;
  ["scenario", "direct req/s", "nginx req/s", "detour req/s", "detour/direct", "detour/nginx",
   "p50 us d/n/g", "p99 us d/n/g", "added p50 n/g", "added p99 n/g",
   "CPU ms/1k n/g", "CPU x nginx", "peak RSS MiB", "errors", "other CPU %", "rounds"],
  (.scenarios[] | [ .scenario, (.direct_rps | v), (.nginx_rps | v), (.detour_rps | v),
           "\(.ratio_pct | v)%", "\(.vs_nginx_pct | v)%",
           "\(.direct.p50_us | v)/\(.nginx.p50_us | v)/\(.detour.p50_us | v)",
           "\(.direct.p99_us | v)/\(.nginx.p99_us | v)/\(.detour.p99_us | v)",
           "\(.nginx_added_p50_us | v)/\(.added_p50_us | v)",
           "\(.nginx_added_p99_us | v)/\(.added_p99_us | v)",
           "\(.nginx_cpu_ms_per_1k | v)/\(.detour_cpu_ms_per_1k | v)", (.cpu_vs_nginx | v),
           (.detour_peak_rss_mib | v), (.errors | v), (.other_cpu_pct_max | v),
           "\(.rounds)/\(.rounds + .rounds_dropped)" ])
  | @tsv' "$SUMMARY" | column -t -s $'\t'
echo
echo "detour idle RSS (before any request): $(jq -r .idle_rss_mib "$SUMMARY") MiB"
echo "streams, time to first body byte (us, direct/nginx/detour):"
jq -r '.scenarios[] | select(.stream) | "  \(.scenario): p50 \(.direct.ttfb_p50_us)/\(.nginx.ttfb_p50_us)/\(.detour.ttfb_p50_us)  p99 \(.direct.ttfb_p99_us)/\(.nginx.ttfb_p99_us)/\(.detour.ttfb_p99_us)"' "$SUMMARY"
echo "mock CPU ms per 1,000 requests when hit directly (for scale):"
jq -r '.scenarios[] | "  \(.scenario): \(.direct.mock_cpu_ms_per_1k)"' "$SUMMARY"
echo

# The targets (issue 12; see BENCHMARKS.md).
jq -r --arg rate "$RATE" '
  def row($s): .scenarios | map(select(.scenario == $s))[0];
  # A scenario left out (ONLY) has no figure: "-", neither met nor missed.
  def verdict($v; f): if $v == null then "-     " elif ($v | f) then "met   " else "MISSED" end;
  def rounds($a): if ($a | length) > 1 then " (rounds: \($a | map(tostring) | join(", ")))" else "" end;
  row("plain-rate\($rate)") as $r | row("plain-c64") as $c | row("stream-c64") as $s
  | row("failover-rate\($rate)") as $f
  | ([$c, $s] | map(.detour_peak_rss_mib) | max) as $rss
  | verdict($c.vs_nginx_pct; . >= 70)
      + " 64 conns non-streamed, detour >= 70% of nginx: \($c.vs_nginx_pct)%" + rounds($c.vs_nginx_pct_rounds),
    verdict($s.vs_nginx_pct; . >= 60)
      + " 64 conns streamed, detour >= 60% of nginx: \($s.vs_nginx_pct)%" + rounds($s.vs_nginx_pct_rounds),
    verdict($c.cpu_vs_nginx; . <= 1.5)
      + " CPU per request <= 1.5x nginx, 64 conns non-streamed: \($c.cpu_vs_nginx)x",
    verdict($s.cpu_vs_nginx; . <= 1.5)
      + " CPU per request <= 1.5x nginx, 64 conns streamed: \($s.cpu_vs_nginx)x",
    verdict($r.added_p50_us; . <= 100)
      + " added p50 at \($rate) req/s <= 100 us: \($r.added_p50_us) us" + rounds($r.added_p50_us_rounds),
    verdict($r.added_p99_us; . <= 250)
      + " added p99 at \($rate) req/s <= 250 us: \($r.added_p99_us) us" + rounds($r.added_p99_us_rounds),
    verdict($rss; . <= 64) + " detour peak RSS at 64 conns <= 64 MiB: \($rss) MiB",
    verdict(.idle_rss_mib; . <= 20) + " detour idle RSS <= 20 MiB: \(.idle_rss_mib) MiB",
    verdict($f.added_p50_us; . <= 1000)
      + " failover (first target refuses) adds <= 1 ms at p50: \($f.added_p50_us) us" + rounds($f.added_p50_us_rounds),
    verdict(.scenarios | map(.errors) | add; . == 0) + " no errors: \(.scenarios | map(.errors) | add)"' "$SUMMARY"


fi # MAIN_BENCH
# Limits on Redis against limits in memory (issue 11): the same key, with rpm
# and tpm far above the load so every request is admitted, in two detour
# processes that differ only in [state]. Limits this large are admitted from
# each replica's allowance (limits::shared: a 200th of the limit taken ahead of
# need, at most 256 requests / 200k tokens), so most requests make no call.
# A third process adds max_concurrent, which has no allowance: one lease call
# per request (and a release sent without waiting); reported, not judged.
# Paired per round: memory, Redis, Redis with concurrency.
if [[ "$REDIS_BENCH" == 1 ]]; then
    for port in "$REDIS_PORT" "$DETOUR_MEM_PORT" "$DETOUR_REDIS_PORT" "$DETOUR_CONC_PORT"; do
        port_free "$port" || { echo "bench: port $port is in use" >&2; exit 1; }
    done
    limited_config() {
        cat <<EOF
[server]
listen = "127.0.0.1:$1"
$2

[[providers]]
name = "mock"
kind = "openai"
base_url = "http://127.0.0.1:$MOCK_PORT/v1"

[[routes]]
model = "bench"
targets = [{ provider = "mock", model = "gpt-4o-mini" }]

[[keys]]
key = "bench-key"
tenant = "bench"
rpm = 1000000000
tpm = 100000000000
$3
EOF
    }
    redis_state="
[state]
backend = \"redis\"
redis_url = \"redis://127.0.0.1:$REDIS_PORT\""
    limited_config "$DETOUR_MEM_PORT" "" "" >"$TMP/detour-mem.toml"
    limited_config "$DETOUR_REDIS_PORT" "$redis_state" "" >"$TMP/detour-redis.toml"
    limited_config "$DETOUR_CONC_PORT" "$redis_state" "max_concurrent = 100000" >"$TMP/detour-conc.toml"
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
        >"$TMP/redis.log" 2>&1 &
    REDIS_PID=$!
    PIDS+=("$REDIS_PID")
    wait_listening "$REDIS_PORT" "$REDIS_PID" redis
    exec_pinned "$DETOUR_CPUS" env RUST_LOG="$DETOUR_LOG" "$DETOUR" serve --config "$TMP/detour-mem.toml" \
        >"$TMP/detour-mem.log" 2>&1 &
    MEM_PID=$!
    PIDS+=("$MEM_PID")
    exec_pinned "$DETOUR_CPUS" env RUST_LOG="$DETOUR_LOG" "$DETOUR" serve --config "$TMP/detour-redis.toml" \
        >"$TMP/detour-redis.log" 2>&1 &
    RED_PID=$!
    PIDS+=("$RED_PID")
    exec_pinned "$DETOUR_CPUS" env RUST_LOG="$DETOUR_LOG" "$DETOUR" serve --config "$TMP/detour-conc.toml" \
        >"$TMP/detour-conc.log" 2>&1 &
    CONC_PID=$!
    PIDS+=("$CONC_PID")
    wait_listening "$DETOUR_MEM_PORT" "$MEM_PID" detour-mem
    wait_listening "$DETOUR_REDIS_PORT" "$RED_PID" detour-redis
    wait_listening "$DETOUR_CONC_PORT" "$CONC_PID" detour-conc
    sleep 2 # the Redis replica connects and beats
    OUT_REDIS=bench-results/$STAMP.redis.jsonl
    : >"$OUT_REDIS"
    for round in $(seq "$ROUNDS"); do
        for spec in "limits-rate$RATE|$RATE_CONNS|$RATE" "limits-c64|64|"; do
            IFS='|' read -r scenario conns rate <<<"$spec"
            args=(--connections "$conns" --api-key bench-key)
            [[ -n "$rate" ]] && args+=(--rate "$rate")
            echo "round $round/$ROUNDS: $scenario" >&2
            for target in memory redis redis-conc; do
                port=$DETOUR_MEM_PORT pid=$MEM_PID
                [[ $target == redis ]] && port=$DETOUR_REDIS_PORT pid=$RED_PID
                [[ $target == redis-conc ]] && port=$DETOUR_CONC_PORT pid=$CONC_PID
                ROUND=$round OUT=$OUT_REDIS run_loadgen "$scenario" "$target" \
                    "http://127.0.0.1:$port/v1/chat/completions" bench "$pid" "${args[@]}"
            done
        done
    done
    echo >&2
    echo "Limits on Redis vs in memory (the same key and limits; medians over $ROUNDS round(s)):"
    jq -s -r --arg rate "$RATE" '
      def median: map(select(. != null)) | sort
        | if length == 0 then null
          elif length % 2 == 1 then .[length / 2 | floor]
          else (.[length / 2 - 1] + .[length / 2]) / 2 end;
      def verdict($ok): if $ok then "met   " else "MISSED" end;
      group_by(.scenario) | map(
        (group_by(.round) | map({m: map(select(.target == "memory"))[0],
                                 r: map(select(.target == "redis"))[0],
                                 c: map(select(.target == "redis-conc"))[0]})
                          | map(select(.m != null and .r != null))) as $p
        | { scenario: $p[0].m.scenario,
            memory_rps: ($p | map(.m.rps) | median), redis_rps: ($p | map(.r.rps) | median),
            ratio_pct: ($p | map(.r.rps / .m.rps * 100) | median | . * 10 | round / 10),
            p50: "\($p | map(.m.p50_us) | median)/\($p | map(.r.p50_us) | median)",
            p99: "\($p | map(.m.p99_us) | median)/\($p | map(.r.p99_us) | median)",
            cpu: "\($p | map(.m.server_cpu_ms_per_1k) | median)/\($p | map(.r.server_cpu_ms_per_1k) | median)",
            added_p50_us: ($p | map(.r.p50_us - .m.p50_us) | median),
            conc_rps: ($p | map(.c.rps) | median),
            conc_ratio_pct: ($p | map(select(.c != null) | .c.rps / .m.rps * 100) | median | if . == null then null else . * 10 | round / 10 end),
            conc_added_p50_us: ($p | map(select(.c != null) | .c.p50_us - .m.p50_us) | median),
            errors: ($p | map(.m.errors + .r.errors + (.c.errors // 0)) | add) })
      | (map("  \(.scenario): req/s memory \(.memory_rps) redis \(.redis_rps) (\(.ratio_pct)%), p50 us m/r \(.p50), p99 us m/r \(.p99), detour CPU ms/1k m/r \(.cpu); with max_concurrent (a lease call each): \(.conc_rps) req/s (\(.conc_ratio_pct)%), p50 +\(.conc_added_p50_us) us; errors \(.errors)") | .[]),
        (map(select(.scenario == "limits-rate\($rate)"))[0] as $r
         | verdict($r.added_p50_us <= 150) + " Redis limits add <= 150 us at p50 over memory at \($rate) req/s: \($r.added_p50_us) us"),
        (map(select(.scenario == "limits-c64"))[0] as $c
         | verdict($c.ratio_pct >= 80) + " Redis limits keep >= 80% of memory throughput at 64 conns: \($c.ratio_pct)%")' \
        "$OUT_REDIS"
fi
