"""Storage back ends by URI scheme. :func:`open_storage` picks one."""

from __future__ import annotations

from kquant_api.spec import StorageConfig
from kquant_job.storage.base import ObjectInfo, Storage, is_prefix, join, sha256_file

__all__ = ["ObjectInfo", "Storage", "is_prefix", "join", "open_storage", "sha256_file"]


def open_storage(uri: str, config: StorageConfig | None = None) -> Storage:
    """The storage for ``uri``'s scheme: S3 for ``s3://``, the local file system for
    ``file://`` and plain paths. ``config`` (endpoint, region, addressing) applies to S3.
    Raises InvalidSpec for another scheme (``http://x/m.onnx`` was read as the relative
    path ``http:/x/m.onnx`` and reported missing)."""
    scheme, sep, _ = uri.partition("://")
    if sep and scheme not in ("s3", "file"):
        from kquant_job.errors import InvalidSpec

        raise InvalidSpec(f"{uri}: kquant reads and writes file:// and s3:// URIs (or plain "
                          f"paths), not {scheme}://")  # fmt: skip
    if uri.startswith("s3://"):
        from kquant_job.storage.s3 import S3Storage

        return S3Storage(config)
    from kquant_job.storage.file import FileStorage

    return FileStorage()
