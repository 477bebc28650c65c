"""Compaction against real S3 servers: the journal folds into checkpoints, one writer wins each
epoch, covered manifests are deleted after a delay, and a new instance starts from a checkpoint
and a short tail with the same answers (tombstones included)."""

from __future__ import annotations

import logging
import threading
import time

import boto3
import numpy as np
from engine_util import Pages, keys
from test_index_truth import delete, eventually, make, object_of, skew


def listed(srv, prefix, part: str) -> list[str]:
    s3 = boto3.client("s3", **srv.client_kwargs())
    out = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=srv.bucket, Prefix=prefix + "/"):
        out += [o["Key"] for o in page.get("Contents", []) if o["Key"].split("/")[-2] == part]
    return out


def history(srv, prefix, batches: int = 4):
    """Pages announced 10 minutes ago (old enough to be covered) in `batches` manifests, and one
    batch announced now (the tail). Returns the writers (open) and the keys of each batch."""
    old, now = make(srv, prefix), make(srv, prefix)
    skew(old, -600.0, measure=False)  # its manifests are named 10 minutes in the past
    batches_ks = []
    for i in range(batches + 1):
        w = old if i < batches else now
        ks = keys(8, f"b{i}")
        assert all(w.put(ks, Pages(8, seed=i).segments()))
        w.flush()
        batches_ks.append(ks)
    return (old, now), batches_ks


def checkpoint(cache) -> bool:
    j = cache.tiers[0].journal
    cache.runtime.run(j.refresh(), timeout=10)
    return cache.runtime.run(j.checkpoint(), timeout=10)


def test_a_new_instance_starts_from_the_checkpoint_and_a_short_tail(s3_env, prefix):
    writers, batches = history(s3_env, prefix)
    c = make(s3_env, prefix)
    try:
        c.tiers[0].journal.delete_delay = 0.2
        assert checkpoint(c)
        assert len(listed(s3_env, prefix, "k")) == 1
        d = make(s3_env, prefix)
        try:
            # one GET for the checkpoint, one for the tail's manifest; none for the 4 covered ones
            assert d.tiers[0].requests["get"] == 2
            for i, ks in enumerate(batches):
                assert d.exists(ks) == 8
                dst = Pages.empty_like(Pages(8, seed=i))
                assert d.get(ks, dst.segments()) == [True] * 8
                assert np.array_equal(dst.data, Pages(8, seed=i).data)
        finally:
            d.close()
        # the covered manifests are deleted after the delay, the tail's stays
        assert eventually(lambda: len(listed(s3_env, prefix, "m")) == 1)
        e = make(s3_env, prefix)
        try:
            assert all(e.exists(ks) == 8 for ks in batches), "a start after the deletion learns it all"
        finally:
            e.close()
    finally:
        c.close()
        for w in writers:
            w.close()


def test_one_writer_wins_each_epoch(s3_env, prefix):
    writers, _ = history(s3_env, prefix, batches=2)
    a, b = make(s3_env, prefix), make(s3_env, prefix)
    try:
        assert checkpoint(a)
        jb = b.tiers[0].journal

        async def stale():  # b listed the checkpoints before a's landed
            return []
        jb._checkpoints = stale
        assert not checkpoint(b), "the create-only PUT of the same epoch loses"
        assert jb._epoch == 1 and jb._since == 0
        assert len(listed(s3_env, prefix, "k")) == 1
    finally:
        for c in (a, b, *writers):
            c.close()


def test_both_writers_racing_leave_one_checkpoint(s3_env, prefix):
    writers, _ = history(s3_env, prefix, batches=2)
    racers = [make(s3_env, prefix) for _ in range(3)]
    try:
        for r in racers:
            r.runtime.run(r.tiers[0].journal.refresh(), timeout=10)
        results, go = [], threading.Barrier(len(racers))

        def race(r):
            go.wait()
            results.append(r.runtime.run(r.tiers[0].journal.checkpoint(), timeout=10))
        threads = [threading.Thread(target=race, args=(r,)) for r in racers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results) == [False] * (len(racers) - 1) + [True]
        assert len(listed(s3_env, prefix, "k")) == 1
    finally:
        for c in (*racers, *writers):
            c.close()


def test_tombstones_survive_compaction(s3_env, prefix):
    writers, batches = history(s3_env, prefix)
    b = make(s3_env, prefix)
    try:
        gone = batches[1]
        delete(s3_env, [object_of(b, gone[0])])
        assert b.get(gone, Pages.empty_like(Pages(8)).segments()) == [False] * 8  # found gone: retracted
        b.flush()
        assert checkpoint(b)
        d = make(s3_env, prefix)
        try:
            assert d.exists(gone) == 0
            assert all(d.exists(ks) == 8 for i, ks in enumerate(batches) if i != 1)
        finally:
            d.close()
    finally:
        b.close()
        for w in writers:
            w.close()


def test_instances_write_checkpoints_by_themselves(s3_env, prefix):
    watcher = make(s3_env, prefix)
    try:
        j = watcher.tiers[0].journal
        j.checkpoint_after, j._jitter = 3, 1.0
        writers, batches = history(s3_env, prefix, batches=4)
        assert eventually(lambda: len(listed(s3_env, prefix, "k")) == 1, timeout=10)
        for w in writers:
            w.close()
    finally:
        watcher.close()


def test_an_unreadable_checkpoint_falls_back_to_an_older_one(s3_env, prefix, caplog):
    writers, batches = history(s3_env, prefix)
    c = make(s3_env, prefix)
    try:
        assert checkpoint(c)
        s3 = boto3.client("s3", **s3_env.client_kwargs())
        s3.put_object(Bucket=s3_env.bucket, Key=f"{c.ns.checkpoint_prefix}0000000002", Body=b"not msgpack \xc1")
        with caplog.at_level(logging.WARNING, logger="sglang_objectcache"):
            d = make(s3_env, prefix)
        try:
            assert "unreadable checkpoint" in caplog.text
            assert all(d.exists(ks) == 8 for ks in batches)
        finally:
            d.close()
    finally:
        c.close()
        for w in writers:
            w.close()


def test_an_instance_that_fell_behind_catches_up_from_the_checkpoint(s3_env, prefix):
    """An instance that could not refresh for longer than the deletion delay would miss the
    manifests deleted meanwhile; it loads the newer checkpoint instead."""
    x = make(s3_env, prefix, index_refresh_interval="60m")
    try:
        writers, batches = history(s3_env, prefix)
        c = make(s3_env, prefix)
        try:
            c.tiers[0].journal.delete_delay = 0.1
            assert checkpoint(c)
            assert eventually(lambda: len(listed(s3_env, prefix, "m")) == 1)
        finally:
            c.close()
        jx = x.tiers[0].journal
        jx.last_refresh = time.monotonic() - 2 * jx.delete_delay  # its last refresh was long ago
        x.runtime.run(jx.refresh(), timeout=10)
        assert all(x.exists(ks) == 8 for ks in batches)
        for w in writers:
            w.close()
    finally:
        x.close()
