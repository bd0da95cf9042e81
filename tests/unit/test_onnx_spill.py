"""Moving embedded weights to a data file by walking the protobuf wire format
(passes/onnx_spill.py): the same files onnx writes, a fraction of the memory, and a clear
error for bytes that are not a model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from corpus import build_corpus
from onnx import TensorProto, helper, numpy_helper

from kquant_job.errors import PassError
from kquant_job.passes.onnx_common import load_model, save_model
from kquant_job.passes.onnx_spill import spill_weights


def _with_subgraph_and_small_tensors(path: Path) -> Path:
    """Big and small initializers, a big tensor as typed float_data (stays, as with onnx),
    and an If whose branch holds an initializer (subgraphs stay embedded)."""
    big = numpy_helper.from_array(np.arange(4096, dtype=np.float32).reshape(64, 64), "big")
    small = numpy_helper.from_array(np.ones(4, np.float32), "small")
    typed = helper.make_tensor("typed", TensorProto.FLOAT, [512], np.ones(512).tolist())
    inner = numpy_helper.from_array(np.full((64, 64), 2, np.float32), "inner")
    branch = helper.make_graph(
        [helper.make_node("Add", ["big", "inner"], ["b_out"])], "then", [],
        [helper.make_tensor_value_info("b_out", TensorProto.FLOAT, [64, 64])], [inner],
    )  # fmt: skip
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "big"], ["h"]),
            helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=branch),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64]),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 64]),
         helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, 64])],
        [big, small, typed],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    model.metadata_props.add(key="author", value="kquant tests")
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_the_files_are_those_onnx_writes(tmp_path: Path) -> None:
    """A model without subgraphs (onnx also moves subgraph initializers; we leave them)."""
    src = build_corpus()["bert_tiny"].path
    ours = spill_weights(src, tmp_path / "ours" / "model.onnx")
    assert [p.name for p in ours] == ["model.onnx", "model.onnx.data"]
    theirs = save_model(load_model(src), tmp_path / "onnx" / "model.onnx", size_limit=0)
    # onnx's threshold counts sys.getsizeof (33 bytes more): no tensor here is that close
    assert ours[0].read_bytes() == theirs[0].read_bytes()
    assert ours[1].read_bytes() == theirs[1].read_bytes()
    a, b = load_model(ours[0]), load_model(theirs[0])
    assert a == b  # weights loaded back: the same model
    plain = onnx.load(str(src))
    assert load_model(ours[0]).graph.node == onnx.load(str(src)).graph.node
    for t_ours, t_src in zip(a.graph.initializer, plain.graph.initializer, strict=True):
        np.testing.assert_array_equal(numpy_helper.to_array(t_ours), numpy_helper.to_array(t_src))


def test_without_the_kernel_copy_the_files_are_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the kernel refuses to copy between the files (e.g. EXDEV on kernels before
    5.19 across file systems), the weights are read and written in chunks: the same
    bytes."""
    src = build_corpus()["bert_tiny"].path
    kernel = spill_weights(src, tmp_path / "kernel" / "model.onnx")
    calls = []

    def refuse(*args: object) -> int:
        calls.append(args)
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr("os.copy_file_range", refuse)
    chunks = spill_weights(src, tmp_path / "chunks" / "model.onnx")
    assert calls  # the fallback ran
    assert chunks[0].read_bytes() == kernel[0].read_bytes()
    assert chunks[1].read_bytes() == kernel[1].read_bytes()


