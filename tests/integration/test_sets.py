"""Publishing sets (kquant_job.sets) on both back ends, a local directory and moto's S3
server: layout, ownership, retention, generations, concurrent writers, reclaiming, the
first layout's manifests. Each test reads the prefix back as a reader would."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from published import Prefix, read_set, set_files

from kquant_api import Reason
from kquant_job.errors import StorageError
from kquant_job.sets import Retention, Target, Writer
from kquant_job.sets.layout import dumps
from kquant_job.sets.mirrors import sync_mirrors
from kquant_job.storage.paths import temp_path

FILES = {"model_fp16.onnx": b"fp16 graph" * 50, "tokenizer/vocab.txt": b"a\nb\n"}


def stage(root: Path, files: dict[str, bytes] = FILES) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def prefix_of(store, key: str = "out/") -> Prefix:
    if store.kind == "file":
        return Prefix.of(store.uri(key))
    bucket, _, base = store.root[5:].partition("/")
    return Prefix(client=store.storage.client, bucket=bucket, key=base + key)


def target(store, writer: Writer, *, replace: bool = True, key: str = "out/", **kw) -> Target:
    t = Target(
        store.storage,
        store.uri(key),
        writer,
        replace=replace,
        field_name="spec.output.uri",
        retention=kw.get("retention", Retention()),
    )
    t.preflight()
    return t


def publish(store, tmp_path, writer, files=FILES, **kw):
    staged = stage(tmp_path / f"staged-{time.monotonic_ns()}", files)
    t = target(store, writer, **kw)
    return t.publish(staged, sorted(files), {"outcome": "ok", "who": writer.name}, {"v": 1})


def reason_of(call) -> Reason:
    with pytest.raises(StorageError) as info:
        call()
    return info.value.reason


JOB = Writer("vad", "speech", "uid-1", 1)


def test_a_set_is_immutable_files_a_manifest_and_fixed_name_copies(store, tmp_path):
    done = publish(store, tmp_path, JOB, replace=False)
    out = prefix_of(store)
    manifest = read_set(out)
    assert manifest["set"] == done.set_id and manifest["job"]["uid"] == "uid-1"
    assert set_files(manifest) == ["model_fp16.onnx", "report.json", "tokenizer/vocab.txt"]
    assert out.fixed_names() == ["manifest.json", *set_files(manifest)]
    assert [a.uri for a in done.artifacts] == [
        store.uri(f"out/.kquant/sets/{done.set_id}/{rel}") for rel in sorted(FILES)
    ]
    marker = json.loads(out.get(f".kquant/sets/{done.set_id}/set.json"))
    assert marker["kind"] == "QuantizationSet" and marker["job"]["name"] == "vad"
    # the set folder carries its own copy of the manifest, for rollback
    assert out.get(f".kquant/sets/{done.set_id}/manifest.json") == out.get("manifest.json")


def test_a_fresh_output_refuses_what_it_did_not_write(store, tmp_path):
    store.storage.write_bytes(store.uri("out/notes.txt"), b"theirs")
    assert reason_of(lambda: target(store, JOB, replace=False)) is Reason.OutputExists
    store.storage.write_bytes(store.uri("out2/manifest.json"), b'{"theirs": 1}')
    for replace in (False, True):
        call = lambda r=replace: target(store, JOB, replace=r, key="out2/")  # noqa: E731
        assert reason_of(call) is Reason.ForeignObject
    assert prefix_of(store, "out2/").all_keys() == ["manifest.json"]
    # another job's set is not this run's to replace without overwrite
    publish(store, tmp_path, Writer("other", "speech", "uid-2", 1), key="out3/")
    assert reason_of(lambda: target(store, JOB, replace=False, key="out3/")) is (
        Reason.OutputExists
    )


def test_a_rerun_of_the_same_generation_replaces_its_own_set(store, tmp_path):
    first = publish(store, tmp_path, JOB, replace=False)
    rerun = Writer("vad", "speech", "uid-1", 1)  # same job and generation, another run
    second = publish(store, tmp_path, rerun, replace=False)
    manifest = read_set(prefix_of(store))
    assert manifest["set"] == second.set_id != first.set_id


def test_replacing_removes_stale_copies_and_never_touches_foreign_objects(store, tmp_path, caplog):
    publish(store, tmp_path, JOB)
    store.storage.write_bytes(store.uri("out/README.md"), b"theirs")
    v2 = {"model_fp16.onnx": b"v2 graph" * 40}
    with caplog.at_level("WARNING", logger="kquant"):
        publish(store, tmp_path, Writer("vad", "speech", "uid-1", 2), v2)
    [warning] = [r for r in caplog.records if "did not write untouched" in r.getMessage()]
    assert warning.fields == {"examples": ["README.md"]}  # reported
    out = prefix_of(store)
    manifest = read_set(out)
    assert out.get("tokenizer/vocab.txt") is None  # only the old set had it
    assert out.get("README.md") == b"theirs"
    assert out.fixed_names() == ["README.md", "manifest.json", "model_fp16.onnx", "report.json"]
    assert manifest["history"][0]["set"] == manifest["set"]


def test_a_fixed_name_rewritten_in_place_stays_the_writers_and_its_set_is_untouched(
    store, tmp_path
):
    """Fault-injection trial: locally the fixed name was a hard link of the set's file, so a
    colleague's ``cp`` over it rewrote the set too, and the next set, which no longer had
    that name, removed the colleague's file as kquant's own."""
    first = publish(store, tmp_path, JOB)
    ours = FILES["model_fp16.onnx"]
    hotfix = b"hotfix" + ours[6:]  # the same size, other bytes
    if store.kind == "file":
        with Path(store.uri("out/model_fp16.onnx")[len("file://") :]).open("r+b") as fh:
            fh.write(b"hotfix")  # in place, as cp does
    else:
        store.storage.write_bytes(store.uri("out/model_fp16.onnx"), hotfix)
    out = prefix_of(store)
    assert out.get("model_fp16.onnx") == hotfix
    assert out.get(f".kquant/sets/{first.set_id}/model_fp16.onnx") == ours
    publish(store, tmp_path, Writer("vad", "speech", "uid-1", 2), {"model_int8.onnx": b"q" * 99})
    assert out.get("model_fp16.onnx") == hotfix  # not kquant's: left where it is
    assert out.get("model_int8.onnx") == b"q" * 99


def test_a_fixed_name_an_earlier_kquant_hard_linked_is_copied_again(store, tmp_path):
    """Fault-injection trial: fixed names published before copies stopped being hard links
    stayed links while their bytes matched, and a colleague's cp still rewrote the set."""
    if store.kind != "file":
        pytest.skip("hard links are local")
    import os

    first = publish(store, tmp_path, JOB)
    root = Path(store.uri("out/")[len("file://") :])
    fixed, kept = root / "model_fp16.onnx", root / f".kquant/sets/{first.set_id}/model_fp16.onnx"
    fixed.unlink()
    os.link(kept, fixed)  # the layout of the stops before
    second = publish(store, tmp_path, Writer("vad", "speech", "uid-1", 2))  # same bytes
    kept = root / f".kquant/sets/{second.set_id}/model_fp16.onnx"
    assert fixed.stat().st_nlink == 1 and kept.stat().st_nlink == 1
    with fixed.open("r+b") as fh:
        fh.write(b"hotfix")
    assert kept.read_bytes() == FILES["model_fp16.onnx"]


