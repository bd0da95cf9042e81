"""What a person reads after a run: the notes that say where the result differs from what was
asked (an INT8 fallback, an FP16 repair, a result slower or larger than the original) and the
rows of the summary table (per model, per output, the tolerance applied, ratios).

Notes go into the result (and so the status), the log and the table; rows into the table.
"""

from __future__ import annotations

from typing import Any

from kquant_api import Bounds, Tolerance, ValidationSummary, output_kind
from kquant_job.gain import latency_ratio
from kquant_job.stage import ModelOutcome

MAX_OUTPUT_ROWS = 6  # per model; the rest are summed up in one row
SLOWER = 1.05  # latency ratio above which a result is called slower


def _settings(attempt: dict[str, Any]) -> str:
    parts = []
    if attempt.get("perChannel"):
        parts.append("per-channel")
    if attempt.get("opTypesToQuantize"):
        parts.append("only " + "/".join(attempt["opTypesToQuantize"]))
    if attempt.get("nodesToExclude"):
        parts.append(f"{len(attempt['nodesToExclude'])} node(s) left float")
    if attempt.get("weightOnlyOpTypes"):
        types = "/".join(attempt["weightOnlyOpTypes"])
        parts.append(f"{types} weights stored INT8, computed in float")
    if attempt.get("integerOps") is False:
        parts.append("no integer op")
    return ", ".join(parts) or "defaults"


def model_notes(model: ModelOutcome) -> list[str]:
    """Where this model's conversion departs from the requested configuration, and where
    a decisions rule tested nothing."""
    notes = _untested_decisions(model)
    details = model.details
    attempts = details.get("attempts") or []
    chosen = details.get("chosenAttempt")  # the last attempt, unless a slow one was kept
    last = next(
        (a for a in attempts if a.get("attempt") == chosen), attempts[-1] if attempts else {}
    )
    if last.get("attempt") not in (None, "requested") and details.get("probePassed", True):
        first = attempts[0]
        missed = (first.get("probe") or {}).get("violations") or [first.get("error", "")]
        if first.get("slower"):
            lat = first["latencyMs"]
            ratio = latency_ratio(lat["original"], lat["quantized"], lat.get("interleavedRatio"))
            missed = [
                f"within tolerance, but {ratio:.2f}x the "
                f"original's latency ({lat['quantized']:.3g} vs {lat['original']:.3g} ms) "
                "with its Conv layers in INT8"
            ]
        kept = (details.get("recovery") or {}).get("keptFloat") or []
        if last.get("attempt") == "nodeRecovery":
            shown = ", ".join(kept[:4]) + (f" and {len(kept) - 4} more" if len(kept) > 4 else "")
            notes.append(
                f"{model.source}: INT8 kept {len(kept)} node(s) float ({shown}), found by "
                "ranking nodes by the error each adds, after every fallback missed the "
                f"tolerance ({missed[0] if missed else 'see the report'}); strict: true "
                "publishes the requested configuration only"
            )
            return notes
        notes.append(
            f"{model.source}: INT8 fell back to {last['attempt']} ({_settings(last)}): the "
            f"requested configuration did not pass ({missed[0] if missed else 'see the report'}); "
            "strict: true publishes the requested configuration only"
        )
    if details.get("repaired"):
        kept = sorted({a for step in attempts for a in step.get("added", [])})
        shown = ", ".join(kept[:6]) + (f" and {len(kept) - 6} more" if len(kept) > 6 else "")
        notes.append(
            f"{model.source}: FP16 repaired: {shown or 'some nodes'} kept FP32 after the "
            f"first conversion failed ({len(attempts)} attempts)"
        )
    return notes


