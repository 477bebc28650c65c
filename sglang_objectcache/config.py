"""Typed, validated configuration.

The config arrives as a dict (SGLang parses `--hicache-storage-backend-extra-config`, inline JSON
or `@file.yaml`), or from a YAML/JSON file. Every error names the offending key and the fix, at
startup, before any page is touched. SGLang's own keys pass through untouched; any other unknown
key is an error, because a typo silently ignored is a production incident later.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from .errors import ConfigError

# Keys SGLang reads from the same extra-config dict (some are popped before we see them, some
# are not, depending on the release). They are accepted and ignored here.
SGLANG_KEYS = frozenset(
    {
        "prefetch_threshold",
        "prefetch_timeout_base",
        "prefetch_timeout_per_ki_token",
        "hicache_storage_pass_prefix_keys",
        "backend_name",
        "module_path",
        "class_name",
        "interface_v1",
        "tp_lcm_size",
        "allocator",
    }
)

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]i?B|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "pb": 10**15,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "pib": 2**50,
}
_DUR_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")


def parse_size(value: Any, key: str) -> int:
    """'100GiB', '512 MiB', '1.5GB' or a plain integer of bytes."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a size like '100GiB' or a number of bytes, got {value!r}")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str) and (m := _SIZE_RE.match(value)):
        n = int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "B").lower()])
    else:
        raise ConfigError(
            f"{key}: cannot read {value!r} as a size; write it like '100GiB', '512MiB' or a "
            "number of bytes"
        )
    if n <= 0:
        raise ConfigError(f"{key}: must be positive, got {value!r}")
    return n


