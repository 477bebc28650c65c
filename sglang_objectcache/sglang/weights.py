"""Which weights a server runs, for the fingerprint: the served name does not say.

Two checkpoints of one model under one name (a fine-tune redeployed, step N and N+1 of a training
run) have the same config, the same tensor shapes, the same file sizes: only the bytes differ, and
so does every KV they compute. Unidentified, the second would load the first's KV from storage.

- A Hugging Face hub id resolved in the local cache: the snapshot's commit (`hf:<commit>`).
- A local directory: a digest of config.json, the weight index, and each weight file's name, size
  and three 64 KiB samples of its bytes (start, middle, end): copies of the same files on other
  hosts agree; another checkpoint differs in its tensor bytes. Reading 192 KiB a file keeps this
  to milliseconds where hashing every byte would take minutes.
- Anything else (nothing readable): None, and the config key `model_revision` is the way.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

log = logging.getLogger("sglang_objectcache")

SAMPLE = 64 << 10
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def _sampled(path: Path, h) -> None:
    size = path.stat().st_size
    h.update(f"{path.name}\0{size}\0".encode())
    with open(path, "rb") as f:
        for at in sorted({0, max(0, size // 2 - SAMPLE // 2), max(0, size - SAMPLE)}):
            f.seek(at)
            h.update(f.read(SAMPLE))


def local_identity(d: Path) -> str | None:
    if not (d / "config.json").is_file():
        return None
    h = hashlib.sha256(b"objectcache-weights-v1\0")
    h.update((d / "config.json").read_bytes())
    for p in sorted(d.iterdir()):
        if p.name.endswith(".index.json"):
            h.update(p.name.encode() + b"\0" + p.read_bytes())
        elif p.name.endswith(WEIGHT_SUFFIXES) and p.is_file():
            _sampled(p, h)
    return "auto:" + h.hexdigest()[:16]


def hub_identity(repo: str, revision: str | None) -> str | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(repo, "config.json", revision=revision)
    except Exception:  # noqa: BLE001 - not a repo id, or an unreadable cache
        return None
    if not isinstance(found, str):
        return None
    parts = Path(found).parts
    return f"hf:{parts[-2]}" if len(parts) >= 3 and parts[-3] == "snapshots" else None


def identity(model_path: str | None, revision: str | None = None) -> str | None:
    """The weights' identity for `model_path` (a directory or a hub id), or None."""
    if not model_path:
        return None
    try:
        if os.path.isdir(model_path):
            return local_identity(Path(model_path))
        return hub_identity(model_path, revision)
    except OSError as e:
        log.warning("objectcache: cannot read the weights at %s to identify them (%s); set model_revision",
                    model_path, e)
        return None


def server_identity() -> str | None:
    """The identity of the weights this SGLang server was launched with, or None outside a server."""
    try:
        from sglang.srt.server_args import get_global_server_args

        args = get_global_server_args()
    except Exception:  # noqa: BLE001 - no server context (tests, tools)
        return None
    if args is None:
        return None
    return identity(getattr(args, "model_path", None), getattr(args, "revision", None))
