#!/usr/bin/env bash
# First run: the example function on the embedded SQLite defaults.
# Registers demo/hello, starts a worker, enqueues sample calls, shows them
# finishing with their logs, then keeps the worker running until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
FNQ=.venv/bin/fnq
say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

say "registering the example function demo/hello (image fnq/example)"
$FNQ fn show demo hello >/dev/null 2>&1 \
    && $FNQ fn update demo hello --image fnq/example:latest >/dev/null \
    || $FNQ fn create demo hello --image fnq/example:latest --memory 64 --timeout 30 >/dev/null
$FNQ fn show demo hello

say "starting a worker (fnq worker)"
# In a session of its own: Ctrl-C (or `timeout`) signals this script's process group,
# and the worker gets exactly one SIGTERM, from stop(), so running calls get their grace.
setsid $FNQ worker &
worker=$!
stop() { kill -TERM "$worker" 2>/dev/null || true; wait "$worker" 2>/dev/null || true; }
trap stop EXIT
trap 'echo; exit 0' INT TERM

say "enqueueing three calls (fnq call demo hello --body ...)"
ids=()
for name in Ada Grace Linus; do
    id=$($FNQ call demo hello --body "{\"name\": \"$name\"}")
    echo "  $name -> $id"
    ids+=("$id")
done

say "waiting for them to finish (fnq calls wait ...)"
$FNQ calls wait --timeout 120 "${ids[@]}" || true

say "fnq calls list --app demo"
$FNQ calls list --app demo
say "fnq calls show ${ids[0]}"
$FNQ calls show "${ids[0]}"
say "fnq logs ${ids[0]}"
$FNQ logs "${ids[0]}"

say "the worker keeps running: try  .venv/bin/fnq call demo hello --body '{\"name\": \"you\"}'  in another terminal; Ctrl-C to stop"
wait "$worker"
