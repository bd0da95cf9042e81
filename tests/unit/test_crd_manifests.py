"""Manifests against the QuantizationJob CRD and the worker: every example is admitted, every
invalid fixture and every CEL rule rejects with the same words as the worker's pydantic model
(kquant_job.manifest.parse_job), so ``kubectl apply`` and ``kquant-job run`` agree.

The API server is stood in for by tests/unit/crd_apiserver.py (null pruning, defaults, JSON
schema validation with jsonschema, CEL rules with cel-python).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml
from crd_apiserver import ROOT, admit, load_schema, rules

from kquant_api.crd import URI_FIELDS
from kquant_api.spec import (
    _FLOAT_FIELDS,
    _FP16_FIELDS,
    _INT4_FIELDS,
    _INT8_FIELDS,
    _STATIC_FIELDS,
)
from kquant_job.errors import InvalidSpec
from kquant_job.manifest import parse_job

SCHEMA = load_schema()
INVALID = sorted((ROOT / "tests" / "fixtures" / "invalid").glob("*.yaml"))
EXAMPLES = [
    pytest.param(doc, id=f"{path.relative_to(ROOT)}#{i}")
    for path in sorted((ROOT / "examples").rglob("*.yaml"))
    for i, doc in enumerate(yaml.safe_load_all(path.read_text(encoding="utf-8")))
    if isinstance(doc, dict) and doc.get("kind") == "QuantizationJob"
]
BASE: dict[str, Any] = {
    "apiVersion": "kquant.io/v1alpha1",
    "kind": "QuantizationJob",
    "metadata": {"name": "vad", "namespace": "speech"},
    "spec": {
        "model": {"uri": "s3://models/vad/silero_vad.onnx"},
        "output": {"uri": "s3://models/vad-out/"},
        "quantization": {"precision": "fp16"},
    },
}
KNOBS: dict[str, Any] = {
    "mode": "static",
    "extraOptions": {"WeightSymmetric": True},
    "preprocess": "never",
    "replaceOpBlockList": True,
    "weightType": "QInt8",
    "activationType": "QUInt8",
    "quantFormat": "QOperator",
    "perChannel": True,
    "reduceRange": True,
    "opTypesToQuantize": ["MatMul"],
    "nodesToExclude": ["n0"],
    "requireGain": False,
    "blockSize": 64,
    "symmetric": False,
    "accuracyLevel": 4,
    "algorithm": "hqq",
    "floatPrecision": "fp16",
    "calibration": {"uri": "s3://datasets/calib/", "samples": 8},
    "keepIoTypes": False,
    "opBlockList": ["Resize"],
    "nodeBlockList": ["n0"],
    "repair": False,
    "keepFp32": ["*.norm.*"],
}


def job(quantization: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    doc = copy.deepcopy(BASE)
    doc["spec"]["quantization"] = quantization or {"precision": "fp16"}
    doc["spec"].update(spec)
    return doc


def with_uri(dotted: str, uri: str) -> dict[str, Any]:
    """A valid job whose URI field ``dotted`` (under spec) is ``uri``."""
    doc = job(
        {"precision": "int8", "mode": "static", "calibration": {"uri": "s3://d/c/"}},
        validation={"dataUri": "s3://datasets/eval/"},
        promotion={"uri": "s3://models/vad-prod/"},
    )
    node = doc["spec"]
    *parents, leaf = dotted.split(".")
    for name in parents:
        node = node[name]
    node[leaf] = uri
    return doc


def expect_rejected(doc: dict[str, Any], *substrings: str) -> None:
    """Both the CRD (schema + CEL) and the worker's parse_job reject ``doc``, each saying
    every one of ``substrings``; the CRD with exactly one error."""
    errors = admit(doc, SCHEMA)
    assert len(errors) == 1, errors
    for text in substrings:
        assert text in errors[0], errors
    with pytest.raises(InvalidSpec) as exc:
        parse_job(doc)
    for text in substrings:
        assert text in str(exc.value)


def rejection_cases() -> list[Any]:
    """One invalid job per CEL rule of the CRD, with the words both sides must say."""
    at = "spec.quantization"
    cases = [
        (job({"precision": p, f: KNOBS[f]}), f"{at}.{f}: int8 setting given with "
         f"precision {p}") for f in _INT8_FIELDS for p in ("fp16", "bf16", "int4")
    ]  # fmt: skip
    cases += [
        (job({"precision": p, f: KNOBS[f]}), f"{at}.{f}: int4 setting given with "
         f"precision {p}") for f in _INT4_FIELDS for p in ("fp16", "bf16", "int8")
    ]  # fmt: skip
    cases.append((job({"precision": "int4", "blockSize": 48}), "is not a power of two"))
    cases += [
        (job({"precision": p, f: KNOBS[f]}), f"{at}.{f}: fp16 setting given with "
         f"precision {p}") for f in _FP16_FIELDS for p in ("int8", "bf16", "int4")
    ]  # fmt: skip
    cases += [
        (job({"precision": p, f: KNOBS[f]}), f"{at}.{f}: fp16/bf16 setting given with "
         f"precision {p}") for f in _FLOAT_FIELDS for p in ("int8", "int4")
    ]  # fmt: skip
    for f in _STATIC_FIELDS:
        for mode in ({}, {"mode": "dynamic"}):
            message = f"{at}.{f}: static-only setting given with mode dynamic"
            cases.append((job({"precision": "int8", **mode, f: KNOBS[f]}), message))
    cases.append((job({"precision": "int8", "mode": "static"}), f"{at}.calibration: required"))
    # the same rules on each of spec.variants: "spec.variants[0]." in the worker's words,
    # "spec.variants[]." in the CRD's (a CEL message is fixed text)
    cases += [
        (as_variants(doc), "spec.variants[", words.removeprefix(f"{at}")) for doc, words in cases
    ]
    for dotted in URI_FIELDS:
        cases.append((with_uri(dotted, "gs://bucket/key"), f"spec.{dotted}: unsupported"))
        cases.append((with_uri(dotted, "s3:///key"), f"spec.{dotted}", "names no bucket"))
    differ = "spec.promotion.uri: overlaps spec.output.uri"
    cases += [
        (job(promotion={"uri": BASE["spec"]["output"]["uri"]}), differ),
        (job(promotion={"uri": "s3://models/vad-out"}), differ),
        (job(promotion={"uri": "s3://models/vad-out/prod/"}), differ),
        (job(promotion={"uri": "s3://p/"}, validation={"enabled": False}),
         "spec.promotion: promotion copies only a validated set"),
        (job(output={"uri": "s3://models/vad/silero_vad.onnx/"}),
         "spec.output.uri: overlaps spec.model.uri"),
        (job(output={"uri": "s3://models"}), "spec.output.uri: overlaps spec.model.uri"),
        (job(promotion={"uri": "s3://models/vad/"}),
         "spec.promotion.uri: overlaps spec.model.uri"),
        (job(validation={"dataUri": "s3://models/vad-out/eval/"}),
         "spec.output.uri: overlaps spec.validation.dataUri"),
        (job(promotion={"uri": "s3://prod/vad"}, validation={"dataUri": "s3://prod/vad/e/"}),
         "spec.promotion.uri: overlaps spec.validation.dataUri"),
        (job(output={"uri": "s3://models/out/vad_fp16.onnx"}),
         "spec.output.uri: names a model file, but an output is a prefix"),
        (job(output={"uri": "s3://models/elsewhere/", "besideOriginals": True}),
         "spec.output.uri: with besideOriginals the output is the model's own folder"),
        (job(output={"uri": "s3://models/vad/", "besideOriginals": True},
             promotion={"uri": "s3://models/vad/prod/"}),
         "spec.promotion.uri: overlaps spec.output.uri"),
    ]  # fmt: skip
    static = {"precision": "int8", "mode": "static"}
    cases += [
        (job({**static, "calibration": {"uri": "s3://models/vad-out/c/"}}),
         "spec.output.uri: overlaps spec.quantization.calibration.uri"),
        (job({**static, "calibration": {"uri": "s3://prod/c/"}}, promotion={"uri": "s3://prod/"}),
         "spec.promotion.uri: overlaps spec.quantization.calibration.uri"),
    ]  # fmt: skip
    calibrated = [
        {"precision": "fp16"},
        {**static, "calibration": {"uri": "s3://models/vad-out/c/"}},
    ]
    cases += [
        (as_variants(job(), calibrated), "spec.output.uri: overlaps spec.variants[",
         "calibration.uri"),
        (as_variants(job(promotion={"uri": "s3://prod/"}),
                     [{**static, "calibration": {"uri": "s3://prod/c/"}}]),
         "spec.promotion.uri: overlaps spec.variants[", "calibration.uri"),
    ]  # fmt: skip
    two = [{"precision": "fp16", "name": "a"}, {"precision": "int8", "name": "a"}]
    cases += [
        ({**job(), "spec": {**job()["spec"], "variants": [{"precision": "fp16"}]}},
         "spec.quantization: give spec.quantization (one conversion) or spec.variants"),
        (job(selection={"objective": "fastest"}), "spec.selection: only with spec.variants"),
        (as_variants(job(output={"uri": "s3://models/vad/", "besideOriginals": True})),
         "spec.variants: not supported with spec.output.besideOriginals"),
        (as_variants(job(), two), "spec.variants: ", "is given to more than one variant"),
    ]  # fmt: skip
    return [pytest.param(doc, words, id=words[0][:60]) for doc, *words in cases]


def as_variants(doc: dict[str, Any], variants: list[dict[str, Any]] | None = None) -> dict:
    """``doc`` with its spec.quantization moved into spec.variants (or ``variants``)."""
    doc = copy.deepcopy(doc)
    quantization = doc["spec"].pop("quantization")
    doc["spec"]["variants"] = variants or [quantization]
    return doc


# --- manifests against the CRD and the worker ------------------------------------------------


@pytest.mark.parametrize("doc", EXAMPLES)
def test_examples_are_admitted_and_parse(doc):
    assert admit(doc, SCHEMA) == []
    parse_job(doc)


def test_examples_exist():
    assert len(EXAMPLES) >= 3


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_invalid_fixtures_are_rejected_by_crd_and_worker(path):
    text = path.read_text(encoding="utf-8")
    expects = [line.split(":", 1)[1].strip() for line in text.splitlines()
               if line.startswith("# expect:")]  # fmt: skip
    assert expects, f"{path.name}: no '# expect: <substring>' line"
    expect_rejected(yaml.safe_load(text), *expects)


@pytest.mark.parametrize(("doc", "words"), rejection_cases())
def test_each_rule_rejects_like_the_worker(doc, words):
    expect_rejected(doc, *words)


def test_every_cel_rule_is_exercised():
    fired = set()
    for case in rejection_cases():
        fired.update(admit(case.values[0], SCHEMA))
    unfired = [
        r["message"] for _, _, r in rules(SCHEMA) if not any(r["message"] in f for f in fired)
    ]
    assert unfired == []


@pytest.mark.parametrize(
    "doc",
    [
        job({"precision": "fp16", **{f: KNOBS[f] for f in (*_FP16_FIELDS, *_FLOAT_FIELDS)}}),
        job({"precision": "bf16", "keepFp32": [], "include": ["*.pt"], "exclude": []}),
        job({"precision": "int8", "mode": "dynamic", "weightType": "QUInt8", "perChannel": True}),
        job({"precision": "int8", **{f: KNOBS[f] for f in _INT8_FIELDS}}),
        job({"precision": "fp16", "mode": None, "calibration": None}),  # nulls mean unset
        job(promotion={"uri": "s3://models/vad-prod/"}, validation={"enabled": True}),
        job(model={"uri": "file:///models/vad.onnx"}, output={"uri": "file:///out/"}),
        job(output={"uri": "s3://bucket-only"}, resources={"limits": {"nvidia.com/gpu": 1}}),
        job(output={"uri": "s3://models/vad/", "besideOriginals": True}),
    ],
    ids=[
        "fp16-knobs",
        "bf16-knobs",
        "int8-dynamic",
        "int8-static",
        "nulls",
        "promotion",
        "file",
        "bucket",
        "beside-originals",
    ],
)
def test_valid_specs_pass_both(doc):
    assert admit(doc, SCHEMA) == []
    parse_job(doc)


def test_plain_paths_are_for_local_runs_only():
    # The worker takes a plain path for `kquant-job run` on a laptop; inside a pod it would
    # point into a read-only root filesystem, so the CRD asks for a scheme.
    doc = job(model={"uri": "models/vad.onnx"})
    parse_job(doc)
    (error,) = admit(doc, SCHEMA)
    assert "spec.model.uri: unsupported or missing scheme" in error


def test_native_fields_keep_kubernetes_shapes():
    doc = job(
        resources={"limits": {"nvidia.com/gpu": 1, "memory": "16Gi"}, "requests": {"cpu": "500m"}},
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        nodeSelector={"gpu": "h100"},
        affinity={"nodeAffinity": {"anything": ["kept", "as", "given"]}},
    )
    assert admit(doc, SCHEMA) == []
    assert admit(job(resources={"limits": {"memory": "16 GB"}}), SCHEMA)  # not a quantity
    assert admit(job(nodeSelector={"gpu": 1}), SCHEMA)
    assert admit(job(tolerations=[{"tolerationSeconds": "soon"}]), SCHEMA)
