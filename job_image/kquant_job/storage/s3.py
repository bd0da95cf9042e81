"""S3 (and S3-compatible: MinIO, Ceph) storage through boto3's managed transfers.

Credentials come only from the standard AWS chain (environment, shared profile, IRSA / web
identity, instance metadata); the operator maps ``spec.storage.secretRef`` to environment
variables. Transfers use boto3's transfer manager (multipart, parallel ranged GETs), tuned by
environment variables (see :mod:`kquant_job.storage.s3_transfer`).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import boto3
from boto3.s3.transfer import ProgressCallbackInvoker, create_transfer_manager
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from s3transfer.subscribers import BaseSubscriber

from kquant_api import Artifact, Reason
from kquant_api.spec import StorageConfig
from kquant_job.errors import InvalidSpec, StorageError
from kquant_job.storage.base import ObjectInfo, Storage, Upload, is_prefix, join, sha256_file
from kquant_job.storage.paths import (
    atomic_target,
    check_keys,
    check_size,
    local_target,
    os_error,
)
from kquant_job.storage.s3_copy import conditional_copy
from kquant_job.storage.s3_errors import classify, unwrap
from kquant_job.storage.s3_transfer import TransferSettings, progress

LOG = logging.getLogger("kquant.storage")
F = TypeVar("F", bound=Callable[..., Any])
# Backoff between attempts of the retry window, seconds: doubling from the first to the cap.
FIRST_DELAY, MAX_DELAY = 0.5, 8.0


def parse_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key); the key may be empty or end in '/'.

    Raises InvalidSpec for a URI that is not ``s3://`` or names no bucket, and
    StorageError(UnsafePath) for a key with a '.' or '..' segment: S3 keys are literal, but
    HTTP clients and file systems read them as "here" and "parent", so such a key never
    names what it seems to."""
    if not uri.startswith("s3://"):
        raise InvalidSpec(f"{uri!r} is not an s3:// URI")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise InvalidSpec(f"{uri!r} names no bucket")
    if any(seg in (".", "..") for seg in key.split("/")):
        raise StorageError(
            f"unsafe key in {uri!r}: '.' and '..' segments are refused", reason=Reason.UnsafePath
        )
    return bucket, key


def retrying(method: F) -> F:
    """Retry a storage call while it fails with StorageUnavailable, for up to the storage's
    ``settings.retry_seconds`` (backoff 0.5 s doubling to 8 s), so a storage restart of a few
    seconds does not fail the job: botocore's own attempts give up within about a second on
    a refused connection. Other errors pass at once."""

    @functools.wraps(method)
    def wrapper(self: S3Storage, *args: Any, **kwargs: Any) -> Any:
        start = time.monotonic()
        deadline = start + self.settings.retry_seconds
        delay = FIRST_DELAY
        while True:
            try:
                return method(self, *args, **kwargs)
            except StorageError as exc:
                if exc.reason is not Reason.StorageUnavailable:
                    raise
                if time.monotonic() + delay > deadline:
                    # what was spent, and the window: the next wait would have passed it
                    spent = time.monotonic() - start
                    raise StorageError(
                        f"{exc} (gave up after {spent:.1f} s of retries: the next one would "
                        f"pass the {self.settings.retry_seconds:g} s of "
                        "KQUANT_S3_RETRY_SECONDS)",
                        reason=Reason.StorageUnavailable,
                    ) from None
                LOG.warning(
                    "storage unavailable, retrying in %.1f s",
                    delay,
                    extra={"fields": {"error": str(exc)}},
                )
                time.sleep(delay)
                delay = min(delay * 2, MAX_DELAY)

    return wrapper  # type: ignore[return-value]


def _object(uri: str) -> tuple[str, str]:
    bucket, key = parse_uri(uri)
    if not key or key.endswith("/"):
        raise InvalidSpec(f"{uri!r} names a prefix, not an object")
    return bucket, key


