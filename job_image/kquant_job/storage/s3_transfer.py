"""Transfer settings and progress logging for :class:`~kquant_job.storage.s3.S3Storage`.

The settings are read from environment variables when a storage is created:

========================================  =======  ==========================================
variable                                  default  meaning
========================================  =======  ==========================================
KQUANT_S3_MAX_ATTEMPTS                    5        attempts per request, first included
KQUANT_S3_RETRY_SECONDS                   60       keep retrying an unreachable storage this long
KQUANT_S3_CONNECT_TIMEOUT                 10       seconds to open a connection
KQUANT_S3_READ_TIMEOUT                    60       seconds to wait on a socket read
KQUANT_S3_MULTIPART_THRESHOLD_MIB         16       objects from this size use multipart, MiB
KQUANT_S3_MULTIPART_CHUNKSIZE_MIB         16       upload part size; least ranged-GET size, MiB
KQUANT_S3_MAX_CONCURRENCY                 8        parallel part requests per transfer
========================================  =======  ==========================================

Each request gets botocore's attempts (standard mode: exponential backoff, about a second in
all against a refused connection); on top, every storage call is retried while the storage
stays unreachable, for up to ``KQUANT_S3_RETRY_SECONDS``, so a restart of a few seconds
passes unnoticed (:func:`kquant_job.storage.s3.retrying`).

16 MiB parts mean 64 requests per GiB (boto3's 8 MiB default: 128) and keep upload buffers at
about concurrency x part size = 128 MiB; s3transfer raises the part size by itself when an
object would need more than S3's 10,000 parts.

A download splits the object into one ranged GET per thread, each between the chunk size and
64 MiB (:meth:`TransferSettings.download_config`): as parallel as 16 MiB parts, with fewer
requests. Measured by ``bench/bench_s3_transfer.py`` (400 MB): 3.4x boto3's 16 MiB parts on
moto, whose every ranged GET copies the whole object, and 1.25x on s3rver, where 64 MiB x 8
was the best plain boto3 configuration; real S3 keeps the same number of parallel streams.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

from boto3.s3.transfer import TransferConfig

from kquant_job.errors import InvalidSpec

LOG = logging.getLogger("kquant.storage")
MIB = 1024 * 1024
PROGRESS_MIN_BYTES = 64 * MIB
DOWNLOAD_PART_MAX = 64 * MIB


@dataclass(frozen=True)
class TransferSettings:
    """Retry, timeout and transfer knobs (seconds, bytes); see the module table."""

    max_attempts: int = 5
    retry_seconds: float = 60.0
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    multipart_threshold: int = 16 * MIB
    multipart_chunksize: int = 16 * MIB
    max_concurrency: int = 8

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> TransferSettings:
        """Settings from ``KQUANT_S3_*`` variables (``os.environ`` by default). Raises
        InvalidSpec naming the variable when a value is not a positive number."""
        env = dict(os.environ if env is None else env)
        d = cls()
        return cls(
            max_attempts=int(_num(env, "KQUANT_S3_MAX_ATTEMPTS", d.max_attempts)),
            retry_seconds=_num(env, "KQUANT_S3_RETRY_SECONDS", d.retry_seconds),
            connect_timeout=_num(env, "KQUANT_S3_CONNECT_TIMEOUT", d.connect_timeout),
            read_timeout=_num(env, "KQUANT_S3_READ_TIMEOUT", d.read_timeout),
            multipart_threshold=int(
                _num(env, "KQUANT_S3_MULTIPART_THRESHOLD_MIB", d.multipart_threshold / MIB) * MIB
            ),
            multipart_chunksize=int(
                _num(env, "KQUANT_S3_MULTIPART_CHUNKSIZE_MIB", d.multipart_chunksize / MIB) * MIB
            ),
            max_concurrency=int(_num(env, "KQUANT_S3_MAX_CONCURRENCY", d.max_concurrency)),
        )

    def transfer_config(self) -> TransferConfig:
        """The boto3 TransferConfig for these settings (classic threaded client, so the
        settings apply even where awscrt is installed)."""
        return TransferConfig(
            multipart_threshold=self.multipart_threshold,
            multipart_chunksize=self.multipart_chunksize,
            max_concurrency=self.max_concurrency,
            preferred_transfer_client="classic",
        )

    def download_config(self, size: int) -> TransferConfig:
        """The TransferConfig for downloading ``size`` bytes: one part per thread, each of
        at least ``multipart_chunksize`` and at most DOWNLOAD_PART_MAX (64 MiB) bytes."""
        per_thread = math.ceil(size / self.max_concurrency / MIB) * MIB
        part = max(self.multipart_chunksize, min(per_thread, DOWNLOAD_PART_MAX))
        return TransferConfig(
            multipart_threshold=self.multipart_threshold,
            multipart_chunksize=part,
            max_concurrency=self.max_concurrency,
            preferred_transfer_client="classic",
        )


def _num(env: dict[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return float(default)
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not (math.isfinite(value) and value > 0):
        raise InvalidSpec(f"{name}={raw!r}: expected a positive number")
    return value


class _Progress:
    """Thread-safe byte counter for s3transfer callbacks; logs at every 10% step."""

    def __init__(self, verb: str, uri: str, total: int) -> None:
        self.verb, self.uri, self.total = verb, uri, total
        self.done = 0
        self.next_pct = 10
        self.start = time.monotonic()
        self.lock = threading.Lock()

    def __call__(self, amount: int) -> None:
        with self.lock:
            self.done += amount  # s3transfer sends negative amounts when a part is retried
            pct = self.done * 100 // self.total
            if pct < self.next_pct:
                return
            self.next_pct = pct // 10 * 10 + 10
            seconds = max(time.monotonic() - self.start, 1e-6)
            fields: dict[str, Any] = {
                "uri": self.uri,
                "percent": min(pct, 100),
                "bytes": self.done,
                "total_bytes": self.total,
                "mb_per_s": round(self.done / 1e6 / seconds, 1),
            }
        LOG.info(f"{self.verb} {fields['percent']}%", extra={"fields": fields})


def progress(verb: str, uri: str, size: int) -> _Progress | None:
    """A progress logger for objects over PROGRESS_MIN_BYTES (64 MiB), else None."""
    return _Progress(verb, uri, size) if size > PROGRESS_MIN_BYTES else None