def test_copies_an_interrupted_run_left_are_finished_by_the_next_run(store, tmp_path, monkeypatch):
    """Fault-injection trial: run 2 was killed between its commit and its copies; run 3's
    commit dropped run 1's set from the history, its copies at the fixed names were no longer
    recognised, and every later run ended in ForeignObject."""
    import kquant_job.sets.publish as publishing
    from kquant_job.sets.mirrors import MirrorOutcome

    keep = Retention(keep_sets=2)
    publish(store, tmp_path, JOB, retention=keep)
    with monkeypatch.context() as m:  # killed after its commit, before any copy
        m.setattr(publishing, "sync_mirrors", lambda *a, **k: MirrorOutcome())
        v2 = {"model_fp16.onnx": b"v2 graph" * 40}
        publish(store, tmp_path, Writer("vad", "speech", "uid-1", 2), v2, retention=keep)
    out = prefix_of(store)
    assert out.get("model_fp16.onnx") == FILES["model_fp16.onnx"]  # still set 1's
    for generation in (3, 4):
        files = {"model_fp16.onnx": f"v{generation} graph".encode() * 40}
        publish(store, tmp_path, Writer("vad", "speech", "uid-1", generation), files,
                retention=keep)  # fmt: skip
        read_set(out)  # every fixed name holds the bytes of the manifest's set


def test_a_foreign_object_at_a_fixed_name_is_refused_before_anything_is_written(store, tmp_path):
    store.storage.write_bytes(store.uri("out/model_fp16.onnx"), b"someone else's model")
    t = target(store, JOB)
    staged = stage(tmp_path / "staged")
    with pytest.raises(StorageError) as info:
        t.publish(staged, sorted(FILES), {}, {})
    assert info.value.reason is Reason.ForeignObject and "model_fp16.onnx" in str(info.value)
    assert prefix_of(store).all_keys() == ["model_fp16.onnx"]


def test_the_last_sets_are_kept_and_older_ones_removed(store, tmp_path):
    keep = Retention(keep_sets=2)
    ids = [
        publish(store, tmp_path, Writer("vad", "speech", "uid-1", g), retention=keep).set_id
        for g in (1, 2, 3)
    ]
    out = prefix_of(store)
    manifest = read_set(out)
    assert [h["set"] for h in manifest["history"]] == [ids[2], ids[1]]
    folders = {k.split("/")[2] for k in out.all_keys() if k.startswith(".kquant/sets/")}
    assert folders == {ids[1], ids[2]}