def _untested_decisions(model: ModelOutcome) -> list[str]:
    """A threshold rule under which neither model decides positive on any sample passes
    without comparing a segment: with the default 16 samples, Silero's first frames of the
    shipped clip hold no speech, and "segments 0 -> 0" passed any conversion (new-user
    trial). Said, so that the samples are made to hold some. Likewise a rule under which
    both models decide positive on every sample (speech everywhere): one segment spanning
    the stream, "segments 1 -> 1, boundaries within 0", and no boundary compared (trial)."""
    outputs = ((model.validation or {}).get("report") or {}).get("outputs") or {}
    samples = ((model.validation or {}).get("summary") or {}).get("samples")
    over = f" over its {samples} samples" if samples else ""
    notes = []
    for name, m in outputs.items():
        if m.get("segmentsOriginal") == 0 and m.get("segmentsConverted") == 0:
            notes.append(
                f"{model.source}: output {name}: no decision above the threshold in either "
                f"model{over}: the decisions rule compared no segment; validate on samples "
                "that hold some (validation.samples, default 16; validation.dataUri)"
            )
        elif (
            m.get("decisions")
            and m.get("positiveOriginal") == m["decisions"]
            and m.get("decisionAgreement") == 1.0
        ):
            notes.append(
                f"{model.source}: output {name}: all {m['decisions']} decisions above the "
                f"threshold in both models{over}: one segment spanning the stream, no start "
                "or end to compare, so the decisions rule measured only that both stay "
                "positive; validate on samples that also hold some below it "
                "(validation.samples, default 16; validation.dataUri)"
            )
    return notes


def result_notes(
    models: list[ModelOutcome], summary: ValidationSummary | None, precision: str = ""
) -> list[str]:
    """Every model's notes, then the job's: not smaller, or slower, than the original (for
    ``precision`` fp16 on the CPU, with where FP16 pays off)."""
    notes = [n for m in models for n in model_notes(m)]
    original = sum(m.original_bytes for m in models)
    quantized = sum(m.quantized_bytes for m in models)
    if original and quantized >= original:
        notes.append(f"not smaller than the original ({quantized / original:.2f}x its size)")
    if summary and summary.latencyMs and summary.latencyMs.original > 0:
        lat = summary.latencyMs
        ratio = latency_ratio(lat.original, lat.quantized, lat.interleavedRatio)
        if ratio > SLOWER:
            fp16_on_cpu = precision == "fp16" and summary.device == "cpu"
            where = "; FP16 pays off where FP16 kernels exist: GPUs" if fp16_on_cpu else ""
            notes.append(
                f"slower than the original on {summary.device} ({ratio:.2f}x its latency){where}"
            )
    return notes


def _decision(metrics: dict[str, Any]) -> str:
    """ ", decisions agree 0.9990 (segments 4 -> 4, boundaries within 1)" when measured."""
    if "decisionAgreement" not in metrics:
        return ""
    text = f", decisions agree {metrics['decisionAgreement']:.4f}"
    if "segmentsOriginal" in metrics:
        text += f" (segments {metrics['segmentsOriginal']} -> {metrics['segmentsConverted']}"
        if "maxBoundaryShift" in metrics:
            text += f", boundaries within {metrics['maxBoundaryShift']}"
        text += ")"
    return text


