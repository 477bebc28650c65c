"""CLI and startup messages that point the right way: each names the cause and the fix, and no user
error ends in a traceback."""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid

import boto3
from conftest import s3_tier
from engine_util import Pages, fingerprint, keys

from sglang_objectcache.cli.main import main
from sglang_objectcache.config import parse_config
from sglang_objectcache.engine.cache import ObjectCache


class Answering:
    """An HTTP server on 127.0.0.1 answering `respond(method, path) -> bytes` (or nothing at all)."""

    def __init__(self, respond):
        self.respond = respond
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.endpoint = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.held: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(c,), daemon=True).start()

    def _one(self, c):
        try:
            c.settimeout(5)
            while True:
                got = b""
                while b"\r\n\r\n" not in got:
                    chunk = c.recv(65536)
                    if not chunk:
                        return
                    got += chunk
                head = got.split(b"\r\n\r\n")[0].decode("latin-1")
                method, path = head.split(" ")[:2]
                length = next((int(line.split(":")[1]) for line in head.split("\r\n")
                               if line.lower().startswith("content-length:")), 0)
                body = got.split(b"\r\n\r\n", 1)[1]
                while len(body) < length:
                    body += c.recv(65536)
                answer = self.respond(method, path)
                if answer is None:  # a server that accepts and never answers
                    self.held.append(c)
                    return
                c.sendall(answer)
        except OSError:
            pass

    def close(self):
        self.sock.close()
        for c in self.held:
            c.close()


def reply(status: str, body: bytes = b"") -> bytes:
    return f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\nContent-Type: application/xml\r\n\r\n".encode() + body


def s3_error(code: str) -> bytes:
    return f"<?xml version='1.0'?><Error><Code>{code}</Code><Message>x</Message></Error>".encode()


def config(tmp_path, tier) -> str:
    p = tmp_path / "oc.json"
    p.write_text(json.dumps({"tiers": [tier]}))
    return str(p)


def tier_at(endpoint, **kw) -> dict:
    return {"kind": "s3", "endpoint": endpoint, "bucket": "kv-cache", "native_reads": "off",
            "request_timeout": 1, "connect_timeout": 1, "max_retries": 0, **kw}


def test_an_endpoint_that_is_not_s3(tmp_path, capsys):
    srv = Answering(lambda m, p: reply("404 Not Found", b"<html>nothing here</html>"))
    try:
        assert main(["check-config", config(tmp_path, tier_at(srv.endpoint)), "--probe"]) == 1
        err = capsys.readouterr().err
        assert "does not look like an S3 endpoint" in err and "Traceback" not in err
    finally:
        srv.close()


def test_create_bucket_refused_by_the_server(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-a-real-secret")

    def respond(method, path):
        if method == "PUT":
            return reply("403 Forbidden", s3_error("AccessDenied"))
        return reply("404 Not Found", s3_error("NoSuchBucket"))
    srv = Answering(respond)
    try:
        cfg = parse_config({"tiers": [tier_at(srv.endpoint, create_bucket=True)]})
        try:
            ObjectCache(cfg, fingerprint("m"))
            raise AssertionError("started")
        except Exception as e:  # noqa: BLE001 - the type and text are the point
            assert type(e).__name__ == "StartupError" and "refused to create bucket" in str(e), e
    finally:
        srv.close()


def test_a_probe_never_creates_the_bucket(s3_env, prefix, tmp_path, capsys):
    bucket = f"never-{uuid.uuid4().hex[:8]}"
    tier = {**s3_tier(s3_env, prefix), "bucket": bucket, "create_bucket": True}
    assert main(["check-config", config(tmp_path, tier), "--probe"]) == 1
    assert "does not exist" in capsys.readouterr().err
    names = [b["Name"] for b in boto3.client("s3", **s3_env.client_kwargs()).list_buckets()["Buckets"]]
    assert bucket not in names


def test_the_probe_writes_reads_and_deletes_and_leaves_nothing(s3_env, prefix, tmp_path, capsys):
    assert main(["check-config", config(tmp_path, s3_tier(s3_env, prefix)), "--probe"]) == 0
    assert "list, write, read, delete" in capsys.readouterr().out
    left = boto3.client("s3", **s3_env.client_kwargs()).list_objects_v2(Bucket=s3_env.bucket,
                                                                        Prefix="objectcache-check/")
    assert left.get("KeyCount", 0) == 0


def test_the_endpoint_from_aws_endpoint_url(s3_env, prefix, monkeypatch):
    tier = s3_tier(s3_env, prefix)
    monkeypatch.setenv("AWS_ENDPOINT_URL", tier.pop("endpoint"))
    c = ObjectCache(parse_config({"tiers": [tier]}), fingerprint("m"))
    try:
        src, ks = Pages(8, seed=1), keys(8)
        assert all(c.put(ks, src.segments())) and c.get(ks, Pages.empty_like(src).segments()) == [True] * 8
        assert c.cfg.tiers[0].endpoint == s3_env.endpoint
    finally:
        c.close()


def test_a_silent_server_is_reported_within_its_timeout(tmp_path, capsys):
    srv = Answering(lambda m, p: None)
    try:
        t0 = time.monotonic()
        assert main(["check-config", config(tmp_path, tier_at(srv.endpoint)), "--probe"]) == 1
        assert time.monotonic() - t0 < 15
        err = capsys.readouterr().err
        assert "times out after 1 s" in err and "cannot reach" in err and "Traceback" not in err
    finally:
        srv.close()


def test_inspect_of_a_missing_file(capsys, tmp_path):
    assert main(["inspect", str(tmp_path / "nothing-here")]) == 2
    assert "cannot read" in capsys.readouterr().err