def test_an_older_generation_never_replaces_a_newer_one(store, tmp_path):
    publish(store, tmp_path, Writer("vad", "speech", "uid-1", 3))
    before = prefix_of(store).all_keys()
    old = Writer("vad", "speech", "uid-1", 2)
    assert reason_of(lambda: publish(store, tmp_path, old)) is Reason.Superseded
    assert prefix_of(store).all_keys() == before


def test_of_two_concurrent_jobs_the_first_commit_wins(store, tmp_path):
    a = target(store, Writer("a", "speech", "uid-a", 1))
    b = target(store, Writer("b", "speech", "uid-b", 1))
    a.publish(stage(tmp_path / "a", {"m.onnx": b"A" * 100}), ["m.onnx"], {}, {})
    staged = stage(tmp_path / "b", {"m.onnx": b"B" * 100})
    with pytest.raises(StorageError) as info:
        b.publish(staged, ["m.onnx"], {}, {})
    assert info.value.reason is Reason.ConcurrentWrite and "speech/a" in str(info.value)
    out = prefix_of(store)
    assert read_set(out)["job"]["name"] == "a" and out.get("m.onnx") == b"A" * 100
    folders = {k.split("/")[2] for k in out.all_keys() if k.startswith(".kquant/sets/")}
    assert len(folders) == 1  # b withdrew its set


def test_a_newer_generation_takes_over_from_an_older_one_that_committed_meanwhile(store, tmp_path):
    new = target(store, Writer("vad", "speech", "uid-1", 2))
    publish(store, tmp_path, Writer("vad", "speech", "uid-1", 1))  # gen 1, still finishing
    new.publish(stage(tmp_path / "g2", {"m.onnx": b"gen2"}), ["m.onnx"], {}, {})
    manifest = read_set(prefix_of(store))
    assert manifest["job"]["generation"] == 2
    assert [h["job"]["generation"] for h in manifest["history"]] == [2, 1]


def test_leftovers_of_this_job_are_reclaimed_and_live_sets_of_others_left(store, tmp_path):
    def leftover(set_id: str, writer: Writer, started: str, state: str = "writing") -> None:
        marker = {"kind": "QuantizationSet", "set": set_id, "job": writer.ref(),
                  "state": state, "startedAt": started}  # fmt: skip
        store.storage.write_bytes(store.uri(f"out/.kquant/sets/{set_id}/set.json"), dumps(marker))
        store.storage.write_bytes(store.uri(f"out/.kquant/sets/{set_id}/m.onnx"), b"partial")

    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    lease = Retention().live_seconds
    past = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 2 * lease - 60))
    leftover("20260101T000000Z-00000001", Writer("vad", "speech", "uid-1", 1), past)  # killed run
    leftover("20260101T000000Z-00000002", Writer("b", "speech", "uid-b", 1), now)  # live writer
    leftover("20200101T000000Z-00000003", Writer("c", "speech", "uid-c", 1), "2020-01-01T00:00:00Z")
    leftover("20260101T000000Z-00000004", Writer("vad", "speech", "uid-1", 0), now, "failed")
    store.storage.write_bytes(store.uri("out/.kquant/sets/20260101T000000Z-00000005/x"), b"")
    # a run of this very job and generation started now may still commit: left alone
    leftover("20260101T000000Z-00000006", Writer("vad", "speech", "uid-1", 1), now)
    # an earlier generation's run killed at its commit, its lease over: this job's to remove
    # (it stayed for a day: fault-injection trial); a newer generation's never is
    leftover("20260101T000000Z-00000008", Writer("vad", "speech", "uid-1", 0), past)
    leftover("20260101T000000Z-00000009", Writer("vad", "speech", "uid-1", 2), past)
    # a folder created now whose marker is still being written (a local temporary file)
    young = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-00000007"
    part = temp_path(Path("set.json")).name
    store.storage.write_bytes(store.uri(f"out/.kquant/sets/{young}/{part}"), b"")
    publish(store, tmp_path, JOB, replace=False)
    out = prefix_of(store)
    folders = {k.split("/")[2] for k in out.all_keys() if k.startswith(".kquant/sets/")}
    assert folders == {read_set(out)["set"], "20260101T000000Z-00000002",
                       "20260101T000000Z-00000006", young,
                       "20260101T000000Z-00000009"}  # fmt: skip


def test_a_second_run_of_the_job_never_removes_the_set_the_first_commits(store, tmp_path):
    """Two runs of one job at once: the second read the prefix while the first's set was
    not committed yet, then the first committed. The second's clean-up leaves that set (its
    lease is not over), so the manifest never names a missing file (before: it was removed
    as "left by an earlier run")."""
    from kquant_job.sets.state import read_state, reclaim

    publish(store, tmp_path, JOB)  # an earlier set, so both runs replace one
    second = Writer("vad", "speech", "uid-1", 1)
    first = target(store, Writer("vad", "speech", "uid-1", 1))
    staged = stage(tmp_path / "first", {"m.onnx": b"first run" * 20})
    # the second run's view, taken while the first one's set folder is being written
    seen = {}
    real_verify = first._verify

    def verify_then_look(set_id: str, rels: list[str]) -> None:
        real_verify(set_id, rels)
        if "state" not in seen:  # before the commit (it checks the set again after it)
            seen["state"] = read_state(store.storage, store.uri("out/"))

    first._verify = verify_then_look  # type: ignore[method-assign]
    done = first.publish(staged, ["m.onnx"], {"outcome": "ok"}, {})
    assert done.set_id in seen["state"].sets and done.set_id != seen["state"].manifest.set_id
    assert reclaim(seen["state"], second, Retention()) == []
    out = prefix_of(store)
    manifest = read_set(out)  # every file it names is there, with its sha256
    assert manifest["set"] == done.set_id and out.get("m.onnx") == b"first run" * 20


