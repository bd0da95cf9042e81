"""What a QuantizationJob's author may ask of the pod the operator creates (operator trial,
stop 23): images matched against KQUANT_ALLOWED_IMAGES part by part, quantities bounded
before they are converted, requests within limits."""

from __future__ import annotations

import time

import pytest
from operator_objects import qjob

from kquant_operator.images import image_matches, parse_image, parse_pattern, same_image
from kquant_operator.jobs import InvalidQuantizationJob, build_job
from kquant_operator.settings import OperatorSettings, quantity, quantity_bytes

DIGEST = "sha256:" + "ab" * 32


def allowed(image: str, pattern: str) -> bool:
    return image_matches(parse_image(image), parse_pattern(pattern))


@pytest.mark.parametrize(
    ("pattern", "image"),
    [
        ("*.dkr.ecr.*.amazonaws.com/kquant/*", "evil.io/x.dkr.ecr.y.amazonaws.com/kquant/miner:1"),
        ("*.example.com/kquant/*", "attacker.net/a.example.com/kquant/miner:1"),
        ("registry.example.com/kquant*", "registry.example.com/kquant-evil/miner:1"),
        ("registry.example.com/kquant/*", "registry.example.com/kquant/a/b/miner:1"),
        ("registry.example.com/kquant/job:v1", "registry.example.com/kquant/job:v2"),
        ("registry.example.com/kquant/job:v1", "registry.example.com/kquant/job"),  # latest
        ("registry.example.com/kquant/job@" + DIGEST, "registry.example.com/kquant/job:v1"),
        ("kquant/job:*", "ghcr.io/kquant/job:1"),  # no host: docker.io's
        ("kquant-*/worker", "kquant-x.evil.com/worker"),  # a glob makes no host (review)
        ("ghcr.io/kquant/kquant-job:0.2.?", f"ghcr.io/kquant/kquant-job:0.2.1@{DIGEST}"),
    ],
)
def test_a_glob_stays_within_its_part_of_the_reference(pattern: str, image: str) -> None:
    """As one string, ``*`` crossed ``/``: these images, of other registries or repositories,
    were allowed."""
    assert not allowed(image, pattern)


@pytest.mark.parametrize(
    ("pattern", "image"),
    [
        ("*.dkr.ecr.*.amazonaws.com/kquant/*", "1234.dkr.ecr.eu-west-1.amazonaws.com/kquant/j:1"),
        ("registry.example.com/kquant/*", "registry.example.com/kquant/job:dev"),
        ("kquant-*/worker", "kquant-team/worker"),  # Docker Hub accounts
        ("python:3.11", "docker.io/python:3.11"),  # library/ after an explicit docker.io
        ("docker.io/python:3.11", "python:3.11"),
        ("[::1]:5000/team/*", "[::1]:5000/team/x:1"),
        ("registry.local:5000/kquant/job", "registry.local:5000/kquant/job@" + DIGEST),
        ("registry.example.com/kquant/job@" + DIGEST, "registry.example.com/kquant/job@" + DIGEST),
        ("docker.io/library/python:3.*", "python:3.11"),
        ("python:*", "docker.io/library/python:3.11"),
        ("python", "index.docker.io/library/python:3.11"),
        ("ghcr.io/kquant/kquant-job:0.2.?", "ghcr.io/kquant/kquant-job:0.2.1"),
    ],
)
def test_images_a_pattern_admits(pattern: str, image: str) -> None:
    assert allowed(image, pattern)


@pytest.mark.parametrize(
    ("image", "part"),
    [
        ("registry.example.com/team/x:v2 #:v1", "path component"),
        ("registry.example.com/kquant/../../evil:1", "path component '..'"),
        ("ghcr.io/kquant/kquant-job:0.1.0 ", "tag"),
        ("ghcr.io/kquant/Job:1", "path component"),
        ("ghcr.io/kquant/job@sha256:xyz", "digest"),
        ("ghcr.io/kquant/job@sha256:" + "ab" * 16, "digest"),  # 32 hex: no sha256
        ("ghcr.io/kquant/job@md5:" + "ab" * 32, "digest"),
        ("ghcr.io/kquant/job\n", "path component"),  # $ once let a newline through
        ("ghcr.io/kquant/job:\u0661\u0662", "tag"),  # other digits: not containerd's
        ("REGISTRY.example.com/kquant/job", "lower-case host"),
        ("a" * 250, "longer than 255"),
        ("ghcr.io/kquant/job:", "tag"),
        (" ", "path component"),
    ],
)
def test_what_is_no_image_reference_is_invalid_spec(image: str, part: str) -> None:
    with pytest.raises(ValueError, match=part):
        parse_image(image)
    with pytest.raises(InvalidQuantizationJob, match=r"spec.image: .* is not an image reference"):
        build_job(qjob(image=image), OperatorSettings())


