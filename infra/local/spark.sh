#!/usr/bin/env bash
# Spark standalone on localhost: one master and one worker, run from the installed pyspark (the same Spark
# version as the driver's), bound to 127.0.0.1.
#
#   infra/local/spark.sh start    start master + worker (no-op if running); waits until the worker is registered
#   infra/local/spark.sh stop     stop both and everything they started (executors); safe to repeat
#   infra/local/spark.sh status   exit 0 running and healthy, 3 stopped, 1 anything else
#   infra/local/spark.sh env      print `export SPARK_MASTER_URL=...` lines for eval
#
# Then: spark-submit --master spark://127.0.0.1:7077 --py-files dist/autocdsr-VERSION-py-files.zip JOB ...
#
# Settings (environment, default):
#   AUTOCDSR_LOCAL_STATE            state folder: pid files, logs, work dirs    (REPO/.local-cluster)
#   AUTOCDSR_SPARK_MASTER_PORT      master RPC port                             (7077)
#   AUTOCDSR_SPARK_MASTER_UI_PORT   master web UI; /json/ is the health check   (8080)
#   AUTOCDSR_SPARK_WORKER_UI_PORT   worker web UI                               (8081)
#   AUTOCDSR_SPARK_WORKER_CORES     cores the worker offers to executors        (2)
#   AUTOCDSR_SPARK_WORKER_MEMORY    memory the worker offers to executors       (2g)
#   AUTOCDSR_SPARK_DAEMON_MEMORY    heap of the master and worker JVMs          (512m)
#   AUTOCDSR_SPARK_HOME             Spark installation                          (the installed pyspark)
#   AUTOCDSR_PYTHON                 Python of the project                       (REPO/.venv/bin/python)
#   AUTOCDSR_START_TIMEOUT / AUTOCDSR_STOP_TIMEOUT   seconds                    (120 / 30)
set -euo pipefail
SCRIPT=spark.sh
# shellcheck source=infra/local/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

settings() {
  if ! load_conf spark; then
    MASTER_PORT="${AUTOCDSR_SPARK_MASTER_PORT:-7077}"
    MASTER_UI_PORT="${AUTOCDSR_SPARK_MASTER_UI_PORT:-8080}"
    WORKER_UI_PORT="${AUTOCDSR_SPARK_WORKER_UI_PORT:-8081}"
    WORKER_CORES="${AUTOCDSR_SPARK_WORKER_CORES:-2}"
    WORKER_MEMORY="${AUTOCDSR_SPARK_WORKER_MEMORY:-2g}"
    DAEMON_MEMORY="${AUTOCDSR_SPARK_DAEMON_MEMORY:-512m}"
  fi
  check_port AUTOCDSR_SPARK_MASTER_PORT "$MASTER_PORT"
  check_port AUTOCDSR_SPARK_MASTER_UI_PORT "$MASTER_UI_PORT"
  check_port AUTOCDSR_SPARK_WORKER_UI_PORT "$WORKER_UI_PORT"
  MASTER_URL="spark://127.0.0.1:$MASTER_PORT"
  MASTER_UI="http://127.0.0.1:$MASTER_UI_PORT"
}

master_json() { http_get "$MASTER_UI/json/"; }
master_up() { master_json | grep -Eq '"status" *: *"ALIVE"'; }
alive_workers() { master_json | sed -nE 's/.*"aliveworkers" *: *([0-9]+).*/\1/p' | head -n 1; }
worker_registered() { [[ "$(alive_workers)" -ge 1 ]] 2>/dev/null; }

find_spark_home() {
  if [[ -n "${AUTOCDSR_SPARK_HOME:-}" ]]; then
    SPARK_HOME_DIR="$AUTOCDSR_SPARK_HOME"
  else
    find_python
    SPARK_HOME_DIR="$("$PY" -c 'import os, pyspark; print(os.path.dirname(pyspark.__file__))' 2>/dev/null)" ||
      die "pyspark is not importable with $PY (run 'make venv' or set AUTOCDSR_SPARK_HOME)"
  fi
  [[ -x "$SPARK_HOME_DIR/bin/spark-class" ]] || die "no bin/spark-class under $SPARK_HOME_DIR"
  command -v java >/dev/null 2>&1 || [[ -n "${JAVA_HOME:-}" ]] || die "java not found (Spark needs Java 17)"
}

# Environment of both daemons. SPARK_LOCAL_IP binds the RPC endpoints and web UIs to loopback; the empty
# SPARK_CONF_DIR keeps a user's spark-env.sh / spark-defaults.conf out of the test cluster.
daemon_env() {
  mkdir -p "$STATE/spark/conf" "$STATE/spark/work" "$STATE/spark/local"
  export SPARK_HOME="$SPARK_HOME_DIR"
  export SPARK_CONF_DIR="$STATE/spark/conf"
  export SPARK_LOCAL_IP=127.0.0.1
  export SPARK_LOCAL_DIRS="$STATE/spark/local"
  export SPARK_WORKER_DIR="$STATE/spark/work"
  export SPARK_DAEMON_MEMORY="$DAEMON_MEMORY"
  # Spark 4 enables the master's REST submission server by default: a fixed port (6066) that would clash
  # between clusters and accepts unauthenticated submissions. spark-submit does not need it.
  export SPARK_MASTER_OPTS="-Dspark.master.rest.enabled=false ${SPARK_MASTER_OPTS:-}"
  export PYSPARK_PYTHON="${PYSPARK_PYTHON:-$PY}"
}

