"""The live mode's summary table, and what both modes of the shared-prefix benchmark print and
write (progress, JSON, PNG plots; the replay mode is benchmarks/replay.py): output only, no measuring."""

from __future__ import annotations

import json
import os
import sys
import time


class Progress:
    """A one-line progress bar on stderr (no dependency); silent when stderr is not a terminal
    except for a line every 10%."""

    def __init__(self, total: int, label: str = ""):
        self.total, self.n, self.label = max(total, 1), 0, label
        self.tty = sys.stderr.isatty()
        self._last_decile = -1
        self.t0 = time.perf_counter()

    def step(self, label: str | None = None) -> None:
        self.n += 1
        if label:
            self.label = label
        frac = min(self.n / self.total, 1.0)
        bar = "#" * int(frac * 30)
        line = f"[{bar:<30}] {self.n}/{self.total} {self.label} {time.perf_counter() - self.t0:.0f}s"
        if self.tty:
            sys.stderr.write("\r" + line + ("\n" if self.n >= self.total else ""))
            sys.stderr.flush()
        elif int(frac * 10) != self._last_decile:
            self._last_decile = int(frac * 10)
            sys.stderr.write(line + "\n")
            sys.stderr.flush()


def live_table(rows: list[dict]) -> str:
    lines = ["| label | prefix | conc | reqs ok | TTFT ms mean / p50 / p90 / p99 | req/s | input tok/s | output tok/s "
             "| cached device / host / storage (tokens) |", "|" + "|".join("---" for _ in range(9)) + "|"]
    for r in rows:
        lines.append(
            f"| {r.get('label', '')} | {r.get('system_prompt_len', '')} | {r.get('concurrency', '')} "
            f"| {r['ok']}/{r['requests']} "
            f"| {r['ttft_mean_ms']:.0f} / {r['ttft_p50_ms']:.0f} / {r['ttft_p90_ms']:.0f} / {r['ttft_p99_ms']:.0f} "
            f"| {r['request_throughput']:.2f} | {r['input_throughput']:.0f} | {r['output_throughput']:.0f} "
            f"| {r['cached_device']} / {r['cached_host']} / {r['cached_storage']} |")
    return "\n".join(lines)


def source_table(rows: list[dict]) -> str:
    """TTFT by where the prefix came from (bench/live.py `source`): n, mean / p50 / p90 / max ms."""
    names = ("storage", "recompute", "cache")
    lines = ["| label | prefix | conc | " + " | ".join(f"{n}: n, mean / p50 / p90 / max ms" for n in names) + " |",
             "|" + "|".join("---" for _ in range(3 + len(names))) + "|"]
    for r in rows:
        cells = []
        for n in names:
            s = (r.get("ttft_by_source") or {}).get(n)
            cells.append(f"{s['n']}: {s['mean_ms']:.0f} / {s['p50_ms']:.0f} / {s['p90_ms']:.0f} / {s['max_ms']:.0f}"
                         if s else "-")
        lines.append(f"| {r.get('label', '')} | {r.get('system_prompt_len', '')} | {r.get('concurrency', '')} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, default=str)


def plots(rows: list[dict], out_dir: str, y_keys: list[tuple[str, str]], x_keys: list[tuple[str, str]],
          prefix: str) -> list[str]:
    """One PNG per (x, y): a line per backend (or label). Returns the paths written; none when
    matplotlib is missing (the `bench` extra) or there is only one point per line."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for xk, xlabel in x_keys:
        for yk, ylabel in y_keys:
            fig, ax = plt.subplots(figsize=(5.5, 3.6))
            drew = False
            for name in sorted({r.get("backend", r.get("label", "")) for r in rows}):
                # hold the other swept variable at its smallest value
                other = "concurrency" if xk == "system_prompt_len" else "system_prompt_len"
                mine = [r for r in rows if r.get("backend", r.get("label", "")) == name and r.get(yk) is not None]
                if not mine:
                    continue
                fixed = min(r[other] for r in mine)
                pts = sorted((r[xk], r[yk]) for r in mine if r[other] == fixed)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
                    drew = True
            if not drew:
                plt.close(fig)
                continue
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            fig.tight_layout()
            p = os.path.join(out_dir, f"{prefix}-{yk}-vs-{xk}.png")
            fig.savefig(p, dpi=110)
            plt.close(fig)
            written.append(p)
    return written
