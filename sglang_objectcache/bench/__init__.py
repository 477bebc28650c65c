"""Shared-prefix benchmarks: the workload, a live HTTP client, a CPU replay through SGLang's tree.

`workload` is pure Python; `live` needs only the standard library; `replay` imports SGLang (CPU
set-up from `testbed.cpu_shims`) and is only imported when the replay mode runs.
"""
