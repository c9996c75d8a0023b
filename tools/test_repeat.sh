#!/usr/bin/env bash
# `make test-repeat`: the README's `make test` on fresh clones of this repository's HEAD, IDLE times
# (default 5) on an idle machine and BUSY times (default 3) with every core kept busy by another
# process (stress-ng where installed, else shell busy loops), one after another. Prints a line per
# run and exits non-zero if any run failed. Not in CI's default path: it takes 8 suites' time.
# The clones share one virtual environment (made by the first run's `make test`) and ../shared.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
IDLE=${IDLE:-5}
BUSY=${BUSY:-3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/extendserve-repeat-XXXXXX")
SHARED=""
[ -d "$ROOT/../shared" ] && SHARED=$(cd "$ROOT/../shared" && pwd)
burners=()
stop_burners() { for p in "${burners[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null; done; burners=(); }
trap stop_burners EXIT
failed=0
echo "run  load  exit  seconds  summary   (logs in $WORK)"
for i in $(seq 1 $((IDLE + BUSY))); do
  load=idle
  [ "$i" -gt "$IDLE" ] && load=busy
  mkdir -p "$WORK/run-$i"
  [ -n "$SHARED" ] && ln -s "$SHARED" "$WORK/run-$i/shared"
  git clone -q "$ROOT" "$WORK/run-$i/main"
  if [ "$load" = busy ]; then
    if command -v stress-ng >/dev/null; then
      stress-ng --cpu "$(nproc)" --quiet & burners+=($!)
    else
      for _ in $(seq "$(nproc)"); do (while :; do :; done) & burners+=($!); done
    fi
  fi
  t0=$(date +%s)
  (cd "$WORK/run-$i/main" && make test VENV="$WORK/venv") > "$WORK/run-$i.log" 2>&1
  rc=$?
  stop_burners
  summary=$(grep -E "^[0-9]+ (passed|failed)|^=+ .*(passed|failed)" "$WORK/run-$i.log" | tail -1 | tr -d '=')
  printf "%3d  %-4s  %4d  %7d  %s\n" "$i" "$load" "$rc" "$(( $(date +%s) - t0 ))" "$summary"
  [ "$rc" -ne 0 ] && failed=$((failed + 1)) && grep -E "^(FAILED|ERROR) " "$WORK/run-$i.log" | head -20
done
echo "$failed of $((IDLE + BUSY)) runs failed"
[ "$failed" -eq 0 ]
