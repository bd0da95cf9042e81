"""A server-side S3 copy that lands only under a condition on the destination.

s3transfer's managed copy (CopyObject, or a multipart copy past its threshold) passes no
condition on the destination, and CopyObject's ``If-None-Match`` is not honoured everywhere
(moto ignores it). S3 checks ``If-None-Match: *`` and ``If-Match: <etag>`` on
CompleteMultipartUpload (AWS since 2024; moto honours ``If-None-Match``), so a conditional
copy is a multipart upload whose parts are UploadPartCopy ranges of the source, completed
under the condition, and aborted when anything fails: a name someone wrote since kquant
looked at it is never replaced (fault-injection trial: a colleague's object that landed
between kquant's check and its copy was overwritten).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

MIB = 2**20
MIN_PART = 5 * MIB  # S3's smallest part but the last
MAX_PART = 5 * 1024 * MIB  # S3's largest part
MAX_PARTS = 10_000


def part_ranges(size: int, part_size: int) -> list[tuple[int, int]]:
    """Inclusive byte ranges covering ``size`` bytes in parts of ``part_size`` bytes, raised
    to S3's limits (at least 5 MiB, at most 5 GiB, at most 10 000 parts)."""
    part = min(max(part_size, MIN_PART, -(-size // MAX_PARTS)), MAX_PART)
    return [(lo, min(lo + part, size) - 1) for lo in range(0, size, part)]


def conditional_copy(
    client: Any,
    source: tuple[str, str],
    dest: tuple[str, str],
    metadata: Mapping[str, str],
    condition: Mapping[str, str],
    part_size: int,
    threads: int,
) -> None:
    """Copy ``source`` (bucket, key) to ``dest`` with ``metadata``, landing only if
    ``condition`` (``{"IfNoneMatch": "*"}`` or ``{"IfMatch": etag}``) holds at the end.
    The parts are pinned to the source's ETag (``CopySourceIfMatch``). An empty source is a
    conditional PutObject. Raises botocore's errors (412 PreconditionFailed when the
    condition fails); the upload is aborted on any failure."""
    src_bucket, src_key = source
    bucket, key = dest
    head = client.head_object(Bucket=src_bucket, Key=src_key)
    size, etag = int(head["ContentLength"]), head["ETag"]
    if size == 0:
        client.put_object(Bucket=bucket, Key=key, Body=b"", Metadata=dict(metadata), **condition)
        return
    upload = client.create_multipart_upload(Bucket=bucket, Key=key, Metadata=dict(metadata))
    upload_id = upload["UploadId"]
    copy_source = {"Bucket": src_bucket, "Key": src_key}

    def one(numbered: tuple[int, tuple[int, int]]) -> dict[str, Any]:
        number, (lo, hi) = numbered
        answer = client.upload_part_copy(
            Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number,
            CopySource=copy_source, CopySourceRange=f"bytes={lo}-{hi}", CopySourceIfMatch=etag,
        )  # fmt: skip
        return {"PartNumber": number, "ETag": answer["CopyPartResult"]["ETag"]}

    try:
        ranges = list(enumerate(part_ranges(size, part_size), start=1))
        with ThreadPoolExecutor(max(1, min(threads, len(ranges)))) as pool:
            parts = list(pool.map(one, ranges))
        client.complete_multipart_upload(
            Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts},
            **condition,
        )  # fmt: skip
    except BaseException:
        with contextlib.suppress(Exception):
            client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        raise
