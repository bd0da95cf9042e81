"""Default tolerances per output kind: embedding outputs (named as transformers and
sentence-transformers name them) need cosine 0.99 under INT8, other outputs keep the
precision's bounds; the spec can bound single outputs by name; the table says which bounds
applied to which outputs."""

from __future__ import annotations

import pytest

from kquant_api import DEFAULT_TOLERANCE, Bounds, OutputKind, Precision, Tolerance, output_kind
from kquant_job.stage import ModelOutcome
from kquant_job.table import table_rows
from kquant_job.validate.metrics import OutputMetrics, check_tolerance


@pytest.mark.parametrize(
    "name",
    ["last_hidden_state", "pooler_output", "sentence_embedding", "token_embeddings",
     "text_embeds", "image_embeds", "speaker_embedding", "Embeddings", "encoder/embeddings"],
)  # fmt: skip
def test_embedding_outputs_are_recognised_by_name(name: str) -> None:
    assert output_kind(name) is OutputKind.embedding


@pytest.mark.parametrize("name", ["logits", "output", "stateN", "hidden", "pooled", "hn"])
def test_other_outputs_have_no_kind(name: str) -> None:
    assert output_kind(name) is None


def _metrics(name: str, cosine: float, mean: float = 0.01) -> OutputMetrics:
    return OutputMetrics(name=name, exact=False, elements=100, maxAbsError=0.1,
                         meanAbsError=mean, cosineSimilarity=cosine)  # fmt: skip


def test_int8_default_holds_embeddings_to_cosine_0_99() -> None:
    tol = DEFAULT_TOLERANCE[Precision.int8]
    # the text-embedding model: cosine 0.983 passed the plain INT8 bound
    violations = check_tolerance([_metrics("sentence_embedding", 0.983)], tol)
    assert violations == ["output 'sentence_embedding': cosineSimilarity 0.983 < 0.99"]
    assert check_tolerance([_metrics("logits", 0.983)], tol) == []
    assert check_tolerance([_metrics("sentence_embedding", 0.995)], tol) == []
    assert tol.bounds_for("last_hidden_state") == Bounds(maxMeanAbsError=0.05,
                                                         minCosineSimilarity=0.99)  # fmt: skip
    assert tol.bounds_for("logits") == Bounds(maxMeanAbsError=0.05, minCosineSimilarity=0.98)


def test_per_output_bounds_win_over_kinds_and_the_top_level() -> None:
    tol = Tolerance.model_validate(
        {"minCosineSimilarity": 0.999, "maxMeanAbsError": 0.01,
         "outputKinds": {"embedding": {"minCosineSimilarity": 0.995}},
         "outputs": {"stateN": {"maxMeanAbsError": 0.2}, "pooler_output": {"maxAbsError": 1}}}
    )  # fmt: skip
    assert tol.bounds_for("stateN") == Bounds(maxMeanAbsError=0.2, minCosineSimilarity=0.999)
    assert tol.bounds_for("pooler_output") == Bounds(
        maxAbsError=1, maxMeanAbsError=0.01, minCosineSimilarity=0.995
    )
    pooled = _metrics("pooler_output", 0.997)
    assert check_tolerance([_metrics("stateN", 0.9995, mean=0.1), pooled], tol) == []
    assert check_tolerance([_metrics("output", 0.9995, mean=0.1), pooled], tol) == [
        "bounds for output 'stateN': the model has no such output (outputs: output, pooler_output)",
        "output 'output': meanAbsError 0.1 > 0.01",
    ]


def test_the_table_names_the_outputs_a_kind_bound_applied_to() -> None:
    outputs = {n: {"cosineSimilarity": 0.999} for n in ("last_hidden_state", "pooler_output")}
    model = ModelOutcome(
        source="model.safetensors", format="transformers", external=[], out_rel="model.onnx",
        out_files=["model.onnx"], original_bytes=100, quantized_bytes=30, pass_name="p",
        details={}, validation={"passed": True, "report": {"outputs": outputs}},
    )  # fmt: skip
    rows = dict(table_rows([model], DEFAULT_TOLERANCE[Precision.int8], False))
    assert rows["tolerance"] == (
        "maxMeanAbsError <= 0.05, minCosineSimilarity >= 0.98, embedding outputs "
        "last_hidden_state, pooler_output: maxMeanAbsError <= 0.05, minCosineSimilarity >= "
        "0.99 (default)"
    )
    model.validation["report"]["outputs"] = {"logits": {"cosineSimilarity": 0.999}}
    rows = dict(table_rows([model], DEFAULT_TOLERANCE[Precision.int8], False))
    assert rows["tolerance"] == "maxMeanAbsError <= 0.05, minCosineSimilarity >= 0.98 (default)"


