#!/usr/bin/env bash
# A private Slurm cluster of two slurmd "nodes" (n1, n2) on this one machine, for tests.
#
#   scripts/slurm_cluster.sh start  [STATE_DIR]   # prints one line: export SLURM_CONF=STATE_DIR/slurm.conf
#   scripts/slurm_cluster.sh stop   [STATE_DIR]   # cancels the jobs, stops the daemons; idempotent
#   scripts/slurm_cluster.sh status [STATE_DIR]   # sinfo of the cluster; non-zero if it is not up
#
# STATE_DIR defaults to ${DISTILLERY_SLURM_DIR:-/tmp/distillery-slurm}; everything lives there: the munge
# key and socket, slurm.conf, state, spool, logs and pid files, so that nothing collides with a system
# munged/slurmctld. Ports: slurmctld ${DISTILLERY_SLURM_PORT:-16817}, slurmd n1/n2 on the next two.
# Typical use:  eval "$(scripts/slurm_cluster.sh start)"; sbatch ...; scripts/slurm_cluster.sh stop
#
# Needs root (SlurmUser=root) and Debian 12's slurmctld, slurmd, slurm-client and munge (scripts/setup.sh).
# `stop` touches only what this cluster started: the daemons carry DISTILLERY_SLURM_CLUSTER=STATE_DIR in
# their environment, and each slurmstepd (which outlives slurmd) holds slurmd's log file under STATE_DIR
# open. All diagnostics go to stderr.
set -euo pipefail
PATH=$PATH:/usr/sbin:/sbin

MARKER=DISTILLERY_SLURM_CLUSTER
NODES=(n1 n2)

log() { echo "slurm_cluster: $*" >&2; }
die() { log "$*"; exit 1; }

usage() {
  echo "usage: $0 {start|stop|status} [STATE_DIR]" >&2
  exit 2
}

