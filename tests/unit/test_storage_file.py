"""FileStorage on the real local file system: URIs, atomic writes, prefix copies, symlinks."""

from __future__ import annotations

import errno
import hashlib
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from kquant_api import Reason
from kquant_job.errors import StorageError
from kquant_job.storage import open_storage
from kquant_job.storage.file import FileStorage, to_path
from kquant_job.storage.paths import atomic_target, os_error

fs = FileStorage()


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if not p.is_dir())


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _reason(call) -> StorageError:
    with pytest.raises(StorageError) as info:
        call()
    return info.value


def test_uri_forms_map_to_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert to_path("file:///abs/m.onnx") == Path("/abs/m.onnx")
    assert to_path("file://rel/m.onnx") == Path("rel/m.onnx")
    assert to_path("rel/m.onnx") == Path("rel/m.onnx")
    assert isinstance(open_storage("file:///x"), FileStorage)
    assert isinstance(open_storage("plain/path"), FileStorage)
    src = _write(tmp_path / "src.bin", b"abc")
    for uri in ("file://out1/a.bin", "out2/a.bin", f"file://{tmp_path}/out3/a.bin"):
        fs.upload(src, uri)
    assert (tmp_path / "out1/a.bin").read_bytes() == b"abc"
    assert (tmp_path / "out2/a.bin").read_bytes() == b"abc"
    assert (tmp_path / "out3/a.bin").read_bytes() == b"abc"


def test_upload_hashes_creates_parents_and_leaves_no_temp(tmp_path):
    data = os.urandom(100_000)
    src = _write(tmp_path / "m.onnx", data)
    uri = f"file://{tmp_path}/out/deep/m.onnx"
    art = fs.upload(src, uri)
    assert (art.uri, art.sha256, art.bytes) == (uri, hashlib.sha256(data).hexdigest(), len(data))
    assert _files(tmp_path / "out") == ["deep/m.onnx"]
    # A prefix URI receives the file under its own name.
    assert fs.upload(src, f"{tmp_path}/pre/").uri == f"{tmp_path}/pre/m.onnx"
    assert (tmp_path / "pre/m.onnx").read_bytes() == data


@pytest.mark.skipif(not Path("/proc/self/mem").exists(), reason="needs Linux /proc")
def test_failed_upload_keeps_old_file_and_leaves_no_temp(tmp_path):
    target = _write(tmp_path / "out/m.onnx", b"previous complete set")
    # Reading /proc/self/mem at offset 0 fails with EIO after the temporary file exists.
    err = _reason(lambda: fs.upload(Path("/proc/self/mem"), f"{tmp_path}/out/m.onnx"))
    assert err.reason is Reason.StorageUnavailable
    assert target.read_bytes() == b"previous complete set"
    assert _files(tmp_path / "out") == ["m.onnx"]


def test_atomic_target_publishes_only_on_success(tmp_path):
    target = tmp_path / "d" / "f.bin"
    with pytest.raises(RuntimeError), atomic_target(target) as tmp:
        tmp.write_bytes(b"half")
        assert not target.exists()  # invisible under its final name while being written
        raise RuntimeError("killed")
    assert _files(tmp_path) == []
    with atomic_target(target) as tmp:
        tmp.write_bytes(b"whole")
    assert _files(tmp_path) == ["d/f.bin"] and target.read_bytes() == b"whole"


def test_uploads_are_fsynced_and_downloads_into_the_work_directory_are_not(tmp_path, monkeypatch):
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    src = _write(tmp_path / "src/m.onnx", b"model")
    fs.download(f"file://{src}", tmp_path / "work")
    assert synced == [] and (tmp_path / "work/m.onnx").read_bytes() == b"model"
    fs.upload(src, f"file://{tmp_path}/out/m.onnx")
    assert len(synced) >= 2  # the file, then its directory entry