def test_a_set_not_committed_within_its_lease_is_withdrawn(store, tmp_path):
    publish(store, tmp_path, JOB)
    before = {k: prefix_of(store).get(k) for k in prefix_of(store).all_keys()}
    late = target(
        store, Writer("vad", "speech", "uid-1", 1), retention=Retention(live_seconds=1e-9)
    )
    staged = stage(tmp_path / "late", {"m.onnx": b"late"})
    with pytest.raises(StorageError) as info:
        late.publish(staged, ["m.onnx"], {}, {})
    assert info.value.reason is Reason.ConcurrentWrite and "KQUANT_LIVE_SET_SECONDS" in str(
        info.value
    )
    out = prefix_of(store)
    assert {k: out.get(k) for k in out.all_keys()} == before  # withdrawn, nothing else touched


def test_a_failure_report_touches_nothing_else(store, tmp_path):
    publish(store, tmp_path, JOB)
    before = {k: prefix_of(store).get(k) for k in prefix_of(store).all_keys()}
    uri = target(store, Writer("vad", "speech", "uid-1", 2)).publish_failure({"outcome": "x"})
    out = prefix_of(store)
    after = {k: out.get(k) for k in out.all_keys()}
    added = set(after) - set(before)
    assert {k for k in before if after.get(k) != before[k]} == set()
    assert len(added) == 2 and uri.endswith("/report.json")
    assert json.loads(out.get(uri.split("/out/", 1)[1]))["outcome"] == "x"


def test_a_manifest_of_the_first_layout_is_replaced_and_its_files_recognised(store, tmp_path):
    import hashlib

    old = {"model_fp16.onnx": b"v1", "config.json": b"{}"}
    for rel, data in old.items():  # as kquant's first layout uploaded them: sha256 metadata
        meta = {"sha256": hashlib.sha256(data).hexdigest()}
        store.storage.write_bytes(store.uri(f"out/{rel}"), data, metadata=meta)
    legacy = {
        "apiVersion": "kquant.io/v1alpha1",
        "kind": "ModelManifest",
        "job": {"name": "vad", "namespace": "speech", "uid": "uid-1", "generation": 1},
        "artifacts": [
            {"path": rel, "sha256": hashlib.sha256(d).hexdigest(), "bytes": len(d)}
            for rel, d in old.items()
        ],
    }
    store.storage.write_bytes(store.uri("out/manifest.json"), dumps(legacy))
    store.storage.write_bytes(store.uri("out/theirs.bin"), b"x")
    publish(store, tmp_path, Writer("vad", "speech", "uid-1", 2), {"model_fp16.onnx": b"v2"})
    out = prefix_of(store)
    read_set(out)
    assert out.fixed_names() == ["manifest.json", "model_fp16.onnx", "report.json", "theirs.bin"]


def test_reserved_and_unsafe_paths_are_refused_before_any_write(store, tmp_path):
    t = target(store, JOB)
    staged = tmp_path / "empty"
    staged.mkdir()
    for files in (["report.json"], ["manifest.json"], [".kquant/x"], ["../x"], ["a", "a/b"]):
        assert reason_of(lambda f=files: t.publish(staged, f, {}, {})) is Reason.UnsafePath
    assert reason_of(lambda: t.publish(tmp_path / "none", ["m.onnx"], {}, {})) is (
        Reason.SourceNotFound
    )
    assert prefix_of(store).all_keys() == []


def test_copies_converge_on_the_manifest_after_a_late_writer(store, tmp_path):
    a = publish(store, tmp_path, JOB, {"m.onnx": b"A"})
    b = publish(store, tmp_path, Writer("vad", "speech", "uid-1", 2), {"m.onnx": b"B"})
    # a writer of set a whose copy lands after b's switch (it checked the manifest earlier)
    store.storage.copy(
        store.uri(f"out/.kquant/sets/{a.set_id}/m.onnx"), store.uri("out/m.onnx"),
        {"kquant-set": a.set_id, "sha256": "x"},
    )  # fmt: skip
    assert prefix_of(store).get("m.onnx") == b"A"
    outcome = sync_mirrors(store.storage, store.uri("out/"))
    assert outcome.set_id == b.set_id and outcome.copied == ["m.onnx"]
    read_set(prefix_of(store))


