"""S3Storage against moto's S3 server process (real HTTP on loopback)."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import socket
import unicodedata
from pathlib import Path

import pytest

from kquant_api import Reason
from kquant_api.spec import StorageConfig
from kquant_job.errors import StorageError
from kquant_job.storage import s3_transfer
from kquant_job.storage.s3 import S3Storage


def _storage(endpoint: str) -> S3Storage:
    return S3Storage(StorageConfig(endpoint=endpoint, region="us-east-1"))


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if not p.is_dir())


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_object_round_trip_keeps_bytes_and_sha256(s3_env, bucket, tmp_path):
    data = os.urandom(300_000)
    src = _write(tmp_path / "src" / "model.onnx", data)
    storage = _storage(s3_env.endpoint)
    uri = f"s3://{bucket}/models/m/model.onnx"

    art = storage.upload(src, uri)

    digest = hashlib.sha256(data).hexdigest()
    assert (art.uri, art.sha256, art.bytes) == (uri, digest, len(data))
    head = s3_env.client().head_object(Bucket=bucket, Key="models/m/model.onnx")
    assert head["Metadata"]["sha256"] == digest
    assert storage.stat(uri).size == len(data)
    got = storage.download(uri, tmp_path / "dest")
    assert got == tmp_path / "dest" / "model.onnx"
    assert got.read_bytes() == data
    assert _files(tmp_path / "dest") == ["model.onnx"]  # no temporary file left behind


def test_prefix_round_trip_lists_relative_keys_and_skips_markers(s3_env, bucket, tmp_path):
    tree = {"a.onnx": b"a" * 10, "sub/b.bin": b"bb" * 7, "sub/deep/c.txt": b"c"}
    storage = _storage(s3_env.endpoint)
    for rel, data in tree.items():
        storage.upload(_write(tmp_path / "src" / rel, data), f"s3://{bucket}/m/{rel}")
    client = s3_env.client()
    client.put_object(Bucket=bucket, Key="m/", Body=b"")  # console-style folder markers
    client.put_object(Bucket=bucket, Key="m/sub/", Body=b"")
    client.put_object(Bucket=bucket, Key="m2/other.onnx", Body=b"x")  # sibling prefix

    listed = storage.list(f"s3://{bucket}/m/")
    assert [(o.key, o.size) for o in listed] == [
        ("a.onnx", 10),
        ("sub/b.bin", 14),
        ("sub/deep/c.txt", 1),
    ]
    assert storage.list(f"s3://{bucket}/m") == listed  # never the sibling "m2/"
    dest = tmp_path / "dest"
    assert storage.download(f"s3://{bucket}/m/", dest) == dest
    assert _files(dest) == sorted(tree)
    for rel, data in tree.items():
        assert (dest / rel).read_bytes() == data


def test_multipart_object_round_trip_and_progress_log(s3_env, bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("KQUANT_S3_MULTIPART_THRESHOLD_MIB", "8")
    monkeypatch.setenv("KQUANT_S3_MULTIPART_CHUNKSIZE_MIB", "5")  # S3's smallest part size
    monkeypatch.setattr(s3_transfer, "PROGRESS_MIN_BYTES", 1024 * 1024)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    log = logging.getLogger("kquant.storage")
    log.addHandler(handler)
    old_level = log.level
    log.setLevel(logging.INFO)
    try:
        data = os.urandom(21 * 1024 * 1024)
        src = _write(tmp_path / "big.bin", data)
        storage = _storage(s3_env.endpoint)
        uri = f"s3://{bucket}/big/big.bin"
        art = storage.upload(src, uri)
        got = storage.download(uri, tmp_path / "dest")
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)

    assert art.sha256 == hashlib.sha256(data).hexdigest()
    etag = s3_env.client().head_object(Bucket=bucket, Key="big/big.bin")["ETag"]
    assert etag.strip('"').endswith("-5")  # a multipart ETag: md5-of-parts "-" part count
    assert hashlib.sha256(got.read_bytes()).hexdigest() == art.sha256
    done = [r.fields for r in records if r.fields["percent"] == 100]  # type: ignore[attr-defined]
    assert {r["uri"] for r in done} == {uri}
    assert len(done) == 2 and all(r["bytes"] == len(data) for r in done)


def _count_heads(storage: S3Storage) -> list[str]:
    heads: list[str] = []
    storage.client.meta.events.register(
        "provide-client-params.s3.HeadObject", lambda params, **kw: heads.append(params["Key"])
    )
    return heads


def test_downloads_reuse_the_size_and_etag_they_already_know(s3_env, bucket, tmp_path):
    storage = _storage(s3_env.endpoint)
    for rel in ("a.onnx", "sub/b.bin"):
        storage.upload(_write(tmp_path / "src" / rel, os.urandom(1000)), f"s3://{bucket}/m/{rel}")
    heads = _count_heads(storage)
    storage.download(f"s3://{bucket}/m/a.onnx", tmp_path / "one")
    assert heads == ["m/a.onnx"]  # our stat; s3transfer makes none of its own
    heads.clear()
    storage.download(f"s3://{bucket}/m/", tmp_path / "all")
    assert heads == [] and _files(tmp_path / "all") == ["a.onnx", "sub/b.bin"]  # the listing


def test_an_object_replaced_during_download_is_fetched_again_whole(
    s3_env, bucket, tmp_path, monkeypatch
):
    monkeypatch.setenv("KQUANT_S3_MULTIPART_THRESHOLD_MIB", "5")
    monkeypatch.setenv("KQUANT_S3_MULTIPART_CHUNKSIZE_MIB", "5")  # ranged GETs, each If-Match
    storage = _storage(s3_env.endpoint)
    uri = f"s3://{bucket}/m/model.onnx"
    storage.upload(_write(tmp_path / "v1.bin", os.urandom(11 * 1024 * 1024)), uri)
    stale = storage.stat(uri)
    v2 = os.urandom(12 * 1024 * 1024)
    storage.upload(_write(tmp_path / "v2.bin", v2), uri)  # replaced after the stat
    real_stat = storage.stat
    calls = iter([stale])
    monkeypatch.setattr(storage, "stat", lambda u: next(calls, None) or real_stat(u))

    got = storage.download(uri, tmp_path / "dest")

    assert got.read_bytes() == v2  # one version whole, never parts of both
    assert _files(tmp_path / "dest") == ["model.onnx"]


def test_missing_object_prefix_and_bucket_are_source_not_found(s3_env, bucket, tmp_path):
    storage = _storage(s3_env.endpoint)
    uri = f"s3://{bucket}/nope/model.onnx"
    assert storage.stat(uri) is None
    cases = [
        lambda: storage.download(uri, tmp_path / "d1"),
        lambda: storage.download(f"s3://{bucket}/nope/", tmp_path / "d2"),
        lambda: storage.list("s3://kq-no-such-bucket/models/"),
        lambda: storage.download("s3://kq-no-such-bucket/m.onnx", tmp_path / "d3"),
        lambda: storage.upload(_write(tmp_path / "f", b"1"), "s3://kq-no-such-bucket/f"),
    ]
    for call in cases:
        with pytest.raises(StorageError) as info:
            call()
        assert info.value.reason is Reason.SourceNotFound, str(info.value)
        assert "s3://" in str(info.value)
    assert not any((tmp_path / d).exists() and _files(tmp_path / d) for d in ("d1", "d2", "d3"))
    storage.upload(tmp_path / "f", f"s3://{bucket}/dir/f")
    with pytest.raises(StorageError, match="end the URI with '/'") as info:
        storage.download(f"s3://{bucket}/dir", tmp_path / "d4")  # a prefix without its '/'
    assert info.value.reason is Reason.SourceNotFound


def _use_keys(monkeypatch, access_key: str, secret_key: str) -> None:
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


def test_bad_credentials_are_access_denied(s3_auth_server, monkeypatch, tmp_path):
    srv = s3_auth_server
    _use_keys(monkeypatch, srv.access_key, srv.secret_key)
    good = _storage(srv.endpoint)
    good.client.create_bucket(Bucket="kq-auth")
    uri = "s3://kq-auth/m/model.onnx"
    src = _write(tmp_path / "model.onnx", b"weights")
    good.upload(src, uri)  # the right key works: the server accepts real credentials
    assert good.stat(uri).size == 7

    wrong = [
        ("AKIAIOSFODNN7EXAMPLE", "not-the-secret-0123456789"),  # unknown key id
        (srv.access_key, "not-the-secret-0123456789"),  # known key, wrong secret
        (srv.denied_access_key, srv.denied_secret_key),  # valid user, no permissions
    ]
    for access_key, secret_key in wrong:
        _use_keys(monkeypatch, access_key, secret_key)
        storage = _storage(srv.endpoint)
        for call in (
            lambda s=storage: s.stat(uri),
            lambda s=storage: s.list("s3://kq-auth/m/"),
            lambda s=storage: s.download(uri, tmp_path / "dest"),
            lambda s=storage: s.upload(src, "s3://kq-auth/m/other.onnx"),
        ):
            with pytest.raises(StorageError) as info:
                call()
            assert info.value.reason is Reason.AccessDenied, str(info.value)
            assert secret_key not in str(info.value) and access_key not in str(info.value)
    assert not (tmp_path / "dest").exists() or _files(tmp_path / "dest") == []


def test_no_credentials_at_all_is_access_denied(s3_server, monkeypatch, tmp_path):
    for name in list(os.environ):
        if name.startswith("AWS_") and name != "AWS_CA_BUNDLE":
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(StorageError) as info:
        _storage(s3_server.endpoint).list("s3://kq-anything/")
    assert info.value.reason is Reason.AccessDenied
    assert "credentials" in str(info.value)


def test_endpoint_down_is_storage_unavailable(s3_env, monkeypatch, tmp_path):
    monkeypatch.setenv("KQUANT_S3_MAX_ATTEMPTS", "2")
    monkeypatch.setenv("KQUANT_S3_CONNECT_TIMEOUT", "1")
    monkeypatch.setenv("KQUANT_S3_RETRY_SECONDS", "1.5")
    with socket.socket() as s:  # a loopback port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    storage = _storage(f"http://127.0.0.1:{port}")
    src = _write(tmp_path / "f.onnx", b"1")
    for call in (
        lambda: storage.list("s3://kq-down/m/"),
        lambda: storage.download("s3://kq-down/m/f.onnx", tmp_path / "dest"),
        lambda: storage.download("s3://kq-down/m/", tmp_path / "dest"),
        lambda: storage.upload(src, "s3://kq-down/m/f.onnx"),
    ):
        with pytest.raises(StorageError) as info:
            call()
        assert info.value.reason is Reason.StorageUnavailable, str(info.value)
        assert "s3://kq-down/m/" in str(info.value)
        spent = re.search(r"gave up after ([\d.]+) s of retries: the next one would pass the "
                          r"1.5 s of KQUANT_S3_RETRY_SECONDS", str(info.value))  # fmt: skip
        assert spent and 0.0 < float(spent.group(1)) <= 1.5, str(info.value)


NFC, NFD = unicodedata.normalize("NFC", "é.bin"), unicodedata.normalize("NFD", "é.bin")
HOSTILE = {
    "dotdot": (["../evil"], "../evil"),
    "dotdot-deep": (["sub/../../evil"], "sub/../../evil"),
    "absolute": (["/abs"], "/abs"),
    "empty-segment": (["a//b"], "a//b"),
    "dot-segment": (["./x"], "./x"),
    "backslash": (["a\\..\\..\\evil"], "a\\..\\..\\evil"),
    "nfc-collision": ([NFC, NFD], None),
    "file-and-dir": (["x", "x/y"], None),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_prefix_keys_are_refused_before_any_write(s3_env, bucket, tmp_path, case):
    keys, named = HOSTILE[case]
    client = s3_env.client()
    for key in ["ok.onnx", *keys, "zz.onnx"]:
        client.put_object(Bucket=bucket, Key=f"model/{key}", Body=b"payload")
    work = tmp_path / "work"
    dest = work / "dest"

    with pytest.raises(StorageError) as info:
        _storage(s3_env.endpoint).download(f"s3://{bucket}/model/", dest)

    assert info.value.reason is Reason.UnsafePath
    for key in [named] if named else keys:  # a clash names both keys
        assert repr(key) in str(info.value)
    assert _files(tmp_path) == []  # nothing written, inside the destination or outside it


def test_sources_beyond_max_bytes_are_refused_before_any_transfer(s3_env, bucket, tmp_path):
    storage = _storage(s3_env.endpoint)
    client = s3_env.client()
    client.put_object(Bucket=bucket, Key="big/a.bin", Body=b"a" * 600)
    client.put_object(Bucket=bucket, Key="big/sub/b.bin", Body=b"b" * 500)
    dest = tmp_path / "dest"
    for uri, total in ((f"s3://{bucket}/big/a.bin", 600), (f"s3://{bucket}/big/", 1100)):
        with pytest.raises(StorageError) as err:
            storage.download(uri, dest, max_bytes=total - 1)
        assert err.value.reason is Reason.SourceTooLarge and err.value.exit_code == 20
        assert uri in str(err.value) and f"{total} bytes" in str(err.value)
        assert not dest.exists()
        storage.download(uri, tmp_path / "fits", max_bytes=total)  # the bound is inclusive
    assert _files(tmp_path / "fits") == ["a.bin", "sub/b.bin"]


def test_a_small_object_replaced_by_a_large_one_after_the_listing_stays_bounded(
    s3_env, bucket, tmp_path, monkeypatch
):
    """Listed at 1 KB, replaced by 3 MB before its (single, not ranged) GET: the GET carries
    If-Match, answers 412, and the object looked up again is held to what the budget leaves
    (before: the 3 MB, or any size, were written whatever the bound)."""
    storage = _storage(s3_env.endpoint)
    for rel in ("a.bin", "zz.bin"):
        storage.upload(_write(tmp_path / "src" / rel, os.urandom(1000)), f"s3://{bucket}/m/{rel}")
    listed = storage.list(f"s3://{bucket}/m/")
    storage.upload(_write(tmp_path / "big.bin", os.urandom(3 * 2**20)), f"s3://{bucket}/m/zz.bin")
    monkeypatch.setattr(storage, "list", lambda uri, limit=None: listed)
    with pytest.raises(StorageError) as info:
        storage.download(f"s3://{bucket}/m/", tmp_path / "dest", max_bytes=2**20)
    assert info.value.reason.value == "SourceTooLarge"
    assert not (tmp_path / "dest" / "zz.bin").exists()
