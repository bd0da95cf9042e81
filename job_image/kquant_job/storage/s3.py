"""S3 (and S3-compatible: MinIO, Ceph) storage through boto3's managed transfers.

Credentials come only from the standard AWS chain (environment, shared profile, IRSA / web
identity, instance metadata); the operator maps ``spec.storage.secretRef`` to environment
variables. Transfers use boto3's transfer manager (multipart, parallel ranged GETs), tuned by
environment variables (see :mod:`kquant_job.storage.s3_transfer`).
"""

from __future__ import annotations

from pathlib import Path

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from kquant_api import Artifact, Reason
from kquant_api.spec import StorageConfig
from kquant_job.errors import InvalidSpec, StorageError
from kquant_job.storage.base import ObjectInfo, Storage, is_prefix, join, sha256_file
from kquant_job.storage.paths import (
    atomic_target,
    check_keys,
    check_size,
    local_target,
    os_error,
)
from kquant_job.storage.s3_errors import classify, unwrap
from kquant_job.storage.s3_transfer import TransferSettings, progress


def parse_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key); the key may be empty or end in '/'."""
    if not uri.startswith("s3://"):
        raise InvalidSpec(f"{uri!r} is not an s3:// URI")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise InvalidSpec(f"{uri!r} names no bucket")
    return bucket, key


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

    def stat(self, uri: str) -> ObjectInfo | None:
        """Size of the object at ``uri`` (HeadObject); None on 404 (no key or no bucket)."""
        bucket, key = _object(uri)
        try:
            head = self.client.head_object(Bucket=bucket, Key=key)
        except (ClientError, BotoCoreError) as exc:
            err = classify(exc, uri)
            if err.reason is Reason.SourceNotFound:
                return None
            raise err from None
        return ObjectInfo(key=key.rsplit("/", 1)[-1], size=int(head["ContentLength"]))

    def list(self, prefix_uri: str) -> list[ObjectInfo]:
        """Every object below ``prefix_uri`` (ListObjectsV2, paginated), keys relative to it,
        sorted; directory markers (keys ending in '/') are left out. A missing trailing '/' is
        implied. A missing bucket raises StorageError(SourceNotFound)."""
        bucket, prefix = parse_uri(prefix_uri)
        if prefix and not prefix.endswith("/"):
            prefix += "/"  # "m" must not match the sibling "m2/..."
        found: list[ObjectInfo] = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=prefix
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    rel = obj["Key"][len(prefix) :]
                    if rel and not rel.endswith("/"):
                        found.append(ObjectInfo(key=rel, size=int(obj["Size"])))
        except (ClientError, BotoCoreError) as exc:
            raise classify(exc, prefix_uri) from None
        return sorted(found, key=lambda o: o.key)

    def download(self, uri: str, dest_dir: Path, max_bytes: int | None = None) -> Path:
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
            self._get(uri, target, info.size)
            return target
        objects = self.list(uri)
        if not objects:
            raise StorageError(f"no objects under {uri}", reason=Reason.SourceNotFound)
        check_keys([o.key for o in objects], uri)
        check_size(uri, sum(o.size for o in objects), max_bytes)
        plan = [(o, local_target(dest_dir, o.key, uri)) for o in objects]
        for obj, target in plan:
            self._get(join(uri, obj.key), target, obj.size)
        return dest_dir

    def upload(self, src: Path, uri: str) -> Artifact:
        """Upload ``src`` to ``uri`` (a prefix ``uri`` receives ``src``'s name) with its hex
        SHA-256 as object metadata ``sha256``. S3 shows an object only once its (multipart)
        upload completes, so readers never see a partial one. Returns URI, SHA-256, bytes."""
        if is_prefix(uri):
            uri = join(uri, src.name)
        bucket, key = _object(uri)
        try:
            size = src.stat().st_size
            digest = sha256_file(src)
        except OSError as exc:
            raise os_error(exc, uri, "upload to") from None
        try:
            self.client.upload_file(
                str(src),
                bucket,
                key,
                ExtraArgs={"Metadata": {"sha256": digest}},
                Callback=progress("upload", uri, size),
                Config=self.transfer,
            )
        except Exception as exc:
            raise _failure(exc, uri, "upload to") from None
        return Artifact(uri=uri, sha256=digest, bytes=size)

    def delete(self, uri: str) -> None:
        """Delete one object (DeleteObject); an absent key is not an error."""
        bucket, key = _object(uri)
        try:
            self.client.delete_object(Bucket=bucket, Key=key)
        except (ClientError, BotoCoreError) as exc:
            raise classify(exc, uri) from None

    def _any(self, uri: str) -> bool:
        bucket, key = parse_uri(uri.rstrip("/") + "/")
        try:
            return bool(
                self.client.list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1)["KeyCount"]
            )
        except (ClientError, BotoCoreError) as exc:
            raise classify(exc, uri) from None

    def _get(self, uri: str, target: Path, size: int) -> None:
        bucket, key = parse_uri(uri)
        try:
            with atomic_target(target) as tmp:
                self.client.download_file(
                    bucket,
                    key,
                    str(tmp),
                    Callback=progress("download", uri, size),
                    Config=self.transfer,
                )
        except Exception as exc:
            raise _failure(exc, uri, "download") from None


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