@pytest.mark.parametrize("store", ["file"], indirect=True)
@pytest.mark.parametrize("name", ["model_fp16.onnx", "manifest.json", "report.json"])
def test_a_folder_at_a_name_kquant_writes_is_refused_before_the_switch(store, tmp_path, name):
    """A folder at a fixed name (or at manifest.json) of a local prefix passed the name
    check (no file there) and the job failed after switching the manifest, as
    StorageUnavailable or ConcurrentWrite, and every rerun committed one more set
    (fault-injection trial). Now it is ForeignObject before anything is written."""
    root = Path(store.root[len("file://") :]) / "out"
    (root / name).mkdir(parents=True)
    (root / name / "theirs.txt").write_text("someone's")
    with pytest.raises(StorageError) as info:  # target() reads the prefix: the preflight
        staged = stage(tmp_path / "staged")
        target(store, JOB, replace=True).publish(staged, sorted(FILES), {"outcome": "ok"}, {})
    assert info.value.reason is Reason.ForeignObject and name in str(info.value)
    assert not (root / ".kquant").exists() and not (root / "manifest.json").is_file()
    assert (root / name / "theirs.txt").read_text() == "someone's"


def test_a_writer_that_commits_during_the_name_check_is_a_concurrent_write(
    store, tmp_path, monkeypatch
):
    """Job B read the prefix, then job A committed and placed its copies, then B checked its
    fixed names against what it had read: A's copies looked like someone's objects and B
    ended in ForeignObject ("move it"), Stalled in the operator (fault-injection trial)."""
    import kquant_job.sets.publish as publish_module

    other = Writer("other", "speech", "uid-2", 1)
    real_reclaim = publish_module.reclaim
    done: list[str] = []

    def reclaim_after_a_commits(state, writer, retention):
        if writer is JOB and not done:  # B, between reading the prefix and the name check
            done.append(publish(store, tmp_path, other).set_id)
        return real_reclaim(state, writer, retention)

    b = target(store, JOB, replace=True)
    monkeypatch.setattr(publish_module, "reclaim", reclaim_after_a_commits)
    staged = stage(tmp_path / "staged-b")
    with pytest.raises(StorageError) as info:
        b.publish(staged, sorted(FILES), {"outcome": "ok"}, {"v": 1})
    assert info.value.reason is Reason.ConcurrentWrite, info.value
    assert "other" in str(info.value) and done
    assert read_set(prefix_of(store))["set"] == done[0]  # A's set stands, whole


def _hold_commit(store, monkeypatch, rerun: Writer) -> list[str]:
    """Hold the next conditional manifest write (a frozen writer, a PUT held in a proxy)
    while ``rerun``, a rerun of the same job with its clock past the held run's lease,
    reclaims the held run's set and ends before committing its own."""
    from kquant_job.sets.state import read_state, reclaim

    real_write = store.storage.write_bytes
    reclaimed: list[str] = []

    def held(uri: str, data: bytes, **kw):
        conditional = kw.get("if_match") or kw.get("if_none_match")
        if uri == store.uri("out/manifest.json") and conditional and not reclaimed:
            reclaimed.append("…")  # the fence's own write goes through
            state = read_state(store.storage, store.uri("out/"))
            reclaimed[:] = reclaim(state, rerun, Retention(live_seconds=1e-9))
        return real_write(uri, data, **kw)

    monkeypatch.setattr(store.storage, "write_bytes", held)
    return reclaimed


def test_a_commit_held_past_its_lease_never_names_a_reclaimed_set(store, tmp_path, monkeypatch):
    """Fault-injection trial: a commit that passed its lease check, then was held (a frozen
    process, a PUT held in a proxy) until a rerun of the job had reclaimed its set, pointed
    the manifest at removed files. Reclaiming now changes the manifest's etag first, so the
    held commit fails its If-Match."""
    publish(store, tmp_path, JOB)
    current = read_set(prefix_of(store))
    held = target(store, Writer("vad", "speech", "uid-1", 1))
    staged = stage(tmp_path / "held", {"m.onnx": b"held run" * 20})
    reclaimed = _hold_commit(store, monkeypatch, Writer("vad", "speech", "uid-1", 1))
    assert reason_of(lambda: held.publish(staged, ["m.onnx"], {}, {})) is Reason.ConcurrentWrite
    assert len(reclaimed) == 1 and "left by an earlier run" in reclaimed[0]
    manifest = read_set(prefix_of(store))  # every file it names is there, with its sha256
    assert manifest["set"] == current["set"] and manifest["fencedBy"].startswith("speech/vad")


def test_a_first_commit_held_past_its_lease_keeps_its_set(store, tmp_path, monkeypatch):
    """The same on a prefix with no manifest yet: there is no etag to fence, so the rerun
    leaves the set (a reclaimer that removed it anyway deleted a set committed meanwhile:
    fault-injection trial) and the held commit lands whole."""
    held = target(store, Writer("vad", "speech", "uid-1", 1), replace=False)
    staged = stage(tmp_path / "held", {"m.onnx": b"held run" * 20})
    reclaimed = _hold_commit(store, monkeypatch, Writer("vad", "speech", "uid-1", 1))
    done = held.publish(staged, ["m.onnx"], {}, {})
    assert reclaimed == []
    assert read_set(prefix_of(store))["set"] == done.set_id  # whole, every sha256 checked


