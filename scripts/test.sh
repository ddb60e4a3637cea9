#!/usr/bin/env bash
# The test command: sets up what the tests need (a Python venv with the
# official SDKs), then runs every test. Safe to run again; fast when set up.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import openai' 2>/dev/null; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check -r tests/sdk/requirements.txt
fi

if cargo nextest --version >/dev/null 2>&1; then
  load='binary(chaos) | test(=a_sheddable_flood_cannot_take_the_critical_tiers_capacity)'
  cargo nextest run --locked --all-targets --no-fail-fast -E "not ($load)"
  # The chaos suite and the overload test measure latency under load: alone,
  # after the rest.
  cargo nextest run --locked --all-targets --no-fail-fast -E "$load"
  # nextest does not run doc tests.
  cargo test --locked --doc
else
  cargo test --locked --all-targets
fi
