#!/usr/bin/env bash
# The detour benchmark: one mock upstream, one detour in front of it, and
# examples/loadgen.rs run directly against the mock and then through detour,
# back to back, for each scenario:
#
#   non-streamed and streamed  x  {16 conns closed loop, 64 conns closed loop,
#                                  RATE req/s open loop over RATE_CONNS conns}
#
# It prints a table (req/s, p50/p99/p99.9 direct vs detour, added latency,
# detour CPU ms per 1,000 requests, detour peak RSS), checks the targets, and
# writes the raw JSON lines to bench-results/<timestamp>.jsonl and the summary
# to bench-results/<timestamp>.summary.json. Each scenario runs ROUNDS times;
# the figures are medians over rounds, each round's direct and detour runs paired.
# Results and how to read them: BENCHMARKS.md.
#
# Usage: scripts/bench.sh            (about 4 minutes on a quiet machine)
# Knobs (environment):
#   DURATION=5 WARMUP=1        measured / warm-up seconds per loadgen run
#   ROUNDS=3                   repetitions of the whole set; figures are medians
#   RATE=2000 RATE_CONNS=32    the fixed-rate scenario
#   MOCK_CPUS=1                taskset CPU list for the mock ("" = unpinned)
#   LOADGEN_CPUS=0             taskset CPU list for the load generator ("" = unpinned)
#   DETOUR_CPUS=               taskset CPU list for detour ("" = unpinned, the default)
#   LOADGEN_THREADS=1          loadgen runtime threads
#   MOCK_PORT=18791 DETOUR_PORT=18792
#   QUIET_PCT=10 QUIET_WAIT=120  before each run, wait up to QUIET_WAIT s for the
#                              machine to be under QUIET_PCT % busy (other jobs
#                              skew results; the table's last column shows them)
#   NOISE_PCT=10               a round whose runs saw other processes use more than
#                              this % of the machine is left out of the medians,
#                              unless no cleaner round exists
#   NO_BUILD=1                 skip `cargo build --release --examples --bins`
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-5}
ROUNDS=${ROUNDS:-3}
WARMUP=${WARMUP:-1}
RATE=${RATE:-2000}
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

command -v jq >/dev/null || { echo "bench: jq is required" >&2; exit 1; }

DETOUR=target/release/detour
LOADGEN=target/release/examples/loadgen
if [[ -z "${NO_BUILD:-}" ]]; then
    cargo build --release --examples --bins
fi

TMP=$(mktemp -d)
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

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

for port in "$MOCK_PORT" "$DETOUR_PORT"; do
    port_free "$port" || { echo "bench: port $port is in use (set MOCK_PORT/DETOUR_PORT)" >&2; exit 1; }
done

cat >"$TMP/detour.toml" <<EOF
[server]
listen = "127.0.0.1:$DETOUR_PORT"

[[providers]]
name = "mock"
kind = "openai"
base_url = "http://127.0.0.1:$MOCK_PORT/v1"

[[routes]]
model = "bench"
targets = [{ provider = "mock", model = "gpt-4o-mini" }]
EOF

exec_pinned "$MOCK_CPUS" "$DETOUR" mock --flavor openai --listen "127.0.0.1:$MOCK_PORT" --seed 1 \
    >"$TMP/mock.log" 2>&1 &
MOCK_PID=$!
PIDS+=("$MOCK_PID")
# One log line per request at info; the benchmark measures the proxy, not the logger.
exec_pinned "$DETOUR_CPUS" env RUST_LOG=warn "$DETOUR" serve --config "$TMP/detour.toml" \
    >"$TMP/detour.log" 2>&1 &
DETOUR_PID=$!
PIDS+=("$DETOUR_PID")
wait_listening "$MOCK_PORT" "$MOCK_PID" mock
wait_listening "$DETOUR_PORT" "$DETOUR_PID" detour

TICK=$(getconf CLK_TCK)
# utime + stime of a process, in clock ticks (fields 14 and 15 of /proc/PID/stat;
# the command name in field 2 may hold spaces, so count from the closing paren).
cpu_ticks() { sed 's/.*) //' "/proc/$1/stat" | awk '{ print $12 + $13 }'; }
peak_rss_kib() { awk '/^VmHWM:/ { print $2 }' "/proc/$1/status"; }

mkdir -p bench-results
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT=bench-results/$STAMP.jsonl
: >"$OUT"

