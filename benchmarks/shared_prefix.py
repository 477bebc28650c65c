"""Shared-prefix workload benchmark (thin entry; the code is in sglang_objectcache.bench).

    python benchmarks/shared_prefix.py replay                      # CPU: SGLang 0.5.23's HiCache + SeaweedFS
    python benchmarks/shared_prefix.py replay --system-prompt-len 512,2048 --concurrency 1,4
    python benchmarks/shared_prefix.py live --url http://127.0.0.1:30000 --concurrency 1,8

Same as `objectcache bench shared-prefix ...`; `-h` after the mode lists the options.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sglang_objectcache.cli.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
