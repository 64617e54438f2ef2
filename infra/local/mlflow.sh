#!/usr/bin/env bash
# An MLflow tracking server on localhost: SQLite backend (runs, metrics, model registry) and a local
# artifact folder served over HTTP (--serve-artifacts, the default), so clients need only the URL: no
# shared disk, no object-store credentials.
#
#   infra/local/mlflow.sh start    start the server (no-op if running); waits until /health answers
#   infra/local/mlflow.sh stop     stop it and its web workers; safe to repeat
#   infra/local/mlflow.sh status   exit 0 running and healthy, 3 stopped, 1 anything else
#   infra/local/mlflow.sh env      print `export MLFLOW_TRACKING_URI=...` for eval
#
# Data stays in STATE/mlflow/ (mlflow.db, mlartifacts/) across restarts; delete the folder to start over.
#
# Settings (environment, default):
#   AUTOCDSR_LOCAL_STATE       state folder: pid files, logs, database, artifacts    (REPO/.local-cluster)
#   AUTOCDSR_MLFLOW_PORT       HTTP port                                             (5000)
#   AUTOCDSR_MLFLOW_WORKERS    uvicorn worker processes                              (1)
#   AUTOCDSR_MLFLOW_JOB_EXECUTION  the server's GenAI job runner (huey consumers)    (false)
#   AUTOCDSR_PYTHON, AUTOCDSR_START_TIMEOUT, AUTOCDSR_STOP_TIMEOUT: as in spark.sh
set -euo pipefail
SCRIPT=mlflow.sh
# shellcheck source=infra/local/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

settings() {
  if ! load_conf mlflow; then
    PORT="${AUTOCDSR_MLFLOW_PORT:-5000}"
    WORKERS="${AUTOCDSR_MLFLOW_WORKERS:-1}"
    JOB_EXECUTION="${AUTOCDSR_MLFLOW_JOB_EXECUTION:-false}"
  fi
  check_port AUTOCDSR_MLFLOW_PORT "$PORT"
  [[ "$WORKERS" =~ ^[1-9][0-9]*$ ]] || die "AUTOCDSR_MLFLOW_WORKERS=$WORKERS is not a positive integer"
  URL="http://127.0.0.1:$PORT"
  DATA="$STATE/mlflow"
}

healthy() { [[ "$(http_get "$URL/health")" == OK* ]]; }

start() {
  local state mlflow
  state="$(daemon_state mlflow)"
  [[ "$state" == running ]] || drop_conf mlflow
  settings
  if [[ "$state" == running ]]; then
    wait_healthy mlflow "$START_TIMEOUT" "answer on $URL/health" healthy ||
      die "an MLflow server is running but not healthy; see $LOG_DIR/mlflow.log, or run '$0 stop'"
    info "already running: $URL"
    return 0
  fi
  if [[ "$state" == degraded ]]; then
    stop_daemon mlflow || die "could not clean up the remains of a previous MLflow server"
  fi
  require_free_port "MLflow" "$PORT" AUTOCDSR_MLFLOW_PORT
  find_python
  mlflow="$(tool mlflow)"
  mkdir -p "$DATA/mlartifacts"
  save_conf mlflow PORT WORKERS JOB_EXECUTION

  trap 'show_log mlflow; stop_daemon mlflow || true; drop_conf mlflow; die "start interrupted; stopped the MLflow server"' INT TERM
  # The server's GenAI job runner (8 huey consumer processes) serves features this project does not use;
  # on a 2-core machine they cost more than they give.
  export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="$JOB_EXECUTION"
  # The first start creates the schema (alembic migrations): seconds, not instant.
  launch mlflow "$mlflow" server \
    --backend-store-uri "sqlite:///$DATA/mlflow.db" \
    --artifacts-destination "$DATA/mlartifacts" --serve-artifacts \
    --host 127.0.0.1 --port "$PORT" --workers "$WORKERS"
  if ! wait_healthy mlflow "$START_TIMEOUT" "answer on $URL/health" healthy; then
    show_log mlflow
    stop_daemon mlflow || true
    drop_conf mlflow
    die "the MLflow server did not come up; stopped what was started"
  fi
  trap - INT TERM
  info "running: $URL (backend $DATA/mlflow.db, artifacts $DATA/mlartifacts); log $LOG_DIR/mlflow.log"
}

stop() {
  if stop_daemon mlflow; then
    drop_conf mlflow
    info "stopped"
  else
    return 1
  fi
}

status() {
  local state
  state="$(daemon_state mlflow)"
  if [[ "$state" == stopped ]]; then
    info "stopped"
    return 3
  fi
  settings
  echo "mlflow: $state  $URL  data $DATA  log $LOG_DIR/mlflow.log"
  if [[ "$state" == running ]] && healthy; then
    return 0
  fi
  warn "not healthy (run '$0 stop' to clean up, then start again)"
  return 1
}

env_cmd() {
  settings
  echo "export MLFLOW_TRACKING_URI=$URL"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  env) env_cmd ;;
  *) usage "start|stop|status|env" ;;
esac
