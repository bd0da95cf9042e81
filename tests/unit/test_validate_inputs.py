"""Validation feeds: generated from a real ONNX signature (seeded) or loaded from .npz files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from kquant_api import ValidationConfig
from kquant_job.errors import InvalidSpec
from kquant_job.validate import prepare_feeds


def save(graph: onnx.GraphProto, path: Path, **kwargs) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9  # what onnxruntime >= 1.16 reads
    onnx.save(model, str(path), **kwargs)
    return path


def signature_model(path: Path) -> Path:
    """Identity model with one input of each kind: symbolic, unnamed and fixed dims."""
    vi = helper.make_tensor_value_info
    inputs = [
        vi("x", TensorProto.FLOAT, ["batch", "seq"]),
        vi("ids", TensorProto.INT64, ["batch", 3]),
        vi("flag", TensorProto.BOOL, []),
        vi("h", TensorProto.FLOAT16, [None, 4]),
    ]
    outputs = [vi(f"{i.name}_out", i.type.tensor_type.elem_type, None) for i in inputs]
    nodes = [helper.make_node("Identity", [i.name], [f"{i.name}_out"]) for i in inputs]
    return save(helper.make_graph(nodes, "sig", inputs, outputs), path)


def test_discovered_feeds_are_seeded_and_follow_the_signature(tmp_path):
    model = signature_model(tmp_path / "sig.onnx")
    cfg = ValidationConfig(samples=3, seed=7, dimensions={"batch": 2, "seq": 50})
    feeds = prepare_feeds(model, cfg, [])
    again = prepare_feeds(model, cfg, [])
    other = prepare_feeds(model, cfg.model_copy(update={"seed": 8}), [])
    assert len(feeds) == 3
    for a, b in zip(feeds, again, strict=True):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(feeds[0]["x"], other[0]["x"])
    assert not np.array_equal(feeds[0]["x"], feeds[1]["x"])  # samples differ
    f = feeds[0]
    assert (f["x"].dtype, f["x"].shape) == (np.float32, (2, 50))
    assert (f["ids"].dtype, f["ids"].shape) == (np.int64, (2, 3))
    assert (f["flag"].dtype, f["flag"].shape) == (np.bool_, ())
    assert (f["h"].dtype, f["h"].shape) == (np.float16, (1, 4))  # unnamed dynamic dim -> 1
    assert not f["h"].any()  # a state starts at zero
    ids = np.concatenate([g["ids"].ravel() for g in feeds])
    assert ids.min() >= 0 and ids.max() < 8
    xs = np.concatenate([g["x"].ravel() for g in feeds])  # a waveform: real speech
    assert np.abs(xs).max() <= 1.0 and xs.std() > 0.01
    # Unlisted symbolic dims: a batch is 1, a waveform's length the first that runs
    assert prepare_feeds(model, ValidationConfig(samples=1), [])[0]["x"].shape == (1, 16000)


def test_generated_feeds_honour_overrides(tmp_path):
    model = signature_model(tmp_path / "sig.onnx")
    cfg = ValidationConfig.model_validate(
        {
            "samples": 2,
            "inputs": {
                "x": {"shape": [3, 5], "low": 2.0, "high": 3.0},
                "ids": {"shape": [3, 3], "low": 100, "high": 103},
                "h": {"value": 1.5},
            },
        }
    )
    f = prepare_feeds(model, cfg, [])[1]
    assert f["x"].shape == (3, 5) and f["x"].min() >= 2.0 and f["x"].max() < 3.0
    assert f["ids"].shape == (3, 3) and set(f["ids"].ravel()) <= {100, 101, 102}
    assert f["h"].dtype == np.float16 and np.all(f["h"] == 1.5)
    for bad in (
        {"nope": {"value": 1}},  # no such input
        {"ids": {"shape": [3]}},  # wrong rank
        {"ids": {"shape": [1, 4]}},  # fixed dim 3
        {"x": {"low": 1.0, "high": 0.0}},
    ):
        with pytest.raises(InvalidSpec, match=r"spec\.validation\.inputs"):
            prepare_feeds(model, ValidationConfig.model_validate({"inputs": bad}), [])


def write_npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def test_npz_feeds_load_in_name_order_and_cast(tmp_path):
    model = signature_model(tmp_path / "sig.onnx")
    files = []
    for i in (2, 0, 1):
        files.append(
            write_npz(
                tmp_path / f"s{i}.npz",
                x=np.full((1, 4), i, np.float64),  # float64 data for a float32 input: cast
                ids=np.zeros((1, 3), np.int32),
                flag=np.array(True),  # 0-d for a scalar input
                h=np.zeros((5, 4), np.float32),
                extra=np.zeros(2),  # not an input: ignored
            )
        )
    feeds = prepare_feeds(model, ValidationConfig(samples=2), files)
    assert [f["x"][0, 0] for f in feeds] == [0.0, 1.0]
    assert feeds[0]["x"].dtype == np.float32 and feeds[0]["ids"].dtype == np.int64
    assert feeds[0]["h"].dtype == np.float16 and "extra" not in feeds[0]
    assert feeds[0]["flag"].shape == ()
    # A scalar saved with shape (1,) is accepted as the scalar.
    write_npz(
        tmp_path / "s0.npz",
        x=np.zeros((1, 4)),
        ids=np.zeros((1, 3), np.int64),
        flag=np.array([False]),
        h=np.zeros((1, 4), np.float16),
    )
    assert prepare_feeds(model, ValidationConfig(samples=1), files)[0]["flag"].shape == ()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"ids": None}, "no array for model input 'ids'"),
        ({"ids": np.zeros((1, 3), np.float32)}, "input 'ids' is float32"),
        ({"x": np.zeros(4, np.float32)}, "input 'x' has rank 1"),
        ({"ids": np.zeros((1, 4), np.int64)}, "fixes axis 1 to 3"),
        ({"flag": np.zeros(3, np.bool_)}, "input 'flag' has rank 1"),
    ],
)
def test_npz_feed_errors_name_file_and_input(tmp_path, change, message):
    model = signature_model(tmp_path / "sig.onnx")
    arrays = {
        "x": np.zeros((1, 4), np.float32),
        "ids": np.zeros((1, 3), np.int64),
        "flag": np.array(True),
        "h": np.zeros((1, 4), np.float16),
    }
    arrays.update(change)
    path = write_npz(
        tmp_path / "bad_sample.npz", **{k: v for k, v in arrays.items() if v is not None}
    )
    with pytest.raises(InvalidSpec, match=message) as info:
        prepare_feeds(model, ValidationConfig(), [path])
    assert "bad_sample.npz" in str(info.value)


def test_npz_unreadable_or_pickled_is_invalid_spec(tmp_path):
    model = signature_model(tmp_path / "sig.onnx")
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 not really a zip")
    pickled = write_npz(tmp_path / "obj.npz", x=np.array([{"a": 1}], dtype=object))
    for path in (tmp_path / "junk.npz", pickled):
        with pytest.raises(InvalidSpec, match=path.name):
            prepare_feeds(model, ValidationConfig(), [path])


def test_an_npz_whose_header_declares_more_than_it_holds_is_invalid_spec(tmp_path):
    """Hostile-input trial: 64 bytes under a .npy header declaring (1, 2^40) float32 ended
    in MemoryLimitExceeded ("raise the pod's memory limit"), numpy allocating 4 TiB first."""
    import io
    import zipfile

    from numpy.lib import format as npy

    from kquant_job.validate.inputs import read_npz

    body = io.BytesIO()
    npy.write_array_header_1_0(body, {"descr": "<f4", "fortran_order": False,
                                      "shape": (1, 1 << 40)})  # fmt: skip
    body.write(b"\0" * 64)
    lying = tmp_path / "lying.npz"
    with zipfile.ZipFile(lying, "w") as archive:
        archive.writestr("x.npy", body.getvalue())
    with pytest.raises(InvalidSpec) as info:
        read_npz(lying, "spec.validation.dataUri")
    assert "array 'x' declares shape (1, 1099511627776) of float32" in str(info.value)
    assert "holds 64 bytes: a corrupt file" in str(info.value)
    honest = tmp_path / "honest.npz"
    np.savez_compressed(honest, x=np.ones((3, 4), np.float32), n=np.array(5))
    assert read_npz(honest)["x"].shape == (3, 4) and int(read_npz(honest)["n"]) == 5
