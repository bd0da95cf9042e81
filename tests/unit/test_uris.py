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