def _effective(precision: str, tolerance: dict | None) -> Tolerance:
    from kquant_api import QuantizationJobSpec

    spec = {"model": {"uri": "s3://b/m.onnx"}, "output": {"uri": "s3://b/out/"},
            "quantization": {"precision": precision}}  # fmt: skip
    if tolerance is not None:
        spec["validation"] = {"tolerance": tolerance}
    return QuantizationJobSpec.model_validate(spec).tolerance


def test_a_bound_the_spec_sets_replaces_the_default_and_the_others_stay() -> None:
    """A new user loosened maxAbsError alone and an INT8 model at cosine 0.08 was published
    as Validated: the spec's tolerance replaced the defaults whole."""
    tol = _effective("int8", {"maxAbsError": 10})
    assert (tol.maxAbsError, tol.maxMeanAbsError, tol.minCosineSimilarity) == (10, 5e-2, 0.98)
    broken = [_metrics("output", cosine=0.08, mean=0.66)]
    assert check_tolerance(broken, tol)  # the default cosine and mean bounds still apply
    assert tol.bounds_for("last_hidden_state").minCosineSimilarity == 0.99
    assert _effective("int8", None) == DEFAULT_TOLERANCE[Precision.int8]


def test_a_top_level_bound_applies_to_every_kind_unless_the_kind_is_set() -> None:
    tol = _effective("int8", {"minCosineSimilarity": 0.95})
    assert tol.bounds_for("last_hidden_state").minCosineSimilarity == 0.95
    assert tol.bounds_for("last_hidden_state").maxMeanAbsError == 5e-2
    kinds = {"embedding": {"minCosineSimilarity": 0.995}}
    own = _effective("int8", {"minCosineSimilarity": 0.95, "outputKinds": kinds})
    assert own.bounds_for("pooler_output").minCosineSimilarity == 0.995
    assert own.bounds_for("logits").minCosineSimilarity == 0.95


def test_a_bound_set_to_null_or_its_loosest_value_is_dropped() -> None:
    tol = _effective(
        "fp16", {"minCosineSimilarity": None, "outputs": {"stateN": {"maxAbsError": 1}}}
    )
    assert tol.minCosineSimilarity is None and tol.maxMeanAbsError == 1e-2
    assert tol.bounds_for("stateN").maxAbsError == 1
    assert not check_tolerance([_metrics("output", cosine=-0.5), _metrics("stateN", 0.9)], tol)
    loose = _effective("fp16", {"minCosineSimilarity": -1})
    assert not check_tolerance([_metrics("output", cosine=-0.5)], loose)
    decided = _effective("fp16", {"decisions": {"output": {"threshold": 0.5}}})
    assert decided.decisions and decided.minCosineSimilarity == 0.999  # decisions add bounds


def test_no_tolerance_row_when_nothing_was_validated_and_mixed_samples_count_runs() -> None:
    """validation.enabled: false still printed "tolerance ... (default)"; a folder of an
    ONNX model (16 samples) and a state dict (7 tensors) said "outputs on 7 samples"."""
    from kquant_job.judge import _summary

    def model(validation: dict | None) -> ModelOutcome:
        return ModelOutcome(
            source="m", format="onnx", external=[], out_rel="m", out_files=["m"],
            original_bytes=100, quantized_bytes=50, pass_name="p", details={},
            validation=validation,
        )  # fmt: skip

    assert "tolerance" not in dict(
        table_rows([model(None)], DEFAULT_TOLERANCE[Precision.fp16], False)
    )

    def summary(kind: str, samples: int) -> dict:
        run = {"passed": True, "samples": samples, "device": "cpu", "kind": kind}
        return {"passed": True, "report": {"outputs": {}}, "summary": run}

    mixed = _summary([model(summary("outputs", 16)), model(summary("tensors", 7))])
    assert mixed is not None and (mixed.kind, mixed.samples) == ("mixed", 16)