CPU_MODEL=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
echo "machine: $(nproc) CPUs ($CPU_MODEL), $(uname -sr)"
echo "detour: built $(date -u -r "$DETOUR" +%Y-%m-%dT%H:%M:%SZ) from $(git rev-parse --short HEAD 2>/dev/null || echo 'a tree with no commit')$(git diff --quiet HEAD 2>/dev/null || echo ' (uncommitted changes)')"
echo "pinning: mock=${MOCK_CPUS:-none} loadgen=${LOADGEN_CPUS:-none} (threads $LOADGEN_THREADS) detour=${DETOUR_CPUS:-none}"
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
    m0=$(cpu_ticks "$MOCK_PID") d0=$(cpu_ticks "$DETOUR_PID") before=$(cpu_ticks "$pid")
    t0=$(date +%s%N)
    line=$(exec_pinned "$LOADGEN_CPUS" "$LOADGEN" --url "$url" --model "$model" \
        --duration "$DURATION" --warmup "$WARMUP" --threads "$LOADGEN_THREADS" \
        --label "$scenario/$target" "$@")
    t1=$(date +%s%N)
    m1=$(cpu_ticks "$MOCK_PID") d1=$(cpu_ticks "$DETOUR_PID") after=$(cpu_ticks "$pid")
    read -r busy1 steal1 < <(machine_ticks)
    jq -c --arg scenario "$scenario" --arg target "$target" \
        --argjson cpu_ms "$(((after - before) * 1000 / TICK))" \
        --argjson peak_rss_kib "$(peak_rss_kib "$pid")" \
        --argjson ours "$(((m1 - m0) + (d1 - d0)))" --argjson busy "$((busy1 - busy0))" \
        --argjson steal "$((steal1 - steal0))" \
        --argjson capacity "$(((t1 - t0) / 1000000 * TICK * NCPU / 1000))" \
        --argjson round "${ROUND:-1}" \
        '. + {scenario: $scenario, target: $target, round: $round, server_cpu_ms: $cpu_ms,
              server_cpu_ms_per_1k: (if .requests_total > 0
                  then ($cpu_ms * 1000 / .requests_total * 10 | round / 10) else null end),
              server_peak_rss_kib: $peak_rss_kib,
              other_cpu_pct: ((($busy - $ours - (.loadgen_cpu_ticks // 0)) / $capacity * 100)
                  | if . < 0 then 0 else round end),
              steal_pct: ($steal / $capacity * 100 | round)}' <<<"$line" >>"$OUT"
}

SCENARIOS=(
    "plain-c16|16|"
    "plain-c64|64|"
    "plain-rate$RATE|$RATE_CONNS|$RATE"
    "stream-c16|16|"
    "stream-c64|64|"
    "stream-rate$RATE|$RATE_CONNS|$RATE"
)
for round in $(seq "$ROUNDS"); do
    for spec in "${SCENARIOS[@]}"; do
        IFS='|' read -r scenario conns rate <<<"$spec"
        args=(--connections "$conns")
        [[ -n "$rate" ]] && args+=(--rate "$rate")
        [[ "$scenario" == stream-* ]] && args+=(--stream)
        echo "round $round/$ROUNDS: $scenario" >&2
        ROUND=$round run_loadgen "$scenario" direct \
            "http://127.0.0.1:$MOCK_PORT/v1/chat/completions" gpt-4o-mini "$MOCK_PID" "${args[@]}"
        ROUND=$round run_loadgen "$scenario" detour \
            "http://127.0.0.1:$DETOUR_PORT/v1/chat/completions" bench "$DETOUR_PID" "${args[@]}"
    done
done
echo >&2

# The summary: per scenario, each round's direct and detour runs are paired
# (they ran back to back), and every figure is the median over rounds. "Added"
# latency is detour pX - direct pX within a round (a difference of percentiles).
SUMMARY=bench-results/$STAMP.summary.json
jq -s '
  def median: map(select(. != null)) | sort
    | if length == 0 then null
      elif length % 2 == 1 then .[length / 2 | floor]
      else (.[length / 2 - 1] + .[length / 2]) / 2 end;
  def r1: if . == null then null else (. * 10 | round / 10) end;
  group_by(.scenario) | map(
    (group_by(.round) | map({d: map(select(.target == "direct"))[0],
                             g: map(select(.target == "detour"))[0]})
                      | map(select(.d != null and .g != null))) as $all
    | ($all | map(select([.d.other_cpu_pct, .g.other_cpu_pct] | max <= $noise))) as $clean
    | (if ($clean | length) > 0 then $clean else $all end) as $p
    | { scenario: $p[0].d.scenario, stream: $p[0].d.stream,
        rounds: ($p | length), rounds_dropped: (($all | length) - ($p | length)),
        direct_rps: ($p | map(.d.rps) | median), detour_rps: ($p | map(.g.rps) | median),
        ratio_pct: ($p | map(.g.rps / .d.rps * 100) | median | r1),
        ratio_pct_rounds: ($p | map(.g.rps / .d.rps * 100 | r1)),
        direct: ($p | map(.d) | {p50_us: map(.p50_us) | median, p99_us: map(.p99_us) | median,
                                 p999_us: map(.p999_us) | median,
                                 ttfb_p50_us: map(.ttfb_p50_us) | median,
                                 ttfb_p99_us: map(.ttfb_p99_us) | median,
                                 mock_cpu_ms_per_1k: map(.server_cpu_ms_per_1k) | median}),
        detour: ($p | map(.g) | {p50_us: map(.p50_us) | median, p99_us: map(.p99_us) | median,
                                 p999_us: map(.p999_us) | median,
                                 ttfb_p50_us: map(.ttfb_p50_us) | median,
                                 ttfb_p99_us: map(.ttfb_p99_us) | median}),
        added_p50_us: ($p | map(.g.p50_us - .d.p50_us) | median),
        added_p50_us_rounds: ($p | map(.g.p50_us - .d.p50_us)),
        added_p99_us: ($p | map(.g.p99_us - .d.p99_us) | median),
        added_p99_us_rounds: ($p | map(.g.p99_us - .d.p99_us)),
        added_p999_us: ($p | map(.g.p999_us - .d.p999_us) | median),
        detour_cpu_ms_per_1k: ($p | map(.g.server_cpu_ms_per_1k) | median | r1),
        detour_cpu_ms_per_1k_rounds: ($p | map(.g.server_cpu_ms_per_1k)),
        detour_peak_rss_mib: ($p | map(.g.server_peak_rss_kib) | max / 1024 | r1),
        errors: ($p | map(.d.errors + .g.errors) | add),
        other_cpu_pct_max: ($p | map(.d.other_cpu_pct, .g.other_cpu_pct) | max),
        other_cpu_pct_rounds: ($all | map([.d.other_cpu_pct, .g.other_cpu_pct] | max)),
        steal_pct_max: ($p | map(.d.steal_pct, .g.steal_pct) | max) })' \
    --argjson noise "$NOISE_PCT" "$OUT" >"$SUMMARY"

echo "Medians over the rounds used. added = detour pX - direct pX, paired per round."
echo "CPU per 1k counts warm-up requests too. other CPU % = the largest share of the"
echo "machine used by other processes during a used round (noise); rounds where it"
echo "exceeded ${NOISE_PCT}% are dropped when a cleaner round exists."
echo
jq -r '
  def v: if . == null then "-" else tostring end;
  ["scenario", "direct req/s", "detour req/s", "ratio", "p50 us d/g", "p99 us d/g",
   "p99.9 us d/g", "added p50", "added p99", "detour CPU ms/1k", "peak RSS MiB",
   "errors", "other CPU %", "rounds"],
  (.[] | [ .scenario, (.direct_rps | v), (.detour_rps | v), "\(.ratio_pct | v)%",
           "\(.direct.p50_us | v)/\(.detour.p50_us | v)",
           "\(.direct.p99_us | v)/\(.detour.p99_us | v)",
           "\(.direct.p999_us | v)/\(.detour.p999_us | v)",
           (.added_p50_us | v), (.added_p99_us | v), (.detour_cpu_ms_per_1k | v),
           (.detour_peak_rss_mib | v), (.errors | v), (.other_cpu_pct_max | v),
           "\(.rounds)/\(.rounds + .rounds_dropped)" ])
  | @tsv' "$SUMMARY" | column -t -s $'\t'
echo
echo "streams, time to first body byte (us, direct/detour):"
jq -r '.[] | select(.stream) | "  \(.scenario): p50 \(.direct.ttfb_p50_us)/\(.detour.ttfb_p50_us)  p99 \(.direct.ttfb_p99_us)/\(.detour.ttfb_p99_us)"' "$SUMMARY"
echo "mock CPU ms per 1,000 requests when hit directly (for scale):"
jq -r '.[] | "  \(.scenario): \(.direct.mock_cpu_ms_per_1k)"' "$SUMMARY"
echo

# The targets (see BENCHMARKS.md).
jq -r --arg rate "$RATE" '
  def row($s): map(select(.scenario == $s))[0];
  def verdict($ok): if $ok then "met   " else "MISSED" end;
  def rounds($a): if ($a | length) > 1 then " (rounds: \($a | map(tostring) | join(", ")))" else "" end;
  row("plain-rate\($rate)") as $r | row("plain-c64") as $c | row("stream-c64") as $s
  | (map(.detour_peak_rss_mib) | max) as $rss
  | verdict($r.added_p50_us < 150)
      + " added p50 at \($rate) req/s < 150 us: \($r.added_p50_us) us" + rounds($r.added_p50_us_rounds),
    verdict($r.added_p99_us < 1000)
      + " added p99 at \($rate) req/s < 1 ms: \($r.added_p99_us) us" + rounds($r.added_p99_us_rounds),
    verdict($r.detour_cpu_ms_per_1k < 40)
      + " detour CPU < 40 ms per 1,000 non-streamed requests at \($rate) req/s: \($r.detour_cpu_ms_per_1k) ms"
      + rounds($r.detour_cpu_ms_per_1k_rounds),
    verdict($rss < 60) + " detour peak RSS < 60 MiB: \($rss) MiB",
    verdict($c.ratio_pct >= 30)
      + " 64 conns non-streamed, detour >= 30% of direct: \($c.ratio_pct)%" + rounds($c.ratio_pct_rounds),
    verdict($s.ratio_pct >= 30)
      + " 64 conns streamed, detour >= 30% of direct: \($s.ratio_pct)%" + rounds($s.ratio_pct_rounds),
    verdict((map(.errors) | add) == 0) + " no errors: \(map(.errors) | add)"' "$SUMMARY"
