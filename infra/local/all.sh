#!/usr/bin/env bash
# The whole local stack: Spark standalone (master + worker), MLflow tracking server, Ray head.
#
#   infra/local/all.sh start    start all three (each a no-op if running); if one fails, stops the ones this
#                               call started and exits 1
#   infra/local/all.sh stop     stop all three, each even if another fails to stop; exit 1 if any failed
#   infra/local/all.sh status   status of each; exit 0 all running and healthy, 3 all stopped, 1 otherwise
#   infra/local/all.sh env      the `export ...` lines of all three, for `eval "$(infra/local/all.sh env)"`
#
# Settings: those of spark.sh, mlflow.sh and ray.sh.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SERVICES=(spark mlflow ray)

STARTED=()
undo_start() {
  echo "all.sh: error: $1; stopping what this call started: ${STARTED[*]:-nothing}" >&2
  for ((i = ${#STARTED[@]} - 1; i >= 0; i--)); do
    "$HERE/${STARTED[i]}.sh" stop || true
  done
  exit 1
}

start() {
  local service
  trap 'undo_start "interrupted"' INT TERM
  for service in "${SERVICES[@]}"; do
    if "$HERE/$service.sh" status >/dev/null 2>&1; then
      "$HERE/$service.sh" start
      continue
    fi
    STARTED+=("$service")
    "$HERE/$service.sh" start || undo_start "$service did not start"
  done
  trap - INT TERM
  echo "all.sh: running; for clients: eval \"\$($HERE/all.sh env)\""
}

stop() {
  local rc=0 i
  for ((i = ${#SERVICES[@]} - 1; i >= 0; i--)); do
    "$HERE/${SERVICES[i]}.sh" stop || rc=1
  done
  return "$rc"
}

status() { # 0 all running and healthy, 3 all stopped, 1 anything else
  local service rc codes=""
  for service in "${SERVICES[@]}"; do
    rc=0
    "$HERE/$service.sh" status || rc=$?
    codes+="$rc"
  done
  [[ "$codes" == 000 ]] && return 0
  [[ "$codes" == 333 ]] && return 3
  return 1
}

env_cmd() {
  local service
  for service in "${SERVICES[@]}"; do
    "$HERE/$service.sh" env
  done
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  env) env_cmd ;;
  *)
    echo "usage: all.sh {start|stop|status|env}" >&2
    exit 2
    ;;
esac
