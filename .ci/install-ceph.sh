#!/usr/bin/env bash
# Install the Ceph daemons that tests/testbed/ceph-rgw-start.sh needs, on a fresh
# Debian 12 (bookworm) machine, as root. Idempotent: does nothing when every package is present.
#
# ceph-mgr is deliberately left out: the test bed runs without a mgr (saves ~300 MB RSS and start
# time; the cluster still serves S3). curl (>= 7.75, for --aws-sigv4) creates the bucket.
# --no-install-recommends keeps this to ~100 packages / ~75 MB instead of pulling in the dashboard,
# smartmontools, etc. gcc builds the package's native helper (copies, checksums, range reads), so
# the tests exercise that path, not only its Python fallback; libssl-dev lets it build the https
# reader too, and openssl makes the test CA for the https tests.
set -euo pipefail

PKGS=(ceph-mon ceph-osd radosgw ceph-common curl gcc libssl-dev openssl)

missing=()
for p in "${PKGS[@]}"; do
  # dpkg-query prints "install ok installed" only for fully configured packages.
  if [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)" != "install ok installed" ]; then
    missing+=("$p")
  fi
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "ceph test-bed packages already installed: ${PKGS[*]}"
  exit 0
fi

SUDO=
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "run as root (or install sudo)" >&2; exit 1; }
  SUDO=sudo
fi
export DEBIAN_FRONTEND=noninteractive
echo "installing: ${missing[*]}"
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
for b in ceph-mon ceph-osd radosgw radosgw-admin ceph ceph-authtool monmaptool curl; do
  command -v "$b" >/dev/null || { echo "after install, $b is still missing" >&2; exit 1; }
done
echo "ceph test-bed packages installed"
