"""A run's lease on its set folder, renewed while the run writes it.

A run holds its uncommitted set folder as long as it keeps the folder's marker (``set.json``)
fresh: a thread rewrites the marker with ``renewedAt`` every third of
``Retention.live_seconds`` (conditional on the marker's etag, so a folder another run removed
is never recreated). Another run of the job removes an uncommitted set only once its marker
is older than twice ``live_seconds`` (:func:`kquant_job.sets.state.reclaim_reason`), and a run
commits only while its last renewal is younger than ``live_seconds``: before, a run whose
uploads took longer than ``live_seconds`` (a large model on a slow link) failed after all its
work. A commit delayed past that (a frozen process) is fenced by the manifest's etag
(:func:`kquant_job.sets.state.fence`).
"""

from __future__ import annotations

import logging
import threading
import time
from types import TracebackType
from typing import Any

from kquant_api import Reason
from kquant_job.errors import StorageError
from kquant_job.report import now
from kquant_job.sets.layout import dumps
from kquant_job.storage.base import Storage

LOG = logging.getLogger("kquant.publish")
RELEASE_WAIT_SECONDS = 10.0


def write_marker(storage: Storage, uri: str, data: bytes, **condition: Any) -> str:
    """Write a set's marker conditionally (``if_none_match`` or ``if_match``); returns its
    etag. A condition that fails on the very bytes written is the resend of a write whose
    reply was lost (botocore resends a PUT it got no answer to, and the first had taken
    effect: fault-injection trial, where that 412 ended the run): read back, the marker is
    this writer's. Raises StorageError (ConcurrentWrite when it is another's or gone)."""
    try:
        return storage.write_bytes(uri, data, **condition)
    except StorageError as exc:
        if exc.reason is not Reason.ConcurrentWrite:
            raise
        got = storage.read_bytes(uri, len(data) + 1)
        if got is None or got[0] != data:
            raise
        return got[1]


class Lease:
    """The lease on one set folder: ``with Lease(...)`` writes the marker ``marker`` (a new
    object: ``If-None-Match``) at ``marker_uri`` and renews it every ``live_seconds / 3``
    until the block ends. Raises the storage's errors from the first write (StorageError)."""

    def __init__(
        self, storage: Storage, marker_uri: str, marker: dict[str, Any], live_seconds: float
    ) -> None:
        self.storage, self.uri, self.marker = storage, marker_uri, marker
        self.live_seconds = live_seconds
        self._etag = ""
        self._renewed = 0.0  # time.monotonic() of the last write that took effect
        self._lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kquant-lease", daemon=True)

    def __enter__(self) -> Lease:
        started = time.monotonic()  # the lease runs from before its marker exists
        self._etag = write_marker(self.storage, self.uri, dumps(self.marker), if_none_match=True)
        self._renewed = started
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.release()

    def release(self) -> None:
        """Stop renewing (idempotent): before withdrawing the set, so no renewal changes
        its marker while it is removed. Waits at most RELEASE_WAIT_SECONDS for a renewal in
        flight (a store that stopped answering keeps botocore retrying for minutes); one
        that lands later is conditional on the marker's etag, so it never recreates a
        removed marker."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(RELEASE_WAIT_SECONDS)

    def held(self) -> bool:
        """Whether the set may still be committed: renewed within ``live_seconds`` and
        never found removed or replaced."""
        return not self._lost and time.monotonic() - self._renewed <= self.live_seconds

    def renew(self) -> None:
        """Rewrite the marker with ``renewedAt`` (now, RFC 3339) while it is the one this
        lease wrote; a failed write leaves the lease to run out (logged)."""
        started = time.monotonic()
        doc = {**self.marker, "renewedAt": now()}
        try:
            self._etag = write_marker(self.storage, self.uri, dumps(doc), if_match=self._etag)
        except StorageError as exc:
            if exc.reason in (Reason.ConcurrentWrite, Reason.SourceNotFound):
                self._lost = True  # removed (or replaced) by another run: never recreated
            LOG.warning("could not renew the lease on %s: %s", self.uri, exc)
            return
        self._renewed = started

    def _run(self) -> None:
        while not self._lost and not self._stop.wait(self.live_seconds / 3):
            self.renew()
