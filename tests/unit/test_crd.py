"""The QuantizationJob CRD: generated from kquant_api without drift, a structural schema with a
description on every field, printer columns that resolve, and room for the operator's status.

The API server is stood in for by tests/unit/crd_apiserver.py.
"""

from __future__ import annotations

import re
import subprocess
import sys
from typing import Any

import pytest
import yaml
from crd_apiserver import (
    CRD_PATH,
    ROOT,
    admit,
    load_schema,
    rules,
    schema_errors,
    structural_violations,
    to_jsonschema,
    unknown_references,
)
from pydantic import BaseModel, Field

from kquant_api import (
    Condition,
    ConditionStatus,
    ConditionType,
    Phase,
    QuantizationJobStatus,
    ResultStatus,
    ValidationSummary,
)
from kquant_api.crd import build_crd, main, render
from kquant_api.result import Artifact, LatencyMs
from kquant_api.structural import structural

SCHEMA = load_schema()
EXAMPLE: dict[str, Any] = yaml.safe_load(
    (ROOT / "examples" / "silero-vad-fp16.yaml").read_text(encoding="utf-8")
)


def test_committed_crd_has_no_drift():
    assert CRD_PATH.read_text(encoding="utf-8") == render(), (
        "crds/quantizationjob.yaml is stale: python -m kquant_api.crd > crds/quantizationjob.yaml"
    )


def test_module_prints_the_crd_and_check_flags_drift(tmp_path, capsys):
    out = subprocess.run(
        [sys.executable, "-m", "kquant_api.crd"], capture_output=True, text=True, check=True
    )
    assert out.stdout == CRD_PATH.read_text(encoding="utf-8")
    assert main(["--check", str(CRD_PATH)]) == 0
    stale = tmp_path / "crd.yaml"
    stale.write_text(render().replace("qjob", "qjobs"), encoding="utf-8")
    assert main(["--check", str(stale)]) == 1
    assert "out of date" in capsys.readouterr().err
    assert main(["--check", str(tmp_path / "missing.yaml")]) == 1


def test_crd_names_version_subresource_and_columns():
    crd = build_crd()
    assert crd["metadata"]["name"] == "quantizationjobs.kquant.io"
    spec = crd["spec"]
    assert (spec["group"], spec["scope"]) == ("kquant.io", "Namespaced")
    assert spec["names"]["shortNames"] == ["qjob", "qj"]
    (version,) = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: (c["type"], c["jsonPath"]) for c in version["additionalPrinterColumns"]}
    assert list(columns) == [
        "Phase", "Precision", "Chosen", "Reduction (%)", "Max abs error", "Ready", "Age"
    ]  # fmt: skip
    # the published precision, also of a chosen variant (spec.variants has no one precision)
    assert columns["Precision"] == ("string", ".status.result.precision")
    assert columns["Chosen"] == ("string", ".status.result.chosen")
    assert columns["Age"] == ("date", ".metadata.creationTimestamp")


@pytest.mark.parametrize("column", build_crd()["spec"]["versions"][0]["additionalPrinterColumns"])
def test_printer_columns_point_at_schema_fields_of_their_type(column):
    # conditions[?(@.type=="Ready")] selects items of the list
    path = re.sub(r"\[\?\(.*?\)\]", "[]", column["jsonPath"]).lstrip(".").split(".")
    if path[0] == "metadata":
        return
    node = SCHEMA
    for part in path:
        name = part.split("[", 1)[0]
        node = node["properties"][name]
        if part.endswith("[]"):
            node = node["items"]
    assert node["type"] == column["type"]


def test_schema_is_structural_and_fully_described():
    assert structural_violations(SCHEMA) == []
    assert SCHEMA["properties"]["spec"]["properties"]["affinity"] == {
        "type": "object",
        "description": "Pod affinity.",
        "x-kubernetes-preserve-unknown-fields": True,
    }
    selector = SCHEMA["properties"]["spec"]["properties"]["nodeSelector"]
    assert selector["additionalProperties"] == {"type": "string"}


def test_structural_checks_can_fail():
    bad = {
        "type": "object",
        "default": None,
        "properties": {
            "a": {"anyOf": [{"type": "integer"}, {"type": "boolean"}], "title": "A"},
            "b": {"type": "object", "description": "B.", "additionalProperties": True},
        },
    }
    found = structural_violations(bad)
    for expected in (
        "<root>: default null",
        "<root>.a: no description",
        "<root>.a: anyOf",
        "<root>.a: title",
        "<root>.a: no type",
        "<root>.b: additionalProperties",
    ):
        assert any(f.startswith(expected) for f in found), (expected, found)  # fmt: skip


def test_generator_refuses_undescribed_fields_and_real_unions():
    class Undescribed(BaseModel):
        size: int

    class Union(BaseModel):
        size: int | str = Field(description="A size.")

    with pytest.raises(ValueError, match=r"\.size: no description"):
        structural(Undescribed.model_json_schema())
    with pytest.raises(ValueError, match=r"\.size: anyOf of several types"):
        structural(Union.model_json_schema())


def test_cel_rules_name_only_fields_of_their_node():
    found = list(rules(SCHEMA))
    assert len(found) >= 20
    for path, node, rule in found:
        assert unknown_references(node, rule["rule"]) == [], (path, rule)
        assert rule["message"] and "rule" in rule


# --- status ------------------------------------------------------------------------------------


def test_status_written_by_the_operator_fits_the_schema():
    status = QuantizationJobStatus(
        phase=Phase.Succeeded,
        reason="Validated",
        observedGeneration=2,
        jobName="vad-2",
        startTime="2025-01-01T00:00:00Z",
        completionTime="2025-01-01T00:01:00Z",
        conditions=[
            Condition(
                type=ConditionType.Ready,
                status=ConditionStatus.true,
                reason="Validated",
                observedGeneration=2,
            ),
            Condition(
                type=ConditionType.Reconciling, status=ConditionStatus.false, reason="Validated"
            ),
        ],
        result=ResultStatus(
            artifacts=[Artifact(uri="s3://m/o/vad.onnx", sha256="ab" * 32, bytes=1286255)],
            originalBytes=2327524,
            quantizedBytes=1286255,
            reductionPercent=44.7,
            validation=ValidationSummary(
                passed=True,
                samples=32,
                device="cpu",
                maxAbsError=8.3e-6,
                latencyMs=LatencyMs(original=0.2, quantized=0.12),
            ),
            promotedUri="s3://m/prod/",
        ),
    )
    status_schema = SCHEMA["properties"]["status"]
    assert schema_errors(status.wire(), status_schema) == []
    assert admit({**EXAMPLE, "status": status.wire()}, SCHEMA) == []
    bad = status.wire() | {"phase": "Done"}
    assert schema_errors(bad, status_schema)
    assert to_jsonschema(status_schema)["additionalProperties"] is False
