#!/usr/bin/env bash
# Stop the daemons started by ceph-rgw-start.sh, by the PIDs in $CEPH_DIR/run/*.pid (never by
# name, so another Ceph on this host is left alone; a PID only counts while its command line still
# names $CEPH_DIR/ceph.conf, so a recycled PID is never hit). Clients first: radosgw and the OSDs,
# then the mgr and the mon (daemons left without a mon hang in reconnect loops).
#
#   ceph-rgw-stop.sh            graceful (SIGTERM, one daemon after the other; ~6 s), keeps $CEPH_DIR and its logs
#   ceph-rgw-stop.sh --purge    SIGKILL at once and delete $CEPH_DIR (only a dir that
#                               ceph-rgw-start.sh made)
# Safe to run twice.
#
#   CEPH_DIR  [/tmp/sglang-objectcache-ceph]   same as for ceph-rgw-start.sh
#   STOP_TIMEOUT_S [10]  per group of daemons, then SIGKILL
set -uo pipefail
CEPH_DIR=${CEPH_DIR:-/tmp/sglang-objectcache-ceph}
STOP_TIMEOUT_S=${STOP_TIMEOUT_S:-10}
RUN=$CEPH_DIR/run

PURGE=0
[ "${1:-}" = "--purge" ] && PURGE=1

# pids_of NAME...: the live PIDs among $RUN/NAME.pid (glob patterns allowed)
pids_of() {
  local n f pid
  for n in "$@"; do
    for f in "$RUN"/$n.pid; do
      [ -f "$f" ] || continue
      pid=$(cat "$f")
      if [ -z "$pid" ] || ! kill -0 "$pid" 2>/dev/null; then continue; fi
      tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF "$CEPH_DIR/ceph.conf" && echo "$pid"
    done
  done
}

# stop_group NAME...: SIGTERM them together, wait up to STOP_TIMEOUT_S, then SIGKILL.
# (Each daemon needs ~2 s to exit after SIGTERM.)
stop_group() {
  local pids p alive
  pids=$(pids_of "$@")
  [ -n "$pids" ] || return 0
  # shellcheck disable=SC2086
  kill -TERM $pids 2>/dev/null
  for _ in $(seq 1 $((STOP_TIMEOUT_S * 20))); do
    alive=0; for p in $pids; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && break; sleep 0.05
  done
  for p in $pids; do
    if kill -0 "$p" 2>/dev/null; then echo "pid $p still alive after ${STOP_TIMEOUT_S}s, SIGKILL"; kill -KILL "$p"; fi
  done
  echo "stopped $* (pids ${pids//$'\n'/ })"
}

if [ -d "$RUN" ]; then
  if [ $PURGE = 1 ]; then
    # The state is deleted right after, so a graceful shutdown buys nothing: SIGKILL (instant).
    pids=$(pids_of client.rgw.gw 'osd.*' mgr.x mon.a)
    # shellcheck disable=SC2086
    [ -n "$pids" ] && kill -KILL $pids 2>/dev/null && echo "killed pids ${pids//$'\n'/ }"
    for _ in $(seq 1 100); do [ -z "$(pids_of client.rgw.gw 'osd.*' mgr.x mon.a)" ] && break; sleep 0.05; done
  else
    # One group after the other: radosgw TERMed together with the OSD hung >10 s in shutdown
    # (it still talks to the OSD), and an OSD tells the mon that it is going down (without a mon
    # it waits 5 s for the answer).
    stop_group client.rgw.gw
    stop_group 'osd.*'
    stop_group mgr.x
    stop_group mon.a
  fi
  rm -f "$RUN"/*.pid
else
  echo "no $RUN (nothing to stop)"
fi

if [ $PURGE = 1 ] && [ -d "$CEPH_DIR" ]; then
  if [ -e "$CEPH_DIR/.sglang-objectcache-ceph" ]; then
    rm -rf "$CEPH_DIR"; echo "purged $CEPH_DIR"
  else
    echo "not purging $CEPH_DIR: not made by ceph-rgw-start.sh" >&2
  fi
fi
exit 0