def parse_duration(value: Any, key: str, *, allow_zero: bool = False) -> float:
    """Seconds as a number, or '250ms', '5s', '2m', '6h', '30d'."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected seconds (a number) or a string like '500ms', got {value!r}")
    if isinstance(value, (int, float)):
        s = float(value)
    elif isinstance(value, str) and (m := _DUR_RE.match(value)):
        s = float(m.group(1)) * {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}[m.group(2) or "s"]
    else:
        raise ConfigError(f"{key}: cannot read {value!r} as a duration; write seconds or '500ms'")
    if s < 0 or (s == 0 and not allow_zero):
        raise ConfigError(f"{key}: must be {'non-negative' if allow_zero else 'positive'}, got {value!r}")
    return s


def _expect(value: Any, typ: type | tuple[type, ...], key: str, hint: str) -> Any:
    if isinstance(value, bool) and typ is not bool and (typ == int or typ == (int, float)):
        raise ConfigError(f"{key}: expected {hint}, got {value!r}")
    if not isinstance(value, typ):
        raise ConfigError(f"{key}: expected {hint}, got {type(value).__name__} {value!r}")
    return value


def _int(value: Any, key: str, lo: int, hi: int) -> int:
    _expect(value, int, key, f"an integer in [{lo}, {hi}]")
    if not lo <= value <= hi:
        raise ConfigError(f"{key}: {value} is out of range; use an integer in [{lo}, {hi}]")
    return value


def _choice(value: Any, key: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(choices)}")
    return value


def _reject_unknown(section: Mapping[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(section) - known)
    if unknown:
        raise ConfigError(
            f"{where}{unknown[0]}: unknown key; known keys here are: {', '.join(sorted(known))}"
        )


@dataclass(frozen=True)
class DiskTierConfig:
    path: str
    capacity: int
    kind: str = "disk"

    @property
    def name(self) -> str:
        return f"disk:{self.path}"


@dataclass(frozen=True)
class S3TierConfig:
    endpoint: str | None
    bucket: str
    prefix: str = ""
    region: str = "us-east-1"
    # auto | obstore | aioboto3 | nixl (range reads through NIXL's OBJ plugin, the rest through obstore)
    transport: str = "auto"
    native_reads: str = "auto"  # auto | on | off: range reads by stores/native_reader.py
    profile: str | None = None
    # https: a PEM file of CAs to trust besides the system's (a private CA); every transport uses it,
    # and certificates are always verified
    ca_bundle: str | None = None
    max_connections: int = 32
    max_write_connections: int = 8
    request_timeout: float = 10.0
    connect_timeout: float = 2.0
    max_retries: int = 2
    index_refresh_interval: float = 2.0
    manifest_flush_interval: float = 0.5
    create_bucket: bool = False
    # SigV4 over each PUT's body (a SHA-256 pass over every byte written, about 0.5 CPU s per GiB);
    # false sends UNSIGNED-PAYLOAD: TLS, and the objects' own checksums (and MAC), guard the body
    sign_payload: bool = False
    # Garbage collection (engine/gc.py): the namespace's data bytes, shared by every instance and
    # rank writing it, and the age of last use past which an object goes; None: unbounded
    capacity: int | None = None
    max_age: float | None = None
    gc_interval: float = 60.0
    kind: str = "s3"

    @property
    def name(self) -> str:
        return f"s3:{self.bucket}/{self.prefix}".rstrip("/")


TierConfig = DiskTierConfig | S3TierConfig


@dataclass(frozen=True)
class ObjectCacheConfig:
    tiers: tuple[TierConfig, ...]
    write_policy: str = "write_through"  # write_through | write_back
    write_back_buffer: int = 1 << 30  # encoded objects held in memory for copies below (write_back)
    shutdown_timeout: float = 30.0  # at close: how long owed copies and manifests may take
    pages_per_object: int = 8
    read_range_bytes: int = 16 << 20  # objects are read as parallel, layer-aligned ranges this big
    # > 0: a streamed fetch's reads that do not carry layer 0 wait up to this long for its layer 0
    # to land, so that its first ranges have the server to themselves (engine/scheduler.py); 0: off
    first_layer_hold: float = 0.1
    copy_threads: int = 0  # threads verifying and copying arrived ranges; 0 = min(8, cores)
    # Python's GIL switch interval while reads are in flight (sys.setswitchinterval; engine/switch.py);
    # 0 leaves Python's own (5 ms). Each read hands the GIL between our threads and SGLang's busy
    # scheduler thread; a waiting thread gets it back after at most this long.
    switch_interval: float = 0.0002
    # how concurrent fetches share the S3 bandwidth: slack | srpt | fair. slack ranks by compute time
    # per layer, which only the 0.5.17 patch set measures (load_or_recompute); elsewhere it is srpt
    fetch_policy: str = "slack"
    bandwidth: int = 0  # bytes/s the S3 reads may use together (0: no cap; the server's limit applies)
    timeout: float = 15.0  # deadline of one backend call (batch get / set)
    verify_checksums: bool = True
    # With the SGLang patch applied (`objectcache patch-sglang`): admit a request once its storage
    # hit is agreed and host slots are allocated, and copy layer l to the GPU as soon as layer l
    # has landed. Without the patch this key has no effect.
    layerwise: bool = True
    # With the SGLang 0.5.17 patch: per request, load a storage hit only when reading it (at the
    # read rate measured now) ends sooner than recomputing it (at the prefill rate measured from
    # SGLang's own forwards) by at least `load_margin`; else recompute it (engine/decide.py).
    # SGLang's prefetch_threshold still applies first, as a floor.
    load_or_recompute: bool = True
    load_margin: float = 0.1
    namespace: str | None = None  # overrides SGLang's model name in object names
    # which weights: the served name does not say (two checkpoints under one name would share KV);
    # any string that changes with the weights (a commit, a checkpoint hash), part of the fingerprint.
    # None: derived from the weights SGLang loads where they can be read (sglang/weights.py); "":
    # not identified (the fingerprint of releases before the derivation)
    model_revision: str | None = None
    # Keyed integrity (opt-in): a secret shared by the writers, read from this file or this
    # environment variable (never from the config itself); an object whose footer MAC does not
    # verify under it is a miss. The secret stays out of this object (and so out of any log).
    integrity_key_file: str | None = None
    integrity_key_env: str | None = None
    sglang: dict = field(default_factory=dict)  # SGLang's own keys, passed through untouched


_S3_KEYS = {f.name for f in fields(S3TierConfig)}
_DISK_KEYS = {f.name for f in fields(DiskTierConfig)}
_TOP_KEYS = {f.name for f in fields(ObjectCacheConfig)} - {"sglang"}


def _parse_disk(d: Mapping[str, Any], where: str) -> DiskTierConfig:
    _reject_unknown(d, _DISK_KEYS, where)
    if "path" not in d:
        raise ConfigError(f"{where}path: required for a disk tier; give a local directory")
    path = _expect(d["path"], str, f"{where}path", "a directory path")
    if "capacity" not in d:
        raise ConfigError(f"{where}capacity: required for a disk tier; give a size like '100GiB'")
    return DiskTierConfig(path=path, capacity=parse_size(d["capacity"], f"{where}capacity"))


def _parse_s3(d: Mapping[str, Any], where: str) -> S3TierConfig:
    _reject_unknown(d, _S3_KEYS, where)
    if "bucket" not in d:
        raise ConfigError(f"{where}bucket: required for an s3 tier; name an existing bucket")
    kw: dict[str, Any] = {"bucket": _expect(d["bucket"], str, f"{where}bucket", "a bucket name")}
    if not re.fullmatch(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]", kw["bucket"]):
        raise ConfigError(f"{where}bucket: {kw['bucket']!r} is not a valid S3 bucket name")
    endpoint = d.get("endpoint")
    env_endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint is None and env_endpoint:  # the AWS SDKs' convention: every transport uses it alike
        endpoint = env_endpoint
        where_endpoint = f"{where}endpoint (from AWS_ENDPOINT_URL)"
    else:
        where_endpoint = f"{where}endpoint"
    if endpoint is not None:
        _expect(endpoint, str, where_endpoint, "a URL like http://127.0.0.1:7480")
        if not re.match(r"^https?://[^/\s]+", endpoint):
            raise ConfigError(f"{where_endpoint}: {endpoint!r} must start with http:// or https://")
    kw["endpoint"] = endpoint
    if "prefix" in d:
        kw["prefix"] = _expect(d["prefix"], str, f"{where}prefix", "a string").strip("/")
    if d.get("ca_bundle") is not None:
        ca = _expect(d["ca_bundle"], str, f"{where}ca_bundle", "a PEM file of CA certificates")
        try:
            pem = Path(ca).read_text()
        except OSError as e:
            raise ConfigError(f"{where}ca_bundle: cannot read {ca} ({e.strerror}); give a PEM file of the CA "
                              "certificates that signed the server's") from None
        if "-----BEGIN CERTIFICATE-----" not in pem:
            raise ConfigError(f"{where}ca_bundle: {ca} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
        kw["ca_bundle"] = ca
    for k in ("region", "profile"):
        if k in d:
            kw[k] = _expect(d[k], str, f"{where}{k}", "a string")
    if "transport" in d:
        kw["transport"] = _choice(d["transport"], f"{where}transport", ("auto", "obstore", "aioboto3", "nixl"))
        if kw["transport"] == "nixl":
            from .stores.nixl_reader import available

            why = available()
            if why:
                raise ConfigError(f"{where}transport: nixl: {why}")
    if "native_reads" in d:
        v = d["native_reads"]
        if isinstance(v, bool):  # YAML 1.1 reads a bare on/off as a bool
            v = "on" if v else "off"
        kw["native_reads"] = _choice(v, f"{where}native_reads", ("auto", "on", "off"))
    if "max_connections" in d:
        kw["max_connections"] = _int(d["max_connections"], f"{where}max_connections", 1, 1024)
    if "max_write_connections" in d:
        kw["max_write_connections"] = _int(
            d["max_write_connections"], f"{where}max_write_connections", 1, 1024
        )
    if "max_retries" in d:
        kw["max_retries"] = _int(d["max_retries"], f"{where}max_retries", 0, 10)
    for k in ("request_timeout", "connect_timeout", "index_refresh_interval", "manifest_flush_interval"):
        if k in d:
            kw[k] = parse_duration(d[k], f"{where}{k}")
    for k in ("create_bucket", "sign_payload"):
        if k in d:
            kw[k] = _expect(d[k], bool, f"{where}{k}", "true or false")
    if d.get("capacity") is not None:
        kw["capacity"] = parse_size(d["capacity"], f"{where}capacity")
    if d.get("max_age") is not None:
        kw["max_age"] = parse_duration(d["max_age"], f"{where}max_age")
        if kw["max_age"] < 600:
            raise ConfigError(f"{where}max_age: at least 10m (an object is kept that long after its last use "
                              "anyway); use a lifecycle rule for shorter lives")
    if "gc_interval" in d:
        kw["gc_interval"] = parse_duration(d["gc_interval"], f"{where}gc_interval")
    cfg = S3TierConfig(**kw)
    if cfg.native_reads == "on" and not cfg.endpoint:
        raise ConfigError(f"{where}native_reads: 'on' needs an endpoint (http:// or https://); AWS's default "
                          "endpoint is read through the transport: use 'auto'")
    if cfg.max_write_connections > cfg.max_connections:
        raise ConfigError(
            f"{where}max_write_connections: {cfg.max_write_connections} exceeds max_connections "
            f"({cfg.max_connections}); lower it or raise max_connections"
        )
    return cfg


def parse_config(raw: Mapping[str, Any] | None) -> ObjectCacheConfig:
    """Validate a raw dict. Raises ConfigError naming the key and the fix."""
    if raw is None:
        raise ConfigError(
            "tiers: no configuration given; pass --hicache-storage-backend-extra-config "
            "@objectcache.yaml with at least one tier"
        )
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config: expected a mapping of keys, got {type(raw).__name__}")
    passthrough = {k: v for k, v in raw.items() if k in SGLANG_KEYS}
    ours = {k: v for k, v in raw.items() if k not in SGLANG_KEYS}
    _reject_unknown(ours, _TOP_KEYS, "")
    tiers_raw = ours.get("tiers")
    if not tiers_raw:
        raise ConfigError("tiers: at least one tier is required (kind: disk or kind: s3)")
    _expect(tiers_raw, list, "tiers", "a list of tiers")
    tiers: list[TierConfig] = []
    for i, t in enumerate(tiers_raw):
        where = f"tiers[{i}]."
        _expect(t, Mapping, f"tiers[{i}]", "a mapping with a 'kind' key")
        kind = t.get("kind")
        if kind == "disk":
            tiers.append(_parse_disk(t, where))
        elif kind == "s3":
            tiers.append(_parse_s3(t, where))
        else:
            raise ConfigError(f"{where}kind: {kind!r} is not a tier kind; use 'disk' or 's3'")
    kinds = [t.kind for t in tiers]
    if kinds.count("s3") > 1 or kinds.count("disk") > 1:
        raise ConfigError("tiers: give at most one disk tier and one s3 tier")
    if kinds == ["s3", "disk"]:
        raise ConfigError("tiers: list the disk tier before the s3 tier (tiers are read top-down)")
    kw: dict[str, Any] = {"tiers": tuple(tiers), "sglang": passthrough}
    if "write_policy" in ours:
        kw["write_policy"] = _choice(ours["write_policy"], "write_policy", ("write_through", "write_back"))
    if "write_back_buffer" in ours:
        kw["write_back_buffer"] = parse_size(ours["write_back_buffer"], "write_back_buffer")
    if "shutdown_timeout" in ours:
        kw["shutdown_timeout"] = parse_duration(ours["shutdown_timeout"], "shutdown_timeout", allow_zero=True)
    if "pages_per_object" in ours:
        kw["pages_per_object"] = _int(ours["pages_per_object"], "pages_per_object", 1, 128)
    if "read_range_bytes" in ours:
        kw["read_range_bytes"] = parse_size(ours["read_range_bytes"], "read_range_bytes")
    if "fetch_policy" in ours:
        kw["fetch_policy"] = _choice(ours["fetch_policy"], "fetch_policy", ("slack", "srpt", "fair"))
    if "bandwidth" in ours and ours["bandwidth"] not in (0, "0", None):
        kw["bandwidth"] = parse_size(ours["bandwidth"], "bandwidth")
    if "copy_threads" in ours:
        kw["copy_threads"] = _int(ours["copy_threads"], "copy_threads", 0, 64)
    if "first_layer_hold" in ours:
        kw["first_layer_hold"] = parse_duration(ours["first_layer_hold"], "first_layer_hold", allow_zero=True)
        if kw["first_layer_hold"] > 10:
            raise ConfigError("first_layer_hold: at most 10s (it delays the rest of a read); 0 turns it off")
    if "switch_interval" in ours:
        kw["switch_interval"] = parse_duration(ours["switch_interval"], "switch_interval", allow_zero=True)
        if kw["switch_interval"] > 0.1:
            raise ConfigError("switch_interval: at most 100ms; Python's default is 5ms, ours 0.2ms")
    if "timeout" in ours:
        kw["timeout"] = parse_duration(ours["timeout"], "timeout")
    if "verify_checksums" in ours:
        kw["verify_checksums"] = _expect(ours["verify_checksums"], bool, "verify_checksums", "true or false")
    if "layerwise" in ours:
        kw["layerwise"] = _expect(ours["layerwise"], bool, "layerwise", "true or false")
    if "load_or_recompute" in ours:
        kw["load_or_recompute"] = _expect(ours["load_or_recompute"], bool, "load_or_recompute", "true or false")
    if "load_margin" in ours:
        m = ours["load_margin"]
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 <= m < 1:
            raise ConfigError("load_margin: a fraction in [0, 1), e.g. 0.1: a load must end 10% sooner "
                              "than recompute to be chosen")
        kw["load_margin"] = float(m)
    for k in ("integrity_key_file", "integrity_key_env"):
        if ours.get(k) is not None:
            kw[k] = _expect(ours[k], str, k, "a file path" if k.endswith("file") else "an environment variable name")
    if "integrity_key_file" in kw and "integrity_key_env" in kw:
        raise ConfigError("integrity_key_env: give the secret one way, integrity_key_file or integrity_key_env")
    if ours.get("model_revision") is not None:
        rev = _expect(ours["model_revision"], str, "model_revision", "a string naming the weights")
        if len(rev) > 256:
            raise ConfigError("model_revision: give at most 256 characters that change with the weights "
                              "('' to leave the weights unidentified)")
        kw["model_revision"] = rev
    if "namespace" in ours and ours["namespace"] is not None:
        ns = _expect(ours["namespace"], str, "namespace", "a string")
        if not re.fullmatch(r"[A-Za-z0-9._\-]{1,128}", ns):
            raise ConfigError("namespace: use 1-128 characters from A-Z a-z 0-9 . _ -")
        kw["namespace"] = ns
    return ObjectCacheConfig(**kw)


def load_config_file(path: str | Path) -> ObjectCacheConfig:
    """Read YAML (.yaml/.yml) or JSON (anything else) and validate it."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"config file {p}: cannot read it ({e.strerror})") from None
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text)
        else:
            raw = json.loads(text)
    except Exception as e:  # noqa: BLE001 - any parser error becomes one clear message
        raise ConfigError(f"config file {p}: not valid {p.suffix.lstrip('.') or 'JSON'}: {e}") from None
    return parse_config(raw)
