#!/usr/bin/env bash
# A profile-guided release build of detour: target/pgo/release/detour.
#
# 1. Builds detour with LLVM's instrumentation (-Cprofile-generate) into
#    target/pgo/gen.
# 2. Trains it: the instrumented detour serves loadgen traffic in front of
#    `detour mock` providers (OpenAI, Anthropic, Gemini): passthrough and
#    translated, streamed and not, closed loop and at a fixed rate, the
#    Anthropic and OpenAI ingresses, a failover past a refused connection,
#    and a few client errors. The mocks and the loadgen are the plain release
#    build, so only detour's own serving is profiled.
# 3. Merges the profile (llvm-profdata of rustc's LLVM major version) and
#    builds detour again with -Cprofile-use into target/pgo/release.
#
# With the profile, LLVM lays the hot path's code out together and splits
# the cold paths off it; that is what the request's instruction-cache misses
# are made of (BENCHMARKS.md, "Session 15"). Behaviour is the same: the
# profile changes layout and inlining, never semantics.
#
# Usage: scripts/pgo.sh            (about 12 minutes on 2 cores)
# Knobs: LLVM_PROFDATA=path  TRAIN_SECONDS=2  INSTRUMENTED=path (skip step 1)
#        NO_BUILD=1 (skip the plain release build of the mocks and loadgen)
#        TRAIN_ONLY=1: step 2 alone, with no build and no profile, on the
#        binaries given (INSTRUMENTED, DETOUR for the mocks, LOADGEN); the
#        tests run it on the debug build so that the training cannot rot
set -euo pipefail
cd "$(dirname "$0")/.."
SCRIPT=pgo
source scripts/lib.sh

TRAIN_SECONDS=${TRAIN_SECONDS:-2}
for tool in jq curl; do
    command -v "$tool" >/dev/null || { echo "$SCRIPT: $tool is required" >&2; exit 1; }
done
OUT=target/pgo
llvm_major=$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
find_profdata() {
    local candidate
    for candidate in "${LLVM_PROFDATA:-}" "llvm-profdata-$llvm_major" \
        "$(rustc --print sysroot)/lib/rustlib/$(rustc -vV | sed -n 's/^host: //p')/bin/llvm-profdata"; do
        [[ -n "$candidate" ]] || continue
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" --version 2>/dev/null | grep -q "LLVM version $llvm_major\."; then
            PROFDATA=$(command -v "$candidate")
            return 0
        fi
    done
    return 1
}
if [[ -n "${TRAIN_ONLY:-}" ]]; then
    [[ -n "${INSTRUMENTED:-}" ]] || { echo "$SCRIPT: TRAIN_ONLY needs INSTRUMENTED" >&2; exit 1; }
    NO_BUILD=1
elif ! find_profdata; then
    echo "$SCRIPT: installing llvm-$llvm_major for llvm-profdata (rustc's LLVM is $llvm_major)" >&2
    sudo=""
    [[ "$(id -u)" -eq 0 ]] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "llvm-$llvm_major" >/dev/null
    find_profdata || {
        echo "$SCRIPT: no llvm-profdata for LLVM $llvm_major (apt-get install llvm-$llvm_major, or rustup component add llvm-tools)" >&2
        exit 1
    }
fi

# The mocks and the loadgen: the plain release build.
release_binaries
scratch_and_cleanup

rm -rf "$OUT/raw"
mkdir -p "$OUT/raw"
if [[ -z "${INSTRUMENTED:-}" ]]; then
    echo "$SCRIPT: instrumented build (target/pgo/gen)" >&2
    RUSTFLAGS="-Cprofile-generate=$PWD/$OUT/raw" cargo build --release --bin detour --target-dir "$OUT/gen"
    INSTRUMENTED=$OUT/gen/release/detour
fi

start_mock OPENAI_PORT openai
start_mock ANTHROPIC_PORT anthropic
start_mock GEMINI_PORT gemini
DEAD_PORT=$(free_port)
DETOUR_PORT=$(free_port)

mkdir -p "$TMP/conf"
cat >"$TMP/conf/detour.toml" <<EOF
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

[[providers]]
name = "gemini"
kind = "gemini"
base_url = "http://127.0.0.1:$GEMINI_PORT/v1beta"

