"""Converted models beside the originals (``spec.output.besideOriginals``): the users'
``quantize_fp16_models.py --models-dir models`` as one job, locally and on S3. New names
only; every original and every other file byte for byte as it was."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import silero_dir
from published import Prefix, read_set
from torch_models import save_state_dict
from worker_helpers import manifest, run_worker, upload_dir

HOME = ".kquant/beside-fp16/"
NEW = {
    "silero_vad_fp16.onnx",
    "silero_vad_fp16.pt",
    "SenseVoiceSmall_fp16/model.pt",
    "SenseVoiceSmall_fp16/config.json",
    "SenseVoiceSmall_fp16/tokenizer.json",
    "SenseVoiceSmall_fp16/vocab.txt",
}


def models_folder(root: Path) -> Path:
    """The users' models/ folder (their README's tree), plus a README and calibration
    samples of someone else's."""
    (root / "SenseVoiceSmall").mkdir(parents=True)
    (root / "calib").mkdir()
    shutil.copy(silero_dir() / "silero_vad.onnx", root / "silero_vad.onnx")
    shutil.copy(silero_dir() / "silero_vad.jit", root / "silero_vad.pt")
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32))
    save_state_dict(net, root / "SenseVoiceSmall" / "model.pt")
    (root / "SenseVoiceSmall" / "config.json").write_text('{"sample_rate": 16000}\n')
    (root / "SenseVoiceSmall" / "tokenizer.json").write_text('{"type": "BPE"}\n')
    (root / "SenseVoiceSmall" / "vocab.txt").write_text("<blank>\n<s>\n")
    (root / "README.md").write_text("our models\n")
    np.savez(root / "calib" / "0000.npz", input=np.zeros((1, 576), np.float32))
    return root


@pytest.fixture(params=["file", "s3"])
def place(request, tmp_path):
    """(models URI, reader of the folder, worker environment, spec storage endpoint)."""
    local = models_folder(tmp_path / "models")
    if request.param == "file":
        return f"file://{local}/", Prefix(root=local), None, None
    server = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("bucket")
    client = server.client()
    upload_dir(client, bucket, "models/", local)
    return (f"s3://{bucket}/models/", Prefix(client=client, bucket=bucket, key="models/"),
            request.getfixturevalue("worker_env"), server.endpoint)  # fmt: skip


def beside_job(uri: str, endpoint: str | None, precision: str = "fp16", name: str = "vad",
               output: str | None = None) -> dict:  # fmt: skip
    quantization: dict = {"precision": precision}
    if precision == "int8":
        # Silero's INT8 (only its LSTM quantized) runs 1.2-1.7x its FP32 latency, by CPU:
        # NoGain or not by machine; the naming is tested here (the verdict: test_worker_gain).
        quantization["requireGain"] = False
    doc = manifest(uri, output or uri, quantization, endpoint=endpoint, name=name)
    doc["spec"]["output"]["besideOriginals"] = True
    doc["spec"].pop("validation")
    return doc


def snapshot(p: Prefix) -> dict[str, bytes]:
    return {k: p.get(k) for k in p.all_keys() if not k.startswith(".kquant/")}


def test_converted_models_appear_beside_the_originals(place, tmp_path):
    uri, folder, env, endpoint = place
    before = snapshot(folder)
    run = run_worker(beside_job(uri, endpoint), tmp_path, env)
    assert run.code == 0, run.log
    after = snapshot(folder)
    assert {k: v for k, v in after.items() if k in before} == before  # originals untouched
    assert set(after) - set(before) == NEW  # new names only
    manifest_doc = read_set(folder, home=HOME)
    assert {a["name"] for a in manifest_doc["artifacts"]} == NEW
    assert manifest_doc["report"]["name"].startswith(HOME + "sets/")  # no report.json here
    assert run.result["manifestUri"] == uri + HOME + "manifest.json"
    # really FP16, and the side files copied byte for byte
    onnx_fp16 = onnx.load_from_string(after["silero_vad_fp16.onnx"])
    assert onnx_fp16.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in _all_tensors(onnx_fp16))
    state = torch.load(_tmp(tmp_path, after["SenseVoiceSmall_fp16/model.pt"]), weights_only=True)
    assert all(t.dtype == torch.float16 for t in state.values() if t.is_floating_point())
    for side in ("config.json", "tokenizer.json", "vocab.txt"):
        assert after[f"SenseVoiceSmall_fp16/{side}"] == before[f"SenseVoiceSmall/{side}"]
    report = json.loads(folder.get(manifest_doc["report"]["path"]))
    assert sorted(report["source"]["leftAlone"]) == ["README.md", "calib/0000.npz"]

    # A rerun reads the originals only (not its own outputs) and leaves the same names.
    run = run_worker(beside_job(uri, endpoint), tmp_path / "again", env)
    assert run.code == 0, run.log
    again = snapshot(folder)
    assert set(again) == set(after) and not [k for k in again if "_fp16_fp16" in k]
    assert {k: again[k] for k in before} == before
    assert read_set(folder, home=HOME)["set"] != manifest_doc["set"]