def test_download_object_and_missing_sources(tmp_path):
    src = _write(tmp_path / "src/m.onnx", b"model")
    got = fs.download(f"file://{src}", tmp_path / "dest")
    assert got == tmp_path / "dest/m.onnx" and got.read_bytes() == b"model"
    missing = f"file://{tmp_path}/src/nope.onnx"
    err = _reason(lambda: fs.download(missing, tmp_path / "d2"))
    assert err.reason is Reason.SourceNotFound and missing in str(err)
    err = _reason(lambda: fs.download(f"{tmp_path}/src", tmp_path / "d3"))
    assert err.reason is Reason.SourceNotFound and "end the URI with '/'" in str(err)
    for prefix in (f"{tmp_path}/nothing/", f"{tmp_path}/src/m.onnx/"):
        assert _reason(lambda p=prefix: fs.download(p, tmp_path / "d4")).reason is (
            Reason.SourceNotFound
        )
    (tmp_path / "empty").mkdir()
    err = _reason(lambda: fs.download(f"{tmp_path}/empty/", tmp_path / "d5"))
    assert err.reason is Reason.SourceNotFound
    assert not any((tmp_path / d).exists() for d in ("d2", "d3", "d4", "d5"))


def test_prefix_download_mirrors_tree_and_follows_inner_symlinks(tmp_path):
    src = tmp_path / "model"
    _write(src / "model.onnx", b"graph")
    _write(src / "weights/part1.bin", b"w1")
    os.symlink("weights/part1.bin", src / "alias.bin")  # inside the tree: copied as a file
    dest = tmp_path / "dest"
    assert fs.download(f"file://{src}/", dest) == dest
    assert _files(dest) == ["alias.bin", "model.onnx", "weights/part1.bin"]
    assert not (dest / "alias.bin").is_symlink()
    assert (dest / "alias.bin").read_bytes() == b"w1"
    assert [(o.key, o.size) for o in fs.list(f"{src}/")] == [
        ("alias.bin", 2),
        ("model.onnx", 5),
        ("weights/part1.bin", 2),
    ]


def _outside_file(src: Path, outside: Path) -> None:
    os.symlink(outside / "secret.txt", src / "evil.bin")


def _outside_dir(src: Path, outside: Path) -> None:
    os.symlink(outside, src / "evil_dir")


def _dotdot(src: Path, outside: Path) -> None:
    os.symlink("../outside/secret.txt", src / "sub/evil.bin")


def _dangling(src: Path, outside: Path) -> None:
    os.symlink("missing.bin", src / "dangling.bin")


def _loop(src: Path, outside: Path) -> None:
    os.symlink("..", src / "sub/up")


def _fifo(src: Path, outside: Path) -> None:
    os.mkfifo(src / "pipe")


def _unsafe_tree(tmp_path: Path, make: Callable[[Path, Path], None]) -> Path:
    """A model folder with two files and the unsafe entry ``make`` adds; a secret outside."""
    outside = tmp_path / "outside"
    _write(outside / "secret.txt", b"not yours")
    src = tmp_path / "model"
    _write(src / "a.onnx", b"a")
    _write(src / "sub/z.onnx", b"z")
    make(src, outside)
    return src


@pytest.mark.parametrize("make", [_outside_file, _outside_dir, _dotdot, _dangling, _loop, _fifo])
def test_prefix_download_refuses_unsafe_entries_before_writing(tmp_path, make):
    src = _unsafe_tree(tmp_path, make)
    dest = tmp_path / "dest"
    err = _reason(lambda: fs.download(f"{src}/", dest))
    assert err.reason is Reason.UnsafePath
    assert not dest.exists()


@pytest.mark.parametrize("make", [_outside_file, _outside_dir, _dotdot, _dangling, _loop, _fifo])
def test_read_in_place_refuses_what_a_download_refuses(tmp_path, make):
    src = _unsafe_tree(tmp_path, make)
    assert _reason(lambda: fs.read_in_place(f"{src}/")).reason is Reason.UnsafePath


def test_read_in_place_gives_the_resolved_path_and_copies_nothing(tmp_path):
    src = _write(tmp_path / "models/m.onnx", b"model")
    os.symlink(src, tmp_path / "link.onnx")
    before = _files(tmp_path)
    assert fs.read_in_place(f"file://{tmp_path}/link.onnx") == src.resolve()
    assert fs.read_in_place(f"file://{tmp_path}/models/") == (tmp_path / "models").resolve()
    assert _files(tmp_path) == before
    os.mkfifo(tmp_path / "pipe.onnx")
    assert _reason(lambda: fs.read_in_place(f"{tmp_path}/pipe.onnx")).reason is Reason.UnsafePath
    for missing in (f"{tmp_path}/none.onnx", f"{tmp_path}/none/", f"{tmp_path}/models"):
        assert _reason(lambda u=missing: fs.read_in_place(u)).reason is Reason.SourceNotFound
    (tmp_path / "empty").mkdir()
    assert _reason(lambda: fs.read_in_place(f"{tmp_path}/empty/")).reason is Reason.SourceNotFound


