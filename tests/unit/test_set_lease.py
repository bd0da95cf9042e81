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
