"""The external-data names a single-file ONNX source may bring with it: plain relative paths
inside the model's folder, nothing else (kquant_job.companions)."""

from __future__ import annotations

import pytest

from kquant_api import Reason
from kquant_job.companions import _checked, _uri_of
from kquant_job.errors import StorageError

URI = "s3://models/vad/model.onnx"


@pytest.mark.parametrize("name", ["model.onnx.data", "weights/part-1.bin", "a b/c.data"])
def test_names_beside_the_model_are_kept(name: str) -> None:
    assert _checked(URI, name) == name
    assert _uri_of(URI, name) == f"s3://models/vad/{name}"


@pytest.mark.parametrize(
    "name",
    ["", "../x", "a/../../x", "/etc/passwd", "./x", "a//b", "a\\..\\x", "C:x", "s3:x", "x\x00"],
)
def test_names_that_leave_the_folder_are_refused(name: str) -> None:
    with pytest.raises(StorageError) as err:
        _checked(URI, name)
    assert err.value.reason is Reason.UnsafePath and repr(name) in str(err.value)