def test_stat_list_delete(tmp_path):
    _write(tmp_path / "p/a.bin", b"12345")
    assert fs.stat(f"{tmp_path}/p/a.bin").size == 5
    assert fs.stat(f"{tmp_path}/p/none.bin") is None
    assert fs.stat(f"{tmp_path}/p") is None  # a directory is not an object
    assert fs.list(f"{tmp_path}/missing/") == []
    fs.delete(f"{tmp_path}/p/a.bin")
    fs.delete(f"{tmp_path}/p/a.bin")  # absent: not an error
    fs.delete(f"{tmp_path}/p")  # directories are left alone
    assert (tmp_path / "p").is_dir() and fs.list(f"{tmp_path}/p/") == []


@pytest.mark.skipif(sys.platform != "linux", reason="sysfs refuses new files, even to root")
def test_permission_denied_is_access_denied(tmp_path):
    src = _write(tmp_path / "m.onnx", b"1")
    err = _reason(lambda: fs.upload(src, "file:///sys/kquant-denied.onnx"))
    assert err.reason is Reason.AccessDenied
    assert "file:///sys/kquant-denied.onnx" in str(err)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file modes")
def test_unreadable_directory_is_access_denied(tmp_path):
    _write(tmp_path / "locked/m.onnx", b"1")
    (tmp_path / "locked").chmod(0)
    try:
        err = _reason(lambda: fs.download(f"{tmp_path}/locked/", tmp_path / "dest"))
    finally:
        (tmp_path / "locked").chmod(0o755)
    assert err.reason is Reason.AccessDenied


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (FileNotFoundError(errno.ENOENT, "No such file or directory", "/x"), Reason.SourceNotFound),
        (PermissionError(errno.EACCES, "Permission denied", "/x"), Reason.AccessDenied),
        (OSError(errno.EROFS, "Read-only file system", "/x"), Reason.AccessDenied),
        (OSError(errno.ENOSPC, "No space left on device", "/x"), Reason.StorageUnavailable),
    ],
)
def test_os_errors_are_classified(exc, reason):
    err = os_error(exc, "file:///x", "write")
    assert err.reason is reason
    assert "file:///x" in str(err) and exc.strerror in str(err)


def test_sources_beyond_max_bytes_are_refused_before_any_copy(tmp_path):
    src = tmp_path / "src"
    _write(src / "model.pt", b"m" * 300)
    _write(src / "sub" / "config.json", b"{}" * 100)
    dest = tmp_path / "dest"
    for uri, total in ((src.as_uri() + "/model.pt", 300), (src.as_uri() + "/", 500)):
        err = _reason(lambda uri=uri, total=total: fs.download(uri, dest, max_bytes=total - 1))
        assert err.reason is Reason.SourceTooLarge and f"{total} bytes" in str(err)
        assert not dest.exists()
        fs.download(uri, tmp_path / "fits", max_bytes=total)
    assert _files(tmp_path / "fits") == ["model.pt", "sub/config.json"]


