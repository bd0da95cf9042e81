"""Hugging Face folders are recognised from config.json and their weight files, without
importing anything; int8 and int4 take them as one model exported to ONNX, fp16 keeps the
safetensors cast; what kquant will not rebuild is refused with the reason."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from kquant_api import ModelFormat, Reason
from kquant_job.beside import plan_names
from kquant_job.errors import PassError
from kquant_job.formats import plan_model
from kquant_job.hf_folder import read_hf_folder


def _folder(tmp_path: Path, config: dict | None = None, weights: str = "safetensors") -> Path:
    root = tmp_path / "hf"
    root.mkdir()
    cfg = {"architectures": ["Wav2Vec2ForCTC"], "model_type": "wav2vec2"}
    (root / "config.json").write_text(json.dumps(cfg if config is None else config))
    (root / "preprocessor_config.json").write_text("{}")
    tensors = {"w": np.ones((4, 4), np.float32)}
    if weights == "safetensors":
        save_file(tensors, str(root / "model.safetensors"))
    elif weights == "sharded":
        save_file(tensors, str(root / "model-00001-of-00002.safetensors"))
        save_file({"v": np.ones(4, np.float32)}, str(root / "model-00002-of-00002.safetensors"))
        index = {"weight_map": {"w": "model-00001-of-00002.safetensors",
                                "v": "model-00002-of-00002.safetensors"}}  # fmt: skip
        (root / "model.safetensors.index.json").write_text(json.dumps(index))
    elif weights == "pickled":
        (root / "pytorch_model.bin").write_bytes(b"\x80\x04N.")
    return root


def test_a_saved_folder_is_one_model_exported_to_onnx_for_int8(tmp_path: Path) -> None:
    root = _folder(tmp_path)
    (root / "pytorch_model.bin").write_bytes(b"\x80\x04N.")  # the same weights, pickled
    hf = read_hf_folder(root)
    assert hf is not None and hf.refusal is None
    assert (hf.architecture, hf.model_type, hf.weights) == (
        "Wav2Vec2ForCTC",
        "wav2vec2",
        ["model.safetensors"],
    )
    plan = plan_model(root, ModelFormat.auto, needs_code=True)
    assert [(m.rel, m.format) for m in plan.models] == [
        ("model.safetensors", ModelFormat.transformers)
    ]
    assert plan.copies == ["config.json", "preprocessor_config.json"]
    assert plan.external_data == ["pytorch_model.bin"]  # replaced by the export, not copied
    names = plan_names(plan, "int8", single_file=False, beside=False)
    assert names.models == {"model.safetensors": "model.onnx"}
    beside = plan_names(plan, "int8", single_file=False, beside=True)
    assert beside.models == {"model.safetensors": "model_int8.onnx"}


def test_fp16_keeps_the_safetensors_cast_unless_transformers_is_declared(tmp_path: Path) -> None:
    root = _folder(tmp_path)
    plan = plan_model(root, ModelFormat.auto, needs_code=False)
    assert [(m.rel, m.format) for m in plan.models] == [
        ("model.safetensors", ModelFormat.safetensors)
    ]
    declared = plan_model(root, ModelFormat.transformers, needs_code=False)
    assert declared.models[0].format is ModelFormat.transformers


def test_shards_are_one_model(tmp_path: Path) -> None:
    root = _folder(tmp_path, weights="sharded")
    plan = plan_model(root, ModelFormat.auto, needs_code=True)
    model = plan.models[0]
    assert model.rel == "model-00001-of-00002.safetensors"
    assert model.external == ["model.safetensors.index.json", "model-00002-of-00002.safetensors"]
    assert plan.copies == ["config.json", "preprocessor_config.json"]


@pytest.mark.parametrize(
    ("config", "weights", "words"),
    [
        ({"architectures": ["X"], "auto_map": {"AutoModel": "m.X"}}, "safetensors",
         "trust_remote_code"),
        ({"architectures": ["A", "B"]}, "safetensors", "exactly one transformers class"),
        ({"architectures": ["WhisperForConditionalGeneration"], "is_encoder_decoder": True},
         "safetensors", "encoder-decoder"),
        ({"architectures": ["Wav2Vec2ForCTC"]}, "pickled", "safetensors only"),
        ({"architectures": ["Wav2Vec2ForCTC"]}, "none", "no weights"),
    ],
)  # fmt: skip
def test_what_kquant_will_not_rebuild_is_refused_with_the_reason(
    tmp_path: Path, config: dict, weights: str, words: str
) -> None:
    root = _folder(tmp_path, config, weights)
    with pytest.raises(PassError) as err:
        plan_model(root, ModelFormat.auto, needs_code=True)
    assert err.value.reason is Reason.UnsupportedFormat
    assert words in str(err.value)


def test_a_shard_outside_the_folder_is_refused(tmp_path: Path) -> None:
    root = _folder(tmp_path, weights="sharded")
    index = {"weight_map": {"w": "../model-00001-of-00002.safetensors"}}
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(PassError, match="not a file of the folder"):
        plan_model(root, ModelFormat.auto, needs_code=True)


def test_other_folders_plan_as_before(tmp_path: Path) -> None:
    root = _folder(tmp_path, {"vocab": 3})  # a config.json without architectures
    assert read_hf_folder(root) is None
    plan = plan_model(root, ModelFormat.auto, needs_code=True)
    assert plan.models[0].format is ModelFormat.safetensors
    with pytest.raises(PassError, match="no Hugging Face folder") as err:
        plan_model(root, ModelFormat.transformers)
    assert err.value.reason is Reason.UnsupportedFormat
    (root / "config.json").write_text("{not json")
    assert read_hf_folder(root) is None


@pytest.mark.parametrize(
    "text",
    [
        '{"architectures": ["BertModel"], "hidden_size": ' + "9" * 5000 + "}",
        '{"architectures": ["BertModel"], "x": ' + "[" * 100_000 + "]" * 100_000 + "}",
    ],
    ids=["integer-of-5000-digits", "nesting-100000-deep"],
)
def test_a_config_python_cannot_parse_is_no_hugging_face_folder(tmp_path: Path, text: str) -> None:
    """Trial: ValueError (int digits limit) and RecursionError were InternalErrors."""
    root = _folder(tmp_path)
    (root / "config.json").write_text(text)
    assert read_hf_folder(root) is None
    with pytest.raises(PassError, match="no Hugging Face folder") as err:
        plan_model(root, ModelFormat.transformers)
    assert err.value.reason is Reason.UnsupportedFormat


def test_a_shard_index_python_cannot_parse_is_refused(tmp_path: Path) -> None:
    root = _folder(tmp_path, weights="sharded")
    (root / "model.safetensors.index.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(PassError, match="is unusable") as err:
        plan_model(root, ModelFormat.auto, needs_code=True)
    assert err.value.reason is Reason.UnsupportedFormat
