"""Conditional writes, deletes, copies and unfinished uploads on both back ends (a local
directory and moto's S3 server): what the publisher's guarantees rest on."""

from __future__ import annotations

import itertools
import threading
from pathlib import Path

import pytest

from kquant_api import Reason
from kquant_job.errors import StorageError


def _reason(call) -> Reason:
    with pytest.raises(StorageError) as info:
        call()
    return info.value.reason


def test_create_only_if_absent(store):
    uri = store.uri("p/manifest.json")
    etag = store.storage.write_bytes(uri, b"first", if_none_match=True)
    assert _reason(lambda: store.storage.write_bytes(uri, b"x", if_none_match=True)) is (
        Reason.ConcurrentWrite
    )
    data, now = store.storage.read_bytes(uri, 1024)
    assert (data, now) == (b"first", etag)
    assert store.storage.stat(uri).etag == etag


def test_replace_only_if_unchanged(store):
    uri = store.uri("p/manifest.json")
    first = store.storage.write_bytes(uri, b"v1")
    second = store.storage.write_bytes(uri, b"v2", if_match=first)
    assert second != first
    assert _reason(lambda: store.storage.write_bytes(uri, b"v3", if_match=first)) is (
        Reason.ConcurrentWrite
    )
    assert store.storage.read_bytes(uri, 1024)[0] == b"v2"
    gone = store.uri("p/absent.json")
    assert _reason(lambda: store.storage.write_bytes(gone, b"v", if_match=first)) is (
        Reason.ConcurrentWrite
    )
    assert store.storage.read_bytes(gone, 1024) is None


def test_delete_only_if_unchanged(store, tmp_path):
    uri = store.uri("p/model.onnx")
    old = store.storage.write_bytes(uri, b"ours")
    new = store.storage.write_bytes(uri, b"someone else's")
    assert _reason(lambda: store.storage.delete(uri, if_match=old)) is Reason.ConcurrentWrite
    assert store.storage.read_bytes(uri, 1024)[0] == b"someone else's"
    store.storage.delete(uri, if_match=new)
    assert store.storage.stat(uri) is None
    store.storage.delete(uri, if_match=new)  # absent: nothing to do


def test_read_bytes_is_bounded(store):
    uri = store.uri("big.json")
    store.storage.write_bytes(uri, b"x" * 100)
    assert _reason(lambda: store.storage.read_bytes(uri, 99)) is Reason.SourceTooLarge
    assert store.storage.read_bytes(uri, 100)[0] == b"x" * 100


def test_copy_replaces_atomically_and_carries_metadata(store, tmp_path):
    src = tmp_path / "m.onnx"
    src.write_bytes(b"weights" * 1000)
    art = store.storage.upload(src, store.uri("sets/a/m.onnx"), {"kquant-set": "a"})
    store.storage.write_bytes(store.uri("m.onnx"), b"old")
    store.storage.copy(store.uri("sets/a/m.onnx"), store.uri("m.onnx"), {"kquant-set": "a"})
    info = store.storage.stat(store.uri("m.onnx"))
    assert store.storage.read_bytes(store.uri("m.onnx"), 10**6)[0] == src.read_bytes()
    if store.kind == "s3":
        assert info.metadata == {"kquant-set": "a"}
        assert store.storage.stat(store.uri("sets/a/m.onnx")).metadata["sha256"] == art.sha256
    else:  # a file of its own, never a hard link of the set's file
        assert info.etag != store.storage.stat(store.uri("sets/a/m.onnx")).etag
        fixed, kept = Path(store.uri("m.onnx")[7:]), Path(store.uri("sets/a/m.onnx")[7:])
        assert fixed.stat().st_ino != kept.stat().st_ino
        with fixed.open("r+b") as fh:  # a colleague's `cp` over the fixed name
            fh.write(b"hotfix")
        assert kept.read_bytes() == src.read_bytes()  # the set's file is untouched


