#!/usr/bin/env bash
# Runs the test suite once per Keras backend, the backends in parallel (each
# pytest process is mostly single-threaded dispatch, so on 2 cores this
# roughly halves the wall time). Prints each backend's log when it ends and
# exits non-zero if any backend failed.
#   usage: tools/test_all_backends.sh PYTHON "BACKENDS" [pytest args...]
set -u
py=$1; backends=$2; shift 2
logdir=$(mktemp -d)
declare -A pids
for b in $backends; do
  KERAS_BACKEND=$b "$py" -m pytest -q -p no:cacheprovider "$@" tests >"$logdir/$b.log" 2>&1 &
  pids[$b]=$!
done
status=0
for b in $backends; do
  if wait "${pids[$b]}"; then result=passed; else result=FAILED; status=1; fi
  echo "=== pytest, KERAS_BACKEND=$b: $result ==="
  cat "$logdir/$b.log"
done
rm -rf "$logdir"
exit $status
