"""Which URIs of a spec overlap (kquant_api.uris): prefixes, buckets, local paths."""

from __future__ import annotations

import pytest

from kquant_api.uris import find_overlaps, location, overlaps


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("s3://b/m/", "s3://b/m/x.onnx", True),  # a prefix holding an object
        ("s3://b/m", "s3://b/m/", True),  # one prefix, two spellings
        ("s3://b/m", "s3://b/m2/x.onnx", False),  # a sibling that shares letters
        ("s3://b/", "s3://b/m/x.onnx", True),  # a bucket root holds everything in it
        ("s3://b", "s3://b/m/x.onnx", True),
        ("s3://a/m/", "s3://b/m/", False),  # other bucket
        ("s3://b/v6-fp16/", "s3://b/v6/silero_vad.onnx", False),
        ("s3://b/m/x.onnx", "s3://b/m/x.onnx/", True),
        ("file:///a/b/../c/", "/a/c/x.onnx", True),  # normalized
        ("file:///a//c/./", "file:///a/c", True),
        ("file://out/", "out/m.onnx", True),  # relative with relative
        ("rel/x", "/abs/rel/x", False),  # relative vs absolute: the worker resolves them
        ("file:///m/", "s3://m/x", False),  # other scheme
    ],
)
def test_overlaps(a, b, expected):
    assert overlaps(a, b) is expected
    assert overlaps(b, a) is expected


def test_location_keeps_s3_keys_literal_and_normalizes_paths():
    assert location("s3://b/a/../c/") == ("s3", "b", "a/../c")
    assert location("file:///a/b/../c/") == ("file", "", "/a/c")
    assert location("file://") == ("file", "", ".")


def test_find_overlaps_names_both_fields_later_write_first():
    found = find_overlaps(
        {"spec.output.uri": "s3://b/out/", "spec.promotion.uri": "s3://b/"},
        {"spec.model.uri": "s3://b/m/x.onnx", "spec.validation.dataUri": "s3://d/eval/"},
    )
    assert found == [
        "spec.promotion.uri: overlaps spec.output.uri (s3://b/ and s3://b/out/): kquant would "
        "write where this job also writes; use prefixes that do not contain each other",
        "spec.promotion.uri: overlaps spec.model.uri (s3://b/ and s3://b/m/x.onnx): kquant "
        "would write where this job also reads; use prefixes that do not contain each other",
    ]
    assert find_overlaps({"spec.output.uri": "s3://b/o/"}, {"spec.model.uri": "s3://b/m"}) == []


def test_the_worker_compares_resolved_local_paths(tmp_path, monkeypatch):
    """A symlink hides an overlap from the lexical rule; the worker resolves it."""
    from kquant_api import QuantizationJobSpec
    from kquant_job.errors import InvalidSpec
    from kquant_job.pipeline import check_resolved_overlaps

    (tmp_path / "models").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "models")
    spec = QuantizationJobSpec.model_validate(
        {
            "model": {"uri": f"file://{tmp_path}/models/"},
            "output": {"uri": f"file://{tmp_path}/link/fp16/"},
            "quantization": {"precision": "fp16"},
        }
    )  # lexically apart: accepted by the spec itself
    with pytest.raises(InvalidSpec, match=r"spec\.output\.uri: overlaps spec\.model\.uri"):
        check_resolved_overlaps(spec)
    monkeypatch.chdir(tmp_path)  # a relative output inside the absolute model folder
    relative = spec.model_copy(
        update={"output": spec.output.model_copy(update={"uri": "models/o/"})}
    )
    with pytest.raises(InvalidSpec, match="overlaps"):
        check_resolved_overlaps(relative)
    apart = spec.model_copy(update={"output": spec.output.model_copy(update={"uri": "out/"})})
    check_resolved_overlaps(apart)


def test_an_output_overlapping_the_model_points_at_beside_originals() -> None:
    from kquant_api.uris import overlap_message

    msg = overlap_message("spec.output.uri", "s3://b/m/", "spec.model.uri", "s3://b/m/")
    assert msg.startswith("spec.output.uri: overlaps spec.model.uri")
    assert "besideOriginals: true" in msg
    other = overlap_message("spec.promotion.uri", "s3://b/p/", "spec.output.uri", "s3://b/p/")
    assert "besideOriginals" not in other
