"""Object names: a namespace derived from what makes KV bytes compatible, then the page hashes.

SGLang's page keys are SHA-256 hashes chained from the sequence start, so a key already names
the whole token path from the radix root (tenants, LoRAs and salts are folded into the chain's
seed by SGLang). What the key does not say is which model, dtype, page size, layer range, head
split or TP rank produced the bytes; the fingerprint adds that. Two deployments share objects
exactly when their fingerprints are equal.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass

import xxhash

OBJECT_LAYOUT = "lkv1"  # layer-major, K then V per (layer, page); see docs/format.md


@dataclass(frozen=True)
class Fingerprint:
    model: str
    dtype: str
    page_size: int
    n_layers: int
    start_layer: int
    piece_bytes: int  # bytes of one page of one layer
    attention: str  # "mha" or "mla"
    kv_heads: int  # local (per-rank) heads for MHA, 1 for MLA
    head_dim: int  # head_dim for MHA; kv_cache_dim for MLA
    v_head_dim: int  # v_head_dim for MHA; 0 for MLA
    tp_rank: int  # 0 for MLA (replicated across ranks)
    tp_size: int  # 1 for MLA
    pp_rank: int = 0
    pp_size: int = 1
    object_layout: str = OBJECT_LAYOUT
    # Shards that hold other bytes of the same page (SGLang 0.5.23): context-parallel attention
    # ranks hold disjoint slices of every page; decode-context-parallel ranks hold MLA shards.
    attn_cp_rank: int = 0
    attn_cp_size: int = 1
    dcp_rank: int = 0
    dcp_size: int = 1
    logical_page_size: int = 0  # 0: the page size (set with DCP)
    model_revision: str = ""  # the config's model_revision: which weights, beyond the served name
    keyed: bool = False  # keyed integrity mode: its objects live apart from unkeyed ones

    @property
    def digest(self) -> str:
        """Names the layout of the bytes. Fields added since the first release count only when
        they differ from their default, so that an unsharded deployment keeps its namespace (and
        what it stored) across the upgrade."""
        fields = asdict(self)
        for name, default in _LATER_FIELDS.items():
            if fields[name] == default:
                del fields[name]
        canon = json.dumps(fields, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canon.encode()).hexdigest()[:32]

    def describe(self) -> str:
        rank = "mla" if self.attention == "mla" else f"tp{self.tp_rank}of{self.tp_size}"
        if self.attn_cp_size > 1:
            rank += f" cp{self.attn_cp_rank}of{self.attn_cp_size}"
        if self.dcp_size > 1:
            rank += f" dcp{self.dcp_rank}of{self.dcp_size}"
        return (
            f"{self.model} {self.dtype} page={self.page_size} layers={self.start_layer}+"
            f"{self.n_layers} {self.attention} heads={self.kv_heads}x{self.head_dim} {rank}"
        )


_LATER_FIELDS = {"attn_cp_rank": 0, "attn_cp_size": 1, "dcp_rank": 0, "dcp_size": 1, "logical_page_size": 0,
                 "model_revision": "", "keyed": False}


def key_hash(key: str) -> int:
    """A page key as the index holds it: 64 bits of xxh3 (8 bytes instead of a 64-character
    string). Two keys sharing a hash would make a lookup name the wrong page, which the read then
    refuses: it checks the object's footer, which lists the full keys."""
    return xxhash.xxh3_64_intdigest(key.encode())


def slug(text: str) -> str:
    """A readable, S3-safe path component (the model name can be a filesystem path)."""
    s = re.sub(r"[^A-Za-z0-9._\-]+", "-", text).strip("-.")
    return (s or "model")[-80:]


@dataclass(frozen=True)
class Namespace:
    """`<prefix>/<model>/<fingerprint>/`: every object this deployment writes lives below it."""

    prefix: str
    model: str
    fingerprint: str

    @property
    def root(self) -> str:
        parts = [p for p in (self.prefix.strip("/"), slug(self.model), self.fingerprint) if p]
        return "/".join(parts) + "/"

    def data_name(self, first_key: str, n_pages: int) -> str:
        """A span of n pages starting at `first_key`. Same name implies same pages."""
        return f"{self.root}d/{first_key}-{n_pages}"

    @property
    def manifest_prefix(self) -> str:
        return f"{self.root}m/"

    @property
    def checkpoint_prefix(self) -> str:
        return f"{self.root}k/"
