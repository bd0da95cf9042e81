"""The variants of one job share one FP32 reference pass (validate/reference_cache.py): what
the first variant's validator found is read back by the next, and nothing else is."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import kquant_job.validate.validators as validators
from kquant_api import QuantizationJobSpec, ValidationConfig
from kquant_job.validate import reference_cache
from kquant_job.validate.reference_cache import CachedReference, cache_key
from kquant_job.validate.validators import OnnxValidator

CPU = ["CPUExecutionProvider"]


def _spec(precision: str = "fp16", samples: int = 4) -> QuantizationJobSpec:
    return QuantizationJobSpec.model_validate(
        {
            "model": {"uri": "s3://b/m.onnx"},
            "output": {"uri": "s3://b/out/"},
            "quantization": {"precision": precision},
            "validation": {"samples": samples, "latencyRuns": 2, "warmupRuns": 0},
        }
    )


def test_a_saved_reference_reads_back_whole(tmp_path: Path) -> None:
    feeds = [{"x": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.array(3, np.int64)}]
    outputs = [{"y": np.ones((2, 2), np.float16)}]
    cfg = ValidationConfig(samples=1, feedback={"y": "x"})
    ref = CachedReference(feeds, outputs, cfg, {"tries": 1}, {"x": 5.0}, "cpu", (12.5, 7))
    assert reference_cache.save(tmp_path / "ref", "k", ref)
    back = reference_cache.load(tmp_path / "ref", "k")
    assert back is not None and back.cfg == cfg and back.chosen == {"tries": 1}
    assert back.latency == (12.5, 7)
    assert back.ranges == {"x": 5.0} and back.device == "cpu"
    assert list(back.feeds[0]) == ["x", "n"] and back.feeds[0]["n"].dtype == np.int64
    np.testing.assert_array_equal(back.feeds[0]["x"], feeds[0]["x"])
    assert back.outputs[0]["y"].dtype == np.float16
    assert reference_cache.load(tmp_path / "ref", "other") is None


def test_a_damaged_or_unwritable_cache_is_ignored(tmp_path: Path) -> None:
    ref = CachedReference([{"x": np.zeros(2)}], [{"y": np.zeros(2)}], ValidationConfig(),
                          None, None, "cpu")  # fmt: skip
    assert reference_cache.save(tmp_path, "k", ref)
    (tmp_path / "k.npz").write_bytes(b"not a zip")
    assert reference_cache.load(tmp_path, "k") is None  # the pass runs again
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert not reference_cache.save(blocker / "sub", "k", ref)  # no folder there: False


def test_the_key_changes_with_what_the_reference_depends_on(silero_onnx: Path, tmp_path) -> None:
    cfg = ValidationConfig(samples=4)
    key = cache_key(silero_onnx, cfg, [], CPU)
    assert key == cache_key(silero_onnx, ValidationConfig(samples=4), [], CPU)
    assert key != cache_key(silero_onnx, ValidationConfig(samples=5), [], CPU)
    assert key != cache_key(silero_onnx, cfg, [], ["CUDAExecutionProvider", *CPU])
    data = tmp_path / "a.npz"
    data.write_bytes(b"1")
    assert key != cache_key(silero_onnx, cfg, [data], CPU)


def test_the_second_validator_reads_the_first_ones_pass(
    silero_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared = tmp_path / "shared"
    first = OnnxValidator(silero_onnx, _spec("fp16"), [], ranges=True, shared=shared)
    assert first.reference.ranges and len(list(shared.glob("*.json"))) == 1

    def no_pass(*_a: object, **_k: object) -> None:
        raise AssertionError("the reference pass ran again")

    monkeypatch.setattr(validators, "resolve_feeds", no_pass)
    monkeypatch.setattr(validators, "make_session", no_pass)
    second = OnnxValidator(silero_onnx, _spec("int8"), [], ranges=False, shared=shared)
    assert second.chosen == first.chosen and second.cfg == first.cfg
    assert second.reference.ranges == first.reference.ranges  # FP16's ranges, kept
    for a, b in zip(first.reference.outputs, second.reference.outputs, strict=True):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert second.probe(silero_onnx).ok
    outcome = second.validate(silero_onnx)  # the latency session is made on use
    assert outcome.passed and outcome.latency_ms["runs"] == 2
    # Other validation settings: another key, the pass runs (and here fails on purpose)
    with pytest.raises(AssertionError, match="ran again"):
        OnnxValidator(silero_onnx, _spec("int8", samples=3), [], shared=shared)


def _count_sessions(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The file names of the sessions validation makes from now on."""
    import kquant_job.validate.compare as compare

    made: list[str] = []
    real = compare.make_session

    def counted(path: Path, providers: list[str]) -> object:
        made.append(Path(path).name)
        return real(path, providers)

    monkeypatch.setattr(compare, "make_session", counted)
    return made


def test_the_originals_latency_is_timed_once_for_every_variant(
    silero_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plain reference pass on the CPU times the original's latency block; a later
    variant reads it with the outputs and makes no session of the original at all."""
    import kquant_job.validate.compare as compare

    shared = tmp_path / "shared"
    first = OnnxValidator(silero_onnx, _spec("int8"), [], ranges=False, shared=shared)
    assert first.reference.latency is not None and first.reference.latency[1] == 2
    made = _count_sessions(monkeypatch)
    # the same model twice: a slowdown is timing noise, and its confirmation round (tested in
    # test_latency_budget) would make sessions of its own
    monkeypatch.setattr(compare, "slower", lambda *_: False)
    copy = tmp_path / "converted.onnx"
    copy.write_bytes(silero_onnx.read_bytes())
    second = OnnxValidator(silero_onnx, _spec("int8"), [], ranges=False, shared=shared)
    assert second.reference.latency == first.reference.latency
    outcome = second.validate(copy)
    assert made == ["converted.onnx"]
    assert outcome.latency_ms["original"] == first.reference.latency[0]


def test_the_originals_latency_timed_by_a_range_recorders_variant_is_shared(
    silero_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FP16 first: its reference pass is a range recorder (not timed), so its validation
    times the original; the INT8 variant after it timed the original again (0.65 s of
    BERT-base's INT8 variant). The first timing is now kept with the shared reference."""
    import kquant_job.validate.compare as compare

    shared = tmp_path / "shared"
    first = OnnxValidator(silero_onnx, _spec("fp16"), [], ranges=True, shared=shared)
    assert first.reference.latency is None  # a recorder's graph is not what users run
    monkeypatch.setattr(compare, "slower", lambda *_: False)
    copy = tmp_path / "converted.onnx"
    copy.write_bytes(silero_onnx.read_bytes())
    timed = first.validate(copy).latency_ms
    made = _count_sessions(monkeypatch)
    second = OnnxValidator(silero_onnx, _spec("int8"), [], ranges=False, shared=shared)
    outcome = second.validate(copy)
    assert made == ["converted.onnx"]  # no session of the original
    assert outcome.latency_ms["original"] == timed["original"]