def test_the_worker_image_under_another_spelling_is_the_worker_image() -> None:
    settings = OperatorSettings(worker_image="python:3.11")
    assert build_job(qjob(image="docker.io/library/python:3.11"), settings)
    assert same_image(parse_image("python"), parse_image("docker.io/library/python:latest"))
    with pytest.raises(InvalidQuantizationJob, match="is not an image this operator runs"):
        build_job(qjob(image="python:3.12"), settings)


def test_a_malformed_allowlist_or_worker_image_stops_the_operator_at_start() -> None:
    with pytest.raises(ValueError, match=r"KQUANT_ALLOWED_IMAGES: .*an empty part"):
        OperatorSettings.from_env({"KQUANT_ALLOWED_IMAGES": "registry.local//job"})
    with pytest.raises(ValueError, match="KQUANT_WORKER_IMAGE"):
        OperatorSettings.from_env({"KQUANT_WORKER_IMAGE": "Registry/Job:1"})


def test_a_service_account_that_is_no_name_is_refused_before_the_api_server() -> None:
    settings = OperatorSettings(allowed_service_accounts=("kquant-*",))
    with pytest.raises(InvalidQuantizationJob, match="is not a ServiceAccount name"):
        build_job(qjob(serviceAccountName="kquant-../default"), settings)
    with pytest.raises(InvalidQuantizationJob, match="is not a ServiceAccount name"):
        build_job(qjob(serviceAccountName="kquant-worker\n"), settings)  # matched whole


@pytest.mark.parametrize("size", ["1e5000", "1e9999999", "9" * 80, "1e31", "10000000000Ei"])
def test_a_huge_quantity_is_invalid_at_once(size: str) -> None:
    """``1e5000`` failed the operator's integer conversion with a plain ValueError (retried
    forever, no status); ``1e9999999`` would have held its event loop for hours."""
    start = time.monotonic()
    with pytest.raises(InvalidQuantizationJob, match="ephemeral-storage"):
        build_job(qjob(resources={"limits": {"ephemeral-storage": size}}), OperatorSettings())
    assert time.monotonic() - start < 1.0


@pytest.mark.parametrize(
    ("resources", "said"),
    [
        ({"limits": {"ephemeral-storage": "-1Gi"}}, "is negative"),
        ({"limits": {"ephemeral-storage": "500m"}}, "not a whole number of bytes"),
        ({"limits": {"ephemeral-storage": "0"}}, "not a whole number of bytes"),
        ({"limits": {"cpu": "-4"}}, "is negative"),
        ({"limits": {"memory": "1Gi"}, "requests": {"memory": "64Gi"}}, "more than its limit"),
    ],
)
def test_quantities_the_api_server_or_the_worker_would_trip_on(resources, said) -> None:
    with pytest.raises(InvalidQuantizationJob, match=said):
        build_job(qjob(resources=resources), OperatorSettings())


def test_quantities_within_bounds() -> None:
    assert quantity("1E", "x") == "1E" and quantity(2**62, "x") == str(2**62)
    assert quantity_bytes("50Gi", "x") == 50 * 2**30 and quantity_bytes("1e3", "x") == 1000
    job = build_job(
        qjob(resources={"limits": {"memory": "8Gi", "ephemeral-storage": "20Gi"},
                        "requests": {"memory": "8Gi"}}),
        OperatorSettings(),
    )  # fmt: skip
    env = {
        e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["KQUANT_WORK_BYTES"] == str(20 * 2**30)


def test_a_priority_class_is_the_default_or_an_allowed_one() -> None:
    """A tenant's ``priorityClassName: system-node-critical`` let its worker pod preempt
    other tenants' pods (operator trial)."""
    plain = OperatorSettings(default_priority_class_name="batch-low")
    with pytest.raises(InvalidQuantizationJob, match=r"spec.priorityClassName: 'system-node"):
        build_job(qjob(priorityClassName="system-node-critical"), plain)
    assert build_job(qjob(priorityClassName="batch-low"), plain)  # the default, named
    listed = OperatorSettings(allowed_priority_classes=("batch-*",))
    job = build_job(qjob(priorityClassName="batch-high"), listed)
    assert job["spec"]["template"]["spec"]["priorityClassName"] == "batch-high"


@pytest.mark.parametrize(
    ("value", "said"),
    [("1\n", "not a Kubernetes quantity"), ("1e1.5", "not a Kubernetes quantity")],
)
def test_what_the_api_server_reads_as_no_quantity_is_refused(value: str, said: str) -> None:
    """Review: ``$`` let a trailing newline through, and quantity.go reads the exponent as
    an integer (the operator then failed in parse_quantity, naming no field)."""
    with pytest.raises(ValueError, match=said):
        quantity(value, "spec.resources.limits.cpu")


def test_a_malformed_claim_is_a_value_error_naming_the_variable() -> None:
    with pytest.raises(ValueError, match=r"KQUANT_DEFAULT_RESOURCES\.claims"):
        OperatorSettings.from_env({"KQUANT_DEFAULT_RESOURCES": '{"claims": [1]}'})
