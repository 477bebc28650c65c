"""Apply, check and revert the SGLang patch set in `patches/sglang-<version>/`.

A small unified-diff applier of our own, strict on purpose: every context and removed line must
match exactly (no fuzz, no offsets beyond the hunk search), so a patch either lands as reviewed or
not at all. Files are written only after every hunk of every file has matched; the originals are
kept next to them as `<name>.py.objectcache-orig` until `--revert`; they also let a newer release of
this package replace an older release's patch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import PatchError
from .compat import sglang_version

_HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")
BACKUP_SUFFIX = ".objectcache-orig"


@dataclass
class Hunk:
    old_start: int
    old: list[str]
    new: list[str]


@dataclass
class FilePatch:
    path: str  # relative to site-packages, e.g. sglang/srt/managers/cache_controller.py
    hunks: list[Hunk]


def _patch_dirs() -> dict[str, Path]:
    """SGLang version -> its patch set, from the installed copy or the repository's `patches/`."""
    here = Path(__file__).resolve().parent.parent
    found: dict[str, Path] = {}
    for root in (here / "patches", here.parent / "patches"):
        for d in sorted(root.glob("sglang-*")) if root.is_dir() else ():
            if d.is_dir():
                found.setdefault(d.name.removeprefix("sglang-"), d)
    return found


def patch_dir(version: str) -> Path:
    d = _patch_dirs().get(version)
    if d is None:
        raise PatchError(f"no patch set for SGLang {version}; layer-wise streaming patches exist for "
                         f"{', '.join(available_versions()) or 'no version'}")
    return d


def available_versions() -> list[str]:
    return sorted(_patch_dirs())


def parse(text: str) -> list[FilePatch]:
    files: list[FilePatch] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("+++ "):
            path = line[4:].split("\t")[0].strip()
            files.append(FilePatch(path[2:] if path.startswith("b/") else path, []))
        elif line.startswith("@@"):
            m = _HUNK.match(line)
            if not m or not files:
                raise PatchError(f"malformed hunk header: {line!r}")
            old, new = [], []
            i += 1
            while i < len(lines) and not lines[i].startswith(("@@", "--- ", "+++ ")):
                tag, body = lines[i][:1], lines[i][1:]
                if tag in (" ", ""):
                    old.append(body)
                    new.append(body)
                elif tag == "-":
                    old.append(body)
                elif tag == "+":
                    new.append(body)
                i += 1
            files[-1].hunks.append(Hunk(int(m.group(1)), old, new))
            continue
        i += 1
    return files


def _apply(text: str, hunks: list[Hunk], reverse: bool, name: str) -> str:
    src = text.split("\n")
    out: list[str] = []
    pos = 0
    for h in hunks:
        want, put = (h.new, h.old) if reverse else (h.old, h.new)
        at = _find(src, want, pos, h.old_start - 1)
        if at < 0:
            raise PatchError(f"{name}: a hunk near line {h.old_start} does not match")
        out.extend(src[pos:at])
        out.extend(put)
        pos = at + len(want)
    out.extend(src[pos:])
    return "\n".join(out)


def _find(src: list[str], want: list[str], lo: int, hint: int) -> int:
    """The exact position of `want` at or after `lo`, nearest to `hint`."""
    hits = [i for i in range(lo, len(src) - len(want) + 1) if src[i:i + len(want)] == want]
    return min(hits, key=lambda i: abs(i - hint)) if hits else -1


def _site() -> Path:
    """Where `sglang/` is installed, found without importing it (its import needs a GPU stack)."""
    import importlib.util

    spec = importlib.util.find_spec("sglang")
    if spec is None or not spec.submodule_search_locations:
        raise PatchError("sglang is not installed in this environment")
    return Path(list(spec.submodule_search_locations)[0]).resolve().parent


def _load(version: str) -> list[FilePatch]:
    d = patch_dir(version)
    patches = []
    for p in sorted(d.glob("*.patch")):
        patches.extend(parse(p.read_text()))
    if not patches:
        raise PatchError(f"{d} holds no patches")
    return patches


def state(version: str | None = None, site: Path | None = None) -> str:
    """'applied', 'clean' (applies cleanly), 'outdated' (patched by another release of this package:
    re-patched from the backups), or raises PatchError (neither: a different source)."""
    version = version or sglang_version()
    site = site or _site()
    applied = clean = True
    for fp in _load(version):
        text = (site / fp.path).read_text()
        try:
            _apply(text, fp.hunks, reverse=True, name=fp.path)
        except PatchError:
            applied = False
        try:
            _apply(text, fp.hunks, reverse=False, name=fp.path)
        except PatchError:
            clean = False
    if applied:
        return "applied"
    if clean:
        return "clean"
    if _from_backups(version, site, reverse=False) is not None:
        return "outdated"
    raise PatchError(f"SGLang {version} at {site} is neither unpatched nor patched by this package "
                     "(another patch or a local edit?); reinstall SGLang, then run again")


def _from_backups(version: str, site: Path, reverse: bool) -> list[tuple[Path, str]] | None:
    """Files patched by another release of this package: rebuild from the backups of SGLang's
    originals. A file without a backup is one that release did not patch: it must be SGLang's own.
    None when that is not the case (a local edit, another patch)."""
    staged = []
    for fp in _load(version):
        target = site / fp.path
        backup = target.with_name(target.name + BACKUP_SUFFIX)
        orig = (backup if backup.exists() else target).read_text()
        if not backup.exists() and reverse:
            continue  # never patched: nothing to revert
        try:
            staged.append((target, orig if reverse else _apply(orig, fp.hunks, reverse=False, name=fp.path)))
        except PatchError:
            return None
    return staged


def apply(version: str | None = None, site: Path | None = None, reverse: bool = False) -> list[str]:
    """Apply (or revert) every file; idempotent. Returns the files written."""
    version = version or sglang_version()
    site = site or _site()
    st = state(version, site)
    if st == "outdated":
        staged = _from_backups(version, site, reverse)
        assert staged is not None
    else:
        if st == ("clean" if reverse else "applied"):
            return []
        staged = []
        for fp in _load(version):
            target = site / fp.path
            staged.append((target, _apply(target.read_text(), fp.hunks, reverse=reverse, name=fp.path)))
    for target, text in staged:  # every hunk matched: now write
        backup = target.with_name(target.name + BACKUP_SUFFIX)
        if not reverse and not backup.exists():
            backup.write_text(target.read_text())
        target.write_text(text)
        if reverse and backup.exists():
            backup.unlink()
        _drop_bytecode(target)
    return [str(t) for t, _ in staged]


def _drop_bytecode(target: Path) -> None:
    cache = target.parent / "__pycache__"
    for pyc in cache.glob(target.stem + ".*.pyc"):
        pyc.unlink(missing_ok=True)
