"""The shared-prefix benchmark against a running SGLang server (`objectcache bench shared-prefix live`).

`workload` is pure Python; `live` needs only the standard library; `report` prints and plots. The
CPU replay through SGLang's tree (`benchmarks/shared_prefix.py replay`) is in the repository's
benchmarks/, not in this package, and reuses these modules.
"""
