"""The native copy-and-checksum helper: same bytes and checksums as the Python path, no bad piece
(nor any after it) copied from a range that fails its check, the GIL released for the call, and a clean fallback when it
cannot be built."""

import ctypes

import numpy as np
import pytest
import xxhash

from sglang_objectcache import native
from sglang_objectcache.format import buffer_address

PIECE = 96 << 10


def _case(n_pieces=12, seed=0):
    rng = np.random.default_rng(seed)
    src = bytearray(rng.integers(0, 256, n_pieces * PIECE, dtype=np.uint8).tobytes())
    dst = bytearray(len(src))
    s, d = buffer_address(src), buffer_address(dst)
    # each piece goes out as two segments, to a shuffled place
    order = rng.permutation(n_pieces).tolist()
    copies = []
    for i, k in enumerate(order):
        half = PIECE // 2
        copies.append((d + k * PIECE, s + i * PIECE, half))
        copies.append((d + k * PIECE + half, s + i * PIECE + half, PIECE - half))
    pieces = [s + i * PIECE for i in range(n_pieces)]
    sums = [xxhash.xxh3_64_intdigest(bytes(src[i * PIECE:(i + 1) * PIECE])) for i in range(n_pieces)]
    want = bytearray(len(src))
    for i, k in enumerate(order):
        want[k * PIECE:(k + 1) * PIECE] = src[i * PIECE:(i + 1) * PIECE]
    return src, dst, copies, pieces, sums, want


@pytest.fixture(params=["native", "python"])
def path(request, monkeypatch):
    if request.param == "native":
        if native._load() is None:
            pytest.skip(f"native helper unavailable: {native.status()}")
    else:
        monkeypatch.setattr(native, "_state", {"fn": None, "why": "forced by the test"})
    return request.param


def test_copy_and_hash_match_the_library(path):
    src, dst, copies, pieces, sums, want = _case()
    assert native.copy_and_hash(copies, pieces, PIECE) == sums
    assert dst == want


PER_PIECE = list(range(0, 2 * 12 + 1, 2))  # _case's copies: two per piece, in piece order


def test_verify_and_copy(path):
    src, dst, copies, pieces, sums, want = _case(seed=1)
    assert native.verify_and_copy(pieces, PIECE, sums, copies) == -1
    assert dst == want
    dst[:] = bytes(len(dst))  # piece by piece: each copied right after its check
    assert native.verify_and_copy(pieces, PIECE, sums, copies, PER_PIECE) == -1
    assert dst == want
    # no check asked: copies only
    dst[:] = bytes(len(dst))
    assert native.verify_and_copy(pieces, PIECE, None, copies) == -1
    assert dst == want


def test_a_bad_piece_is_named_and_neither_it_nor_later_ones_are_copied(path):
    src, dst, copies, pieces, sums, want = _case(seed=2)
    src[7 * PIECE + 1000] ^= 0xFF
    assert native.verify_and_copy(pieces, PIECE, sums, copies, PER_PIECE) == 7
    for i in range(7, len(pieces)):  # where pieces 7.. go: untouched
        k = (copies[2 * i][0] - buffer_address(dst)) // PIECE
        assert dst[k * PIECE:(k + 1) * PIECE] == bytes(PIECE)
    for i in range(7):  # those before: checked, so either in place or not copied at all
        k = (copies[2 * i][0] - buffer_address(dst)) // PIECE
        assert dst[k * PIECE:(k + 1) * PIECE] in (want[k * PIECE:(k + 1) * PIECE], bytes(PIECE))


def test_without_a_grouping_every_piece_is_checked_before_any_copy(path):
    """Copies in any order, no per-piece grouping given: all pieces are checked first, so a bad
    one leaves every target untouched."""
    src, dst, copies, pieces, sums, want = _case(seed=3)
    shuffled = copies[1::2] + copies[0::2]
    assert native.verify_and_copy(pieces, PIECE, sums, shuffled) == -1
    assert dst == want
    dst[:] = bytes(len(dst))
    src[11 * PIECE + 5] ^= 0xFF
    assert native.verify_and_copy(pieces, PIECE, sums, shuffled) == 11
    assert dst == bytearray(len(dst))


def test_the_native_call_releases_the_gil():
    fn = native._load()
    if fn is None:
        pytest.skip(f"native helper unavailable: {native.status()}")
    assert not fn._flags_ & ctypes._FUNCFLAG_PYTHONAPI  # ctypes.CDLL: the GIL is let go for the call
    assert "native" in native.status()


def test_without_a_compiler_it_falls_back_with_a_reason(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("OBJECTCACHE_NATIVE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    assert native._load() is None
    assert "false failed" in native.status()
    assert "native copy helper unavailable" in caplog.text
    src, dst, copies, pieces, sums, want = _case(seed=3)
    assert native.copy_and_hash(copies, pieces, PIECE) == sums and dst == want
    assert not list(tmp_path.glob("*.so"))


def test_it_builds_into_its_cache_dir_once(tmp_path, monkeypatch):
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("OBJECTCACHE_NATIVE_DIR", str(tmp_path))
    if native._load() is None:
        pytest.skip(f"no C compiler here: {native.status()}")
    built = list(tmp_path.glob("objectcache-*.so"))
    assert len(built) == 1
    mtime = built[0].stat().st_mtime_ns
    monkeypatch.setattr(native, "_state", {})
    assert native._load() is not None
    assert built[0].stat().st_mtime_ns == mtime  # reused, not rebuilt
