"""``kquant-job inspect``: real models, local and on S3, parsed in the sandbox."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import silero_dir
from hostile_models import pt_zip_bomb
from onnx import TensorProto, helper, numpy_helper
from torch_models import hostile_checkpoint, save_state_dict
from worker_helpers import upload_dir

from kquant_job.inspect_model import inspect_path


def inspect(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "kquant_job.cli", "inspect", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180,
                          env=env if env is not None else dict(os.environ))  # fmt: skip


def all_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    found = []
    for node in graph.node:
        found.append(node)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                found += all_nodes(attr.g)
    return found


def test_an_onnx_report_holds_the_signature_ops_and_weights(silero_onnx):
    report = inspect_path(silero_onnx)
    (m,) = report["models"]
    model = onnx.load(silero_onnx)
    assert [i["name"] for i in m["inputs"]] == ["input", "state", "sr"]
    assert m["inputs"][2]["type"] == "INT64" and m["inputs"][1]["shape"][0] == 2
    nodes = all_nodes(model.graph)
    assert m["opTypes"] == dict(Counter(n.op_type for n in nodes))  # subgraphs counted
    assert m["subgraphs"] > 0 and m["nodesListed"] == len(nodes)
    # Silero's weights are Constant nodes, not initializers: they count as weights
    biggest = max(m["initializers"], key=lambda t: t["bytes"])
    assert biggest["constant"] and biggest["dtype"] == "float32" and biggest["min"] < 0
    assert m["precision"]["weights"] == "float32" and not m["precision"]["alreadyQuantized"]


def test_nodes_filter_by_op_type_and_by_name(silero_onnx):
    (m,) = inspect_path(silero_onnx, op_type="Pad")["models"]
    assert m["nodesListed"] == m["opTypes"]["Pad"] == len(m["nodes"])
    assert {n["opType"] for n in m["nodes"]} == {"Pad"}
    assert all(n["inputs"][0] == "input" for n in m["nodes"])
    (m,) = inspect_path(silero_onnx, name="decoder/rnn")["models"]
    assert m["nodes"] and all("decoder/rnn" in n["name"] for n in m["nodes"])
    assert "LSTM" in {n["opType"] for n in m["nodes"]}


def tiny(path: Path, weight: np.ndarray, op: str = "MatMul") -> Path:
    nodes = [helper.make_node(op, ["x", "w"], ["y"], name=f"the_{op.lower()}")]
    if op == "Range":
        nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
                 helper.make_node("ReduceSum", ["m"], ["s"], name="sum", keepdims=0),
                 helper.make_node("Range", ["s", "s", "s"], ["r"], name="the_range"),
                 helper.make_node("Identity", ["m"], ["y"], name="out")]  # fmt: skip
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(weight, "w")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_what_fp16_keeps_fp32_and_why(tmp_path):
    weight = np.eye(4, dtype=np.float32)
    weight[0, 0] = 1e6  # beyond FP16's largest finite value (65504)
    (m,) = inspect_path(tiny(tmp_path / "big.onnx", weight, "Range"))["models"]
    keeps = m["fp16KeepsFp32"]
    assert "Range" in keeps["opTypes"]  # in the default op block list
    assert "w" in keeps["initializers"] and "range" in keeps["initializers"]["w"]
    assert keeps["nodes"]


def test_already_quantized_and_already_fp16_models_are_recognised(tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.float16 import convert_float_to_float16

    weight = np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32)
    fp32 = tiny(tmp_path / "m.onnx", weight)
    quantize_dynamic(str(fp32), str(tmp_path / "m_int8.onnx"), weight_type=QuantType.QInt8)
    (q,) = inspect_path(tmp_path / "m_int8.onnx")["models"]
    assert q["precision"]["alreadyQuantized"]
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= set(q["precision"]["quantizedOps"])
    half = convert_float_to_float16(onnx.load(fp32), keep_io_types=True)
    onnx.save(half, tmp_path / "m_fp16.onnx")
    (h,) = inspect_path(tmp_path / "m_fp16.onnx")["models"]
    assert h["precision"]["weights"] == "float16" and h["precision"]["alreadyReduced"]
    assert not h["precision"]["alreadyQuantized"]


def test_torchscript_reports_forward_and_tensors():
    (m,) = inspect_path(silero_dir() / "silero_vad.jit")["models"]
    assert m["format"] == "torchscript" and m["resetStates"]
    assert [(a["name"], a["type"]) for a in m["forward"]] == [("x", "Tensor"), ("sr", "int")]
    module = torch.jit.load(str(silero_dir() / "silero_vad.jit"))
    expected = dict(module.named_parameters()) | dict(module.named_buffers())
    assert {t["name"] for t in m["tensors"]} == set(expected)
    one = next(t for t in m["tensors"] if t["name"] in expected)
    assert one["shape"] == list(expected[one["name"]].shape)


def test_state_dicts_and_safetensors_list_their_tensors(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8))
    path = save_state_dict(net, tmp_path / "model.pt")
    (m,) = inspect_path(path)["models"]
    assert m["format"] == "pytorch"
    assert {t["name"] for t in m["tensors"]} == set(net.state_dict())
    assert m["tensorsByDtype"] == {"float32": 6, "int64": 1}  # num_batches_tracked
    (s,) = inspect_path(silero_dir() / "silero_vad_16k.safetensors")["models"]
    assert s["format"] == "safetensors" and s["tensors"]


def test_a_folder_reports_every_model_and_its_other_files(tmp_path, silero_onnx):
    folder = tmp_path / "models"
    (folder / "asr").mkdir(parents=True)
    shutil.copy(silero_onnx, folder / "silero_vad.onnx")
    net = torch.nn.Linear(4, 4)
    save_state_dict(net, folder / "asr" / "model.pt")
    (folder / "asr" / "config.yaml").write_text("frontend: fbank\n")
    proc = inspect(str(folder), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert sorted(m["file"] for m in report["models"]) == ["asr/model.pt", "silero_vad.onnx"]
    assert report["otherFiles"] == ["asr/config.yaml"]


def test_an_output_prefix_is_reported_without_kquants_own_set_folders(tmp_path, silero_onnx):
    """Inspecting an output prefix listed each model twice: at its name and inside
    kquant's set folder (.kquant/sets/<id>/), of which the name holds a copy."""
    out = tmp_path / "out"
    inside = out / ".kquant" / "sets" / "20261207T000000Z-0a1b2c3d"
    inside.mkdir(parents=True)
    for where in (out, inside):
        shutil.copy(silero_onnx, where / "silero_vad_fp16.onnx")
    (inside / "set.json").write_text("{}")
    (out / "manifest.json").write_text("{}")
    proc = inspect(str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert [m["file"] for m in report["models"]] == ["silero_vad_fp16.onnx"]
    assert report["otherFiles"] == ["manifest.json"] and report["kquantFiles"] == 2
    human = inspect(str(out))
    assert "not listed: 2 files under .kquant/" in human.stdout


def test_the_human_report_names_the_signature_and_the_listed_nodes(silero_onnx):
    proc = inspect(str(silero_onnx), "--op-type", "LSTM")
    assert proc.returncode == 0, proc.stderr
    assert "input FLOAT" in proc.stdout and "sr INT64 []" in proc.stdout
    listed = [line for line in proc.stdout.splitlines() if line.strip().startswith("#")]
    assert listed and all(" LSTM " in line for line in listed)
    assert "sandbox: confined" in proc.stderr or "NOT confined" in proc.stderr
    misspelt = inspect(str(silero_onnx), "--op-type", "LTSM")
    assert misspelt.returncode == 0 and "nodes (0 listed)" in misspelt.stdout
    assert "no node matches; op types here: " in misspelt.stdout and "LSTM" in misspelt.stdout


def test_inspect_reads_from_s3(s3_server, bucket, tmp_path, silero_onnx, worker_env):
    folder = tmp_path / "up"
    folder.mkdir()
    shutil.copy(silero_onnx, folder / "silero_vad.onnx")
    upload_dir(s3_server.client(), bucket, "models/vad/", folder)
    env = {**worker_env}
    env.pop("AWS_ENDPOINT_URL", None)
    proc = inspect(f"s3://{bucket}/models/vad/", "--json", "--endpoint-url",
                   s3_server.endpoint, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (m,) = json.loads(proc.stdout)["models"]
    assert m["file"] == "silero_vad.onnx" and m["format"] == "onnx"
    missing = inspect(f"s3://{bucket}/models/none.onnx", "--endpoint-url", s3_server.endpoint,
                      env=env)  # fmt: skip
    assert missing.returncode == 20 and "SourceNotFound" in missing.stderr


def test_hostile_and_broken_files_end_in_their_reasons(tmp_path):
    marker = tmp_path / "pwned"
    bad = inspect(str(hostile_checkpoint(tmp_path / "evil.pt", marker)))
    assert bad.returncode == 30 and "UnsafeModel" in bad.stderr
    assert not marker.exists()
    bomb = inspect(str(pt_zip_bomb(tmp_path / "bomb.pt", 2 * 2**30)))
    assert bomb.returncode == 30 and "UnsafeModel" in bomb.stderr
    (tmp_path / "junk.onnx").write_bytes(b"\x08\x07garbage")
    junk = inspect(str(tmp_path / "junk.onnx"))
    assert junk.returncode == 30 and "CorruptModel" in junk.stderr
    (tmp_path / "notes.txt").write_text("hello")
    other = inspect(str(tmp_path / "notes.txt"))
    assert other.returncode == 30 and "UnsupportedFormat" in other.stderr


@pytest.mark.parametrize("flag", ["--json", "--nodes"])
def test_every_node_is_listed_on_request(silero_onnx, flag):
    proc = inspect(str(silero_onnx), flag)
    assert proc.returncode == 0, proc.stderr
    total = len(all_nodes(onnx.load(silero_onnx).graph))
    if flag == "--json":
        assert len(json.loads(proc.stdout)["models"][0]["nodes"]) == total
    else:
        assert sum(line.strip().startswith("#") for line in proc.stdout.splitlines()) == total


def test_a_local_model_is_read_where_it_lies(tmp_path, silero_onnx):
    """inspect copied a local model (or a whole folder) into its work directory first; a
    run reads it in place, read-only in the sandbox, and so does inspect now."""
    from kquant_job.preview import inspect_uri

    work = tmp_path / "work"
    report = inspect_uri(silero_onnx.as_uri(), work)
    assert [m["file"] for m in report["models"]] == ["silero_vad.onnx"]
    assert not (work / "source").exists() and not list(work.rglob("*.onnx"))


def test_an_fp16_model_is_not_advised_for_int8(tmp_path):
    """New-user trial: inspect said "INT8 still can" of an FP16 model, which an INT8 job
    refuses (AlreadyQuantized: onnxruntime's quantizers need the FP32 weights)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = tmp_path / "vad_fp16.onnx"
    src = onnx.load(str(silero_dir() / "silero_vad_16k_op15.onnx"))
    onnx.save(convert_float_to_float16(src, keep_io_types=True), str(model))
    out = inspect(str(model))
    assert out.returncode == 0, out.stderr
    assert "INT8 still can" not in out.stdout
    assert "INT8 needs the FP32 original" in out.stdout and "AlreadyQuantized" in out.stdout
