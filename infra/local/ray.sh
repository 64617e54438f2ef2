#!/usr/bin/env bash
# A single-node Ray cluster on localhost: `ray start --head --block` in its own session, dashboard (and
# with it the Jobs API) on 127.0.0.1.
#
#   infra/local/ray.sh start    start the head (no-op if running); waits until the Jobs API answers
#   infra/local/ray.sh stop     stop the head and every Ray process it started (workers, job entrypoints)
#   infra/local/ray.sh status   exit 0 running and healthy, 3 stopped, 1 anything else
#   infra/local/ray.sh env      print `export RAY_API_SERVER_ADDRESS=... RAY_ADDRESS=...` lines for eval
#
# Then: ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m autocdsr.train ...
#
# It never runs `ray stop`, which kills every Ray process of the user on the machine, including other
# clusters and local `ray.init()` sessions; it stops exactly what it started (see common.sh).
#
# Settings (environment, default):
#   AUTOCDSR_LOCAL_STATE               state folder: pid files, logs                        (REPO/.local-cluster)
#   AUTOCDSR_RAY_PORT                  GCS port; `ray.init(address="127.0.0.1:PORT")`        (6379)
#   AUTOCDSR_RAY_DASHBOARD_PORT        dashboard + Jobs API; `ray job submit --address`     (8265)
#   AUTOCDSR_RAY_CLIENT_PORT           Ray Client server (ray://127.0.0.1:PORT)             (10001)
#   AUTOCDSR_RAY_AGENT_PORT            dashboard agent HTTP port                            (52365)
#   AUTOCDSR_RAY_MIN_WORKER_PORT, AUTOCDSR_RAY_MAX_WORKER_PORT: range for worker processes; the ports
#                                      above must lie outside it                            (10002, 19999)
#   AUTOCDSR_RAY_NUM_CPUS              logical CPUs; more than training workers reserve, or
#                                      Ray Data gets none and the job hangs (STACK.md)      (8)
#   AUTOCDSR_RAY_OBJECT_STORE_MEMORY   bytes                                                (2147483648)
#   AUTOCDSR_RAY_TEMP_DIR              Ray's session folder (sockets, logs); at most 40
#                                      characters, Unix socket paths are limited to 107     (STATE/ray if short
#                                                                                            enough, else under /tmp)
#   AUTOCDSR_RAY_DRAIN_TIMEOUT         seconds `stop` lets running jobs drain               (3)
#   RAY_AUTH_MODE                      token authentication; defaults to `disabled` here because the
#                                      cluster is local and tests must not depend on ~/.ray/auth_token
#                                      (set RAY_AUTH_MODE=token to keep it on)               (disabled)
#   AUTOCDSR_PYTHON, AUTOCDSR_START_TIMEOUT, AUTOCDSR_STOP_TIMEOUT: as in spark.sh
set -euo pipefail
SCRIPT=ray.sh
# shellcheck source=infra/local/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

