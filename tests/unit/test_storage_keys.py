"""Key checks that guard every prefix download (pure functions)."""

from __future__ import annotations

import unicodedata

import pytest

from kquant_api import Reason
from kquant_job.errors import StorageError
from kquant_job.storage.paths import check_keys, local_target

WHERE = "s3://b/m/"


def test_plain_keys_pass_and_directory_markers_are_dropped():
    keys = ["a.onnx", "sub/", "sub/b.bin", "sub/deep/c", "x.y/..z", "é/日本.bin"]
    assert check_keys(keys, WHERE) == ["a.onnx", "sub/b.bin", "sub/deep/c", "x.y/..z", "é/日本.bin"]


@pytest.mark.parametrize(
    "keys",
    [
        ["../evil"],
        ["a/../../evil"],
        [".."],
        ["/abs"],
        ["a//b"],
        ["./a"],
        ["a/."],
        ["a\\b"],
        ["a\x00b"],
        ["x" * 256],
        ["x", "x/y"],
        ["x/y", "x"],
        ["a/b/c", "a/b"],
        [unicodedata.normalize("NFC", "é"), unicodedata.normalize("NFD", "é")],
        [""],
    ],
)
def test_unsafe_keys_are_refused(keys):
    with pytest.raises(StorageError) as info:
        check_keys(keys, WHERE)
    assert info.value.reason is Reason.UnsafePath
    assert WHERE in str(info.value)


def test_local_target_refuses_a_symlink_out_of_the_destination(tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (dest / "sub").symlink_to(tmp_path / "elsewhere")
    assert local_target(dest, "a/b.bin", WHERE) == dest.resolve() / "a" / "b.bin"
    with pytest.raises(StorageError) as info:
        local_target(dest, "sub/b.bin", WHERE)
    assert info.value.reason is Reason.UnsafePath
