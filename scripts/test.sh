#!/usr/bin/env bash
# The test command, on a fresh machine or an old one: installs what the tests
# need (Debian's chromium for the status-page test, redis-server for the
# replica tests, which start their own on free ports, curl and jq for the
# production build's training, python3-venv and a venv with
# the official Python SDKs, Node.js with the official Node SDKs in
# tests/node/node_modules), then runs every test. Safe to run again; fast when
# set up.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests use, installed only when missing.
missing=()
python3 -m venv --help >/dev/null 2>&1 || missing+=(python3-venv)
[ -x /usr/bin/chromium ] || missing+=(chromium)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
# The production build's training (the last phase) drives detour with curl and
# reads the load generator's JSON with jq.
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v jq >/dev/null 2>&1 || missing+=(jq)
# Node.js 18 or newer for the Node SDK tests; Debian's is fine.
if ! command -v node >/dev/null 2>&1; then
  missing+=(nodejs npm)
elif ! command -v npm >/dev/null 2>&1; then
  missing+=(npm)
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "test.sh: installing ${missing[*]} (Debian packages the tests need)" >&2
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  # redis-server's package would start the system service: a policy-rc.d that
  # refuses keeps it stopped (the tests start their own, on free ports).
  policy_added=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $sudo tee /usr/sbin/policy-rc.d >/dev/null
    $sudo chmod 755 /usr/sbin/policy-rc.d
    policy_added=1
  fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
  if [ -n "$policy_added" ]; then $sudo rm -f /usr/sbin/policy-rc.d; fi
fi

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import openai, anthropic' 2>/dev/null; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check -r tests/sdk/requirements.txt
fi

# The Node SDKs, exactly as tests/node/package-lock.json pins them; installed
# again only when that lock file changed since the last install.
lock_sum=$(sha256sum tests/node/package-lock.json | cut -d' ' -f1)
stamp=tests/node/node_modules/.detour-lock-sha256
if [ "$(cat "$stamp" 2>/dev/null)" != "$lock_sum" ] \
  || [ ! -f tests/node/node_modules/openai/package.json ] \
  || [ ! -f tests/node/node_modules/@anthropic-ai/sdk/package.json ]; then
  npm ci --prefix tests/node --no-audit --no-fund --loglevel=error
  echo "$lock_sum" >"$stamp"
fi

# Every phase runs even when an earlier one failed, so one failure never hides
# another; the script fails if any did. Every phase covers the whole workspace:
# the gateway, crates/detour-protocol and crates/detour-mock.
status=0
if cargo nextest --version >/dev/null 2>&1; then
  load='binary_id(detour::chaos) | binary_id(detour::probes) | binary_id(detour::drill) | test(=a_sheddable_flood_cannot_take_the_critical_tiers_capacity) | test(=allowances_never_let_the_replicas_admit_past_the_limit) | test(=a_large_limit_is_admitted_from_allowances_without_a_call_each)'
  cargo nextest run --locked --workspace --all-targets --no-fail-fast -E "not ($load)" || status=1
  # The tests that measure latency or throughput under load (the chaos suite,
  # the overload test, probes, the drill, the shared allowances): alone, after
  # the rest.
  cargo nextest run --locked --workspace --all-targets --no-fail-fast -E "$load" || status=1
  # nextest does not run doc tests.
  cargo test --locked --workspace --doc || status=1
else
  cargo test --locked --workspace --all-targets --no-fail-fast || status=1
fi
# The production build's training (scripts/pgo.sh, step 2) on the debug build
# (the tests' build does not put the load generator at its plain path): every
# request it sends must be served, or the profile would lay out the wrong paths.
cargo build --locked --bin detour --example loadgen || status=1
INSTRUMENTED=target/debug/detour DETOUR=target/debug/detour LOADGEN=target/debug/examples/loadgen \
  TRAIN_ONLY=1 TRAIN_SECONDS=1 scripts/pgo.sh || status=1
exit $status
