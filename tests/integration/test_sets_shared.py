"""Publishing to a prefix shared with other people's files (``Target(home=...)``: converted
models beside their originals), on a local directory and on moto's S3 server."""

from __future__ import annotations

import time

import pytest
from published import Prefix, read_set
from test_sets import prefix_of, reason_of, stage

from kquant_api import Reason
from kquant_job.errors import StorageError
from kquant_job.sets import Retention, Target, Writer

HOME = ".kquant/beside-fp16/"
JOB = Writer("models", "speech", "uid-7", 1)
THEIRS = {"silero_vad.onnx": b"original graph", "Sense/config.json": b"{}", "README.md": b"hi"}
SET = {"silero_vad_fp16.onnx": b"fp16" * 40, "Sense_fp16/config.json": b"{}"}


def shared(store, **kw) -> Target:
    t = Target(store.storage, store.uri("models/"), JOB, replace=kw.get("replace", False),
               field_name="spec.output.uri", retention=Retention(), home=HOME)  # fmt: skip
    t.preflight()
    return t


def put_theirs(store, files: dict[str, bytes] = THEIRS) -> None:
    for rel, data in files.items():
        store.storage.write_bytes(store.uri(f"models/{rel}"), data)


def publish(store, tmp_path, files: dict[str, bytes] = SET, folders=("Sense_fp16/",)):
    staged = stage(tmp_path / f"staged-{time.monotonic_ns()}", files)
    return shared(store).publish(staged, sorted(files), {"ok": True}, {"v": 1}, list(folders))


def test_a_set_beside_other_peoples_files(store, tmp_path):
    put_theirs(store)
    done = publish(store, tmp_path)
    out = prefix_of(store, "models/")
    manifest = read_set(out, home=HOME)
    assert manifest["set"] == done.set_id
    assert done.manifest_uri == store.uri(f"models/{HOME}manifest.json")
    names = set(out.fixed_names())
    assert names == set(THEIRS) | set(SET)  # no manifest.json or report.json among them
    assert all(out.get(k) == v for k, v in THEIRS.items())

    # the next set drops a name: its copy goes, other people's files stay
    publish(store, tmp_path, {"silero_vad_fp16.onnx": b"fp16 v2" * 40}, folders=())
    assert set(out.fixed_names()) == set(THEIRS) | {"silero_vad_fp16.onnx"}
    assert all(out.get(k) == v for k, v in THEIRS.items())
    read_set(out, home=HOME)


def test_foreign_objects_at_names_or_inside_folders_of_the_set_are_refused(store, tmp_path):
    put_theirs(store, {**THEIRS, "Sense_fp16/notes.txt": b"mine"})
    before = prefix_of(store, "models/").all_keys()
    assert reason_of(lambda: publish(store, tmp_path)) is Reason.ForeignObject
    assert prefix_of(store, "models/").all_keys() == before  # nothing written
    with pytest.raises(StorageError, match=r"Sense_fp16/notes\.txt"):
        shared(store).check_free(list(SET), ["Sense_fp16/"])


def test_a_second_job_is_refused_unless_it_may_replace(store, tmp_path):
    put_theirs(store)
    publish(store, tmp_path)
    other = Target(store.storage, store.uri("models/"), Writer("other", "speech", "uid-9", 1),
                   replace=False, field_name="spec.output.uri", home=HOME)  # fmt: skip
    assert reason_of(other.preflight) is Reason.OutputExists


@pytest.mark.parametrize("store", ["s3"], indirect=True)
def test_other_peoples_unfinished_uploads_are_left_alone(store, tmp_path, monkeypatch):
    """Only kquant's own unfinished writes are aborted, on a shared prefix and on one of
    kquant's own: a colleague's hour-old multipart upload under a promotion prefix was
    aborted as kquant's (fault-injection trial)."""
    put_theirs(store)
    client = store.storage.client
    bucket = store.root[5:].split("/", 1)[0]
    base = store.root[5 + len(bucket) + 1 :]
    own = Target(store.storage, store.uri("own/"), JOB, replace=True,
                 field_name="spec.output.uri")  # fmt: skip
    own.preflight()
    own.publish(stage(tmp_path / "s1", SET), sorted(SET), {"ok": True}, {"v": 1})
    fixed = sorted(SET)[0]  # a name the manifest says kquant placed
    theirs = client.create_multipart_upload(Bucket=bucket, Key=f"{base}models/big.bin")
    colleague = client.create_multipart_upload(Bucket=bucket, Key=f"{base}own/dataset.tar")
    mine = client.create_multipart_upload(Bucket=bucket, Key=f"{base}own/{fixed}")
    later = time.time() + 2 * 3600  # every upload now looks abandoned
    monkeypatch.setattr("kquant_job.sets.state.time.time", lambda: later)
    publish(store, tmp_path)
    own = Target(store.storage, store.uri("own/"), JOB, replace=True,
                 field_name="spec.output.uri")  # fmt: skip
    own.preflight()
    own.publish(stage(tmp_path / "s2", SET), sorted(SET), {"ok": True}, {"v": 1})
    uploads = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    ids = {u["UploadId"] for u in uploads}
    assert theirs["UploadId"] in ids  # a shared prefix: not kquant's to abort
    assert colleague["UploadId"] in ids  # kquant's own prefix, someone else's upload
    assert mine["UploadId"] not in ids  # an abandoned copy to a name kquant placed


def test_the_prefix_reads_as_a_set_for_a_reader(store, tmp_path):
    put_theirs(store)
    publish(store, tmp_path)
    out: Prefix = prefix_of(store, "models/")
    assert out.get("manifest.json") is None and out.get("report.json") is None