def _g(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _worst_first(output: dict[str, Any]) -> tuple[float, float]:
    """Sort key of an output's row: the lowest cosine first, as the "worst output" row
    judges (the rows were in max abs error, and the worst one was not the first: trial),
    then the largest max abs error; an output without a cosine last."""
    cosine = output.get("cosineSimilarity")
    return (2.0 if cosine is None else float(cosine), -float(output.get("maxAbsError") or 0))


def _output_rows(model: ModelOutcome, indent: str) -> list[tuple[str, str]]:
    report = (model.validation or {}).get("report", {})
    if "outputs" in report:
        outputs = report["outputs"]
        ranked = sorted(outputs, key=lambda n: _worst_first(outputs[n]))
        rows = [
            (
                f"{indent}output {name}",
                f"max abs {_g(outputs[name].get('maxAbsError'))}, mean abs "
                f"{_g(outputs[name].get('meanAbsError'))}, cosine "
                f"{_g(outputs[name].get('cosineSimilarity'))}{_decision(outputs[name])}",
            )
            for name in ranked[:MAX_OUTPUT_ROWS]
        ]
        if len(ranked) > MAX_OUTPUT_ROWS:
            rows.append((f"{indent}...", f"{len(ranked) - MAX_OUTPUT_ROWS} more outputs"))
        return rows
    if "tensors" in report:
        return [
            (
                f"{indent}tensors",
                f"{report['tensors']} compared, {report.get('tensorsCast', '?')} cast, "
                f"{report.get('overflowValues', 0)} overflowing, "
                f"{report.get('flushToZeroValues', 0)} flushed to zero",
            )
        ]
    return []


def _bounds_text(bounds: dict[str, float]) -> str:
    return ", ".join(
        f"{k} {'>=' if k.startswith('min') else '<='} {v:g}" for k, v in bounds.items()
    )


def _per_output_parts(models: list[ModelOutcome], tolerance: Tolerance) -> list[str]:
    """The bounds of outputs that differ from the top-level ones (an output kind's default,
    or the spec's per-output bounds), for the outputs these models have."""
    top = Bounds(**{k: getattr(tolerance, k) for k in Bounds.model_fields})
    parts: dict[tuple[str, str], list[str]] = {}
    for model in models:
        outputs = (model.validation or {}).get("report", {}).get("outputs", {})
        for name in outputs:
            own = tolerance.bounds_for(name)
            if own == top:
                continue
            kind = output_kind(name)
            own_bounds = name in (tolerance.outputs or {})
            label = f"{kind.value} outputs" if kind and not own_bounds else "output"
            text = _bounds_text(own.model_dump(mode="json", exclude_none=True))
            parts.setdefault((label, text), []).append(name)
    return [
        f"{label} {', '.join(dict.fromkeys(names))}: {text}"
        for (label, text), names in parts.items()
    ]


def table_rows(
    models: list[ModelOutcome], tolerance: Tolerance, spec_tolerance: bool
) -> list[tuple[str, str]]:
    """Rows for the table: one per model file (directories), its outputs, the worst output,
    the tolerance applied."""
    rows: list[tuple[str, str]] = []
    several = len(models) > 1
    worst: tuple[float, str] | None = None
    for model in models:
        indent = "  " if several else ""
        if several:
            ratio = model.quantized_bytes / model.original_bytes if model.original_bytes else 0
            if model.validation is None:
                verdict = "not validated"
            else:
                verdict = "passed" if model.validation.get("passed") else "FAILED"
            rows.append(
                (f"model {model.source}", f"{model.pass_name}, {ratio:.2f}x size, {verdict}")
            )
        rows += _output_rows(model, indent)
        outputs = (model.validation or {}).get("report", {}).get("outputs", {})
        for name, m in outputs.items():
            cosine = m.get("cosineSimilarity")
            if cosine is not None and (worst is None or cosine < worst[0]):
                worst = (cosine, f"{model.source}: {name}" if several else name)
    if worst is not None:
        rows.append(("worst output", f"{worst[1]} (the lowest cosine {worst[0]:.6f})"))
    bounds = tolerance.model_dump(mode="json", exclude_none=True)
    rules = bounds.pop("decisions", {})
    bounds.pop("outputs", None), bounds.pop("outputKinds", None)
    parts = [_bounds_text(bounds)] if bounds else []
    parts += _per_output_parts(models, tolerance)
    for name, rule in rules.items():
        how = f"> {rule['threshold']:g}" if rule["kind"] == "threshold" else "argmax"
        shift = rule.get("maxBoundaryShift")
        parts.append(
            f"decisions on {name} ({how}) agree >= {rule['minAgreement']:g}"
            + (f", boundaries within {shift}" if shift is not None else "")
        )
    if parts and any(m.validation is not None for m in models):  # no bounds unless applied
        text = ", ".join(parts)
        rows.append(
            (
                "tolerance",
                f"{text} ({'spec, defaults for the rest' if spec_tolerance else 'default'})",
            )
        )
    return rows