def test_temporary_files_name_their_writer(tmp_path):
    import subprocess
    import sys

    from kquant_job.storage.paths import temp_path, temp_writer_alive

    mine = temp_path(tmp_path / "manifest.json")
    assert mine.name.startswith(".manifest.json.") and temp_writer_alive(mine.name) is True
    child = subprocess.Popen([sys.executable, "-c", "import os; print(os.getpid())"],
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    pid = int(child.communicate()[0])  # a process that has ended
    gone = mine.name.replace(f"-{os.getpid()}.", f"-{pid}.")
    assert temp_writer_alive(gone) is False
    assert temp_writer_alive(".m.onnx.1234abcd.kquant-part") is None  # says nothing
    host = gone.split(".")[-3].split("-")[0]
    assert temp_writer_alive(gone.replace(host, "00000000")) is None  # another host's
    (tmp_path / gone).write_bytes(b"half")
    [upload] = fs.list_uploads(f"file://{tmp_path}/")
    assert (upload.key, upload.writer_alive) == (gone, False)


def test_a_file_named_with_a_trailing_slash_says_to_drop_it(tmp_path: Path) -> None:
    (tmp_path / "m.onnx").write_bytes(b"x")
    with pytest.raises(StorageError) as info:
        FileStorage().download(f"file://{tmp_path}/m.onnx/", tmp_path / "dl", 10**6)
    assert info.value.reason is Reason.SourceNotFound
    assert "names a file, not a directory: drop the trailing '/'" in str(info.value)
    with pytest.raises(StorageError, match="no directory at"):
        FileStorage().download(f"file://{tmp_path}/none/", tmp_path / "dl", 10**6)


def test_a_missing_relative_path_shows_where_it_was_looked_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new user ran a spec with a relative path from another folder: the message said
    'cannot stat m/vad.onnx' without saying against which directory it resolved."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StorageError) as info:
        FileStorage().download("m/vad.onnx", tmp_path / "dl", 10**6)
    assert info.value.reason is Reason.SourceNotFound
    assert f"({tmp_path / 'm' / 'vad.onnx'})" in str(info.value)


def test_an_entry_swapped_for_a_symlink_after_the_walk_is_not_followed(tmp_path, monkeypatch):
    """The folder is walked and checked, then each file copied: a file (or a folder on its
    path) replaced by a symlink in between is refused, not read (before: the copy followed
    it and published the file it pointed at, a race a helper's trial won)."""
    from kquant_job.storage import file as file_storage

    secret = tmp_path / "secret.txt"
    secret.write_text("outside the model folder")
    src = tmp_path / "models"
    (src / "sub").mkdir(parents=True)
    (src / "a.bin").write_bytes(b"a" * 10)
    (src / "sub" / "config.json").write_text("{}")
    walk = file_storage._walk

    def walk_then_swap(root, where):
        pairs = walk(root, where)
        (src / "sub" / "config.json").unlink()
        (src / "sub" / "config.json").symlink_to(secret)
        return pairs

    monkeypatch.setattr(file_storage, "_walk", walk_then_swap)
    store = FileStorage()
    with pytest.raises(StorageError) as info:
        store.download(f"file://{src}/", tmp_path / "dest")
    assert info.value.reason.value == "UnsafePath" and "became a symlink" in str(info.value)
    assert not any(
        p.read_bytes() == secret.read_bytes() for p in (tmp_path / "dest").rglob("*") if p.is_file()
    )

    (src / "sub" / "config.json").unlink()
    (src / "sub" / "config.json").write_text("{}")

    def walk_then_swap_folder(root, where):
        pairs = walk(root, where)
        (src / "sub").rename(tmp_path / "moved")
        (src / "sub").symlink_to(tmp_path / "moved")  # same content, reached through a link
        return pairs

    monkeypatch.setattr(file_storage, "_walk", walk_then_swap_folder)
    with pytest.raises(StorageError) as info:
        store.download(f"file://{src}/", tmp_path / "dest2")
    assert info.value.reason.value == "UnsafePath"


def test_open_beneath_opens_a_resolved_regular_file_only(tmp_path):
    from kquant_job.storage.file import open_beneath

    (tmp_path / "f").write_bytes(b"x")
    with open_beneath((tmp_path / "f").resolve()) as fh:
        assert fh.read() == b"x"
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(StorageError):  # opened without blocking, then refused
        open_beneath((tmp_path / "fifo").resolve())
    (tmp_path / "link").symlink_to(tmp_path / "f")
    with pytest.raises(OSError):
        open_beneath(tmp_path / "link")


def test_only_kquant_s_own_temporary_names_are_hidden_and_reclaimable(tmp_path):
    from kquant_job.storage.paths import temp_path, temp_target

    ours = temp_path(tmp_path / "silero_vad_fp16.onnx")
    assert temp_target(ours.name) == "silero_vad_fp16.onnx"
    assert temp_target("notes.kquant-part") is None
    assert temp_target(".notes.kquant-part") is None
    ours.write_bytes(b"partial")
    (tmp_path / "notes.kquant-part").write_text("a user's file")
    store = FileStorage()
    listed = [o.key for o in store.list(f"file://{tmp_path}/")]
    assert listed == ["notes.kquant-part"]  # the user's file is an object like any other
    assert [u.key for u in store.list_uploads(f"file://{tmp_path}/")] == [ours.name]
    with pytest.raises(StorageError) as info:  # and a source may not carry the suffix
        store.download(f"file://{tmp_path}/", tmp_path / "dest")
    assert info.value.reason.value == "UnsafePath" and "rename it" in str(info.value)


def test_a_source_that_is_no_regular_file_or_grows_while_copied_is_refused(tmp_path, monkeypatch):
    """A FIFO or a symlink to /dev/zero named as the model (before: the fetch blocked for
    good, or never ended), and a file growing past the size the budget counted."""
    from kquant_job.storage import file as file_storage

    store = FileStorage()
    os.mkfifo(tmp_path / "m.onnx")
    (tmp_path / "zero.onnx").symlink_to("/dev/zero")
    for name in ("m.onnx", "zero.onnx"):
        with pytest.raises(StorageError) as info:
            store.download(f"file://{tmp_path}/{name}", tmp_path / "dest")
        assert info.value.reason.value == "UnsafePath", name
    (tmp_path / "grows.onnx").write_bytes(b"x" * 5000)
    monkeypatch.setattr(file_storage, "_size", lambda path, uri: 1000)  # its size when checked
    with pytest.raises(StorageError) as info:
        store.download(f"file://{tmp_path}/grows.onnx", tmp_path / "dest")
    assert info.value.reason.value == "ConcurrentWrite" and "grew past the 1000 bytes" in str(
        info.value
    )
    assert not list((tmp_path / "dest").glob("*"))  # nothing half-written left


def test_a_model_file_that_is_a_symlink_out_of_its_folder_is_refused(tmp_path):
    """A link planted in a models folder, pointing at someone else's file elsewhere (before:
    read, converted and published beside the link, world-readable)."""
    private = tmp_path / "private" / "secret.onnx"
    private.parent.mkdir()
    private.write_bytes(b"someone else's model")
    models = tmp_path / "models"
    models.mkdir()
    (models / "m.onnx").symlink_to(private)
    (models / "inside.onnx").write_bytes(b"a model")
    (models / "alias.onnx").symlink_to(models / "inside.onnx")
    store = FileStorage()
    for call in (store.download, lambda uri, _dest: store.read_in_place(uri)):
        with pytest.raises(StorageError) as info:
            call(f"file://{models}/m.onnx", tmp_path / "dest")
        assert info.value.reason.value == "UnsafePath" and "outside its folder" in str(info.value)
    assert store.read_in_place(f"file://{models}/alias.onnx") == (models / "inside.onnx")


def test_a_copy_to_a_name_seen_free_never_replaces_what_appeared_there(tmp_path):
    """A fixed-name copy checked the name with a stat, then replaced whatever a colleague
    wrote there meanwhile (fault-injection trial). Copied "absent", it links without
    replacing: the colleague's file stays and the copy is a ConcurrentWrite."""
    storage = FileStorage()
    src = tmp_path / "set" / "m.onnx"
    src.parent.mkdir()
    src.write_bytes(b"kquant's")
    dst = tmp_path / "out" / "m.onnx"
    storage.copy(f"file://{src}", f"file://{dst}", {}, absent=True)
    assert dst.read_bytes() == b"kquant's"
    dst.unlink()
    dst.write_bytes(b"a colleague's")  # written after kquant saw the name free
    with pytest.raises(StorageError) as info:
        storage.copy(f"file://{src}", f"file://{dst}", {}, absent=True)
    assert info.value.reason is Reason.ConcurrentWrite
    assert dst.read_bytes() == b"a colleague's"
    assert [p.name for p in dst.parent.iterdir()] == ["m.onnx"]  # no temporary file left


def test_a_listing_skips_what_went_away_while_it_walked(tmp_path, monkeypatch):
    """A concurrent writer's temporary file, renamed away between the directory read and
    the check, was refused as "not a regular file" (UnsafePath), failing the other writer
    of a race in the suite; a file or folder removed meanwhile is gone, not unsafe."""
    import types

    from kquant_job.storage import file as file_module
    from kquant_job.storage.paths import temp_path

    (tmp_path / "sets").mkdir()
    (tmp_path / "sets" / "m.onnx").write_bytes(b"kept")
    real = os.scandir
    phantoms = ["gone.bin", temp_path(tmp_path / "m.onnx").name, "gone-folder"]

    class Listing:
        def __init__(self, path):
            self.entries = list(real(path)) + [types.SimpleNamespace(name=n) for n in phantoms]

        def __enter__(self):
            return iter(self.entries)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(file_module.os, "scandir", Listing)
    listed = FileStorage().list(f"file://{tmp_path}/")
    assert [o.key for o in listed] == ["sets/m.onnx"]


def test_a_temporary_file_of_another_pid_namespace_is_never_judged_by_our_pids(tmp_path):
    """Fault-injection trial: containers sharing a volume and a host name (host network)
    but not a PID namespace; a reclaimer took another namespace's live writer for a dead
    pid of its own and deleted its temporary file mid-copy."""
    import shutil
    import subprocess
    import sys

    from kquant_job.storage.paths import temp_writer_alive

    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1)")
    # a writer in a PID namespace of its own names its file (pid 1 there: alive here too)
    code = ("import pathlib, sys; from kquant_job.storage.paths import temp_path; "
            "print(temp_path(pathlib.Path(sys.argv[1])).name)")  # fmt: skip
    run = subprocess.run(
        ["unshare", "-p", "-f", "--mount-proc", sys.executable, "-c", code,
         str(tmp_path / "model.onnx")],
        capture_output=True, text=True, env={**os.environ},
    )  # fmt: skip
    if run.returncode != 0:
        pytest.skip(f"no PID namespace here: {run.stderr.strip()[:200]}")
    name = run.stdout.strip()
    assert name.endswith(".kquant-part") and "-1." in name  # pid 1 in its namespace
    assert temp_writer_alive(name) is None  # a pid of another process table: unknown


