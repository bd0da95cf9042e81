"""Publishing against FileStorage: order of operations, manifest content, overwrite rules."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from kquant_api import Artifact, Reason
from kquant_job import publish as pub
from kquant_job.errors import StorageError
from kquant_job.storage.file import FileStorage, to_path


class RecordingStorage(FileStorage):
    """FileStorage that records every write-side call as (op, path relative to root); an
    upload also records which manifest.json exists at that moment."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.calls: list[tuple[str, str]] = []

    def _rel(self, uri: str) -> str:
        return to_path(uri).relative_to(self.root).as_posix()

    def upload(self, src: Path, uri: str) -> Artifact:
        self.calls.append(("upload", self._rel(uri)))
        return super().upload(src, uri)

    def delete(self, uri: str) -> None:
        self.calls.append(("delete", self._rel(uri)))
        super().delete(uri)


FILES = {"model.fp16.onnx": b"fp16 graph" * 50, "tokenizer/vocab.txt": b"a\nb\n"}


def _stage(root: Path, files: dict[str, bytes] = FILES) -> Path:
    staged = root / "staged"
    for rel, data in files.items():
        (staged / rel).parent.mkdir(parents=True, exist_ok=True)
        (staged / rel).write_bytes(data)
    return staged


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_publish_writes_artifacts_then_report_then_manifest(tmp_path):
    staged = _stage(tmp_path)
    store = RecordingStorage(tmp_path)
    out = f"{tmp_path}/out"  # no trailing slash: still a prefix here

    done = pub.publish(
        store, out, staged, list(FILES), {"passed": True}, {"kind": "x"}, overwrite=False
    )

    assert store.calls == [
        ("upload", "out/model.fp16.onnx"),
        ("upload", "out/tokenizer/vocab.txt"),
        ("upload", "out/report.json"),
        ("upload", "out/manifest.json"),
    ]
    tree = _tree(tmp_path / "out")
    manifest = json.loads(tree["manifest.json"])
    assert manifest == {
        "kind": "x",
        "artifacts": [
            {"path": rel, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
            for rel, data in FILES.items()
        ],
        "report": {
            "path": "report.json",
            "sha256": hashlib.sha256(tree["report.json"]).hexdigest(),
            "bytes": len(tree["report.json"]),
        },
    }
    assert json.loads(tree["report.json"]) == {"passed": True}
    assert tree["manifest.json"].decode() == json.dumps(manifest, sort_keys=True, indent=2) + "\n"
    assert [a.uri for a in done.artifacts] == [f"{out}/{rel}" for rel in FILES]
    assert done.report_uri == f"{out}/report.json"
    assert done.manifest_uri == f"{out}/manifest.json"


def test_existing_output_is_refused_without_overwrite(tmp_path):
    staged = _stage(tmp_path)
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "sub/someone-elses.bin").write_bytes(b"keep me")
    store = RecordingStorage(tmp_path)
    for call in (
        lambda: pub.check_output_free(store, f"file://{out}/", overwrite=False),
        lambda: pub.publish(store, str(out), staged, list(FILES), {}, {}, overwrite=False),
    ):
        with pytest.raises(StorageError) as info:
            call()
        assert info.value.reason is Reason.OutputExists
        assert str(out) in str(info.value)
    assert store.calls == []
    assert _tree(out) == {"sub/someone-elses.bin": b"keep me"}
    pub.check_output_free(store, f"{out}/", overwrite=True)  # allowed when overwriting
    pub.check_output_free(store, f"{tmp_path}/fresh/", overwrite=False)  # absent: free


def test_overwrite_deletes_manifest_first_and_stale_objects_last(tmp_path):
    store = RecordingStorage(tmp_path)
    out = f"{tmp_path}/out/"
    old_files = {"model.fp16.onnx": b"old", "old-only.onnx": b"stale", "x/old.txt": b"s"}
    pub.publish(
        store, out, _stage(tmp_path / "v1", old_files), list(old_files), {}, {}, overwrite=False
    )
    store.calls.clear()

    pub.publish(store, out, _stage(tmp_path / "v2"), list(FILES), {"v": 2}, {}, overwrite=True)

    assert store.calls[0] == ("delete", "out/manifest.json")
    assert store.calls[-3] == ("upload", "out/manifest.json")
    assert sorted(store.calls[-2:]) == [
        ("delete", "out/old-only.onnx"),
        ("delete", "out/x/old.txt"),
    ]
    tree = _tree(tmp_path / "out")
    assert sorted(tree) == [
        "manifest.json",
        "model.fp16.onnx",
        "report.json",
        "tokenizer/vocab.txt",
    ]
    assert tree["model.fp16.onnx"] == FILES["model.fp16.onnx"]
    manifest = json.loads(tree["manifest.json"])
    assert [a["path"] for a in manifest["artifacts"]] == list(FILES)


def test_promote_replaces_the_target_set(tmp_path):
    store = RecordingStorage(tmp_path)
    prod = tmp_path / "prod"
    prod.mkdir()
    (prod / "manifest.json").write_text("{}")
    (prod / "previous.onnx").write_bytes(b"prev")
    done = pub.promote(store, f"file://{prod}/", _stage(tmp_path), list(FILES), {}, {"v": 3})
    assert store.calls[0] == ("delete", "prod/manifest.json")
    assert sorted(_tree(prod)) == [
        "manifest.json",
        "model.fp16.onnx",
        "report.json",
        "tokenizer/vocab.txt",
    ]
    assert json.loads((prod / "manifest.json").read_text())["v"] == 3
    assert done.manifest_uri == f"file://{prod}/manifest.json"


def test_report_only_removes_manifest_and_writes_report(tmp_path):
    store = RecordingStorage(tmp_path)
    out = tmp_path / "out"
    pub.publish(store, f"{out}/", _stage(tmp_path), list(FILES), {"v": 1}, {}, overwrite=False)
    store.calls.clear()

    uri = pub.publish_report_only(store, f"{out}/", {"passed": False, "maxAbsError": 0.5})

    assert store.calls == [("delete", "out/manifest.json"), ("upload", "out/report.json")]
    assert uri == f"{out}/report.json"
    assert not (out / "manifest.json").exists()
    assert json.loads((out / "report.json").read_text()) == {"maxAbsError": 0.5, "passed": False}
    store.calls.clear()
    pub.publish_report_only(store, f"{tmp_path}/fresh/", {"passed": False})
    assert store.calls == [("upload", "fresh/report.json")]  # nothing to delete


@pytest.mark.parametrize(
    ("files", "reason"),
    [
        (["../escape.onnx"], Reason.UnsafePath),
        (["/abs.onnx"], Reason.UnsafePath),
        (["manifest.json"], Reason.UnsafePath),
        (["report.json"], Reason.UnsafePath),
        (["model.fp16.onnx", "model.fp16.onnx"], Reason.UnsafePath),
        (["tokenizer/"], Reason.UnsafePath),
        (["not-staged.onnx"], Reason.SourceNotFound),
    ],
)
def test_bad_file_lists_fail_before_touching_the_output(tmp_path, files, reason):
    store = RecordingStorage(tmp_path)
    with pytest.raises(StorageError) as info:
        pub.publish(store, f"{tmp_path}/out/", _stage(tmp_path), files, {}, {}, overwrite=True)
    assert info.value.reason is reason
    assert store.calls == [] and not (tmp_path / "out").exists()
