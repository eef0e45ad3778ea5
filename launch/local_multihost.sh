#!/usr/bin/env bash
# N processes of one command on this machine, joined into one JAX runtime through a
# coordinator on 127.0.0.1: a multi-host run without a cluster, for testing.
#
#   launch/local_multihost.sh 2 python -m experiments.gkd_summarize --workdir=runs/two_hosts
#
# Each process gets --coordinator_address/--num_processes/--process_id appended and
# DEVICES_PER_PROCESS forced CPU devices (default 1); its output lines are prefixed with
# its id. If one process fails the others are stopped, and the first failure's exit code
# is returned.
set -euo pipefail

if [[ $# -lt 2 || ! $1 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 NUM_PROCESSES COMMAND [ARGS...]" >&2
  exit 2
fi
num_processes=$1
shift
port=${COORDINATOR_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
devices=${DEVICES_PER_PROCESS:-1}

set -m  # each process in its own process group, so stopping it stops its children too
declare -A running=()  # pid -> process id
stop_all() {
  for pid in "${!running[@]}"; do kill -- "-$pid" 2>/dev/null || true; done
}
trap stop_all INT TERM

for ((i = 0; i < num_processes; i++)); do
  XLA_FLAGS="--xla_force_host_platform_device_count=$devices ${XLA_FLAGS:-}" \
  JAX_PLATFORMS=cpu \
    "$@" --coordinator_address="127.0.0.1:$port" --num_processes="$num_processes" \
    --process_id="$i" > >(sed -u "s/^/[$i] /") 2>&1 &
  running[$!]=$i
done

status=0
while [[ ${#running[@]} -gt 0 ]]; do
  rc=0
  wait -n -p finished "${!running[@]}" || rc=$?
  id=${running[$finished]}
  unset "running[$finished]"
  if [[ $rc -ne 0 && $status -eq 0 ]]; then
    echo "process $id exited with $rc; stopping the others" >&2
    status=$rc
    stop_all
  fi
done
wait  # the log prefixers
exit "$status"
