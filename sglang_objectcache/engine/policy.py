"""Who gets the bandwidth next: sharing policies over concurrent requests' layer-ordered reads.

A request is a queue of reads in layer order plus what its forward pass needs: the compute time of
one layer (modelled or measured) and its arrival. A policy looks at the active requests and says
which share of the bandwidth each gets right now. The same policies drive the fluid model
(`benchmarks/fluid.py`) and the scheduler of real transfers.

- `fair`: equal shares among active requests (the paper's baseline).
- `srpt`: all bandwidth to the request with the fewest bytes left (optimal for mean completion when
  every request is transfer-bound; for n equal requests it serves them one at a time).
- `slack` (default): compute-aware, where the caller passes a compute time per layer (inside SGLang
  the load-or-recompute decider's prefill model gives it for each streamed fetch; without one, every
  `t_layer` is 0 and `slack` ranks requests exactly as `srpt` does). A request whose next layer will not be needed before it could
  arrive at full rate ("ahead": its transfer is hidden behind its compute) gains nothing from more
  bandwidth now. Requests that are behind go first: compute-bound ones about to stall before
  transfer-bound ones (a stall delays all their later layers), transfer-bound ones fewest bytes
  left first (SRPT); when everyone is ahead, the one whose next layer is needed soonest goes.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestState:
    """One request's transfer and modelled compute, as the policies see it."""

    name: str
    arrival: float
    reads: list[tuple[int, int, int]]  # (bytes, first layer, end layer) in plan order
    n_layers: int
    t_layer: float  # seconds of forward compute per layer (for this request's new tokens)
    next_read: int = 0
    left_in_read: float = 0.0
    ready: list[float | None] = field(default_factory=list)  # when each layer landed
    _compute_end: list[float] = field(default_factory=list)  # modelled finish of each layer's compute

    def __post_init__(self) -> None:
        self.ready = [None] * self.n_layers
        self.left_in_read = float(self.reads[0][0]) if self.reads else 0.0
        for _, l0, l1 in self.reads:
            if not 0 <= l0 < l1 <= self.n_layers:
                raise ValueError(f"{self.name}: read of layers [{l0}, {l1}) outside 0..{self.n_layers}")
        # The reads never change: precompute what the policies ask on every grant, which otherwise
        # costs a pass over all reads each time (quadratic in a 64K-token prefix's 1024 reads).
        self._after = [0] * (len(self.reads) + 1)  # bytes of reads[i:]
        for i in range(len(self.reads) - 1, -1, -1):
            self._after[i] = self._after[i + 1] + self.reads[i][0]
        self.largest_read = max((n for n, _, _ in self.reads), default=0)
        self._sorted = all(a[1] <= b[1] for a, b in zip(self.reads, self.reads[1:]))

    @property
    def done(self) -> bool:
        return self.next_read >= len(self.reads)

    @property
    def bytes_left(self) -> float:
        return self.left_in_read + self._after[min(self.next_read + 1, len(self.reads))]

    def advance(self, nbytes: float, now: float) -> bool:
        """Move `nbytes` of the current read; True when it completes (its layers land at `now`)."""
        self.left_in_read -= nbytes
        if self.left_in_read > 1e-6:
            return False
        _, l0, l1 = self.reads[self.next_read]
        self.next_read += 1
        self.left_in_read = float(self.reads[self.next_read][0]) if not self.done else 0.0
        # a layer is ready once every read carrying it has landed
        for layer in range(l0, l1):
            if all(not (a <= layer < b) for _, a, b in self.reads[self.next_read:]):
                self.ready[layer] = now
        return True

    def compute_finish(self, upto: int) -> float:
        """Modelled end of compute of layers [0, upto), given the layers that have landed."""
        t = self.arrival
        for layer in range(upto):
            r = self.ready[layer]
            if r is None:
                raise ValueError("layer not landed")
            t = max(t, r) + self.t_layer
        return t

    def bytes_for_next_layer(self) -> float:
        """Bytes that must land before the first missing layer is complete."""
        if self.done:
            return 0.0
        k = self.reads[self.next_read][1]
        total = self.left_in_read
        for n, l0, _ in self.reads[self.next_read + 1:]:
            if l0 <= k:
                total += n
            elif self._sorted:  # layer-ordered plans: nothing later carries layer k
                break
        return total

    def need_time(self, now: float) -> float:
        """When the forward pass will want the first layer not yet landed."""
        if self.done:
            return float("inf")
        k = self.reads[self.next_read][1]
        return max(now, self.compute_finish(k)) if k else max(now, self.arrival)

    def ttft(self) -> float:
        """Compute done, relative to arrival (the fixed per-request cost is added by callers)."""
        return self.compute_finish(self.n_layers) - self.arrival


class Policy:
    name = "policy"

    def shares(self, active: list[RequestState], now: float, rate: float) -> dict[str, float]:
        raise NotImplementedError


class Fair(Policy):
    name = "fair"

    def shares(self, active, now, rate):
        return {r.name: 1.0 / len(active) for r in active} if active else {}


class Serial(Policy):
    """All bandwidth to the request with the smallest key."""

    def key(self, r: RequestState, now: float, rate: float):
        raise NotImplementedError

    def shares(self, active, now, rate):
        if not active:
            return {}
        best = min(active, key=lambda r: self.key(r, now, rate))
        return {best.name: 1.0}


class SRPT(Serial):
    name = "srpt"

    def key(self, r, now, rate):
        return (r.bytes_left, r.arrival, r.name)


class Slack(Serial):
    name = "slack"

    def __init__(self, margin_reads: float = 16.0):
        # Decisions change only between reads (a read in flight is not preempted), so a request
        # counts as ahead only if its next layer would still land in time after this many of the
        # largest reads of others.
        self.margin_reads = margin_reads

    def key(self, r, now, rate):
        need = r.need_time(now)
        margin = self.margin_reads * r.largest_read / rate
        if need - now > r.bytes_for_next_layer() / rate + margin:
            return (2, need, r.arrival, r.name)  # ahead: earliest need first, after the others
        k = r.reads[r.next_read][1]
        if r.bytes_left / rate <= (r.n_layers - k) * r.t_layer:
            # compute-bound and about to stall: a stall delays every later layer of it, while
            # serving its next group delays a transfer-bound request by only that group's time
            return (0, need, r.arrival, r.name)
        return (1, r.bytes_left, r.arrival, r.name)  # transfer-bound: fewest bytes left first


POLICIES = {p.name: p for p in (Fair(), SRPT(), Slack())}