# ---------------------------------------------------------------------------------------------- setup
[ $# -ge 1 ] && [ $# -le 2 ] || usage
CMD=$1
STATE_DIR=$(realpath -m "${2:-${DISTILLERY_SLURM_DIR:-/tmp/distillery-slurm}}")
CONF=$STATE_DIR/slurm.conf
PIDS=$STATE_DIR/pids
SOCKET=$STATE_DIR/munge.socket
CTLD_PORT=${DISTILLERY_SLURM_PORT:-16817}

# Run a Slurm client command against this cluster, with a timeout so that a dead slurmctld cannot hang us.
slurm() { SLURM_CONF=$CONF timeout 20 "$@"; }

# ------------------------------------------------------------------------------------------ processes
# These helpers scan /proc with shell builtins only: a fork per process would make `stop` slow.

# True if PID is alive and not a zombie (here PID 1 reaps orphans only now and then, and kill -0
# succeeds on a zombie).
alive() {
  local stat
  { read -r stat <"/proc/$1/stat"; } 2>/dev/null || return 1
  stat=${stat##*) }
  [ "${stat%% *}" != Z ]
}

# True if PID is one of our daemons: alive and carrying our marker (guards against a recycled PID).
ours() {
  local var
  alive "$1" || return 1
  while IFS= read -r -d '' var; do
    [ "$var" = "$MARKER=$STATE_DIR" ] && return 0
  done 2>/dev/null <"/proc/$1/environ"
  return 1
}

# True if PID is a slurmstepd of this cluster. slurmstepd rewrites its argv/environ area for its process
# title, so the marker is gone; but it inherits slurmd's log file, which lies under STATE_DIR/log.
our_stepd() {
  local comm fd
  { read -r comm <"/proc/$1/comm"; } 2>/dev/null && [ "$comm" = slurmstepd ] && alive "$1" || return 1
  for fd in "/proc/$1"/fd/*; do
    [[ $(readlink "$fd" 2>/dev/null) == "$STATE_DIR"/log/* ]] && return 0
  done
  return 1
}

# Live PIDs (from /proc) that pass the given test: ours or our_stepd.
pids_where() {
  local d pid
  for d in /proc/[0-9]*; do
    pid=${d#/proc/}
    if "$1" "$pid"; then echo "$pid"; fi
  done
}

# The given PIDs and all their descendants (job scripts and tasks are children of slurmstepd).
with_descendants() {
  local -a queue=("$@")
  local pid table
  table=$(ps -e -o pid=,ppid=)
  while [ ${#queue[@]} -gt 0 ]; do
    pid=${queue[0]}; queue=("${queue[@]:1}")
    echo "$pid"
    mapfile -t -O ${#queue[@]} queue < <(awk -v p="$pid" '$2 == p { print $1 }' <<<"$table")
  done
}

any_alive() { local p; for p in "$@"; do alive "$p" && return 0; done; return 1; }

# terminate SECONDS PID...: SIGTERM, wait up to SECONDS for them to exit, then SIGKILL what is left.
terminate() {
  local wait_s=$1 i; shift
  [ $# -gt 0 ] || return 0
  kill -TERM "$@" 2>/dev/null || true
  for ((i = 0; i < wait_s * 10; i++)); do any_alive "$@" || return 0; sleep 0.1; done
  log "still alive after ${wait_s}s, sending SIGKILL: $*"
  kill -KILL "$@" 2>/dev/null || true
  for ((i = 0; i < 50; i++)); do any_alive "$@" || return 0; sleep 0.1; done
  log "could not kill: $*"
}

# PIDs recorded in STATE_DIR/pids (lines "NAME PID") whose name matches the pattern and that are still ours.
recorded() {
  [ -f "$PIDS" ] || return 0
  local name pid
  while read -r name pid; do
    # shellcheck disable=SC2053  # $1 is a glob pattern on purpose
    if [[ $name == $1 ]] && ours "$pid"; then echo "$pid"; fi
  done <"$PIDS"
}

# Start a daemon in the background, in its own session (a Ctrl-C in the caller does not reach it) and in
# STATE_DIR/run (it does not pin the caller's directory), with our marker in its environment and its
# output in STATE_DIR/log/NAME.out; record its PID.
launch() {
  local name=$1; shift
  (cd "$STATE_DIR/run" && exec env "$MARKER=$STATE_DIR" setsid "$@") </dev/null >>"$STATE_DIR/log/$name.out" 2>&1 &
  echo "$name $!" >>"$PIDS"
}

# ------------------------------------------------------------------------------------------------ stop
# True once no job step of ours runs and slurmctld (if up) has no running or completing job: slurmd and
# slurmctld told to stop while a job completes hang in their shutdown for many seconds.
jobs_gone() {
  [ -z "$(pids_where our_stepd)" ] || return 1
  [ -z "$(recorded slurmctld)" ] || [ -z "$(slurm squeue -h -t R,CG -o %A 2>/dev/null)" ]
}

# wait_jobs_gone SECONDS
wait_jobs_gone() {
  local i
  for ((i = 0; i < $1 * 4; i++)); do jobs_gone && return 0; sleep 0.25; done
  return 1
}

stop_cluster() {
  local jobs i daemon_wait=10
  local -a left steps

  # 1. Cancel every job while slurmctld is still up, and give them up to 10 s to finish.
  if [ -f "$CONF" ] && [ -n "$(recorded slurmctld)" ]; then
    jobs=$(slurm squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ') || true
    if [ -n "${jobs// /}" ]; then
      log "cancelling jobs: $jobs"
      # shellcheck disable=SC2086
      slurm scancel $jobs 2>/dev/null || true
      wait_jobs_gone 10 || true
    fi
  fi

  # 2. slurmstepd outlives slurmd. A job that ignored SIGTERM is still there (Slurm would wait KillWait=30
  #    before its SIGKILL): kill the jobs' processes, give their slurmstepd 5 s to finish, then kill it.
  #    slurmd/slurmctld then wait for that job until KillWait is over: give them less time before SIGKILL.
  mapfile -t steps < <(pids_where our_stepd)
  if [ ${#steps[@]} -gt 0 ]; then
    mapfile -t left < <(with_descendants "${steps[@]}" | sort -u | grep -vxF -f <(printf '%s\n' "${steps[@]}"))
    log "killing the processes of leftover job steps: ${left[*]:-none}"
    [ ${#left[@]} -eq 0 ] || kill -KILL "${left[@]}" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do any_alive "${steps[@]}" || break; sleep 0.1; done
    mapfile -t left < <(pids_where our_stepd)
    [ ${#left[@]} -eq 0 ] || { log "killing leftover slurmstepd: ${left[*]}"; kill -KILL "${left[@]}" 2>/dev/null || true; }
    daemon_wait=3
  fi

  # 3. The daemons: slurmd and slurmctld first, munged (which they talk to) last; with them anything that
  #    carries our marker but was not recorded (a `start` that died half-way).
  mapfile -t left < <(recorded 'slurm*')
  terminate $daemon_wait ${left[@]+"${left[@]}"}
  mapfile -t left < <(recorded munged; pids_where ours)
  terminate 10 ${left[@]+"${left[@]}"}
  rm -f "$PIDS"
}

# ----------------------------------------------------------------------------------------------- start
write_conf() {
  local host; host=$(hostname -s)
  cat >"$CONF" <<EOF
# Generated by scripts/slurm_cluster.sh: a private two-node test cluster on $host.
ClusterName=distillery-test
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root

# Its own munged, never the system one; cred_expire=10 (default 120) is also how long a requeued job
# waits before it may start again.
AuthType=auth/munge
AuthInfo=socket=$SOCKET,cred_expire=10
CredType=cred/munge

# No systemd/cgroups here: process-group tracking, no task binding. Nodes overstate their CPUs and memory
# on purpose (config_overrides keeps slurmd from draining them).
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true

# Fast scheduling; finished jobs stay visible to scontrol for an hour.
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
MinJobAge=3600
ReturnToService=2
KillWait=30
JobRequeue=1

StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/spool/%n
SlurmctldPidFile=$STATE_DIR/run/slurmctld.pid
SlurmdPidFile=$STATE_DIR/run/slurmd-%n.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig=$STATE_DIR/plugstack.conf

NodeName=n1 NodeHostname=$(hostname) NodeAddr=127.0.0.1 Port=$((CTLD_PORT + 1)) CPUs=4 RealMemory=8000 State=UNKNOWN
NodeName=n2 NodeHostname=$(hostname) NodeAddr=127.0.0.1 Port=$((CTLD_PORT + 2)) CPUs=4 RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
}

# On failure: the daemons' log tails to stderr, then stop whatever was started.
start_failed() {
  local f
  trap - EXIT
  log "start failed; log tails follow"
  for f in "$STATE_DIR"/log/*; do
    # slurmctld/slurmd -D copy their log to stdout: show NAME.out only where there is no NAME.log.
    if [ ! -s "$f" ] || [[ $f == *.out && -s ${f%.out}.log ]]; then continue; fi
    echo "----- $f" >&2
    tail -n 20 "$f" >&2
  done
  stop_cluster || true
  exit 1
}

# False (and says which) if a recorded daemon has exited.
check_daemons() {
  local name pid
  while read -r name pid; do
    alive "$pid" || { log "$name (pid $pid) exited"; return 1; }
  done <"$PIDS"
}

start_cluster() {
  local i t0 node states out
  if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    die "slurmctld/munged missing: run scripts/setup.sh (Debian packages slurmctld slurmd slurm-client munge)"
  fi
  [ "$(id -u)" = 0 ] || die "must run as root (SlurmUser=root)"

  # A previous cluster in this STATE_DIR is stopped first: every start is from a clean state.
  if [ -f "$PIDS" ] || [ -n "$(pids_where ours)" ]; then
    log "stopping the previous cluster in $STATE_DIR"
    stop_cluster
  fi
  # slurmstepd listens on STATE_DIR/spool/NODE/NODE_JOBID.STEPID: a Unix socket path has at most 107 bytes.
  [ ${#STATE_DIR} -le 70 ] || die "STATE_DIR too long for Unix socket paths (over 70 characters): $STATE_DIR"
  t0=$SECONDS
  trap start_failed EXIT

  mkdir -p "$STATE_DIR"
  chmod 0755 "$STATE_DIR" # munged refuses group/other-writable directories
  rm -rf "$STATE_DIR"/{ctld,spool,run,log} "$STATE_DIR"/munge.* "$PIDS"
  mkdir -p "$STATE_DIR"/{ctld,run,log} "${NODES[@]/#/$STATE_DIR/spool/}"
  : >"$STATE_DIR/plugstack.conf" # not /etc/slurm's
  : >"$PIDS"
  write_conf

  # munge: a fresh key and a daemon of our own on our own socket (in the foreground munged logs to
  # stderr, that is log/munged.out).
  mungekey --create --keyfile="$STATE_DIR/munge.key"
  chown root:root "$STATE_DIR/munge.key"
  chmod 0400 "$STATE_DIR/munge.key"
  launch munged munged --foreground --key-file="$STATE_DIR/munge.key" --socket="$SOCKET" \
    --pid-file="$STATE_DIR/run/munged.pid" --log-file="$STATE_DIR/log/munged.log" \
    --seed-file="$STATE_DIR/munged.seed"
  for ((i = 0; ; i++)); do
    munge -n -S "$SOCKET" 2>/dev/null | unmunge -S "$SOCKET" >/dev/null 2>&1 && break
    check_daemons || start_failed
    ((i < 100)) || { log "munged did not answer within 10s"; start_failed; }
    sleep 0.1
  done

  # slurmctld (-c: no old state, -i: ignore state errors), then one slurmd per node.
  launch slurmctld slurmctld -D -c -i -f "$CONF"
  for node in "${NODES[@]}"; do launch "slurmd-$node" slurmd -D -N "$node" -f "$CONF"; done

  # Wait (up to 60 s) until both nodes are idle.
  for ((i = 0; ; i++)); do
    states=$(slurm sinfo -h -N -o '%N %T' 2>/dev/null | sort | tr '\n' ' ') || true
    [ "$states" = "n1 idle n2 idle " ] && break
    check_daemons || start_failed
    ((i < 120)) || { log "nodes not idle after 60s: '$states'"; start_failed; }
    sleep 0.5
  done
  log "nodes idle after $((SECONDS - t0))s"

  # Smoke test: a real two-node step.
  out=$(SLURM_CONF=$CONF timeout 60 srun -N 2 hostname 2>&1) || { log "smoke test failed: $out"; start_failed; }
  [ "$(wc -l <<<"$out")" = 2 ] || { log "smoke test: unexpected output: $out"; start_failed; }
  log "up in $((SECONDS - t0))s (srun -N 2 hostname: $(tr '\n' ' ' <<<"$out"))"

  trap - EXIT
  echo "export SLURM_CONF=$CONF"
}

# ---------------------------------------------------------------------------------------------- status
status_cluster() {
  local name pid ok=0
  [ -f "$PIDS" ] || { log "not running (no $PIDS)"; return 1; }
  while read -r name pid; do
    ours "$pid" || { log "$name (pid $pid) is not running"; ok=1; }
  done <"$PIDS"
  slurm sinfo -N -o '%N %P %T %C' || ok=1
  return $ok
}

case $CMD in
  start) start_cluster ;;
  stop) stop_cluster ;;
  status) status_cluster ;;
  *) usage ;;
esac
