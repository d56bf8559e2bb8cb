#!/usr/bin/env bash
# Runs the test suite once per Keras backend, the backends in parallel (each
# pytest process is mostly single-threaded dispatch, so on 2 cores this
# roughly halves the wall time), and exits non-zero if any backend failed.
#
# While they run it prints one status line every $TEST_PROGRESS_INTERVAL
# seconds (default 30) with each backend's tests done so far, and a line as
# each backend finishes. At the end it prints each backend's whole log, then
# pytest's closing summary line of every backend (the last lines of output).
#   usage: tools/test_all_backends.sh PYTHON "BACKENDS" [pytest args...]
# Without test paths in the pytest arguments, pytest runs its `testpaths`
# (tests/, see pyproject.toml); with some, only those, e.g.
#   tools/test_all_backends.sh .venv/bin/python "jax torch" tests/test_backend.py
set -u
py=$1; backends=$2; shift 2
interval=${TEST_PROGRESS_INTERVAL:-30}
logdir=$(mktemp -d)

stop() {
  # Background jobs of a script ignore Ctrl-C: stop our pytest processes.
  local pidfile
  for pidfile in "$logdir"/*.pid; do
    [ -e "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null
  done
  rm -rf "$logdir"
  exit 130
}
trap stop INT TERM

# Threads per backend: the cores shared out among the backends running at
# once (at least 1; TEST_THREADS overrides). Each math library otherwise
# starts one thread per core, and on 2 cores three backends' thread pools
# spin against each other: measured on a loaded 2-core machine, a quick
# study run of Soft MoE on torch took 16.2 s with 2 threads and 2.1 s with 1.
cores=$(nproc 2>/dev/null || echo 1)
count=$(echo $backends | wc -w)
threads=${TEST_THREADS:-$(( cores / count > 0 ? cores / count : 1 ))}
export OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads
export TF_NUM_INTRAOP_THREADS=$threads
if [ "$threads" = 1 ]; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_cpu_multi_thread_eigen=false"
fi
echo "Running the tests of: $backends ($threads thread(s) each, $cores cores)"

for b in $backends; do
  (
    # Unbuffered, so that the log shows the tests done so far.
    KERAS_BACKEND=$b PYTHONUNBUFFERED=1 "$py" -m pytest -q -p no:cacheprovider \
      -o console_output_style=count "$@" >"$logdir/$b.log" 2>&1 &
    echo $! >"$logdir/$b.pid"
    wait $!
    { echo $? >"$logdir/$b.rc"; } 2>/dev/null  # the folder is gone if stopped
  ) &
done

# Tests done so far in a pytest -q log: one character per test outcome
# (. F E s x X) on the progress lines ("....F.. [ 40/700]"), the last one
# possibly unfinished.
progress() {
  local name=$1 log=$2 lines outcomes failed total
  lines=$(grep -aE '^[.FEsxX]+( +\[ *[0-9]+/[0-9]+\])?$' "$log" 2>/dev/null)
  outcomes=$(printf '%s\n' "$lines" | sed -E 's/ +\[.*//' | tr -d '\n')
  failed=$(printf %s "$outcomes" | tr -cd 'FE' | wc -c)
  total=$(printf '%s\n' "$lines" | grep -oE '/[0-9]+\]$' | tail -n 1 | tr -d '/]')
  printf '%s %s%s' "$name" "${#outcomes}" "${total:+/$total}"
  [ "$failed" -gt 0 ] && printf ' (%s failed)' "$failed"
  return 0
}

# The closing summary line of a pytest log ("3 passed, 1 skipped in 1.20s").
summary() {
  grep -aE ' in [0-9.]+s( \([0-9:]+\))?( =+)?$' "$1" | tail -n 1
}

elapsed() { printf '%dm%02ds' $((SECONDS / 60)) $((SECONDS % 60)); }

declare -A finished
status=0
next=$interval
while :; do
  remaining=0
  for b in $backends; do
    [ -n "${finished[$b]:-}" ] && continue
    if [ -e "$logdir/$b.rc" ]; then
      finished[$b]=1
      if [ "$(cat "$logdir/$b.rc")" = 0 ]; then result=passed; else result=FAILED; status=1; fi
      echo "[$(elapsed)] $b finished: $result. $(summary "$logdir/$b.log")"
    else
      remaining=1
    fi
  done
  [ $remaining = 0 ] && break
  if [ $SECONDS -ge $next ]; then
    line=""
    for b in $backends; do
      [ -n "${finished[$b]:-}" ] && continue
      line="$line${line:+ | }$(progress "$b" "$logdir/$b.log")"
    done
    echo "[$(elapsed)] tests done: $line"
    next=$((SECONDS + interval))
  fi
  sleep 1
done
wait

for b in $backends; do
  if [ "$(cat "$logdir/$b.rc")" = 0 ]; then result=passed; else result=FAILED; fi
  echo
  echo "=== pytest, KERAS_BACKEND=$b: $result ==="
  cat "$logdir/$b.log"
done
echo
echo "=== summary ($(elapsed)) ==="
for b in $backends; do
  if [ "$(cat "$logdir/$b.rc")" = 0 ]; then result=passed; else result=FAILED; fi
  echo "$b: $result $(summary "$logdir/$b.log")"
done
rm -rf "$logdir"
exit $status
