"""sglang-objectcache: S3-compatible object storage as SGLang HiCache's L3 tier.

The engine (config, keys, format, stores, engine/) knows nothing of SGLang; `sglang/` is the
thin glue that SGLang loads as the `objectcache` storage backend.
"""

__version__ = "0.1.0"