def test_a_first_commit_whose_set_lost_a_file_is_taken_back(store, tmp_path, monkeypatch):
    """A set that lost a file between its check and its first commit (removed by hand, or
    by a run that did not fence) is found right after the commit; the manifest is removed."""
    first = target(store, Writer("vad", "speech", "uid-1", 1), replace=False)
    real_write = store.storage.write_bytes

    def remove_then_write(uri: str, data: bytes, **kw):
        if uri == store.uri("out/manifest.json") and kw.get("if_none_match"):
            set_id = json.loads(data)["set"]
            store.storage.delete(store.uri(f"out/.kquant/sets/{set_id}/m.onnx"))
        return real_write(uri, data, **kw)

    monkeypatch.setattr(store.storage, "write_bytes", remove_then_write)
    staged = stage(tmp_path / "first", {"m.onnx": b"first" * 20})
    assert reason_of(lambda: first.publish(staged, ["m.onnx"], {}, {})) is Reason.ConcurrentWrite
    out = prefix_of(store)
    assert out.get("manifest.json") is None and out.get("m.onnx") is None


@pytest.mark.parametrize(
    "where", ["history", "artifact", "set"], ids=["history-name", "artifact-name", "set-id"]
)
def test_a_planted_manifest_naming_paths_outside_the_prefix_is_never_followed(
    store, tmp_path, where
):
    """Hostile-input trial: a manifest.json planted at a promotion prefix listed
    '../victim/important.txt' with that file's sha256; the promotion's sync deleted the file,
    outside its prefix, as a copy of a retired set (and a name of the current set made it
    hard-link a file there). Names and set ids are now checked as keys when read."""
    victim = "victim/important.txt"
    store.storage.write_bytes(store.uri(victim), b"someone's data")
    digest = "a" * 64
    old = "20200101T000000Z-deadbeef"
    history = [{"set": old, "job": {"name": "x"}, "files": {"m.onnx": digest}}]
    doc = {"apiVersion": "kquant.io/v1alpha1", "kind": "ModelManifest", "layout": 2,
           "set": old, "job": {"name": "x"}, "artifacts": [], "report": {},
           "history": history}  # fmt: skip
    if where == "history":
        doc["history"][0]["files"] = {f"../{victim}": digest}
    elif where == "artifact":
        doc["artifacts"] = [{"name": f"../{victim}", "path": "p", "sha256": digest}]
    else:
        doc["set"] = doc["history"][0]["set"] = "../../victim"
    store.storage.write_bytes(store.uri("out/manifest.json"), dumps(doc))
    before = prefix_of(store, "").all_keys()
    with pytest.raises(StorageError) as info:
        publish(store, tmp_path, JOB, replace=True)
    assert info.value.reason is Reason.UnsafePath and "manifest.json names a path" in str(
        info.value
    )
    assert prefix_of(store, "").all_keys() == before
    assert prefix_of(store, "").get(victim) == b"someone's data"


def test_a_run_whose_uploads_outlast_the_lease_renews_it_and_commits(store, tmp_path, monkeypatch):
    """A run whose uploads took longer than KQUANT_LIVE_SET_SECONDS (a large model on a slow
    link) failed after all its work, and a rerun could remove its set meanwhile. The lease is
    now renewed while the run writes: a rerun's clean-up leaves the set, and it commits."""
    from kquant_job.sets.state import read_state, reclaim

    retention = Retention(live_seconds=3.0)  # renewed every 1 s: a loaded machine keeps up
    real_upload = store.storage.upload
    seen: list[list[str]] = []

    def slow_upload(src, uri, metadata=None):
        time.sleep(7.0)  # past 2x the lease since the marker's start: reclaimable unrenewed
        state = read_state(store.storage, store.uri("out/"))
        seen.append(reclaim(state, Writer("vad", "speech", "uid-1", 1), retention))
        return real_upload(src, uri, metadata)

    slow = target(store, Writer("vad", "speech", "uid-1", 1), retention=retention)
    monkeypatch.setattr(store.storage, "upload", slow_upload)
    done = slow.publish(stage(tmp_path / "slow", {"m.onnx": b"slow" * 10}), ["m.onnx"], {}, {})
    assert seen == [[]]
    manifest = read_set(prefix_of(store))
    assert manifest["set"] == done.set_id
    marker = json.loads(prefix_of(store).get(f".kquant/sets/{done.set_id}/set.json"))
    assert marker["renewedAt"] >= marker["startedAt"]


