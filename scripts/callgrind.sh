#!/usr/bin/env bash
# Instructions per request, counted by valgrind's callgrind: the figure a shared,
# noisy machine cannot blur (the same binary, inputs and environment give the same
# count whatever else runs). Not a timed test, and not in CI.
#
# For each scenario it starts detour under callgrind with instrumentation off,
# warms it up, turns instrumentation on and zeroes the counters, sends requests from one connection for DURATION
# seconds with examples/loadgen.rs, dumps the counters, and divides the
# instructions detour executed (all its threads) by the requests sent:
#
#   plain       OpenAI client -> OpenAI provider, non-streamed (passthrough)
#   stream      OpenAI client -> OpenAI provider, streamed (passthrough)
#   translated  OpenAI client -> Anthropic provider, non-streamed (IR translation)
#
# It prints instructions per request and detour's top functions per scenario
# (inclusive of nothing: self cost), for BENCHMARKS.md.
#
# Usage: scripts/callgrind.sh        (about 2 minutes)
# Knobs: DURATION=5 WARMUP_REQUESTS=50 TOP=12 NO_BUILD=1 RUST_LOG=info
#        DETOUR=path (another detour binary, e.g. an older build, to compare)
#        ONLY=plain (one scenario)  KEEP_DUMPS=dir (keep the dumps, for
#        `callgrind_annotate --inclusive=yes --tree=caller`)
set -euo pipefail
cd "$(dirname "$0")/.."
SCRIPT=callgrind
source scripts/lib.sh

DURATION=${DURATION:-5}
WARMUP_REQUESTS=${WARMUP_REQUESTS:-50}
TOP=${TOP:-12}
DETOUR_LOG=${RUST_LOG:-info}

for tool in valgrind callgrind_control callgrind_annotate jq; do
    command -v "$tool" >/dev/null || { echo "callgrind: $tool is required" >&2; exit 1; }
done

release_binaries
scratch_and_cleanup

start_mock OPENAI_PORT openai
start_mock ANTHROPIC_PORT anthropic

DETOUR_PORT=$(free_port)
cat >"$TMP/detour.toml" <<EOF
[server]
listen = "127.0.0.1:$DETOUR_PORT"

[[providers]]
name = "openai"
kind = "openai"
base_url = "http://127.0.0.1:$OPENAI_PORT/v1"

[[providers]]
name = "anthropic"
kind = "anthropic"
base_url = "http://127.0.0.1:$ANTHROPIC_PORT/v1"

[[routes]]
model = "bench"
targets = [{ provider = "openai", model = "gpt-4o-mini" }]

[[routes]]
model = "bench-translated"
targets = [{ provider = "anthropic", model = "claude-haiku-4-5" }]
EOF

echo "detour: $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD 2>/dev/null || echo ' (uncommitted changes)'), $(valgrind --version), log level $DETOUR_LOG"
echo

# scenario|model|loadgen flags
SCENARIOS=(
    "plain|bench|"
    "stream|bench|--stream"
    "translated|bench-translated|"
)
for spec in "${SCENARIOS[@]}"; do
    IFS='|' read -r scenario model flags <<<"$spec"
    [[ -n "${ONLY:-}" && "$ONLY" != "$scenario" ]] && continue
    out="$TMP/cg.$scenario"
    env RUST_LOG="$DETOUR_LOG" valgrind --tool=callgrind --instr-atstart=no \
        --callgrind-out-file="$out" "$DETOUR" serve --config "$TMP/detour.toml" \
        >"$TMP/detour-$scenario.log" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    wait_port "$DETOUR_PORT"
    url="http://127.0.0.1:$DETOUR_PORT/v1/chat/completions"
    # Warm-up: connections, caches and lazy statics, outside the count.
    for _ in $(seq "$WARMUP_REQUESTS"); do
        curl -sf -o /dev/null "$url" -H 'content-type: application/json' \
            -d "{\"model\":\"$model\",\"messages\":[{\"role\":\"user\",\"content\":\"hello\"}]}" || true
    done
    callgrind_control -i on "$pid" >/dev/null 2>&1
    callgrind_control -z "$pid" >/dev/null 2>&1
    # shellcheck disable=SC2086
    line=$("$LOADGEN" --url "$url" --model "$model" --connections 1 --duration "$DURATION" \
        --warmup 0 --threads 1 --label "$scenario" $flags)
    callgrind_control -d "$pid" >/dev/null 2>&1
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    requests=$(jq -r .requests_total <<<"$line")
    errors=$(jq -r .errors <<<"$line")
    # The dump taken after the load (the highest-numbered part file).
    dump=$(ls -1 "$out".* 2>/dev/null | sort -t. -k3 -n | tail -1)
    total=$(awk '/^(summary|totals):/ { print $2; exit }' "$dump")
    per=$((total / (requests > 0 ? requests : 1)))
    if [[ -n "${KEEP_DUMPS:-}" ]]; then
        mkdir -p "$KEEP_DUMPS" && cp "$dump" "$KEEP_DUMPS/callgrind.$scenario"
    fi
    printf '%-10s %8s requests (%s errors)  %12s instructions  %9s per request\n' \
        "$scenario" "$requests" "$errors" "$total" "$per"
    callgrind_annotate --inclusive=no "$dump" 2>/dev/null |
        awk -v top="$TOP" '/^-+$/ { rule++; next } rule >= 3 && NF > 1 && n < top { print "    " $0; n++ }' |
        sed -E 's#  [^ ]*/[^: ]*:#  #; s# \[[^]]*\]$##'
    echo
done
