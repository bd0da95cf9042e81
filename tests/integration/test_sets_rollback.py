"""Rolling a prefix back (kquant_job.sets.rollback, ``kquant-job rollback``) on both back
ends: readers get the earlier set at the manifest and at the fixed names, and later runs
publish as before (fault-injection trial: the README's manual rollback, copying a set's own
manifest over the prefix's, left the newer files at the fixed names and every later run in
ForeignObject)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from published import read_set
from test_sets import JOB, prefix_of, publish

from kquant_api import Reason
from kquant_job.errors import StorageError
from kquant_job.sets import Writer
from kquant_job.sets.rollback import rollback


def _three(store, tmp_path) -> list[str]:
    """Sets v1, v2, v3 of one job (generations 1-3), v3 current; their set ids."""
    ids = []
    for gen in (1, 2, 3):
        files = {"model.onnx": f"v{gen} graph".encode() * 20, f"only-v{gen}.txt": b"x"}
        ids.append(publish(store, tmp_path, Writer("vad", "speech", "uid-1", gen), files).set_id)
    return ids


def test_a_rollback_restores_the_set_at_every_name_and_later_runs_publish(store, tmp_path):
    v1, v2, v3 = _three(store, tmp_path)
    out = prefix_of(store)
    done = rollback(store.storage, store.uri("out/"))  # the set before the current one
    assert (done.previous, done.current) == (v3, v2)
    manifest = read_set(out)  # asserts the fixed names hold the set's own bytes
    assert manifest["set"] == v2 and manifest["rolledBackFrom"] == v3
    assert out.get("model.onnx") == b"v2 graph" * 20
    assert out.get("only-v3.txt") is None and out.get("only-v2.txt") == b"x"
    assert [h["set"] for h in manifest["history"]] == [v2, v1, v3]  # v3 still known
    assert manifest["newerSets"] == [v3]
    # again: one set further back, never forward to the set just rolled back from (trial)
    assert rollback(store.storage, store.uri("out/")).current == v1
    assert read_set(out)["set"] == v1 and out.get("model.onnx") == b"v1 graph" * 20
    with pytest.raises(StorageError, match="no set before"):
        rollback(store.storage, store.uri("out/"))
    # forward again, by id
    assert rollback(store.storage, store.uri("out/"), v3).current == v3
    assert read_set(out)["set"] == v3 and out.get("model.onnx") == b"v3 graph" * 20
    assert rollback(store.storage, store.uri("out/"), v1).current == v1
    # and the next run of the job publishes as usual over it
    v4 = publish(store, tmp_path, Writer("vad", "speech", "uid-1", 4), {"model.onnx": b"v4"})
    assert read_set(out)["set"] == v4.set_id and out.get("model.onnx") == b"v4"
    assert out.get("only-v1.txt") is None


def test_a_rollback_refuses_what_it_cannot_restore(store, tmp_path):
    with pytest.raises(StorageError) as info:
        rollback(store.storage, store.uri("out/"))
    assert info.value.reason is Reason.SourceNotFound  # nothing published there
    publish(store, tmp_path, JOB)
    with pytest.raises(StorageError, match="no set before"):
        rollback(store.storage, store.uri("out/"))
    with pytest.raises(StorageError, match="not one the prefix keeps"):
        rollback(store.storage, store.uri("out/"), "20200101T000000Z-00000000")
    with pytest.raises(StorageError, match="not one the prefix keeps"):
        rollback(store.storage, store.uri("out/"), "../../elsewhere")


def test_a_run_committing_during_a_rollback_wins(store, tmp_path, monkeypatch):
    _three(store, tmp_path)
    import kquant_job.sets.rollback as module

    real = module.read_state

    def then_a_commit(*args, **kwargs):
        state = real(*args, **kwargs)  # read; now another run commits
        publish(store, tmp_path, Writer("vad", "speech", "uid-1", 4), {"model.onnx": b"v4"})
        return state

    monkeypatch.setattr(module, "read_state", then_a_commit)
    with pytest.raises(StorageError) as info:
        rollback(store.storage, store.uri("out/"))
    assert info.value.reason is Reason.ConcurrentWrite
    assert prefix_of(store).get("model.onnx") == b"v4"


def test_the_rollback_command(tmp_path, monkeypatch):
    from kquant_job.sets import Retention, Target
    from kquant_job.storage.file import FileStorage

    root = tmp_path / "prod"
    for gen in (1, 2):
        staged = tmp_path / f"staged-{gen}"
        staged.mkdir()
        (staged / "model.onnx").write_bytes(f"v{gen}".encode())
        writer = Writer("vad", "speech", "u", gen)
        target = Target(FileStorage(), f"file://{root}/", writer, replace=True,
                        field_name="spec.promotion.uri", retention=Retention())  # fmt: skip
        target.preflight()
        target.publish(staged, ["model.onnx"], {"r": gen}, {})
    cmd = [sys.executable, "-m", "kquant_job.cli", "rollback", f"file://{root}"]
    run = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ), timeout=60)
    assert run.returncode == 0, run.stderr
    assert "is current again" in run.stdout
    assert (root / "model.onnx").read_bytes() == b"v1"
    assert json.loads((root / "manifest.json").read_text())["rolledBackFrom"]
    again = subprocess.run([*cmd, "--to", "nope"], capture_output=True, text=True, timeout=60)
    assert again.returncode != 0 and "not one the prefix keeps" in again.stderr


def test_a_rollback_stopped_before_its_copies_is_finished_by_the_same_command(
    store, tmp_path, monkeypatch
):
    """Trial: a rollback killed after its manifest write, run again to finish, rolled back
    one set further instead."""
    import kquant_job.sets.rollback as module

    v2 = _three(store, tmp_path)[1]
    real = module.sync_mirrors
    calls = {"n": 0}

    def killed_once(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt("killed after the manifest write")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "sync_mirrors", killed_once)
    with pytest.raises(KeyboardInterrupt):
        rollback(store.storage, store.uri("out/"))
    out = prefix_of(store)
    assert json.loads(out.get("manifest.json"))["set"] == v2
    assert out.get("model.onnx") == b"v3 graph" * 20  # the names not yet in step
    done = rollback(store.storage, store.uri("out/"))  # the same command again
    assert (done.previous, done.current) == (v2, v2)
    assert read_set(out)["set"] == v2 and out.get("model.onnx") == b"v2 graph" * 20


def test_a_stale_generation_never_replaces_a_rolled_back_prefix(store, tmp_path):
    """Trial: after a rollback to generation 2's set, a run of generation 2 (older than the
    generation 3 kept behind) published over it: the fence was the current set's writer."""
    _three(store, tmp_path)
    rollback(store.storage, store.uri("out/"))
    stale = Writer("vad", "speech", "uid-1", 2)
    with pytest.raises(StorageError) as info:
        publish(store, tmp_path, stale, {"model.onnx": b"stale"})
    assert info.value.reason is Reason.Superseded
    assert prefix_of(store).get("model.onnx") == b"v2 graph" * 20
