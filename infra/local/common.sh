# shellcheck shell=bash
# Sourced by spark.sh, ray.sh, mlflow.sh and all.sh: state folder, tool lookup, starting daemons in their
# own sessions, health waits with timeouts, and stopping exactly what was started.
#
# How a daemon is tracked: it is started with `setsid` (so it leads a new session; its id is in
# STATE/run/NAME.pid) and with AUTOCDSR_LOCAL_CLUSTER=STATE:NAME in its environment, which every child
# inherits (Spark executors, Ray workers and job entrypoints, uvicorn workers). `stop` kills the session,
# every descendant of it, and every process that carries the marker, so nothing survives a stop even if
# it started its own session; and it never touches a process that carries neither.

AUTOCDSR_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
SCRIPT="${SCRIPT:-$(basename "$0")}"

STATE="${AUTOCDSR_LOCAL_STATE:-$AUTOCDSR_REPO/.local-cluster}"
mkdir -p "$STATE"
STATE="$(cd "$STATE" && pwd)"
RUN_DIR="$STATE/run"
LOG_DIR="$STATE/logs"
mkdir -p "$RUN_DIR" "$LOG_DIR"

START_TIMEOUT="${AUTOCDSR_START_TIMEOUT:-120}"
STOP_TIMEOUT="${AUTOCDSR_STOP_TIMEOUT:-30}"

die() {
  echo "$SCRIPT: error: $*" >&2
  exit 1
}
info() { echo "$SCRIPT: $*"; }
warn() { echo "$SCRIPT: warning: $*" >&2; }

# The project's Python: $AUTOCDSR_PYTHON, else the repository's .venv, else an activated venv, else python3.
# Tools (spark-class, ray, mlflow) are taken from the same bin/ folder, falling back to PATH.
find_python() {
  if [[ -n "${AUTOCDSR_PYTHON:-}" ]]; then
    PY="$AUTOCDSR_PYTHON"
  elif [[ -x "$AUTOCDSR_REPO/.venv/bin/python" ]]; then
    PY="$AUTOCDSR_REPO/.venv/bin/python"
  elif [[ -n "${VIRTUAL_ENV:-}" && -x "$VIRTUAL_ENV/bin/python" ]]; then
    PY="$VIRTUAL_ENV/bin/python"
  else
    PY="$(command -v python3 || true)"
  fi
  [[ -n "$PY" && -x "$PY" ]] || die "no Python found: run 'make venv' or set AUTOCDSR_PYTHON"
  BIN_DIR="$(dirname "$PY")"
}

tool() {
  if [[ -x "$BIN_DIR/$1" ]]; then
    echo "$BIN_DIR/$1"
  elif command -v "$1" >/dev/null 2>&1; then
    command -v "$1"
  else
    die "'$1' not found next to $PY nor on PATH (install the project: make venv)"
  fi
}

