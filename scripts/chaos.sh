#!/usr/bin/env bash
# Runs the chaos suite and writes its measured figures to RESILIENCE.md.
# Usage: scripts/chaos.sh            (about a minute; the suite also runs in CI)
set -euo pipefail
cd "$(dirname "$0")/.."

report=$(mktemp)
trap 'rm -f "$report"' EXIT
DETOUR_CHAOS_REPORT="$report" cargo nextest run --locked --test chaos --no-fail-fast

python3 - "$report" > RESILIENCE.md <<'PY'
import json, sys, datetime, os, platform
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print("# Resilience: the chaos suite's figures\n")
print("Produced by `scripts/chaos.sh` on", datetime.date.today().isoformat(),
      f"({os.cpu_count()} cores, {platform.machine()}, debug build, mocks and load generator in one process).")
print("Each scenario drives 8 concurrent clients through detour to `detour mock` providers for")
print("5-8 s, switching faults on mid-run over the mocks' control API; `tests/chaos.rs` asserts")
print("the bounds, and these are the figures it measured.\n")
for r in sorted(rows, key=lambda r: r["scenario"]):
    print(f"## {r['scenario']}\n")
    print("| figure | value |\n|---|---|")
    for k, v in r["figures"].items():
        if isinstance(v, float):
            v = f"{v:.3f}"
        elif isinstance(v, list):
            v = ", ".join(f"{x:.2f}" for x in v)
        print(f"| {k.replace('_', ' ')} | {v} |")
    print()
PY
echo "wrote RESILIENCE.md"