def test_a_set_committed_after_the_reclaimer_read_the_prefix_is_never_removed(
    store, tmp_path, monkeypatch
):
    """Fault-injection trial: B read the prefix while A's set was uncommitted and its lease
    over (A frozen, then resumed); A's commit landed; B's fence then failed, and B deleted
    A's set anyway, leaving the manifest naming removed files. A fence that fails now leaves
    the set for a later run."""
    from kquant_job.sets.state import read_state, reclaim

    publish(store, tmp_path, JOB)
    a = target(store, Writer("vad", "speech", "uid-1", 1))
    real_write = store.storage.write_bytes
    removed: list[list[str]] = []

    def commit_between_read_and_fence(uri: str, data: bytes, **kw):
        if uri != store.uri("out/manifest.json") or not kw.get("if_match") or removed:
            return real_write(uri, data, **kw)
        seen_by_b = read_state(store.storage, store.uri("out/"))  # A's set: uncommitted
        etag = real_write(uri, data, **kw)  # A's commit lands
        b = Writer("vad", "speech", "uid-1", 1)
        removed.append(reclaim(seen_by_b, b, Retention(live_seconds=1e-9)))
        return etag

    monkeypatch.setattr(store.storage, "write_bytes", commit_between_read_and_fence)
    done = a.publish(stage(tmp_path / "a", {"m.onnx": b"A" * 64}), ["m.onnx"], {}, {})
    assert removed == [[]]
    assert read_set(prefix_of(store))["set"] == done.set_id  # whole, every sha256 checked


def test_a_set_whose_lease_was_renewed_since_the_listing_is_left(store, tmp_path, monkeypatch):
    """Fault-injection trial: a writer resumed while another run reclaimed its set renewed
    its marker; the remover's conditional delete of the marker (then last) failed its whole
    publish after the set's files were gone. The marker now goes first: a renewal since the
    listing keeps the set whole."""
    from kquant_job.sets.state import read_state, reclaim

    publish(store, tmp_path, JOB)
    set_id = "20260101T000000Z-0000000a"
    marker = {"kind": "QuantizationSet", "set": set_id, "job": JOB.ref(), "state": "writing",
              "startedAt": "2026-01-01T00:00:00Z"}  # fmt: skip
    store.storage.write_bytes(store.uri(f"out/.kquant/sets/{set_id}/m.onnx"), b"model")
    store.storage.write_bytes(store.uri(f"out/.kquant/sets/{set_id}/set.json"), dumps(marker))
    listed = read_state(store.storage, store.uri("out/"))
    real_read = store.storage.read_bytes

    def renewed_right_after_read(uri: str, max_bytes: int):
        got = real_read(uri, max_bytes)
        if uri.endswith(f"{set_id}/set.json") and "renewedAt" not in marker:
            marker["renewedAt"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            store.storage.write_bytes(uri, dumps(marker))  # the writer, resumed, renews
        return got

    monkeypatch.setattr(store.storage, "read_bytes", renewed_right_after_read)
    assert reclaim(listed, Writer("vad", "speech", "uid-1", 1), Retention()) == []
    assert prefix_of(store).get(f".kquant/sets/{set_id}/m.onnx") == b"model"


def test_removed_set_folders_leave_no_empty_folders(store, tmp_path):
    for _ in range(5):
        publish(store, tmp_path, JOB)
    if store.kind == "file":
        root = Path(store.uri("out/.kquant/sets/")[len("file://") :])
        assert len([d for d in root.iterdir() if d.is_dir()]) == 3  # KQUANT_KEEP_SETS
    assert len({k.split("/")[2] for k in prefix_of(store).all_keys() if "/sets/" in k}) == 3


def test_a_sync_reads_each_fixed_names_bytes_once(store, tmp_path, monkeypatch):
    """A local file is hashed in full to judge it (its etag names the file, not its bytes):
    a sync asks whether a fixed name is in sync, then whether it is kquant's, on one read."""
    publish(store, tmp_path, JOB)
    store.storage.write_bytes(store.uri("out/model_fp16.onnx"), b"theirs")  # foreign now
    store.storage.delete(store.uri("out/tokenizer/vocab.txt"))  # to be copied again
    hashed: list[tuple[str, str | None]] = []
    real = type(store.storage).content_sha256

    def counting(self, uri: str, info):
        hashed.append((uri, info.etag))
        return real(self, uri, info)

    monkeypatch.setattr(type(store.storage), "content_sha256", counting)
    outcome = sync_mirrors(store.storage, store.uri("out/"))
    assert outcome.foreign == ["model_fp16.onnx"] and outcome.copied == ["tokenizer/vocab.txt"]
    assert len(hashed) == len(set(hashed))
    if store.kind == "file":  # judged by its content: hashed, once
        assert [uri for uri, _ in hashed].count(store.uri("out/model_fp16.onnx")) == 1
    assert prefix_of(store).get("model_fp16.onnx") == b"theirs"


def test_a_storage_error_after_the_commit_is_a_publication_and_the_next_run_finishes_it(
    store, tmp_path, monkeypatch
):
    """Fault-injection trial: a fixed-name copy failing after the manifest switch (storage
    out past the retry window) raised, so the job said Failed and not promoted while the
    prefix's manifest named its set: GitOps saw a failure for a live model."""
    cls = type(store.storage)
    real = cls.copy

    def unreachable(self, src, dst, *args, **kwargs):
        raise StorageError(f"cannot copy to {dst}: unreachable (injected)",
                           reason=Reason.StorageUnavailable)  # fmt: skip

    monkeypatch.setattr(cls, "copy", unreachable)
    done = publish(store, tmp_path, JOB)
    assert done.copies_error and "unreachable (injected)" in done.copies_error
    out = prefix_of(store)
    manifest = json.loads(out.get("manifest.json"))
    assert manifest["set"] == done.set_id  # committed: readers of the manifest have it
    assert out.get("model_fp16.onnx") is None  # the fixed names wait for the next run
    monkeypatch.setattr(cls, "copy", real)
    again = publish(store, tmp_path, Writer("vad", "speech", "uid-1", 2))
    assert again.copies_error is None
    assert out.get("model_fp16.onnx") == FILES["model_fp16.onnx"]
    assert out.fixed_names() == ["manifest.json", *set_files(read_set(out))]


def test_fixed_names_are_never_written_or_removed_through_a_linked_folder(store, tmp_path):
    """Fault-injection trial: with ``out/tokenizer`` a symlink to a folder elsewhere, the
    copy of ``tokenizer/vocab.txt`` landed there, and a later set without it deleted a
    colleague's file of the same bytes there as kquant's own."""
    if store.kind != "file":
        pytest.skip("symlinks are local")
    publish(store, tmp_path, JOB)  # the prefix exists, tokenizer/ a real folder
    root = Path(store.uri("out/")[len("file://") :])
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "tokenizer" / "vocab.txt").unlink()
    (root / "tokenizer").rmdir()
    (root / "tokenizer").symlink_to(outside)  # made between two runs
    done = publish(store, tmp_path, Writer("vad", "speech", "uid-1", 2))
    assert "tokenizer/vocab.txt" in done.mirrors.foreign  # left alone, and said so
    assert list(outside.iterdir()) == []
    (outside / "vocab.txt").write_bytes(FILES["tokenizer/vocab.txt"])  # a colleague's
    publish(store, tmp_path, Writer("vad", "speech", "uid-1", 3), {"model_fp16.onnx": b"v3"})
    assert (outside / "vocab.txt").read_bytes() == FILES["tokenizer/vocab.txt"]