def test_a_planted_temporary_name_with_an_impossible_pid_is_unknown(tmp_path):
    """Hostile-input trial: a name in the writer-tag format with a 20-digit pid made
    ``os.kill`` raise OverflowError, and every publish to the prefix crashed."""
    from kquant_job.storage.paths import _host_tag, temp_writer_alive

    tag = _host_tag()
    for pid in ("99999999999999999999", "0", str(2**22 + 1)):
        name = f".x.{tag}-{pid}.abcdef12.kquant-part"
        assert temp_writer_alive(name) is None
        (tmp_path / name).write_bytes(b"planted")
    uploads = fs.list_uploads(f"file://{tmp_path}/")
    assert len(uploads) == 3 and all(u.writer_alive is None for u in uploads)


@pytest.mark.parametrize("uri", ["http://x/y.onnx", "gs://bucket/m/", "hf://org/model"])
def test_a_uri_of_another_scheme_is_invalid_spec_not_a_missing_path(uri: str) -> None:
    """New-user trial: ``kquant-job inspect http://x/y.onnx`` read ``http:/x/y.onnx`` as a
    relative path and said it was missing (exit 20)."""
    from kquant_job.errors import InvalidSpec
    from kquant_job.storage import open_storage

    with pytest.raises(InvalidSpec, match="file:// and s3://"):
        open_storage(uri)
    assert open_storage("relative/path.onnx") and open_storage("file:///m/")


def test_a_temporary_file_renamed_while_uploads_are_listed_is_not_an_error(tmp_path, monkeypatch):
    """Full-suite run: a concurrent writer renamed its marker's temporary file into place
    between the listing's walk and its stat, and the other run failed as SourceNotFound."""
    from kquant_job.storage import file as module
    from kquant_job.storage.paths import temp_path

    fs = FileStorage()
    kept = temp_path(tmp_path / "sets" / "a" / "set.json")
    kept.parent.mkdir(parents=True)
    kept.write_bytes(b"half")
    renamed = temp_path(tmp_path / "sets" / "a" / "model.onnx")  # listed, then gone
    real_walk = module.os.walk

    def walk_then_rename(top, *args, **kwargs):
        for folder, dirs, names in real_walk(top, *args, **kwargs):
            if folder == str(kept.parent):
                names = [*names, renamed.name]
            yield folder, dirs, names

    monkeypatch.setattr(module.os, "walk", walk_then_rename)
    uploads = fs.list_uploads(f"file://{tmp_path}/")
    assert [u.key for u in uploads] == [f"sets/a/{kept.name}"]