class S3Storage(Storage):
    """:class:`Storage` for ``s3://bucket/key`` URIs. ``config`` gives the endpoint, region,
    addressing style (default: path when an endpoint is set, else auto) and TLS verification.

    Errors are StorageError: SourceNotFound (NoSuchKey, NoSuchBucket, 404), AccessDenied (403,
    bad or missing credentials), UnsafePath (hostile keys in a prefix download) or
    StorageUnavailable (connection failures, timeouts, 5xx after botocore's retries).
    """

    def __init__(
        self, config: StorageConfig | None = None, settings: TransferSettings | None = None
    ) -> None:
        config = config or StorageConfig()
        self.settings = settings or TransferSettings.from_env()
        style = config.addressingStyle.value if config.addressingStyle else None
        style = style or ("path" if config.endpoint else "auto")
        botocore_config = Config(
            retries={"mode": "standard", "total_max_attempts": self.settings.max_attempts},
            connect_timeout=self.settings.connect_timeout,
            read_timeout=self.settings.read_timeout,
            s3={"addressing_style": style},
            max_pool_connections=max(10, self.settings.max_concurrency + 2),
        )
        try:
            self.client = boto3.session.Session().client(
                "s3",
                endpoint_url=config.endpoint or None,
                region_name=config.region or None,
                verify=config.verifyTls,
                config=botocore_config,
            )
        except ValueError as exc:  # e.g. a malformed endpoint URL
            raise InvalidSpec(f"spec.storage: {exc}") from None
        self.transfer = self.settings.transfer_config()
        # (bucket, key) -> the ETag a download expects: every GetObject of it carries If-Match
        self._expected: dict[tuple[str, str], str] = {}
        self.client.meta.events.register("before-parameter-build.s3.GetObject", self._if_match)

    def _if_match(self, params: dict[str, Any], **_: Any) -> None:
        """botocore's hook before a GetObject is built: add If-Match for an object whose ETag
        the download expects. s3transfer adds it to ranged GETs only and refuses it as an
        extra argument; a single GET would otherwise write whatever object now has the key,
        at any size (a red-team trial: listed at 1 KB, replaced by 200 MB)."""
        etag = self._expected.get((params.get("Bucket", ""), params.get("Key", "")))
        if etag and "IfMatch" not in params:
            params["IfMatch"] = etag

    @retrying
    def stat(self, uri: str) -> ObjectInfo | None:
        """Size, ETag and metadata of the object at ``uri`` (HeadObject); None on 404 (no key
        or no bucket)."""
        bucket, key = _object(uri)
        try:
            head = self.client.head_object(Bucket=bucket, Key=key)
        except (ClientError, BotoCoreError) as exc:
            err = classify(exc, uri)
            if err.reason is Reason.SourceNotFound:
                return None
            raise err from None
        return ObjectInfo(
            key=key.rsplit("/", 1)[-1],
            size=int(head["ContentLength"]),
            etag=head.get("ETag"),
            metadata=dict(head.get("Metadata") or {}),
        )

    @retrying
    def list(self, prefix_uri: str, limit: int | None = None) -> list[ObjectInfo]:
        """Every object below ``prefix_uri`` (ListObjectsV2, paginated; at most ``limit``
        keys, in key order, when given), keys relative to it, sorted; directory markers (keys
        ending in '/') are left out. A missing trailing '/' is implied. A missing bucket
        raises StorageError(SourceNotFound)."""
        bucket, prefix = parse_uri(prefix_uri)
        if prefix and not prefix.endswith("/"):
            prefix += "/"  # "m" must not match the sibling "m2/..."
        found: list[ObjectInfo] = []
        paging = {"MaxItems": limit} if limit else {}
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=prefix, PaginationConfig=paging
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    rel = obj["Key"][len(prefix) :]
                    if rel and not rel.endswith("/"):
                        found.append(ObjectInfo(rel, int(obj["Size"]), obj.get("ETag")))
        except (ClientError, BotoCoreError) as exc:
            raise classify(exc, prefix_uri) from None
        return sorted(found, key=lambda o: o.key)

    def download(
        self,
        uri: str,
        dest_dir: Path,
        max_bytes: int | None = None,
        skip: Callable[[str], bool] | None = None,
    ) -> Path:
        """Fetch an object to ``dest_dir/<basename>``, or a prefix into ``dest_dir`` mirroring
        its keys; returns the file or ``dest_dir``.

        A prefix's keys are all checked before anything is written (``..``, absolute, empty
        segments, backslashes, collisions, file-and-directory clashes raise
        StorageError(UnsafePath)). Each file lands under a temporary name and is renamed when
        complete. Raises StorageError(SourceNotFound) when nothing is there,
        StorageError(SourceTooLarge) beyond ``max_bytes`` (before any transfer).
        """
        if not is_prefix(uri):
            info = self.stat(uri)
            if info is None:
                hint = "; objects exist below it: end the URI with '/'" if self._any(uri) else ""
                raise StorageError(f"no object at {uri}{hint}", reason=Reason.SourceNotFound)
            check_size(uri, info.size, max_bytes)
            target = local_target(dest_dir, info.key, uri)
            self._fetch(uri, target, info, max_bytes)
            return target
        objects = [o for o in self.list(uri) if not (skip and skip(o.key))]
        if not objects:
            raise StorageError(f"no objects under {uri}", reason=Reason.SourceNotFound)
        check_keys([o.key for o in objects], uri)
        total = sum(o.size for o in objects)
        check_size(uri, total, max_bytes)
        plan = [(o, local_target(dest_dir, o.key, uri)) for o in objects]
        for obj, target in plan:
            # an object replaced since the listing may take what the others leave
            room = None if max_bytes is None else max_bytes - (total - obj.size)
            self._fetch(join(uri, obj.key), target, obj, room)
        return dest_dir

    def upload(self, src: Path, uri: str, metadata: Mapping[str, str] | None = None) -> Artifact:
        """Upload ``src`` to ``uri`` (a prefix ``uri`` receives ``src``'s name) with
        ``metadata`` and its hex SHA-256 as object metadata ``sha256``. S3 shows an object
        only once its (multipart) upload completes, so readers never see a partial one; a
        failed multipart upload is aborted by boto3 (a killed one is left for
        :meth:`list_uploads`). Returns URI, SHA-256, bytes."""
        if is_prefix(uri):
            uri = join(uri, src.name)
        _object(uri)
        try:
            size = src.stat().st_size
            digest = sha256_file(src)
        except OSError as exc:
            raise os_error(exc, uri, "upload to") from None
        self._put_file(src, uri, size, {**(metadata or {}), "sha256": digest})
        return Artifact(uri=uri, sha256=digest, bytes=size)

    @retrying
    def _put_file(self, src: Path, uri: str, size: int, metadata: dict[str, str]) -> None:
        bucket, key = _object(uri)
        try:
            self.client.upload_file(
                str(src),
                bucket,
                key,
                ExtraArgs={"Metadata": metadata},
                Callback=progress("upload", uri, size),
                Config=self.transfer,
            )
        except Exception as exc:
            raise _failure(exc, uri, "upload to") from None

    @retrying
    def delete(self, uri: str, if_match: str | None = None) -> None:
        """Delete one object (DeleteObject); an absent key is not an error. With
        ``if_match``, S3 deletes only while the ETag matches, else StorageError
        (ConcurrentWrite)."""
        bucket, key = _object(uri)
        kwargs = {"IfMatch": if_match} if if_match else {}
        try:
            self.client.delete_object(Bucket=bucket, Key=key, **kwargs)
        except (ClientError, BotoCoreError) as exc:
            err = classify(exc, uri)
            if err.reason is Reason.SourceNotFound and not _is_bucket_error(exc):
                return
            raise err from None

    @retrying
    def read_bytes(self, uri: str, max_bytes: int) -> tuple[bytes, str] | None:
        """GetObject of a small object: (bytes, ETag), or None on NoSuchKey. Raises
        StorageError(SourceTooLarge) beyond ``max_bytes``, SourceNotFound for a missing
        bucket."""
        bucket, key = _object(uri)
        try:
            got = self.client.get_object(Bucket=bucket, Key=key)
            check_size(uri, int(got["ContentLength"]), max_bytes)
            return got["Body"].read(max_bytes + 1), got["ETag"]
        except (ClientError, BotoCoreError) as exc:
            err = classify(exc, uri)
            if err.reason is Reason.SourceNotFound and not _is_bucket_error(exc):
                return None
            raise err from None

    @retrying
    def write_bytes(
        self,
        uri: str,
        data: bytes,
        *,
        if_match: str | None = None,
        if_none_match: bool = False,
        metadata: Mapping[str, str] | None = None,
    ) -> str:
        """PutObject with ``If-None-Match: *`` or ``If-Match: <etag>`` (S3 conditional
        writes, honoured by AWS S3 and MinIO): returns the new ETag; 412, or NoSuchKey for
        ``if_match`` on a vanished object, raises StorageError(ConcurrentWrite)."""
        bucket, key = _object(uri)
        kwargs: dict[str, Any] = {"Metadata": dict(metadata or {})}
        if if_none_match:
            kwargs["IfNoneMatch"] = "*"
        if if_match is not None:
            kwargs["IfMatch"] = if_match
        try:
            return str(self.client.put_object(Bucket=bucket, Key=key, Body=data, **kwargs)["ETag"])
        except (ClientError, BotoCoreError) as exc:
            err = classify(exc, uri)
            vanished = err.reason is Reason.SourceNotFound and not _is_bucket_error(exc)
            if if_match is not None and vanished:
                raise StorageError(
                    f"{uri}: removed by another writer", reason=Reason.ConcurrentWrite
                ) from None
            raise err from None

    @retrying
    def copy(
        self,
        src_uri: str,
        dst_uri: str,
        metadata: Mapping[str, str],
        *,
        absent: bool = False,
        if_match: str | None = None,
    ) -> None:
        """Server-side copy with ``metadata`` replacing the source's: boto3's managed copy
        (CopyObject, or a multipart copy beyond its threshold); with ``absent`` or
        ``if_match``, a multipart copy completed with ``If-None-Match: *`` or ``If-Match``
        (:func:`~kquant_job.storage.s3_copy.conditional_copy`), whose 412 raises
        StorageError(ConcurrentWrite)."""
        src_bucket, src_key = _object(src_uri)
        bucket, key = _object(dst_uri)
        try:
            if absent or if_match is not None:
                condition = {"IfNoneMatch": "*"} if absent else {"IfMatch": str(if_match)}
                conditional_copy(
                    self.client, (src_bucket, src_key), (bucket, key), metadata, condition,
                    self.settings.multipart_chunksize, self.settings.max_concurrency,
                )  # fmt: skip
                return
            self.client.copy(
                {"Bucket": src_bucket, "Key": src_key},
                bucket,
                key,
                ExtraArgs={"Metadata": dict(metadata), "MetadataDirective": "REPLACE"},
                Config=self.transfer,
            )
        except Exception as exc:
            raise _failure(exc, dst_uri, f"copy {src_uri} to") from None

    @retrying
    def list_uploads(self, prefix_uri: str) -> list[Upload]:
        """Incomplete multipart uploads below ``prefix_uri`` (ListMultipartUploads)."""
        bucket, prefix = parse_uri(prefix_uri)
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        found: list[Upload] = []
        try:
            pages = self.client.get_paginator("list_multipart_uploads").paginate(
                Bucket=bucket, Prefix=prefix
            )
            for page in pages:
                for up in page.get("Uploads", []):
                    when = up.get("Initiated")
                    found.append(
                        Upload(
                            up["Key"][len(prefix) :],
                            up["UploadId"],
                            when.timestamp() if when is not None else None,
                        )
                    )
        except (ClientError, BotoCoreError) as exc:
            raise classify(exc, prefix_uri) from None
        return found

    @retrying
    def abort_upload(self, prefix_uri: str, upload: Upload) -> None:
        """AbortMultipartUpload; an upload already gone is not an error."""
        bucket, key = _object(join(prefix_uri, upload.key))
        try:
            self.client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload.upload_id)
        except (ClientError, BotoCoreError) as exc:
            err = classify(exc, prefix_uri)
            if err.reason is not Reason.SourceNotFound:
                raise err from None

    @retrying
    def _any(self, uri: str) -> bool:
        bucket, key = parse_uri(uri.rstrip("/") + "/")
        try:
            return bool(
                self.client.list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1)["KeyCount"]
            )
        except (ClientError, BotoCoreError) as exc:
            raise classify(exc, uri) from None

    def _fetch(self, uri: str, target: Path, info: ObjectInfo, max_bytes: int | None) -> None:
        """Download the object ``info`` (from a HeadObject or a listing) describes. Its size
        and ETag spare s3transfer a HeadObject, and every ranged GET carries If-Match, so
        the parts all come from that one version. When the object was replaced since (412),
        it is looked up again (size bound re-checked) and fetched once more; a second
        replacement raises StorageError(ConcurrentWrite)."""
        try:
            self._get(uri, target, info)
            return
        except StorageError as exc:
            if exc.reason is not Reason.ConcurrentWrite:
                raise
        LOG.info(
            "object replaced while downloading; fetching it again", extra={"fields": {"uri": uri}}
        )
        fresh = self.stat(uri)
        if fresh is None:
            raise StorageError(
                f"no object at {uri} (removed while downloading)", reason=Reason.SourceNotFound
            )
        check_size(uri, fresh.size, max_bytes)
        self._get(uri, target, fresh)

    @retrying
    def _get(self, uri: str, target: Path, info: ObjectInfo) -> None:
        bucket, key = parse_uri(uri)
        subscribers: list[BaseSubscriber] = [_KnownObject(info.size, info.etag)]
        callback = progress("download", uri, info.size)
        if callback is not None:
            subscribers.append(ProgressCallbackInvoker(callback))
        config = self.settings.download_config(info.size)
        try:
            # the manager exits (its threads stop writing) before a failed file is removed
            with (
                atomic_target(target, durable=False) as tmp,
                create_transfer_manager(self.client, config) as manager,
            ):
                if info.etag:  # a replaced object answers 412, not its new, unchecked size
                    self._expected[(bucket, key)] = info.etag
                manager.download(bucket, key, str(tmp), subscribers=subscribers).result()
        except Exception as exc:
            raise _failure(exc, uri, "download") from None
        finally:
            self._expected.pop((bucket, key), None)


class _KnownObject(BaseSubscriber):
    """Gives s3transfer the size and ETag already known, in place of its own HeadObject."""

    def __init__(self, size: int, etag: str | None) -> None:
        self.size, self.etag = size, etag

    def on_queued(self, future: Any, **kwargs: Any) -> None:
        future.meta.provide_transfer_size(self.size)
        if self.etag:
            future.meta.provide_object_etag(self.etag)


def _is_bucket_error(exc: ClientError | BotoCoreError) -> bool:
    code = exc.response.get("Error", {}).get("Code") if isinstance(exc, ClientError) else None
    return code == "NoSuchBucket"


def _failure(exc: Exception, uri: str, action: str) -> Exception:
    """The StorageError for a failed transfer, or ``exc`` itself when it is neither a
    botocore nor a local I/O error. botocore is checked first: some of its timeouts are
    OSError subclasses too."""
    root = unwrap(exc)
    if root is not None:
        return classify(root, uri)
    if isinstance(exc, OSError):
        return os_error(exc, uri, action)
    return exc
