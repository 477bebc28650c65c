"""The generated-shared-prefix workload, with the parameters of SGLang's own dataset.

SGLang's `bench_serving --dataset-name generated-shared-prefix` draws a system prompt per group and a
question per request, then shuffles. It needs a tokenizer; here prompts are token ids (as with its
`--tokenize-prompt`), so the same stream drives both a live server (`input_ids`) and the CPU replay,
and one seed gives the same requests on every machine.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field

VOCAB = (1000, 30000)  # token ids drawn from here: clear of special tokens in common vocabularies


@dataclass(frozen=True)
class WorkloadSpec:
    """SGLang's gsp_* parameters (same names without the prefix) plus the arrival process."""

    num_groups: int = 4
    prompts_per_group: int = 4
    system_prompt_len: int = 1024
    question_len: int = 128
    output_len: int = 16
    group_distribution: str = "uniform"  # or "zipf"
    zipf_alpha: float | None = None
    request_rate: float = math.inf  # requests/s (Poisson arrivals); inf: all at once
    concurrency: int = 1  # requests in flight at most
    seed: int = 1
    ordered: bool = False  # SGLang's --gsp-ordered: keep group order instead of shuffling

    def __post_init__(self) -> None:
        for name in ("num_groups", "prompts_per_group", "system_prompt_len", "question_len", "output_len",
                     "concurrency"):
            if getattr(self, name) < (0 if name in ("question_len", "output_len") else 1):
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.group_distribution not in ("uniform", "zipf"):
            raise ValueError(f"group_distribution must be uniform or zipf, got {self.group_distribution!r}")
        if self.group_distribution == "zipf" and not (self.zipf_alpha and self.zipf_alpha > 0):
            raise ValueError("zipf needs zipf_alpha > 0")
        if self.group_distribution == "uniform" and self.zipf_alpha is not None:
            raise ValueError("zipf_alpha is only meaningful with group_distribution=zipf")
        if not self.request_rate > 0:
            raise ValueError("request_rate must be > 0 (inf: all at once)")


@dataclass
class Request:
    index: int  # position in the stream
    group: int
    input_ids: list[int]
    output_len: int
    arrival: float  # seconds after the start (0 for all when the rate is inf)
    prefix_len: int = field(default=0)  # tokens shared with the group (the system prompt)

    def to_dict(self) -> dict:
        return asdict(self)


def zipf_probs(num_groups: int, alpha: float) -> list[float]:
    """SGLang's rank-based Zipf: p(rank) = rank**-alpha / sum; group 0 is the hottest."""
    w = [1.0 / (r**alpha) for r in range(1, num_groups + 1)]
    s = sum(w)
    return [x / s for x in w]


def generate(spec: WorkloadSpec) -> list[Request]:
    """The request stream for `spec`: deterministic for a seed.

    Uniform: every group gets exactly prompts_per_group requests. Zipf: num_groups * prompts_per_group
    requests, each group drawn with zipf_probs (a separate RNG, so the prompt pool is the same as in
    uniform mode, as in SGLang). Then shuffled unless ordered; arrivals are Poisson at request_rate.
    """
    rng = random.Random(spec.seed)
    systems = [[rng.randrange(*VOCAB) for _ in range(spec.system_prompt_len)] for _ in range(spec.num_groups)]
    total = spec.num_groups * spec.prompts_per_group
    questions = [[rng.randrange(*VOCAB) for _ in range(spec.question_len)] for _ in range(total)]
    if spec.group_distribution == "uniform":
        assignment = [i // spec.prompts_per_group for i in range(total)]
    else:
        pick = random.Random(spec.seed + 0x5A5A)
        assignment = pick.choices(range(spec.num_groups), weights=zipf_probs(spec.num_groups, spec.zipf_alpha),
                                  k=total)
    rows = [(g, systems[g] + questions[i]) for i, g in enumerate(assignment)]
    if not spec.ordered:
        rng.shuffle(rows)
    t, out = 0.0, []
    for i, (g, ids) in enumerate(rows):
        if math.isfinite(spec.request_rate) and i:
            t += rng.expovariate(spec.request_rate)
        out.append(Request(i, g, ids, spec.output_len, t, spec.system_prompt_len))
    return out


def describe(reqs: list[Request]) -> dict:
    """Shape of a stream: what the tests and the report check against the spec."""
    sizes: dict[int, int] = {}
    for r in reqs:
        sizes[r.group] = sizes.get(r.group, 0) + 1
    return {"requests": len(reqs), "group_sizes": dict(sorted(sizes.items())),
            "input_tokens": sum(len(r.input_ids) for r in reqs),
            "unique_prefix_tokens": sum(r.prefix_len for r in {r.group: r for r in reqs}.values())}
