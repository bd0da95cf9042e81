"""The QuantizationJob spec: defaults, unknown fields and impossible combinations."""

from __future__ import annotations

import copy

import pytest

from kquant_api import DEFAULT_TOLERANCE, Int8Mode, Precision, QuantizationJob
from kquant_job.errors import InvalidSpec
from kquant_job.manifest import load_jobs, parse_job

BASE = {
    "apiVersion": "kquant.io/v1alpha1",
    "kind": "QuantizationJob",
    "metadata": {"name": "vad"},
    "spec": {
        "model": {"uri": "s3://models/vad/silero_vad.onnx"},
        "output": {"uri": "s3://models/vad-fp16/"},
        "quantization": {"precision": "fp16"},
    },
}


def job(**quantization) -> dict:
    doc = copy.deepcopy(BASE)
    doc["spec"]["quantization"].update(quantization)
    return doc


def test_minimal_fp16_job_gets_documented_defaults():
    parsed = QuantizationJob.model_validate(job())
    q = parsed.spec.quantization
    assert q.precision is Precision.fp16
    assert parsed.spec.validation.enabled
    assert parsed.spec.tolerance == DEFAULT_TOLERANCE[Precision.fp16]
    assert q.int8_mode is Int8Mode.dynamic
    assert parsed.spec.output.overwrite is False


@pytest.mark.parametrize(
    ("quantization", "field"),
    [
        ({"activationType": "QInt8"}, "spec.quantization.activationType"),
        ({"perChannel": True}, "spec.quantization.perChannel"),
        ({"precision": "int8", "keepIoTypes": True}, "spec.quantization.keepIoTypes"),
        ({"precision": "int8", "activationType": "QInt8"}, "spec.quantization.activationType"),
        (
            {"precision": "int8", "mode": "dynamic", "quantFormat": "QDQ"},
            "spec.quantization.quantFormat",
        ),
        ({"precision": "int8", "mode": "static"}, "spec.quantization.calibration"),
        ({"keepIOTypes": True}, "spec.quantization.keepIOTypes"),
        ({"precision": "fp8"}, "spec.quantization.precision"),
        ({"precision": "int8", "weightType": "QInt4"}, "spec.quantization.weightType"),
    ],
)
def test_impossible_or_unknown_settings_are_rejected_naming_the_field(quantization, field):
    with pytest.raises(InvalidSpec) as err:
        parse_job(job(**quantization))
    assert field in str(err.value)


@pytest.mark.parametrize(
    ("path", "value", "needle"),
    [
        (("model", "uri"), "gs://bucket/model.onnx", "unsupported scheme 'gs'"),
        (("output", "uri"), "s3:///no-bucket/", "names no bucket"),
        (("output", "uri"), "s3://models/vad/silero_vad.onnx", "names a model file"),
        (("output", "uri"), "s3://models/vad/silero_vad.onnx/", "overlaps spec.model.uri"),
        (("output", "uri"), "s3://models/", "spec.output.uri: overlaps spec.model.uri"),
        (("validation",), {"tolerance": {"maxAbsError": -1}}, "maxAbsError"),
        (("validation",), {"samples": 0}, "samples"),
        (("promotion",), {"uri": "s3://models/vad-fp16/"}, "overlaps spec.output.uri"),
        (("promotion",), {"uri": "s3://models"}, "spec.promotion.uri: overlaps spec.model.uri"),
    ],
)
def test_bad_values_are_rejected(path, value, needle):
    doc = copy.deepcopy(BASE)
    target = doc["spec"]
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(InvalidSpec) as err:
        parse_job(doc)
    assert needle in str(err.value)


def test_promotion_needs_validation():
    doc = copy.deepcopy(BASE)
    doc["spec"]["validation"] = {"enabled": False}
    doc["spec"]["promotion"] = {"uri": "s3://models/prod/"}
    with pytest.raises(InvalidSpec, match="validated set"):
        parse_job(doc)


def test_static_int8_job_accepts_its_knobs():
    parsed = parse_job(
        job(
            precision="int8",
            mode="static",
            quantFormat="QOperator",
            activationType="QUInt8",
            calibration={"uri": "s3://d/calib/", "calibrateMethod": "Entropy", "samples": 8},
        )
    )
    q = parsed.spec.quantization
    assert q.quantFormat.value == "QOperator"
    assert q.calibration.calibrateMethod.value == "Entropy"
    assert parsed.spec.tolerance == DEFAULT_TOLERANCE[Precision.int8]


def test_multi_document_manifest_runs_jobs_in_order_and_skips_other_kinds(tmp_path):
    import yaml

    second = job()
    second["metadata"]["name"] = "vad-2"
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3"}}
    path = tmp_path / "jobs.yaml"
    path.write_text(yaml.safe_dump_all([job(), secret, second]))
    assert [j.metadata.name for j in load_jobs(str(path))] == ["vad", "vad-2"]


