"""The lease on a set folder (kquant_job.sets.lease), on local storage."""

from __future__ import annotations

import json

from kquant_job.sets.lease import Lease
from kquant_job.storage import open_storage


def test_a_removed_marker_is_never_recreated_and_the_lease_is_lost(tmp_path):
    storage = open_storage(tmp_path.as_uri() + "/", None)
    uri = (tmp_path / "set.json").as_uri()
    with Lease(storage, uri, {"set": "s", "startedAt": "2026-12-07T00:00:00Z"}, 60.0) as lease:
        assert lease.held()
        lease.renew()
        assert json.loads((tmp_path / "set.json").read_bytes())["renewedAt"]
        (tmp_path / "set.json").unlink()  # another run removed the set
        lease.renew()
        assert not lease.held() and not (tmp_path / "set.json").exists()


def test_an_unrenewed_lease_runs_out(tmp_path):
    storage = open_storage(tmp_path.as_uri() + "/", None)
    lease = Lease(storage, (tmp_path / "set.json").as_uri(), {"set": "s"}, 1e-9)
    with lease:
        lease.release()  # no renewal: held for live_seconds after the first write only
        assert not lease.held()


def test_a_marker_write_whose_reply_was_lost_is_the_leases_own(tmp_path):
    """Fault-injection trial (S3): a marker PUT took effect, its reply was lost, and the
    resent PUT met 412 on the lease's own marker; the run ended ("lease lapsed")."""
    from kquant_api import Reason
    from kquant_job.errors import StorageError

    storage = open_storage(tmp_path.as_uri() + "/", None)
    real_write = storage.write_bytes

    def lost_reply(uri, data, **kw):
        real_write(uri, data, **kw)  # it took effect...
        raise StorageError("precondition failed", reason=Reason.ConcurrentWrite)  # ...a retry

    storage.write_bytes = lost_reply  # type: ignore[method-assign]
    uri = (tmp_path / "set.json").as_uri()
    with Lease(storage, uri, {"set": "s"}, 60.0) as lease:
        lease.renew()
        assert lease.held()
        assert json.loads((tmp_path / "set.json").read_bytes())["renewedAt"]
        (tmp_path / "set.json").write_text('{"set": "another"}')  # not ours: lost
        lease.renew()
        assert not lease.held()


def test_keeping_fewer_than_two_sets_is_refused():
    import pytest

    from kquant_job.errors import InvalidSpec
    from kquant_job.sets.layout import Retention

    with pytest.raises(InvalidSpec, match="KQUANT_KEEP_SETS=1: kquant keeps at least 2 sets"):
        Retention.from_env({"KQUANT_KEEP_SETS": "1"})
    assert Retention.from_env({"KQUANT_KEEP_SETS": "2"}).keep_sets == 2


def test_a_renewal_stuck_in_a_dead_store_does_not_hold_the_run(tmp_path, monkeypatch):
    import threading
    import time

    import kquant_job.sets.lease as lease_module

    storage = open_storage(tmp_path.as_uri() + "/", None)
    real_write, stuck = storage.write_bytes, threading.Event()

    def hangs_on_renewal(uri, data, **kw):
        if "if_match" in kw:
            stuck.set()
            time.sleep(5)  # a store that stopped answering
        return real_write(uri, data, **kw)

    storage.write_bytes = hangs_on_renewal  # type: ignore[method-assign]
    monkeypatch.setattr(lease_module, "RELEASE_WAIT_SECONDS", 0.2)
    lease = Lease(storage, (tmp_path / "set.json").as_uri(), {"set": "s"}, 0.03)
    with lease:
        assert stuck.wait(2)
        started = time.monotonic()
    assert time.monotonic() - started < 2


def test_a_failure_reports_marker_whose_reply_was_lost_is_written_once(tmp_path):
    from kquant_api import Reason
    from kquant_job.errors import StorageError
    from kquant_job.sets import Target, Writer

    storage = open_storage(tmp_path.as_uri() + "/", None)
    real_write = storage.write_bytes

    def lost_reply(uri, data, **kw):
        etag = real_write(uri, data, **kw)
        if kw.get("if_none_match"):  # it took effect; the resend meets 412
            raise StorageError("precondition failed", reason=Reason.ConcurrentWrite)
        return etag

    storage.write_bytes = lost_reply  # type: ignore[method-assign]
    target = Target(storage, (tmp_path / "out").as_uri() + "/", Writer("vad"), replace=False,
                    field_name="spec.output.uri")  # fmt: skip
    uri = target.publish_failure({"outcome": "failed"})
    assert json.loads((tmp_path / uri.split(tmp_path.as_uri() + "/", 1)[1]).read_bytes()) == {
        "outcome": "failed"
    }