def test_a_conditional_copy_never_replaces_what_someone_wrote(store, tmp_path):
    """A colleague's object that lands at a name after kquant looked at it (absent, or at
    the etag it saw) stays; the copy fails with ConcurrentWrite (fault-injection trial: S3
    overwrote it, as the managed copy passed no condition)."""
    src = tmp_path / "m.onnx"
    src.write_bytes(b"weights" * 1000)
    store.storage.upload(src, store.uri("sets/a/m.onnx"))
    source, fixed = store.uri("sets/a/m.onnx"), store.uri("m.onnx")
    theirs = store.storage.write_bytes(fixed, b"a colleague's model")  # after kquant saw none
    meta = {"kquant-set": "a"}
    assert _reason(lambda: store.storage.copy(source, fixed, meta, absent=True)) is (
        Reason.ConcurrentWrite
    )
    assert store.storage.read_bytes(fixed, 10**6)[0] == b"a colleague's model"
    store.storage.copy(source, fixed, meta, if_match=theirs)  # what it saw: replaced
    assert store.storage.read_bytes(fixed, 10**6)[0] == src.read_bytes()
    if store.kind == "s3":
        assert store.storage.stat(fixed).metadata == meta
        return  # moto does not check If-Match on CompleteMultipartUpload (AWS S3 does)
    now = store.storage.write_bytes(fixed, b"rewritten since")
    assert now != theirs
    assert _reason(lambda: store.storage.copy(source, fixed, meta, if_match=theirs)) is (
        Reason.ConcurrentWrite
    )
    assert store.storage.read_bytes(fixed, 10**6)[0] == b"rewritten since"


def test_exactly_one_of_many_concurrent_creators_wins(store):
    uri = store.uri("p/manifest.json")
    outcomes: list[str] = []
    barrier = threading.Barrier(8)

    def writer(i: int) -> None:
        barrier.wait()
        try:
            store.storage.write_bytes(uri, f"writer {i}".encode(), if_none_match=True)
            outcomes.append(f"won {i}")
        except StorageError as exc:
            outcomes.append(exc.reason.value)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [o for o in outcomes if o.startswith("won")]
    assert len(winners) == 1 and outcomes.count("ConcurrentWrite") == 7
    assert store.storage.read_bytes(uri, 100)[0] == f"writer {winners[0][4:]}".encode()


def test_unfinished_uploads_are_listed_and_aborted(store, tmp_path):
    if store.kind == "s3":
        from kquant_job.storage.s3 import parse_uri

        bucket, key = parse_uri(store.uri("sets/x/m.onnx"))
        store.storage.client.create_multipart_upload(Bucket=bucket, Key=key)
    else:
        from kquant_job.storage.paths import temp_path

        part = temp_path(Path(store.root[len("file://") :]) / "sets/x/m.onnx")
        part.parent.mkdir(parents=True)
        part.write_bytes(b"half")
    uploads = store.storage.list_uploads(store.uri("sets/"))
    assert [u.key.split("/")[0] for u in uploads] == ["x"]
    assert store.storage.list(store.uri("sets/")) == []  # never listed as an object
    store.storage.abort_upload(store.uri("sets/"), uploads[0])
    assert store.storage.list_uploads(store.uri("sets/")) == []


def test_a_conditional_copy_of_several_parts_is_whole(store, tmp_path):
    """S3: a conditional copy is a multipart upload of UploadPartCopy ranges (5 MiB parts
    here, S3's smallest): the object that lands is the source, byte for byte."""
    import dataclasses

    from kquant_job.storage.s3_copy import MIN_PART, part_ranges

    if store.kind == "s3":
        store.storage.settings = dataclasses.replace(
            store.storage.settings, multipart_chunksize=MIN_PART
        )
    src = tmp_path / "big.onnx"
    src.write_bytes(bytes(range(256)) * (12 * 2**20 // 256) + b"tail")
    assert len(part_ranges(src.stat().st_size, MIN_PART)) == 3
    store.storage.upload(src, store.uri("sets/a/big.onnx"))
    store.storage.copy(store.uri("sets/a/big.onnx"), store.uri("big.onnx"), {}, absent=True)
    assert store.storage.read_bytes(store.uri("big.onnx"), 2**25)[0] == src.read_bytes()
    store.storage.write_bytes(store.uri("sets/a/empty"), b"")
    store.storage.copy(store.uri("sets/a/empty"), store.uri("empty"), {}, absent=True)
    assert store.storage.read_bytes(store.uri("empty"), 10)[0] == b""


def test_parts_keep_to_the_limits_of_s3():
    from kquant_job.storage.s3_copy import MAX_PARTS, MIN_PART, part_ranges

    assert part_ranges(0, MIN_PART) == []
    assert part_ranges(10, 1) == [(0, 9)]  # raised to 5 MiB: one part
    ranges = part_ranges(12 * 2**20 + 1, MIN_PART)
    assert ranges[0] == (0, MIN_PART - 1) and ranges[-1] == (2 * MIN_PART, 12 * 2**20)
    huge = part_ranges(MAX_PARTS * MIN_PART * 3, MIN_PART)  # 150 GB: parts grow
    assert len(huge) <= MAX_PARTS and huge[-1][1] == MAX_PARTS * MIN_PART * 3 - 1
    assert all(b == a + 1 for (_, a), (b, _) in itertools.pairwise(huge))
