"""onnx_common: corrupt files, external data in and out, node naming."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from fp16_helpers import (
    batchnorm_model,
    convert,
    rel_error,
    run,
)
from onnx import TensorProto, helper, numpy_helper

from kquant_api import Reason
from kquant_job.errors import PassError
from kquant_job.passes.onnx_common import (
    iter_nodes,
    load_model,
    name_unnamed_nodes,
    save_model,
)


@pytest.mark.parametrize("data", [b"", b"not an onnx model at all", b"\x08\x07"])
def test_corrupt_file(data: bytes, tmp_path: Path) -> None:
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(data)
    with pytest.raises(PassError) as err:
        convert(bad, tmp_path)
    assert err.value.reason is Reason.CorruptModel
    assert "broken.onnx" in str(err.value)


def test_external_data_in_and_out(tmp_path: Path) -> None:
    """A model whose weights live in an external file converts; save_model switches to
    external data past its size limit and never appends to a stale data file."""
    weights = np.random.default_rng(3).standard_normal((64, 64)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 64])],
        [numpy_helper.from_array(weights, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    src = tmp_path / "src" / "mm.onnx"
    src.parent.mkdir()
    onnx.save(model, str(src), save_as_external_data=True, location="weights.bin", size_threshold=0)
    result = convert(src, tmp_path)
    feeds = {"x": np.ones((2, 64), np.float32)}
    assert rel_error(run(src, feeds)[0], run(result.output, feeds)[0]) < 1e-2

    converted = load_model(result.output)
    for _ in range(2):
        files = save_model(converted, tmp_path / "big" / "m.onnx", size_limit=1024)
        assert [f.name for f in files] == ["m.onnx", "m.onnx.data"]
        assert files[1].stat().st_size == 64 * 64 * 2
        converted = load_model(files[0])
    np.testing.assert_array_equal(run(files[0], feeds)[0], run(result.output, feeds)[0])
    (tmp_path / "big" / "m.onnx.data").unlink()
    with pytest.raises(PassError) as err:
        load_model(tmp_path / "big" / "m.onnx")
    assert err.value.reason is Reason.CorruptModel


@pytest.mark.parametrize("problem", ["missing", "outside", "short"])
def test_bad_external_data_is_a_corrupt_model(problem: str, tmp_path: Path) -> None:
    model = batchnorm_model(tmp_path / "bn.onnx")
    src = tmp_path / "src" / "bn.onnx"
    src.parent.mkdir()
    onnx.save(onnx.load(str(model)), str(src), save_as_external_data=True,
              location="bn.bin", size_threshold=0)  # fmt: skip
    data = src.with_name("bn.bin")
    if problem == "missing":
        data.unlink()
    elif problem == "short":
        data.write_bytes(data.read_bytes()[:10])
    else:
        proto = onnx.load(str(src), load_external_data=False)
        for entry in proto.graph.initializer[0].external_data:
            if entry.key == "location":
                entry.value = "../bn.bin"
        onnx.save(proto, str(src))
        data.rename(tmp_path / "bn.bin")
    with pytest.raises(PassError) as err:
        convert(src, tmp_path)
    assert err.value.reason is Reason.CorruptModel
    assert "bn.onnx" in str(err.value) and "bn.bin" in str(err.value)


def test_node_naming_reaches_subgraphs(silero_onnx: Path) -> None:
    model = load_model(silero_onnx)
    top = len(model.graph.node)
    named = name_unnamed_nodes(model)
    names = [n.name for _, n in iter_nodes(model.graph)]
    assert len(names) > top and named > 0
    assert all(names) and len(set(names)) == len(names)
    again = load_model(silero_onnx)
    name_unnamed_nodes(again)
    assert [n.name for _, n in iter_nodes(again.graph)] == names


def _weights_model(dtypes: dict[str, type]) -> onnx.ModelProto:
    """A graph of no nodes holding one 64x64 initializer per name, of the given dtype."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.zeros((64, 64), dt), name) for name, dt in dtypes.items()]
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    return helper.make_model(helper.make_graph([], "g", [], [y], inits))


def test_a_model_mostly_in_float16_is_refused_and_fp32_ones_pass() -> None:
    import numpy as np

    from kquant_api import Reason
    from kquant_job.errors import PassError
    from kquant_job.passes.onnx_common import refuse_reduced

    model = _weights_model

    refuse_reduced(model({"a": np.float32, "b": np.float16}), "mixed.onnx", "fp16")  # 2:1 FP32
    with pytest.raises(PassError) as info:
        refuse_reduced(model({"a": np.float16, "b": np.float16, "c": np.float16, "d": np.float32}),
                       "m.onnx", "int8")  # fmt: skip
    assert info.value.reason is Reason.AlreadyQuantized
    assert "24576 of its 40960 float weight bytes are float16" in str(info.value)
    assert "INT8 quantizers need the FP32 weights" in str(info.value)


def test_fp16_of_a_mostly_integer_model_is_refused_and_a_partly_quantized_one_passes() -> None:
    import numpy as np

    from kquant_api import Reason
    from kquant_job.errors import PassError
    from kquant_job.passes.onnx_common import refuse_integer

    model = _weights_model

    mostly_int8 = model({**{f"w{i}": np.int8 for i in range(20)}, "s": np.float32})
    with pytest.raises(PassError) as info:
        refuse_integer(mostly_int8, "m.onnx", quantized_nodes=5)
    assert info.value.reason is Reason.AlreadyQuantized
    assert "81920 of its 98304 weight bytes are integers" in str(info.value)
    refuse_integer(mostly_int8, "m.onnx", quantized_nodes=0)  # int8 tables, not quantized
    refuse_integer(model({"a": np.int8, "b": np.float32}), "half.onnx", quantized_nodes=1)