def test_manifest_errors_are_invalid_spec(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("spec: [unclosed")
    with pytest.raises(InvalidSpec, match="not valid YAML"):
        load_jobs(str(bad))
    with pytest.raises(InvalidSpec, match="cannot read manifest"):
        load_jobs(str(tmp_path / "missing.yaml"))
    other = tmp_path / "other.yaml"
    other.write_text("apiVersion: v1\nkind: ConfigMap\n")
    with pytest.raises(InvalidSpec, match="no QuantizationJob"):
        load_jobs(str(other))


def test_spec_from_environment(monkeypatch):
    import json

    monkeypatch.setenv("KQUANT_JOB", json.dumps(job()))
    assert load_jobs("-", spec_env="KQUANT_JOB")[0].metadata.name == "vad"
    monkeypatch.setenv("KQUANT_JOB", "")
    with pytest.raises(InvalidSpec, match="empty or unset"):
        load_jobs("-", spec_env="KQUANT_JOB")


def test_strict_and_repair_contradict():
    with pytest.raises(InvalidSpec, match=r"spec\.quantization\.repair: repair true contradicts"):
        parse_job(job(precision="fp16", strict=True, repair=True))
    assert parse_job(job(precision="int8", strict=True)).spec.quantization.strict is True


@pytest.mark.parametrize(
    ("model", "output", "error"),
    [
        ("s3://models/vad/silero_vad.onnx", "s3://models/vad/", None),
        ("s3://models/vad/silero_vad.onnx", "s3://models/vad", None),
        ("s3://models/speech/", "s3://models/speech/", None),
        ("file:///srv/models/", "file:///srv/./models/", None),
        ("s3://models/vad/silero_vad.onnx", "s3://models/", "the model's own folder"),
        ("s3://models/speech/", "s3://models/speech/vad/", "the model's own folder"),
        ("s3://models/speech/", "s3://other/speech/", "the model's own folder"),
    ],
)
def test_beside_the_originals_writes_into_the_models_own_folder(model, output, error):
    doc = copy.deepcopy(BASE)
    doc["spec"]["model"]["uri"] = model
    doc["spec"]["output"] = {"uri": output, "besideOriginals": True}
    if error is None:
        assert parse_job(doc).spec.output.besideOriginals
        return
    with pytest.raises(InvalidSpec) as err:
        parse_job(doc)
    assert error in str(err.value) and "besideOriginals" in str(err.value)


def test_beside_the_originals_still_keeps_promotion_and_data_apart():
    doc = copy.deepcopy(BASE)
    doc["spec"]["model"]["uri"] = "s3://models/speech/"
    doc["spec"]["output"] = {"uri": "s3://models/speech/", "besideOriginals": True}
    doc["spec"]["promotion"] = {"uri": "s3://models/speech/prod/"}
    with pytest.raises(InvalidSpec, match=r"spec\.promotion\.uri: overlaps spec\.model\.uri"):
        parse_job(doc)
    del doc["spec"]["promotion"]
    doc["spec"]["validation"] = {"dataUri": "s3://models/speech/calib/"}
    with pytest.raises(InvalidSpec, match=r"spec\.output\.uri: overlaps spec\.validation\.dataUri"):
        parse_job(doc)


def with_variants(variants: list, **spec) -> dict:
    doc = copy.deepcopy(BASE)
    del doc["spec"]["quantization"]
    doc["spec"]["variants"] = variants
    doc["spec"].update(spec)
    return doc


CALIB = {"uri": "s3://datasets/calib/"}


def test_variants_get_default_names_and_their_own_tolerances():
    parsed = QuantizationJob.model_validate(with_variants([
        {"precision": "fp16"}, {"precision": "int8"},
        {"precision": "int8", "mode": "static", "calibration": CALIB}, {"precision": "int8",
         "name": "int8_pc", "perChannel": True},
    ]))  # fmt: skip
    assert [v.label for v in parsed.spec.conversions] == ["fp16", "int8", "int8_static", "int8_pc"]
    assert parsed.spec.selection is None and parsed.spec.quantization is None
    assert "spec.variants[2].calibration.uri" in parsed.spec.read_uris()
    from kquant_job.variants import variant_jobs

    jobs = dict(variant_jobs(parsed))
    assert jobs["int8_static"].spec.quantization.calibration.uri == CALIB["uri"]
    assert jobs["int8"].spec.tolerance == DEFAULT_TOLERANCE[Precision.int8]
    assert jobs["fp16"].spec.tolerance == DEFAULT_TOLERANCE[Precision.fp16]
    assert all(j.spec.variants is None for j in jobs.values())


@pytest.mark.parametrize(
    ("doc", "needle"),
    [
        (with_variants([{"precision": "int8"}, {"precision": "int8", "perChannel": True}]),
         "spec.variants: the name 'int8' is given to more than one variant"),
        (with_variants([{"precision": "fp16", "name": "a"}, {"precision": "int8", "name": "a"}]),
         "the name 'a' is given to more than one variant"),
        (with_variants([{"precision": "fp16"}], quantization={"precision": "fp16"}),
         "exactly one of them"),
        (with_variants([{"precision": "fp16"}], selection={"objective": "cheapest"}),
         "selection.objective"),
        (with_variants([{"precision": "fp16"}], selection={"objective": "fastest"},
                       validation={"enabled": False}),
         "spec.selection.objective: fastest is measured by validation"),
        (with_variants([{"precision": "int8", "mode": "static"}]),
         "spec.variants[0].calibration: required with mode static"),
        (with_variants([{"precision": "fp16", "weightType": "QInt8"}]),
         "spec.variants[0].weightType: int8 setting given with precision fp16"),
        (with_variants([{"precision": "fp16", "name": "FP16!"}]), "String should match pattern"),
        (with_variants([{"precision": "fp16"}] * 9), "at most 8 items"),
        (with_variants([{"precision": "int8", "calibration": {"uri": "s3://models/vad-fp16/c/"},
                         "mode": "static"}]),
         "spec.output.uri: overlaps spec.variants[0].calibration.uri"),
    ],
)  # fmt: skip
def test_bad_variants_are_rejected_naming_the_variant(doc: dict, needle: str):
    with pytest.raises(InvalidSpec) as info:
        parse_job(doc)
    assert needle in str(info.value)


def test_selection_needs_variants_and_neither_conversion_is_refused():
    doc = job()
    doc["spec"]["selection"] = {"objective": "fastest"}
    with pytest.raises(InvalidSpec, match=r"spec\.selection: only with spec\.variants"):
        parse_job(doc)
    doc = job()
    del doc["spec"]["quantization"]
    with pytest.raises(InvalidSpec, match="exactly one of them"):
        parse_job(doc)


def test_variants_beside_the_originals_are_refused():
    doc = with_variants([{"precision": "fp16"}, {"precision": "int8"}])
    doc["spec"]["output"] = {"uri": "s3://models/vad/", "besideOriginals": True}
    with pytest.raises(InvalidSpec, match=r"not supported with spec\.output\.besideOriginals"):
        parse_job(doc)


def test_int4_names_follow_transformers_js_and_refuse_foreign_knobs():
    from kquant_api import QuantizationConfig

    assert QuantizationConfig(precision="int4").label == "q4"
    assert QuantizationConfig(precision="int4", floatPrecision="fp16").label == "q4f16"
    parsed = QuantizationJob.model_validate(
        with_variants([{"precision": "int4"}, {"precision": "int4", "floatPrecision": "fp16"}])
    )
    assert [v.label for v in parsed.spec.conversions] == ["q4", "q4f16"]
    given = "setting given with precision"
    for knobs, needle in [
        ({"precision": "int8", "blockSize": 32}, f"blockSize: int4 {given} int8"),
        ({"precision": "int4", "perChannel": True}, f"perChannel: int8 {given} int4"),
        ({"precision": "int4", "keepFp32": []}, f"keepFp32: fp16/bf16 {given} int4"),
        ({"precision": "int4", "blockSize": 48}, "48 is not a power of two"),
        ({"precision": "int4", "accuracyLevel": 5}, "accuracyLevel"),
    ]:  # fmt: skip
        with pytest.raises(InvalidSpec) as info:
            parse_job(job(**knobs))
        assert needle in str(info.value), knobs


def test_equal_sizes_go_to_the_earlier_variant_whatever_their_latency():
    """Variants trial: two FP16 variants of one size were told apart by measured latency,
    so reruns of an unchanged job promoted a, b, b, b: what production read was renamed."""
    from kquant_api import Objective
    from kquant_api.result import LatencyMs, VariantResult
    from kquant_job.variants import VariantOutcome, choose

    def outcome(name: str, latency: float, size: int = 1000) -> VariantOutcome:
        return VariantOutcome(VariantResult(
            name=name, precision="fp16", passed=True, reason="Validated", quantizedBytes=size,
            latencyMs=LatencyMs(original=1.0, quantized=latency)))  # fmt: skip

    a, b = outcome("a", 1.3), outcome("b", 1.1)
    assert choose([a, b], Objective.smallest) is a
    assert choose([b, a], Objective.smallest) is b
    assert choose([a, b, outcome("c", 2.0, size=999)], Objective.smallest).entry.name == "c"
    assert choose([a, b], Objective.fastest) is b


def test_a_variants_field_is_named_as_the_other_messages_name_it():
    """Variants trial: ``spec.variants.0.name`` beside ``spec.variants[0].calibration``."""
    with pytest.raises(InvalidSpec, match=r"spec\.variants\[0\]\.name: String should match"):
        parse_job(with_variants([{"precision": "fp16", "name": "FP16!"}]))