def test_fp16_and_int8_live_side_by_side(tmp_path):
    local = models_folder(tmp_path / "models")
    shutil.rmtree(local / "SenseVoiceSmall")
    (local / "silero_vad.pt").unlink()
    uri = f"file://{local}/"
    assert run_worker(beside_job(uri, None), tmp_path / "a").code == 0
    fp16 = snapshot(Prefix(root=local))
    run = run_worker(beside_job(uri, None, "int8", name="vad-int8"), tmp_path / "b")
    assert run.code == 0, run.log
    both = snapshot(Prefix(root=local))
    assert {k: both[k] for k in fp16} == fp16  # the FP16 names untouched
    assert set(both) - set(fp16) == {"silero_vad_int8.onnx"}
    read_set(Prefix(root=local), home=HOME)
    read_set(Prefix(root=local), home=".kquant/beside-int8/")


def test_a_hand_made_conversion_is_never_replaced(tmp_path):
    local = models_folder(tmp_path / "models")
    (local / "silero_vad_fp16.onnx").write_bytes(b"made by hand last year")
    before = snapshot(Prefix(root=local))
    uri = f"file://{local}/"
    dry = run_worker(beside_job(uri, None), tmp_path / "dry", extra_args=("--dry-run",))
    assert dry.code == 20 and "ForeignObject" in dry.log and "silero_vad_fp16.onnx" in dry.log
    run = run_worker(beside_job(uri, None), tmp_path / "run")
    assert run.code == 20 and run.result["reason"] == "ForeignObject", run.log
    assert snapshot(Prefix(root=local)) == before  # nothing new outside .kquant/
    assert run.result["reportUri"].startswith(uri + HOME + "sets/")


def test_a_foreign_file_in_a_model_folder_output_is_refused(tmp_path):
    local = models_folder(tmp_path / "models")
    (local / "SenseVoiceSmall_fp16").mkdir()
    (local / "SenseVoiceSmall_fp16" / "extra.txt").write_text("someone's")
    before = snapshot(Prefix(root=local))
    run = run_worker(beside_job(f"file://{local}/", None), tmp_path)
    assert run.code == 20 and run.result["reason"] == "ForeignObject", run.log
    assert "SenseVoiceSmall_fp16/" in run.result["message"]
    assert "convert: start" not in run.log  # found while planning, nothing converted
    assert snapshot(Prefix(root=local)) == before


def test_a_single_model_file_beside_its_original(tmp_path):
    local = models_folder(tmp_path / "models")
    before = snapshot(Prefix(root=local))
    job = beside_job(f"file://{local}/silero_vad.onnx", None, output=f"file://{local}/")
    run = run_worker(job, tmp_path)
    assert run.code == 0, run.log
    after = snapshot(Prefix(root=local))
    assert set(after) - set(before) == {"silero_vad_fp16.onnx"}


def test_the_output_must_be_the_models_own_folder(tmp_path):
    local = models_folder(tmp_path / "models")
    job = beside_job(f"file://{local}/", None, output=f"file://{tmp_path}/elsewhere/")
    run = run_worker(job, tmp_path)
    assert run.code == 10 and "besideOriginals" in run.result["message"]
    assert not (tmp_path / "elsewhere").exists()


def _all_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    found, graphs = [], [model.graph]
    while graphs:
        graph = graphs.pop()
        found += list(graph.initializer)
        for node in graph.node:
            found += [a.t for a in node.attribute if a.HasField("t")]
            graphs += [a.g for a in node.attribute if a.HasField("g")]
    return found


def _tmp(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "loaded.pt"
    path.write_bytes(data)
    return path


def test_a_user_file_named_like_an_unfinished_write_is_never_removed(tmp_path):
    """A file of the users' that merely ends in kquant's suffix for unfinished writes
    (``.kquant-part``), an hour old, deep in the models folder: before, a run beside the
    originals reclaimed it as an upload of its own and deleted it."""
    import os
    import time

    local = models_folder(tmp_path / "models")
    notes = local / "keep" / "notes.kquant-part"
    notes.parent.mkdir()
    notes.write_text("the users' own notes")
    old = time.time() - 7200
    os.utime(notes, (old, old))
    run = run_worker(beside_job(f"file://{local}/", None), tmp_path / "run")
    assert (run.code, run.result["reason"]) == (20, "UnsafePath"), run.log
    assert (
        "keep/notes.kquant-part" in run.result["message"] and "rename it" in run.result["message"]
    )
    assert notes.read_text() == "the users' own notes"
    assert "reclaimed" not in run.log


def test_an_output_beside_the_originals_is_rolled_back_by_its_folder(tmp_path):
    """Trial: ``rollback models/`` said it held no manifest, and ``rollback
    models/.kquant/beside-fp16/`` that it held no earlier set, with two kept."""
    import subprocess
    import sys

    local = models_folder(tmp_path / "models")
    shutil.rmtree(local / "SenseVoiceSmall")
    uri = f"file://{local}/"
    assert run_worker(beside_job(uri, None), tmp_path / "a").code == 0
    first = read_set(Prefix(root=local), home=HOME)["set"]
    assert run_worker(beside_job(uri, None), tmp_path / "b").code == 0
    before = snapshot(Prefix(root=local))
    cmd = [sys.executable, "-m", "kquant_job.cli", "rollback", uri + HOME]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert f"set {first} is current again" in run.stdout
    assert read_set(Prefix(root=local), home=HOME)["set"] == first
    assert snapshot(Prefix(root=local)) == before  # originals and (equal) copies untouched
    plain = subprocess.run([*cmd[:-1], uri], capture_output=True, text=True, timeout=120)
    assert plain.returncode != 0 and ".kquant/beside-<name>/" in plain.stderr