STARTED=()
abort_start() {
  local name
  for name in "${STARTED[@]}"; do
    show_log "$name"
  done
  for ((i = ${#STARTED[@]} - 1; i >= 0; i--)); do
    stop_daemon "${STARTED[i]}" || true
  done
  [[ "$(daemon_state spark-master)" == running ]] || drop_conf spark
  die "${1:-start interrupted}; stopped what this call started"
}

start() {
  local master_state worker_state
  master_state="$(daemon_state spark-master)"
  [[ "$master_state" == running ]] || drop_conf spark
  settings
  if [[ "$master_state" == degraded ]]; then
    stop_daemon spark-master || die "could not clean up the remains of a previous spark-master"
  fi
  if [[ "$(daemon_state spark-worker)" == degraded ]]; then
    stop_daemon spark-worker || die "could not clean up the remains of a previous spark-worker"
  fi
  find_python
  trap 'abort_start "interrupted"' INT TERM

  if [[ "$master_state" != running ]]; then
    require_free_port "master RPC" "$MASTER_PORT" AUTOCDSR_SPARK_MASTER_PORT
    require_free_port "master UI" "$MASTER_UI_PORT" AUTOCDSR_SPARK_MASTER_UI_PORT
    find_spark_home
    daemon_env
    save_conf spark MASTER_PORT MASTER_UI_PORT WORKER_UI_PORT WORKER_CORES WORKER_MEMORY DAEMON_MEMORY SPARK_HOME_DIR
    STARTED+=(spark-master)
    launch spark-master "$SPARK_HOME_DIR/bin/spark-class" org.apache.spark.deploy.master.Master \
      --host 127.0.0.1 --port "$MASTER_PORT" --webui-port "$MASTER_UI_PORT"
    wait_healthy spark-master "$START_TIMEOUT" "ALIVE status on $MASTER_UI/json/" master_up ||
      abort_start "the Spark master did not come up"
  fi

  worker_state="$(daemon_state spark-worker)"
  if [[ "$worker_state" != running ]]; then
    require_free_port "worker UI" "$WORKER_UI_PORT" AUTOCDSR_SPARK_WORKER_UI_PORT
    [[ -n "${SPARK_HOME_DIR:-}" ]] || find_spark_home
    daemon_env
    STARTED+=(spark-worker)
    launch spark-worker "$SPARK_HOME_DIR/bin/spark-class" org.apache.spark.deploy.worker.Worker \
      --host 127.0.0.1 --webui-port "$WORKER_UI_PORT" --cores "$WORKER_CORES" --memory "$WORKER_MEMORY" \
      --work-dir "$STATE/spark/work" "$MASTER_URL"
  fi
  wait_healthy spark-worker "$START_TIMEOUT" "worker registered with the master" worker_registered ||
    abort_start "the Spark worker did not register with $MASTER_URL"
  trap - INT TERM

  if ((${#STARTED[@]} == 0)); then
    info "already running: $MASTER_URL (UI $MASTER_UI)"
  else
    info "running: $MASTER_URL (UI $MASTER_UI), 1 worker with $WORKER_CORES cores / $WORKER_MEMORY; logs in $LOG_DIR"
  fi
}

stop() {
  local rc=0
  stop_daemon spark-worker || rc=1
  stop_daemon spark-master || rc=1
  if ((rc == 0)); then
    drop_conf spark
    info "stopped"
  fi
  return "$rc"
}

status() {
  local m w
  m="$(daemon_state spark-master)"
  w="$(daemon_state spark-worker)"
  if [[ "$m" == stopped && "$w" == stopped ]]; then
    info "stopped"
    return 3
  fi
  settings
  echo "spark-master: $m  $MASTER_URL  UI $MASTER_UI  log $LOG_DIR/spark-master.log"
  echo "spark-worker: $w  UI http://127.0.0.1:$WORKER_UI_PORT  log $LOG_DIR/spark-worker.log"
  if [[ "$m" == running && "$w" == running ]] && worker_registered; then
    echo "alive workers: $(alive_workers)"
    return 0
  fi
  warn "not healthy (run '$0 stop' to clean up, then start again)"
  return 1
}

env_cmd() {
  settings
  echo "export SPARK_MASTER_URL=$MASTER_URL"
  # The driver must be reachable from executors; on loopback that means binding it to 127.0.0.1 too.
  echo "export SPARK_LOCAL_IP=127.0.0.1"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  env) env_cmd ;;
  *) usage "start|stop|status|env" ;;
esac