def test_a_colleagues_symlink_at_a_fixed_name_is_left_alone(store, tmp_path):
    """Fault-injection trial: a symlink at a fixed name whose target held the set's bytes
    was taken for kquant's copy and replaced."""
    if store.kind != "file":
        pytest.skip("symlinks are local")
    publish(store, tmp_path, JOB)
    root = Path(store.uri("out/")[len("file://") :])
    theirs = tmp_path / "theirs.onnx"
    theirs.write_bytes(FILES["model_fp16.onnx"])  # the same bytes as the set's file
    (root / "model_fp16.onnx").unlink()
    (root / "model_fp16.onnx").symlink_to(theirs)
    again = Writer("vad", "speech", "uid-1", 2)  # a set naming it: refused before writing
    assert reason_of(lambda: publish(store, tmp_path, again)) is Reason.ForeignObject
    assert (root / "model_fp16.onnx").is_symlink()
    publish(store, tmp_path, Writer("vad", "speech", "uid-1", 3), {"other.onnx": b"v3"})
    assert (root / "model_fp16.onnx").is_symlink() and theirs.read_bytes() == FILES[
        "model_fp16.onnx"
    ]


def test_copies_failing_in_runs_in_a_row_never_strand_a_set_at_the_fixed_names(
    store, tmp_path, monkeypatch
):
    """Fault-injection trial: with two sets kept and the fixed-name copies failing in two
    runs in a row, the second commit dropped the set whose copies still stood: they counted
    as someone else's, and every later run failed (ForeignObject). A commit made while the
    names are behind now drops no set."""
    cls = type(store.storage)
    real = cls.copy

    def unreachable(self, src, dst, *args, **kwargs):
        raise StorageError(f"cannot copy to {dst}: unreachable (injected)",
                           reason=Reason.StorageUnavailable)  # fmt: skip

    two = Retention(keep_sets=2)
    publish(store, tmp_path, JOB, {"model.onnx": b"v1"}, retention=two)
    monkeypatch.setattr(cls, "copy", unreachable)
    for gen in (2, 3):
        done = publish(store, tmp_path, Writer("vad", "speech", "uid-1", gen),
                       {"model.onnx": f"v{gen}".encode()}, retention=two)  # fmt: skip
        assert done.copies_error
    out = prefix_of(store)
    assert out.get("model.onnx") == b"v1"  # still the first set's copy
    assert len(json.loads(out.get("manifest.json"))["history"]) == 3  # none dropped
    monkeypatch.setattr(cls, "copy", real)
    done = publish(store, tmp_path, Writer("vad", "speech", "uid-1", 4), {"model.onnx": b"v4"},
                   retention=two)  # fmt: skip
    assert done.copies_error is None and not done.mirrors.foreign
    assert out.get("model.onnx") == b"v4"
    assert len(read_set(out)["history"]) == 2  # back to the retention once in step