[[providers]]
name = "dead"
kind = "openai"
base_url = "http://127.0.0.1:$DEAD_PORT/v1"

[[routes]]
model = "train"
targets = [{ provider = "openai", model = "gpt-4o-mini" }]

[[routes]]
model = "train-anthropic"
targets = [{ provider = "anthropic", model = "claude-haiku-4-5" }]

[[routes]]
model = "train-gemini"
targets = [{ provider = "gemini", model = "gemini-2.0-flash" }]

[[routes]]
model = "train-failover"
targets = [{ provider = "dead", model = "gpt-4o-mini" }, { provider = "openai", model = "gpt-4o-mini" }]
EOF

echo "$SCRIPT: training" >&2
LLVM_PROFILE_FILE="$PWD/$OUT/raw/detour-%p-%m.profraw" RUST_LOG=info \
    "$INSTRUMENTED" serve --config "$TMP/conf/detour.toml" >"$TMP/detour.log" 2>&1 &
SERVE_PID=$!
PIDS+=("$SERVE_PID")
wait_port "$DETOUR_PORT"
chat="http://127.0.0.1:$DETOUR_PORT/v1/chat/completions"
# train LOADGEN-ARGS...: one loadgen run, which must serve every request: a
# profile trained on errors would lay the error paths out as the hot ones.
train() {
    local line
    line=$("$LOADGEN" --url "$chat" --warmup 0 --duration "$TRAIN_SECONDS" "$@")
    jq -e '.requests_total > 0 and .errors == 0' <<<"$line" >/dev/null || {
        echo "$SCRIPT: training run failed ($*): $line" >&2
        exit 1
    }
}
for model in train train-anthropic train-gemini train-failover; do
    for stream in "" "--stream"; do
        # shellcheck disable=SC2086
        train --model "$model" --connections 16 $stream
        # shellcheck disable=SC2086
        train --model "$model" --connections 32 --rate 500 $stream
    done
done
# The Anthropic ingress, passed through and translated, and a few client errors.
messages="http://127.0.0.1:$DETOUR_PORT/v1/messages"
for model in train train-anthropic; do
    for stream in false true; do
        for _ in $(seq 100); do
            status=$(curl -s -o /dev/null -w '%{http_code}' "$messages" \
                -H 'content-type: application/json' -H 'anthropic-version: 2023-06-01' \
                -d "{\"model\":\"$model\",\"max_tokens\":64,\"stream\":$stream,\"messages\":[{\"role\":\"user\",\"content\":\"hello\"}]}")
            [[ "$status" == 200 ]] || { echo "$SCRIPT: /v1/messages ($model, stream $stream) answered $status" >&2; exit 1; }
        done
    done
done
for _ in $(seq 50); do
    curl -s -o /dev/null "$chat" -H 'content-type: application/json' -d '{"model":"nope","messages":[]}'
    curl -s -o /dev/null "$chat" -H 'content-type: application/json' -d '{"model":'
    curl -s -o /dev/null "http://127.0.0.1:$DETOUR_PORT/v1/models"
done
# The profile is written when the process exits, which it does cleanly (0)
# on SIGTERM.
kill -TERM "$SERVE_PID"
if ! wait "$SERVE_PID"; then
    echo "$SCRIPT: the trained detour did not stop cleanly; the end of its log:" >&2
    tail -n 20 "$TMP/detour.log" >&2
    exit 1
fi
if [[ -n "${TRAIN_ONLY:-}" ]]; then
    echo "$SCRIPT: training served every request" >&2
    exit 0
fi

"$PROFDATA" merge -o "$OUT/detour.profdata" "$OUT"/raw/*.profraw
echo "$SCRIPT: profile $OUT/detour.profdata ($(du -h "$OUT/detour.profdata" | cut -f1)); optimized build (target/pgo/release)" >&2
# Every crate is built again with the new profile: cargo fingerprints the flag,
# not the profile's contents.
rm -rf "$OUT/release"
RUSTFLAGS="-Cprofile-use=$PWD/$OUT/detour.profdata" cargo build --release --bin detour --target-dir "$OUT"
echo "$SCRIPT: $OUT/release/detour" >&2