check_port() { # NAME VALUE: a TCP port number
  [[ "$2" =~ ^[0-9]+$ ]] && ((10#$2 >= 1 && 10#$2 <= 65535)) || die "$1=$2 is not a port number"
}

port_in_use() { # PORT: true if something accepts connections on 127.0.0.1:PORT
  timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null
}

require_free_port() { # WHAT PORT ENVVAR
  if port_in_use "$2"; then
    die "port $2 ($1) is already in use on 127.0.0.1; choose another with $3=PORT"
  fi
}

# HTTP probes with curl, or with Python's urllib where curl is missing; 3 s timeout either way.
http_get() { # URL: body on stdout, false unless the answer is 2xx
  if command -v curl >/dev/null 2>&1; then
    curl -fsS --max-time 3 "$1" 2>/dev/null
  else
    "${PY:-python3}" -c 'import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=3) as r:
    sys.stdout.write(r.read().decode("utf-8", "replace"))' "$1" 2>/dev/null
  fi
}

http_ok() { http_get "$1" >/dev/null; }

# --- the saved settings of a running service ---------------------------------------------------------
# `start` records the settings it used in STATE/run/SERVICE.conf; status/stop/env read them back, so a
# service started with non-default ports is found again without repeating the environment.

save_conf() { # SERVICE VAR...
  local service="$1" var
  shift
  : >"$RUN_DIR/$service.conf"
  for var in "$@"; do
    printf '%s=%q\n' "$var" "${!var}" >>"$RUN_DIR/$service.conf"
  done
}

load_conf() { # SERVICE: true if settings were loaded
  local f="$RUN_DIR/$1.conf"
  [[ -f "$f" ]] || return 1
  # shellcheck disable=SC1090
  source "$f"
}

drop_conf() { rm -f "$RUN_DIR/$1.conf"; }

# --- processes ----------------------------------------------------------------------------------------

marker() { echo "$STATE:$1"; }

pid_of() { # NAME: the session id recorded for NAME, or nothing
  local f="$RUN_DIR/$1.pid"
  [[ -f "$f" ]] && tr -dc '0-9' <"$f"
  return 0
}

# True if PID exists and is not a zombie (kill -0 succeeds on a zombie, which would hide a crashed start).
alive() { # PID
  local stat
  [[ -n "${1:-}" ]] && stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
  stat="${stat##*) }"
  [[ "${stat%% *}" != Z ]]
}

# Processes whose environment carries NAME's marker (one grep over /proc; unreadable entries are skipped).
marked_pids() { # NAME
  local m
  m="AUTOCDSR_LOCAL_CLUSTER=$(marker "$1")"
  grep -lsxzF -e "$m" /proc/[0-9]*/environ 2>/dev/null | awk -F/ -v self="$$" '$3 != self {print $3}'
  return 0
}

# Members of session SID and all their descendants (by parent pid), one pid a line. Read from /proc
# (fields after the parenthesised command name: state ppid pgrp session), so procps is not needed; `cat`
# skips processes that exit meanwhile.
session_pids() { # SID
  { cat /proc/[0-9]*/stat 2>/dev/null || true; } | awk -v sid="$1" '
    {
      p = $1
      sub(/^.*\) /, "")
      pid[NR] = p; ppid[NR] = $2; s[NR] = $4
    }
    END {
      for (i = 1; i <= NR; i++) if (s[i] == sid) keep[pid[i]] = 1
      do {
        changed = 0
        for (i = 1; i <= NR; i++)
          if (!(pid[i] in keep) && (ppid[i] in keep)) { keep[pid[i]] = 1; changed = 1 }
      } while (changed)
      for (p in keep) print p
    }'
}

# Everything that belongs to NAME right now: marked processes, plus the recorded session and its
# descendants if at least one of its members is marked (so a recycled pid never gets us to kill a stranger).
owned_pids() { # NAME
  local name="$1" sid marked session p
  sid="$(pid_of "$name")"
  marked="$(marked_pids "$name")"
  if [[ -n "$sid" ]]; then
    session="$(session_pids "$sid")"
    if [[ -n "$session" ]]; then
      for p in $session; do
        if grep -qx "$p" <<<"$marked"; then
          marked="$marked"$'\n'"$session"
          break
        fi
      done
    fi
  fi
  grep -E '^[0-9]+$' <<<"$marked" | grep -vx "$$" | sort -un
  return 0
}

# Start CMD... as daemon NAME: new session, marker in its environment, output to STATE/logs/NAME.log.
launch() { # NAME CMD...
  local name="$1" pidfile="$RUN_DIR/$1.pid" log="$LOG_DIR/$1.log" i
  shift
  rm -f "$pidfile"
  {
    echo "=== $(date -u '+%Y-%m-%dT%H:%M:%SZ') $SCRIPT starts $name"
    printf '%q ' "$@"
    echo
  } >"$log"
  AUTOCDSR_LOCAL_CLUSTER="$(marker "$name")" \
    setsid bash -c 'echo $$ >"$0.tmp" && mv "$0.tmp" "$0" && exec "$@"' "$pidfile" "$@" \
    >>"$log" 2>&1 </dev/null &
  for ((i = 0; i < 50; i++)); do
    [[ -s "$pidfile" ]] && return 0
    sleep 0.1
  done
  die "$name did not start (no pid file after 5 s); see $log"
}

# Wait up to TIMEOUT seconds for CHECK... to succeed while daemon NAME stays alive.
wait_healthy() { # NAME TIMEOUT WHAT CHECK...
  local name="$1" timeout="$2" what="$3" deadline pid
  shift 3
  deadline=$((SECONDS + timeout))
  pid="$(pid_of "$name")"
  while ((SECONDS < deadline)); do
    if "$@"; then
      return 0
    fi
    if ! alive "$pid"; then
      warn "$name exited before $what"
      return 1
    fi
    sleep 1
  done
  warn "$name: no $what after ${timeout}s"
  return 1
}

show_log() { # NAME: the end of its log on stderr
  local log="$LOG_DIR/$1.log"
  [[ -f "$log" ]] || return 0
  {
    echo "----- last 40 lines of $log -----"
    tail -n 40 "$log"
    echo "-----"
  } >&2
}

# Wait up to SECONDS for everything NAME owns to exit; with LEADER given, stop waiting 3 s after that
# process has exited (its children had their chance to follow it). True if nothing is left.
wait_gone() { # NAME SECONDS [LEADER]
  local name="$1" deadline=$((SECONDS + $2)) leader="${3:-}" leader_gone_at=""
  while [[ -n "$(owned_pids "$name")" ]]; do
    if [[ -n "$leader" ]] && ! alive "$leader"; then
      leader_gone_at="${leader_gone_at:-$SECONDS}"
      ((SECONDS - leader_gone_at >= 3)) && return 1
    fi
    ((SECONDS >= deadline)) && return 1
    sleep 0.25
  done
  return 0
}

# Stop daemon NAME, in three steps, each bounded:
#   1. SIGTERM to the session leader alone, which lets a supervisor shut down in order (`ray start
#      --block` drains the node and stops its components; signalled all at once they wait on each other
#      for 30 s); up to STOP_TIMEOUT seconds;
#   2. SIGTERM to everything NAME still owns; up to 10 s;
#   3. SIGKILL to whatever is left; up to 10 s.
# False if anything survives.
stop_daemon() { # NAME
  local name="$1" pids leader sig
  pids="$(owned_pids "$name")"
  if [[ -z "$pids" ]]; then
    rm -f "$RUN_DIR/$name.pid"
    return 0
  fi
  info "stopping $name ($(wc -l <<<"$pids") processes)"
  leader="$(pid_of "$name")"
  if [[ -n "$leader" ]] && alive "$leader" && grep -qx "$leader" <<<"$pids"; then
    kill -TERM "$leader" 2>/dev/null || true
    wait_gone "$name" "$STOP_TIMEOUT" "$leader" || true
  fi
  for sig in TERM KILL; do
    pids="$(owned_pids "$name")"
    [[ -z "$pids" ]] && break
    [[ "$sig" == KILL ]] && warn "$name: $(wc -l <<<"$pids") processes ignored SIGTERM; sending SIGKILL"
    # shellcheck disable=SC2086
    kill -s "$sig" $pids 2>/dev/null || true
    wait_gone "$name" 10 || true
  done
  pids="$(owned_pids "$name")"
  if [[ -n "$pids" ]]; then
    warn "$name: processes $(echo $pids) survived SIGKILL"
    return 1
  fi
  rm -f "$RUN_DIR/$name.pid"
  return 0
}

# running:  the session leader is alive (and carries the marker, so it is not a recycled pid);
# degraded: the leader is gone but some of its processes are left (`stop` cleans them up);
# dead:     a pid file but nothing left;  stopped: never started, or stopped cleanly.
daemon_state() { # NAME
  local pid
  pid="$(pid_of "$1")"
  if alive "$pid" && grep -qx "$pid" <<<"$(marked_pids "$1")"; then
    echo running
  elif [[ -n "$(owned_pids "$1")" ]]; then
    echo degraded
  elif [[ -n "$pid" ]]; then
    echo dead
  else
    echo stopped
  fi
}

usage() { # COMMANDS
  echo "usage: $SCRIPT {$1}" >&2
  exit 2
}
