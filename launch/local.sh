#!/usr/bin/env bash
# Run one command as N cooperating CPU processes on this machine (a multi-host run in miniature):
#
#   launch/local.sh 2 python -m diffuseg_jax.main --config=configs/test.py --workdir=runs/two_procs
#
# Process i gets JAX_COORDINATOR_ADDRESS=127.0.0.1:<port>, NUM_PROCESSES=N and PROCESS_ID=i, which
# diffuseg_jax/distributed.py turns into jax.distributed.initialize(); cross-process collectives use gloo.
#
# Environment:
#   LOCAL_DEVICES     CPU devices per process (default 1; sets --xla_force_host_platform_device_count)
#   COORDINATOR_PORT  port of process 0 (default: a free one)
#   LAUNCH_LOG_DIR    if set, process i writes its output to $LAUNCH_LOG_DIR/process_<i>.log
#   LAUNCH_GRACE_S    seconds the others get to exit after one process fails, before SIGKILL (default 20)
#
# SIGTERM/SIGINT/SIGHUP are forwarded to every process as SIGTERM (they checkpoint at one agreed step and
# exit with 143); a second signal kills them. Exit status: 0 if every process succeeded, else the status of
# the first process that failed. A failed process leaves the others blocked in a collective, so they are
# sent SIGTERM and, after LAUNCH_GRACE_S, SIGKILL.
set -u

if [[ $# -lt 2 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 NUM_PROCESSES COMMAND [ARGS...]" >&2
  exit 2
fi
num=$1
shift

port=${COORDINATOR_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
devices=${LOCAL_DEVICES:-1}
xla_flags="$(echo "${XLA_FLAGS:-}" | sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g') --xla_force_host_platform_device_count=${devices}"
[[ -n "${LAUNCH_LOG_DIR:-}" ]] && mkdir -p "$LAUNCH_LOG_DIR"

pids=()
for ((i = 0; i < num; i++)); do
  export JAX_COORDINATOR_ADDRESS="127.0.0.1:$port" NUM_PROCESSES=$num PROCESS_ID=$i
  export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu} XLA_FLAGS="$xla_flags"
  if [[ -n "${LAUNCH_LOG_DIR:-}" ]]; then
    "$@" >"$LAUNCH_LOG_DIR/process_$i.log" 2>&1 &
  else
    "$@" &
  fi
  pids+=($!)
done

signals=0
forward() {
  signals=$((signals + 1))
  local sig=TERM
  ((signals > 1)) && sig=KILL
  for pid in "${pids[@]}"; do kill -s "$sig" "$pid" 2>/dev/null; done
}
trap forward TERM INT HUP

status=0
failed_at=
remaining=$num
declare -A done_pids=()
while ((remaining > 0)); do
  for pid in "${pids[@]}"; do
    [[ -n "${done_pids[$pid]:-}" ]] && continue
    kill -0 "$pid" 2>/dev/null && continue  # bash reaps exited children, so this fails once one ends
    wait "$pid"
    rc=$?
    done_pids[$pid]=1
    remaining=$((remaining - 1))
    if ((rc != 0 && status == 0)); then
      status=$rc
      failed_at=$SECONDS
      echo "launch/local.sh: process with pid $pid exited with status $rc; stopping the others" >&2
      for other in "${pids[@]}"; do
        [[ -z "${done_pids[$other]:-}" ]] && kill -TERM "$other" 2>/dev/null
      done
    fi
  done
  if [[ -n "$failed_at" ]] && ((SECONDS - failed_at >= ${LAUNCH_GRACE_S:-20})); then
    for pid in "${pids[@]}"; do
      [[ -z "${done_pids[$pid]:-}" ]] && kill -KILL "$pid" 2>/dev/null
    done
  fi
  ((remaining > 0)) && sleep 0.2
done
exit "$status"