def test_a_tensor_with_two_raw_data_fields_is_kept_as_it_is(tmp_path: Path) -> None:
    """Protobuf lets a field appear twice (the last wins): such a tensor is not moved, so
    that what readers parse stays what the file says."""
    tensor = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    blob = tensor.SerializeToString()
    twice = blob + b"\x4a" + bytes([0x80, 0x80, 0x01]) + np.full(4096, 2, np.float32).tobytes()
    assert numpy_helper.to_array(TensorProto.FromString(twice))[0, 0] == 2
    init = bytes([0x2A]) + _varint(len(twice)) + twice
    node = helper.make_node("Identity", ["w"], ["y"]).SerializeToString()
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 64]).SerializeToString()
    graph = b"\x0a" + _varint(len(node)) + node + init + b"\x62" + _varint(len(out)) + out
    model = helper.make_model(helper.make_graph([], "g", [], []), ir_version=8)
    del model.graph.node[:]
    raw = (
        model.SerializeToString().replace(
            b"\x3a" + _varint(model.graph.ByteSize()) + model.graph.SerializeToString(), b""
        )
        + b"\x3a"
        + _varint(len(graph))
        + graph
    )
    src = tmp_path / "twice.onnx"
    src.write_bytes(raw)
    dst, data = spill_weights(src, tmp_path / "out" / "model.onnx")
    bare = onnx.load(str(dst), load_external_data=False)
    assert bare.graph.initializer[0].data_location == TensorProto.DEFAULT
    assert numpy_helper.to_array(bare.graph.initializer[0])[0, 0] == 2
    assert data.stat().st_size == 0


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append(value & 0x7F | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def test_typed_and_subgraph_tensors_stay_and_the_rest_round_trips(tmp_path: Path) -> None:
    src = _with_subgraph_and_small_tensors(tmp_path / "m.onnx")
    dst, data = spill_weights(src, tmp_path / "out" / "model.onnx")
    bare = onnx.load(str(dst), load_external_data=False)
    where = {t.name: t.data_location for t in bare.graph.initializer}
    assert where == {"big": TensorProto.EXTERNAL, "small": TensorProto.DEFAULT,
                     "typed": TensorProto.DEFAULT}  # fmt: skip
    inner = bare.graph.node[1].attribute[0].g.initializer[0]
    assert inner.data_location == TensorProto.DEFAULT and inner.raw_data
    assert data.stat().st_size == 64 * 64 * 4
    back, plain = load_model(dst), onnx.load(str(src))
    assert back.graph.node == plain.graph.node
    for got, want in zip(back.graph.initializer, plain.graph.initializer, strict=True):
        np.testing.assert_array_equal(numpy_helper.to_array(got), numpy_helper.to_array(want))
    assert bare.metadata_props[0].value == "kquant tests"  # other fields copied as they were


@pytest.mark.parametrize(
    "damage",
    ["truncated", "garbage", "length_past_end", "no_graph"],
)
def test_bytes_that_are_not_a_model_are_corrupt_model(tmp_path: Path, damage: str) -> None:
    good = _with_subgraph_and_small_tensors(tmp_path / "m.onnx").read_bytes()
    bad = {
        "truncated": good[: len(good) // 2],
        "garbage": b"\xff" * 64,
        # graph field (key 0x3a) claiming far more bytes than the file holds
        "length_past_end": b"\x08\x08\x3a\xff\xff\xff\x7f" + b"\x00" * 16,
        "no_graph": b"\x08\x08",
    }[damage]
    src = tmp_path / "bad.onnx"
    src.write_bytes(bad)
    with pytest.raises(PassError) as info:
        spill_weights(src, tmp_path / "out" / "model.onnx")
    assert info.value.reason.value == "CorruptModel" and "bad.onnx" in str(info.value)
    assert not (tmp_path / "out" / "model.onnx").exists()  # nothing half-written


def test_memory_stays_near_the_largest_tensor(tmp_path: Path) -> None:
    """40 tensors of 4 MiB (160 MiB embedded): onnx's load and save peaks at over twice the
    model; the walk holds no weight (the kernel copies them), only the interpreter's
    buffers."""
    tensors = [numpy_helper.from_array(np.full((1024, 1024), i, np.float32), f"w{i}")
               for i in range(40)]  # fmt: skip
    nodes = [helper.make_node("Identity", [f"w{i}"], [f"o{i}"]) for i in range(40)]
    outs = [helper.make_tensor_value_info(f"o{i}", TensorProto.FLOAT, None) for i in range(40)]
    graph = helper.make_graph(nodes, "g", [], outs, tensors)
    src = tmp_path / "big.onnx"
    onnx.save(helper.make_model(graph), str(src))
    del tensors, graph
    script = (
        "import resource, sys; from pathlib import Path;"
        "from kquant_job.passes.onnx_spill import spill_weights;"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss;"
        "spill_weights(Path(sys.argv[1]), Path(sys.argv[2]));"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)"
    )
    out = subprocess.run([sys.executable, "-c", script, str(src), str(tmp_path / "o/m.onnx")],
                         capture_output=True, text=True, check=True)  # fmt: skip
    grown = int(out.stdout.split()[-1])
    assert grown < 0.05 * src.stat().st_size, grown  # vs 2x for load + save
    assert (tmp_path / "o" / "m.onnx.data").stat().st_size == 40 * 4 * 2**20
