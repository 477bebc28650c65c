#!/usr/bin/env bash
# Bring up a throw-away single-node Ceph cluster (1 mon, 1 OSD, pool size 1, no mgr by default)
# plus radosgw (beast frontend) on 127.0.0.1, create an S3 user and a bucket.
#
# This is the real gateway software that the paper measured (Ceph RGW), used by the test suite,
# the benchmarks and the README's main job. From Python use
# testbed.start_ceph_rgw() (tests/testbed/servers.py), which picks free ports and stops it at exit.
#
# Needs these Debian 12 packages (see .ci/install-ceph.sh):
#   apt-get install -y --no-install-recommends ceph-mon ceph-osd radosgw ceph-common curl
# (ceph-mgr only with WITH_MGR=1; curl >= 7.75 for the SigV4-signed "create bucket" request).
#
# Everything lives under $CEPH_DIR; nothing is written to /etc/ceph or /var/lib/ceph, and every
# daemon binds 127.0.0.1 only. Stop with ceph-rgw-stop.sh (kills the daemons by the PIDs in
# $CEPH_DIR/run/*.pid, so another Ceph on the same host is never touched).
#
# Environment knobs (defaults in brackets):
#   CEPH_DIR      [/tmp/sglang-objectcache-ceph]  state dir (wiped and recreated; must be empty,
#                 missing, or a dir this script made before)
#   OSD_STORE     [memstore]   memstore (all data in RAM, fastest start) or bluestore (sparse
#                              file $CEPH_DIR/osd.0/block)
#   OSD_SIZE_GB   [4 for memstore, 20 for bluestore]  memstore capacity (= its RAM cap; the OSD
#                              refuses writes when full) / bluestore block file size
#   OSD_MEM_MB    [1024]       osd_memory_target for bluestore (cache), min ~900
#   RGW_PORT      [7480]       S3 endpoint port
#   MON_PORT      [13300]      mon msgr2 port (not Ceph's default 3300, so a system Ceph on this
#   MON_V1_PORT   [16789]      host is left alone); mon legacy msgr1 port (default Ceph: 6789)
#   S3_ACCESS_KEY [testaccesskey]  S3_SECRET_KEY [testsecretkey]
#   BUCKET        [kv-cache]   bucket to create (empty = none)
#   WITH_MGR      [0]          1 = also run ceph-mgr (~300 MB RSS, ~1 s; S3 works without it)
#   PRECREATE_POOLS [0]        1 = create the RGW pools up front from one python-rados process
#                              (measured: no faster than radosgw's own, given the paxos knobs)
#   RGW_GC_WAIT_S [60]         seconds before deleted/overwritten RADOS data is garbage-collected
#   RGW_LC_DEBUG_INTERVAL [10] seconds a lifecycle rule's "day" lasts (tests of expiration)
set -euo pipefail