settings() {
  if ! load_conf ray; then
    GCS_PORT="${AUTOCDSR_RAY_PORT:-6379}"
    DASHBOARD_PORT="${AUTOCDSR_RAY_DASHBOARD_PORT:-8265}"
    CLIENT_PORT="${AUTOCDSR_RAY_CLIENT_PORT:-10001}"
    AGENT_PORT="${AUTOCDSR_RAY_AGENT_PORT:-52365}"
    MIN_WORKER_PORT="${AUTOCDSR_RAY_MIN_WORKER_PORT:-10002}"
    MAX_WORKER_PORT="${AUTOCDSR_RAY_MAX_WORKER_PORT:-19999}"
    NUM_CPUS="${AUTOCDSR_RAY_NUM_CPUS:-8}"
    OBJECT_STORE_MEMORY="${AUTOCDSR_RAY_OBJECT_STORE_MEMORY:-2147483648}"
    AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
    RAY_TMP="${AUTOCDSR_RAY_TEMP_DIR:-}"
    if [[ -z "$RAY_TMP" ]]; then
      RAY_TMP="$STATE/ray"
      if ((${#RAY_TMP} > 40)); then
        RAY_TMP="/tmp/autocdsr-ray-$(id -u)-$(printf '%s' "$STATE" | cksum | cut -d' ' -f1)"
      fi
    fi
  fi
  check_port AUTOCDSR_RAY_PORT "$GCS_PORT"
  check_port AUTOCDSR_RAY_DASHBOARD_PORT "$DASHBOARD_PORT"
  check_port AUTOCDSR_RAY_CLIENT_PORT "$CLIENT_PORT"
  check_port AUTOCDSR_RAY_AGENT_PORT "$AGENT_PORT"
  check_port AUTOCDSR_RAY_MIN_WORKER_PORT "$MIN_WORKER_PORT"
  check_port AUTOCDSR_RAY_MAX_WORKER_PORT "$MAX_WORKER_PORT"
  ((MIN_WORKER_PORT < MAX_WORKER_PORT)) || die "worker port range $MIN_WORKER_PORT-$MAX_WORKER_PORT is empty"
  local p seen=" "
  for p in "$GCS_PORT" "$DASHBOARD_PORT" "$CLIENT_PORT" "$AGENT_PORT"; do
    [[ "$seen" != *" $p "* ]] ||
      die "port $p is given twice: AUTOCDSR_RAY_PORT, AUTOCDSR_RAY_DASHBOARD_PORT, AUTOCDSR_RAY_CLIENT_PORT and AUTOCDSR_RAY_AGENT_PORT must differ"
    seen+="$p "
    if ((p >= MIN_WORKER_PORT && p <= MAX_WORKER_PORT)); then
      die "port $p lies in Ray's worker port range $MIN_WORKER_PORT-$MAX_WORKER_PORT; choose another, or move the range with AUTOCDSR_RAY_MIN_WORKER_PORT/AUTOCDSR_RAY_MAX_WORKER_PORT"
    fi
  done
  [[ "$NUM_CPUS" =~ ^[1-9][0-9]*$ ]] || die "AUTOCDSR_RAY_NUM_CPUS=$NUM_CPUS is not a positive integer"
  [[ "$OBJECT_STORE_MEMORY" =~ ^[1-9][0-9]*$ ]] ||
    die "AUTOCDSR_RAY_OBJECT_STORE_MEMORY=$OBJECT_STORE_MEMORY is not a number of bytes"
  ((${#RAY_TMP} <= 40)) ||
    die "Ray temp dir '$RAY_TMP' is longer than 40 characters (Unix socket paths under it would exceed 107); set AUTOCDSR_RAY_TEMP_DIR"
  DASHBOARD="http://127.0.0.1:$DASHBOARD_PORT"
}

# The Jobs API is served by a dashboard module that comes up after the dashboard itself.
jobs_api_up() { http_ok "$DASHBOARD/api/version" && http_ok "$DASHBOARD/api/jobs/"; }
head_started() { grep -q "Ray runtime started" "$LOG_DIR/ray-head.log" 2>/dev/null && jobs_api_up; }

start() {
  local state ray
  state="$(daemon_state ray-head)"
  [[ "$state" == running ]] || drop_conf ray
  settings
  if [[ "$state" == running ]]; then
    wait_healthy ray-head "$START_TIMEOUT" "Jobs API on $DASHBOARD" head_started ||
      die "a Ray head is running but not healthy; see $LOG_DIR/ray-head.log, or run '$0 stop'"
    info "already running: $DASHBOARD (GCS 127.0.0.1:$GCS_PORT)"
    return 0
  fi
  if [[ "$state" == degraded ]]; then
    stop_daemon ray-head || die "could not clean up the remains of a previous ray-head"
  fi
  require_free_port "GCS" "$GCS_PORT" AUTOCDSR_RAY_PORT
  require_free_port "dashboard" "$DASHBOARD_PORT" AUTOCDSR_RAY_DASHBOARD_PORT
  require_free_port "Ray Client server" "$CLIENT_PORT" AUTOCDSR_RAY_CLIENT_PORT
  require_free_port "dashboard agent" "$AGENT_PORT" AUTOCDSR_RAY_AGENT_PORT
  find_python
  ray="$(tool ray)"
  mkdir -p "$RAY_TMP"
  save_conf ray GCS_PORT DASHBOARD_PORT CLIENT_PORT AGENT_PORT MIN_WORKER_PORT MAX_WORKER_PORT NUM_CPUS OBJECT_STORE_MEMORY AUTH_MODE RAY_TMP

  trap 'show_log ray-head; stop_daemon ray-head || true; drop_conf ray; die "start interrupted; stopped the Ray head"' INT TERM
  export RAY_AUTH_MODE="$AUTH_MODE" RAY_USAGE_STATS_ENABLED=0
  # On SIGTERM `ray start --block` drains the node, by default for up to 30 s while jobs run; a local
  # cluster being stopped has nothing to hand its work to.
  export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="${AUTOCDSR_RAY_DRAIN_TIMEOUT:-3}"
  # Job entrypoints are shell commands run in the head's environment: `python` must be the project's.
  export PATH="$BIN_DIR:$PATH"
  launch ray-head "$ray" start --head --block \
    --node-ip-address 127.0.0.1 --port "$GCS_PORT" \
    --include-dashboard true --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT" \
    --dashboard-agent-listen-port "$AGENT_PORT" --ray-client-server-port "$CLIENT_PORT" \
    --min-worker-port "$MIN_WORKER_PORT" --max-worker-port "$MAX_WORKER_PORT" \
    --num-cpus "$NUM_CPUS" --num-gpus 0 --object-store-memory "$OBJECT_STORE_MEMORY" \
    --temp-dir "$RAY_TMP" --disable-usage-stats
  if ! wait_healthy ray-head "$START_TIMEOUT" "Jobs API on $DASHBOARD" head_started; then
    show_log ray-head
    stop_daemon ray-head || true
    drop_conf ray
    die "the Ray head did not come up; stopped what was started (Ray's own logs: $RAY_TMP/session_latest/logs)"
  fi
  trap - INT TERM
  info "running: Jobs API $DASHBOARD, GCS 127.0.0.1:$GCS_PORT, $NUM_CPUS CPUs, auth $AUTH_MODE; log $LOG_DIR/ray-head.log"
}

stop() {
  if stop_daemon ray-head; then
    drop_conf ray
    info "stopped"
  else
    return 1
  fi
}

status() {
  local state
  state="$(daemon_state ray-head)"
  if [[ "$state" == stopped ]]; then
    info "stopped"
    return 3
  fi
  settings
  echo "ray-head: $state  dashboard/Jobs API $DASHBOARD  GCS 127.0.0.1:$GCS_PORT  $NUM_CPUS CPUs  auth $AUTH_MODE"
  echo "          log $LOG_DIR/ray-head.log  Ray logs $RAY_TMP/session_latest/logs"
  if [[ "$state" == running ]] && jobs_api_up; then
    return 0
  fi
  warn "not healthy (run '$0 stop' to clean up, then start again)"
  return 1
}

env_cmd() {
  settings
  # What `ray start` itself recommends: the Jobs CLI/SDK read RAY_API_SERVER_ADDRESS, `ray.init()` RAY_ADDRESS.
  echo "export RAY_API_SERVER_ADDRESS=$DASHBOARD"
  echo "export RAY_ADDRESS=127.0.0.1:$GCS_PORT"
  echo "export RAY_AUTH_MODE=$AUTH_MODE"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  env) env_cmd ;;
  *) usage "start|stop|status|env" ;;
esac
