"""Accuracy recovery's search (kquant_job.passes.int8_recovery) on a model of errors: each
node adds a known error when quantized, a candidate passes when the sum stays under a bound.
The real-model cases are in test_corpus_int8 (nodeRecovery rows)."""

from __future__ import annotations

import math

import pytest

from kquant_job.passes.base import ProbeResult
from kquant_job.passes.int8_common import Int8Settings
from kquant_job.passes.int8_recovery import groups_of, recover, score


def errors_model(errors: dict[str, float], bound: float, calls: list[Int8Settings]):
    """try_ for recover(): a candidate's error is the sum over the nodes it quantizes."""

    def try_(settings: Int8Settings, label: str) -> ProbeResult | None:
        calls.append(settings)
        quantized = settings.nodes_to_quantize or tuple(
            n for n in errors if n not in settings.nodes_to_exclude
        )
        if not quantized:
            return None  # onnxruntime quantized nothing: no candidate
        total = sum(errors[n] for n in quantized)
        metrics = {"y": {"meanAbsError": total, "cosineSimilarity": 1.0}}
        ok = total <= bound
        return ProbeResult(ok=ok, violations=[] if ok else ["y"], metrics=metrics)

    return try_


def test_the_most_harmful_nodes_and_only_they_stay_float() -> None:
    errors = {f"n{i}": 0.001 for i in range(10)} | {"n3": 0.5, "n7": 0.2, "n8": 0.05}
    calls: list[Int8Settings] = []
    found = recover(Int8Settings(), list(errors), errors_model(errors, 0.06, calls))
    assert found.settings is not None and found.result is not None and found.result.ok
    assert found.kept_float == ["n3", "n7"]  # n8's 0.05 plus the rest fits under 0.06
    assert found.settings.nodes_to_exclude == ("n3", "n7")
    assert found.settings.nodes_to_quantize == ()
    assert [r["nodes"] for r in found.ranking[:3]] == [["n3"], ["n7"], ["n8"]]
    # one probe per node, then k = 1, 2 (found), and nothing to narrow
    assert found.probes == len(calls) == 10 + 2


def test_bisection_finds_the_fewest_float_groups() -> None:
    errors = {f"n{i:02d}": 0.1 * (20 - i) for i in range(20)}
    calls: list[Int8Settings] = []
    bound = sum(sorted(errors.values())[:9]) + 1e-9  # the 9 smallest fit: 11 must go
    found = recover(Int8Settings(), list(errors), errors_model(errors, bound, calls))
    assert len(found.kept_float) == 11
    assert set(found.kept_float) == {f"n{i:02d}" for i in range(11)}
    # 20 ranking probes, k = 1, 2, 4, 8, 16, then bisection between 8 and 16: 12, 10, 11
    assert found.probes == 20 + 5 + 3


def test_base_exclusions_are_kept_and_not_ranked() -> None:
    errors = {"a": 0.3, "b": 0.01, "c": 0.01}
    calls: list[Int8Settings] = []
    base = Int8Settings(per_channel=True, nodes_to_exclude=("a",))
    found = recover(base, list(errors), errors_model(errors, 0.015, calls))
    assert found.settings is not None
    assert found.settings.nodes_to_exclude[0] == "a" and found.settings.per_channel
    assert all("a" not in c.nodes_to_quantize for c in calls)
    assert len(found.kept_float) == 1


def test_no_passing_set_keeps_one_node_quantized() -> None:
    errors = {"a": 0.5, "b": 0.4, "c": 0.3}
    calls: list[Int8Settings] = []
    found = recover(Int8Settings(), list(errors), errors_model(errors, 0.1, calls))
    assert found.settings is None and found.kept_float == []
    # never tried with every node float: the "INT8" model would be the float one
    assert all(c.nodes_to_quantize or len(c.nodes_to_exclude) < 3 for c in calls)
    assert found.describe()["passed"] is False


def test_a_single_node_cannot_be_recovered() -> None:
    calls: list[Int8Settings] = []
    found = recover(Int8Settings(), ["a"], errors_model({"a": 1.0}, 0.1, calls))
    assert found.settings is None and found.probes == 1


def test_many_nodes_are_ranked_in_runs() -> None:
    assert groups_of(["a", "b", "c"], 5) == [("a",), ("b",), ("c",)]
    runs = groups_of([f"n{i}" for i in range(70)], 32)
    assert len(runs) == 32 and sum(len(r) for r in runs) == 70
    assert {len(r) for r in runs} == {2, 3}
    assert [n for r in runs for n in r] == [f"n{i}" for i in range(70)]


@pytest.mark.parametrize(
    ("metrics", "expected"),
    [
        ({"y": {"meanAbsError": 0.1, "cosineSimilarity": 0.9}}, 0.2),
        ({"y": {"meanAbsError": 0.1}, "z": {"cosineSimilarity": 0.5}}, 0.6),
        ({"y": {"meanAbsError": math.nan}}, math.inf),
    ],
)
def test_score_adds_error_and_lost_cosine(metrics: dict, expected: float) -> None:
    assert score(ProbeResult(ok=False, metrics=metrics)) == pytest.approx(expected)


def test_a_candidate_that_fails_to_run_scores_worst() -> None:
    assert score(None) == math.inf
    assert score(ProbeResult(ok=False, error="run failed")) == math.inf


def test_the_note_names_the_nodes_left_float() -> None:
    from kquant_job.stage import ModelOutcome
    from kquant_job.table import model_notes

    requested = {"attempt": "requested", "probe": {"ok": False, "violations": ["y: 0.3 > 0.05"]}}
    kept = [f"/enc/layer{i}/MatMul" for i in range(6)]
    details = {
        "attempts": [requested, {"attempt": "nodeRecovery", "nodesToExclude": kept}],
        "recovery": {"keptFloat": kept},
        "probePassed": True,
    }
    model = ModelOutcome("m.onnx", "onnx", [], "m_int8.onnx", [], 100, 60, "p", details)
    [note] = model_notes(model)
    assert note.startswith("m.onnx: INT8 kept 6 node(s) float (/enc/layer0/MatMul, ")
    assert "and 2 more" in note and "y: 0.3 > 0.05" in note and "strict: true" in note