CEPH_DIR=${CEPH_DIR:-/tmp/sglang-objectcache-ceph}
OSD_STORE=${OSD_STORE:-memstore}
if [ "$OSD_STORE" = memstore ]; then OSD_SIZE_GB=${OSD_SIZE_GB:-4}; else OSD_SIZE_GB=${OSD_SIZE_GB:-20}; fi
OSD_MEM_MB=${OSD_MEM_MB:-1024}
RGW_PORT=${RGW_PORT:-7480}
MON_PORT=${MON_PORT:-13300}
MON_V1_PORT=${MON_V1_PORT:-16789}
S3_ACCESS_KEY=${S3_ACCESS_KEY:-testaccesskey}
S3_SECRET_KEY=${S3_SECRET_KEY:-testsecretkey}
BUCKET=${BUCKET-kv-cache}
WITH_MGR=${WITH_MGR:-0}
PRECREATE_POOLS=${PRECREATE_POOLS:-0}
RGW_GC_WAIT_S=${RGW_GC_WAIT_S:-60}
IP=127.0.0.1
MARKER=.sglang-objectcache-ceph
STOP_SCRIPT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/ceph-rgw-stop.sh"
trap 'echo "FAILED at line $LINENO: $BASH_COMMAND" >&2' ERR
on_exit() {
  local rc=$?
  if [ $rc -ne 0 ] && ls "$CEPH_DIR"/run/*.pid >/dev/null 2>&1; then
    echo "logs in $CEPH_DIR/log; daemons already started stay up: run CEPH_DIR=$CEPH_DIR $STOP_SCRIPT --purge" >&2
  fi
}
trap on_exit EXIT

t0=$(date +%s%N)
log() { local ms=$(( ($(date +%s%N) - t0) / 1000000 )); printf '[%3d.%01ds] %s\n' $((ms / 1000)) $((ms % 1000 / 100)) "$*"; }

case "$OSD_STORE" in memstore|bluestore) ;; *) echo "OSD_STORE must be memstore or bluestore" >&2; exit 1;; esac
# Debian puts some admin tools in /usr/sbin, which a non-root PATH may lack.
export PATH="$PATH:/usr/sbin:/sbin"
need=(ceph-mon ceph-osd radosgw radosgw-admin ceph ceph-authtool monmaptool curl)
[ "$WITH_MGR" = 1 ] && need+=(ceph-mgr)
for b in "${need[@]}"; do
  command -v "$b" >/dev/null || {
    echo "missing $b; install with: apt-get install -y --no-install-recommends ceph-mon ceph-osd radosgw ceph-common curl$([ "$WITH_MGR" = 1 ] && echo ' ceph-mgr')" >&2
    exit 1
  }
done

if [ -d "$CEPH_DIR" ]; then
  if ls "$CEPH_DIR"/run/*.pid >/dev/null 2>&1; then
    for f in "$CEPH_DIR"/run/*.pid; do
      if kill -0 "$(cat "$f")" 2>/dev/null; then
        echo "a daemon from a previous run is still alive ($f); run CEPH_DIR=$CEPH_DIR $STOP_SCRIPT first" >&2; exit 1
      fi
    done
  fi
  # The state dir is wiped below: refuse to wipe a directory that is not ours.
  if [ -n "$(ls -A "$CEPH_DIR")" ] && [ ! -e "$CEPH_DIR/$MARKER" ]; then
    echo "$CEPH_DIR is not empty and was not made by this script; refusing to wipe it" >&2; exit 1
  fi
fi
for p in "$RGW_PORT" "$MON_PORT" "$MON_V1_PORT"; do
  if (exec 3<>"/dev/tcp/$IP/$p") 2>/dev/null; then echo "port $IP:$p already in use" >&2; exit 1; fi
done

rm -rf "$CEPH_DIR"
mkdir -p "$CEPH_DIR"/{run,log,mon.a,osd.0,rgw.gw}
touch "$CEPH_DIR/$MARKER"
CONF=$CEPH_DIR/ceph.conf
KEYRING=$CEPH_DIR/keyring
FSID=$(cat /proc/sys/kernel/random/uuid)
MON_ADDRS="[v2:$IP:$MON_PORT,v1:$IP:$MON_V1_PORT]"
C="ceph -c $CONF"

cat >"$CONF" <<EOF
[global]
fsid = $FSID
mon host = $MON_ADDRS
# loopback only: every daemon binds 127.0.0.1
public network = 127.0.0.0/8
cluster network = 127.0.0.0/8
public addr = $IP
cluster addr = $IP
ms bind ipv4 = true
ms bind ipv6 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = $KEYRING
run dir = $CEPH_DIR/run
pid file = $CEPH_DIR/run/\$name.pid
admin socket = $CEPH_DIR/run/\$name.asok
log file = $CEPH_DIR/log/\$name.log
crash dir = $CEPH_DIR/crash
log to stderr = false
err to stderr = true
# one OSD: pools of size 1, few PGs, no redundancy warnings
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon max pg per osd = 1000
mon data avail warn = 2
mon data avail crit = 1
# make the single mon commit map changes quickly (default 1 s per proposal; each pool creation
# needs ~2 proposals, which made start-up take >10 s)
paxos propose interval = 0.05
paxos min wait = 0.01
mon warn on insecure global id reclaim allowed = false

[mon.a]
mon data = $CEPH_DIR/mon.a

[mgr.x]
mgr data = $CEPH_DIR/mgr.x
keyring = $CEPH_DIR/mgr.x/keyring

[osd]
osd data = $CEPH_DIR/osd.\$id
keyring = $CEPH_DIR/osd.\$id/keyring
osd objectstore = $OSD_STORE
osd memory target = $((OSD_MEM_MB * 1024 * 1024))
# 'bluestore block path' is left out on purpose: setting it made a self-symlink
bluestore block create = true
bluestore block size = $((OSD_SIZE_GB * 1024 * 1024 * 1024))
bluestore fsck on mount = false
# memstore keeps everything in RAM (an uncapped OSD reached 6.9 GB in a benchmark): this caps it
memstore device bytes = $((OSD_SIZE_GB * 1024 * 1024 * 1024))
osd max object size = 134217728

[client.rgw.gw]
keyring = $CEPH_DIR/rgw.gw/keyring
rgw frontends = beast endpoint=$IP:$RGW_PORT
rgw data = $CEPH_DIR/rgw.gw
rgw enable usage log = false
rgw thread pool size = 128
# Overwritten/deleted object data waits 2 h for garbage collection by default, so benchmark loops
# filled the OSD (and, with memstore, RAM). Collect it after a minute instead.
rgw gc obj min wait = $RGW_GC_WAIT_S
rgw gc processor period = $RGW_GC_WAIT_S
# Bucket lifecycle rules run at any hour, and a rule's "day" lasts this many seconds: what lets a
# test see a lifecycle expiration (docs/operations.md) in seconds rather than days.
rgw lifecycle work time = 00:00-23:59
rgw lc debug interval = ${RGW_LC_DEBUG_INTERVAL:-10}
EOF

# --- mon ---------------------------------------------------------------------
ceph-authtool --create-keyring "$KEYRING" --gen-key -n mon. --cap mon 'allow *' >/dev/null
ceph-authtool "$KEYRING" --gen-key -n client.admin \
  --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' --cap mds 'allow *' >/dev/null
monmaptool --create --fsid "$FSID" --addv a "$MON_ADDRS" "$CEPH_DIR/monmap" >/dev/null
ceph-mon -c "$CONF" --mkfs -i a --monmap "$CEPH_DIR/monmap" --keyring "$KEYRING"
ceph-mon -c "$CONF" -i a            # daemonizes, writes run/mon.a.pid
log "mon started ($MON_ADDRS)"

# --- mgr (optional) ----------------------------------------------------------
if [ "$WITH_MGR" = 1 ]; then
  mkdir -p "$CEPH_DIR/mgr.x"
  $C --connect-timeout 30 auth get-or-create mgr.x mon 'allow profile mgr' osd 'allow *' mds 'allow *' \
    -o "$CEPH_DIR/mgr.x/keyring"
  ceph-mgr -c "$CONF" -i x
  log "mgr started"
fi

# --- osd ---------------------------------------------------------------------
OSD_UUID=$(cat /proc/sys/kernel/random/uuid)
OSD_ID=$($C --connect-timeout 30 osd new "$OSD_UUID")   # first mon command: also waits for the mon
[ "$OSD_ID" = 0 ] || { echo "unexpected OSD id $OSD_ID" >&2; exit 1; }
ceph-authtool --create-keyring "$CEPH_DIR/osd.$OSD_ID/keyring" --gen-key -n "osd.$OSD_ID" >/dev/null
$C auth add "osd.$OSD_ID" osd 'allow *' mon 'allow profile osd' mgr 'allow profile osd' \
  -i "$CEPH_DIR/osd.$OSD_ID/keyring" 2>>"$CEPH_DIR/log/setup.out"   # chatty: "added key for osd.0"
ceph-osd -c "$CONF" -i "$OSD_ID" --mkfs --osd-uuid "$OSD_UUID" >"$CEPH_DIR/log/osd-mkfs.out" 2>&1
ceph-osd -c "$CONF" -i "$OSD_ID" 2>>"$CEPH_DIR/log/setup.out"       # chatty: "log_to_monitors ..."
log "osd.$OSD_ID ($OSD_STORE, ${OSD_SIZE_GB} GB) started"

# --- rgw pools + user --------------------------------------------------------
# Optional: radosgw creates its 7 pools one after another at start-up / first bucket / first PUT,
# each a mon round; with the default 1 s paxos interval that took ~12 s, so this did them all from
# one python-rados process (python3-rados comes with ceph-common). With the quick paxos settings
# above it gains nothing (~3.0 s either way), hence off by default.
if [ "$PRECREATE_POOLS" = 1 ]; then
  /usr/bin/python3 - "$CONF" <<'PYEOF'
import json, sys, rados
r = rados.Rados(conffile=sys.argv[1], name="client.admin"); r.connect(timeout=30)
for p in (".rgw.root", "default.rgw.control", "default.rgw.meta", "default.rgw.log",
          "default.rgw.buckets.index", "default.rgw.buckets.data", "default.rgw.buckets.non-ec"):
    for cmd in ({"prefix": "osd pool create", "pool": p, "pg_num": 8, "pgp_num": 8},
                {"prefix": "osd pool application enable", "pool": p, "app": "rgw"}):
        ret, out, err = r.mon_command(json.dumps(cmd), b"")
        if ret != 0: sys.exit(f"{cmd}: {ret} {err}")
r.shutdown()
PYEOF
  log "rgw pools created"
fi
$C auth get-or-create client.rgw.gw mon 'allow rw' osd 'allow rwx' mgr 'allow rw' \
  -o "$CEPH_DIR/rgw.gw/keyring"
for _ in $(seq 1 120); do
  $C osd dump -f json 2>/dev/null | grep -q '"up":1' && break
  sleep 0.25
done
$C osd dump -f json 2>/dev/null | grep -q '"up":1' || { echo "osd.0 did not come up" >&2; exit 1; }
log "osd up"

# --- rgw ---------------------------------------------------------------------
radosgw -c "$CONF" -n client.rgw.gw    # daemonizes, writes run/client.rgw.gw.pid
log "radosgw started"
radosgw-admin -c "$CONF" user create --uid=test --display-name="test user" \
  --access-key="$S3_ACCESS_KEY" --secret-key="$S3_SECRET_KEY" >/dev/null
log "S3 user created"
for _ in $(seq 1 240); do
  curl -s -o /dev/null "http://$IP:$RGW_PORT/" && break
  sleep 0.25
done
curl -s -o /dev/null "http://$IP:$RGW_PORT/" || { echo "radosgw did not answer on $IP:$RGW_PORT" >&2; exit 1; }
log "radosgw answers on http://$IP:$RGW_PORT"

if [ -n "$BUCKET" ]; then
  # A signed create + PUT + DELETE proves that the user, the bucket and the data pool all work.
  S3CURL=(curl -sSf --aws-sigv4 "aws:amz:us-east-1:s3" --user "$S3_ACCESS_KEY:$S3_SECRET_KEY"
          -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" -o /dev/null)
  "${S3CURL[@]}" -X PUT "http://$IP:$RGW_PORT/$BUCKET"
  echo hello >"$CEPH_DIR/hello.txt"
  "${S3CURL[@]}" -T "$CEPH_DIR/hello.txt" "http://$IP:$RGW_PORT/$BUCKET/.testbed-probe"
  "${S3CURL[@]}" -X DELETE "http://$IP:$RGW_PORT/$BUCKET/.testbed-probe"
  log "bucket $BUCKET created, test PUT ok"
fi

cat >"$CEPH_DIR/env.sh" <<EOF
export CEPH_CONF=$CONF
export AWS_ENDPOINT_URL=http://$IP:$RGW_PORT
export AWS_ACCESS_KEY_ID=$S3_ACCESS_KEY
export AWS_SECRET_ACCESS_KEY=$S3_SECRET_KEY
export AWS_DEFAULT_REGION=us-east-1
export S3_BUCKET=$BUCKET
EOF
echo "ready: endpoint http://$IP:$RGW_PORT bucket=$BUCKET  (source $CEPH_DIR/env.sh)"
echo "pids: $(for f in "$CEPH_DIR"/run/*.pid; do printf '%s=%s ' "$(basename "$f" .pid)" "$(cat "$f")"; done)"
