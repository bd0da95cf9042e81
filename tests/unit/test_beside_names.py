"""Output names beside the originals: which folders are models, which files get a sibling."""

from __future__ import annotations

import pytest
from onnx import TensorProto, helper

from kquant_api import ModelFormat
from kquant_job.beside import looks_converted, plan_names
from kquant_job.formats import ModelFile, Plan


def plan(models: list[str], copies: list[str], kept: dict[str, str] | None = None,
         external: dict[str, list[str]] | None = None) -> Plan:  # fmt: skip
    files = [ModelFile(m, ModelFormat.pytorch, (external or {}).get(m, [])) for m in models]
    data = sorted(e for ext in (external or {}).values() for e in ext)
    return Plan(root=None, models=files, copies=copies, external_data=data,  # type: ignore[arg-type]
                kept=kept or {})  # fmt: skip


def test_the_users_models_folder():
    # models/ of the users' quantize_fp16_models.py --models-dir models
    p = plan(
        ["silero_vad.onnx", "silero_vad.pt", "SenseVoiceSmall/model.pt"],
        ["SenseVoiceSmall/config.json", "SenseVoiceSmall/tokenizer.json",
         "SenseVoiceSmall/vocab.txt", "README.md"],
    )  # fmt: skip
    names = plan_names(p, "fp16", single_file=False, beside=True)
    assert names.models == {
        "silero_vad.onnx": "silero_vad_fp16.onnx",
        "silero_vad.pt": "silero_vad_fp16.pt",
        "SenseVoiceSmall/model.pt": "SenseVoiceSmall_fp16/model.pt",
    }
    assert names.copies == {
        f"SenseVoiceSmall/{f}": f"SenseVoiceSmall_fp16/{f}"
        for f in ("config.json", "tokenizer.json", "vocab.txt")
    }
    assert names.left == ["README.md"] and names.folders == ["SenseVoiceSmall_fp16/"]


def test_grouping_folders_keep_models_beside_their_originals():
    p = plan(
        ["vad/silero_vad.onnx", "vad/silero_vad.jit", "asr/SenseVoice/model.pt"],
        ["asr/SenseVoice/am.mvn", "asr/notes.txt", "calib/0.npz"],
    )
    names = plan_names(p, "int8", single_file=False, beside=True)
    assert names.models == {
        "vad/silero_vad.onnx": "vad/silero_vad_int8.onnx",  # vad/ holds only models
        "vad/silero_vad.jit": "vad/silero_vad_int8.jit",
        "asr/SenseVoice/model.pt": "asr/SenseVoice_int8/model.pt",
    }
    assert names.copies == {"asr/SenseVoice/am.mvn": "asr/SenseVoice_int8/am.mvn"}
    assert names.left == ["asr/notes.txt", "calib/0.npz"]
    assert names.folders == ["asr/SenseVoice_int8/"]


def test_a_model_folder_takes_its_sub_folders_and_kept_files_along():
    p = plan(
        ["CosyVoice2/llm.pt", "CosyVoice2/flow.pt", "CosyVoice2/CosyVoice-BlankEN/model.pt"],
        ["CosyVoice2/hift.pt", "CosyVoice2/CosyVoice-BlankEN/config.json", "hift.pt"],
        kept={"CosyVoice2/hift.pt": "excluded", "hift.pt": "excluded"},
    )
    names = plan_names(p, "fp16", single_file=False, beside=True)
    assert names.folders == ["CosyVoice2_fp16/"]
    assert names.models["CosyVoice2/CosyVoice-BlankEN/model.pt"] == (
        "CosyVoice2_fp16/CosyVoice-BlankEN/model.pt"
    )
    assert names.copies["CosyVoice2/hift.pt"] == "CosyVoice2_fp16/hift.pt"  # kept, copied
    assert names.left == ["hift.pt"]  # a kept model on its own is left where it is


def test_external_data_does_not_make_a_folder_a_model_folder():
    p = plan(["enc/encoder.onnx"], [], external={"enc/encoder.onnx": ["enc/encoder.onnx.data"]})
    names = plan_names(p, "fp16", single_file=False, beside=True)
    assert names.models == {"enc/encoder.onnx": "enc/encoder_fp16.onnx"} and not names.folders


def test_the_usual_layout_is_unchanged():
    p = plan(["a/model.pt"], ["a/config.yaml"])
    names = plan_names(p, "fp16", single_file=False, beside=False)
    assert names.models == {"a/model.pt": "a/model.pt"}
    assert names.copies == {"a/config.yaml": "a/config.yaml"} and not names.left
    single = plan_names(plan(["vad.onnx"], []), "bf16", single_file=True, beside=False)
    assert single.models == {"vad.onnx": "vad_bf16.onnx"}


@pytest.mark.parametrize(
    ("key", "converted"),
    [
        ("silero_vad_fp16.onnx", True),
        ("silero_vad_fp16.onnx.data", True),
        ("SenseVoiceSmall_fp16/config.json", True),
        ("asr/SenseVoice_int8/model.pt", True),
        ("m_bf16.pt", True),
        (".kquant/beside-fp16/manifest.json", True),
        ("silero_vad.onnx", False),
        ("fp16/model.onnx", False),  # a folder named fp16 is not a conversion's name
        ("model_fp16x.onnx", False),
        ("SenseVoiceSmall/config.json", False),
    ],
)
def test_earlier_outputs_are_not_originals(key, converted):
    assert looks_converted(key) is converted


def test_plan_names_on_a_real_plan(tmp_path):
    from kquant_job.formats import plan_model

    root = tmp_path / "models"
    (root / "SenseVoiceSmall").mkdir(parents=True)
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )  # fmt: skip
    (root / "vad.onnx").write_bytes(helper.make_model(graph).SerializeToString())
    (root / "SenseVoiceSmall" / "model.onnx").write_bytes(
        helper.make_model(graph).SerializeToString()
    )
    (root / "SenseVoiceSmall" / "tokens.json").write_text("[]")
    (root / "README.md").write_text("models")
    names = plan_names(plan_model(root), "fp16", single_file=False, beside=True)
    assert names.models == {
        "vad.onnx": "vad_fp16.onnx",
        "SenseVoiceSmall/model.onnx": "SenseVoiceSmall_fp16/model.onnx",
    }
    assert names.copies == {"SenseVoiceSmall/tokens.json": "SenseVoiceSmall_fp16/tokens.json"}
    assert names.left == ["README.md"]


def test_a_folder_whose_every_model_is_kept_gets_no_converted_name():
    """New-user trial: ``exclude: ["*.pt"]`` published ``SenseVoiceSmall_int8/`` holding the
    FP32 ``model.pt`` unchanged: a service preferring ``_int8`` loaded FP32 unawares."""
    p = plan(
        ["silero_vad.onnx"],
        ["SenseVoiceSmall/model.pt", "SenseVoiceSmall/config.json", "silero_vad.pt"],
        kept={"SenseVoiceSmall/model.pt": "excluded", "silero_vad.pt": "excluded"},
    )
    names = plan_names(p, "int8", single_file=False, beside=True)
    assert names.models == {"silero_vad.onnx": "silero_vad_int8.onnx"}
    assert names.folders == [] and names.copies == {}
    assert names.left == ["SenseVoiceSmall/config.json", "SenseVoiceSmall/model.pt",
                          "silero_vad.pt"]  # fmt: skip
