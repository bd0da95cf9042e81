"""Operator settings, read once from the environment (the Helm chart sets them).

Every variable is optional; a malformed value raises ``ValueError`` naming the variable, so a
bad Deployment fails at start-up instead of producing broken Jobs later.

==================================  =======================================================
Variable                            Meaning (default)
==================================  =======================================================
KQUANT_WORKER_IMAGE                 worker image (``ghcr.io/kquant/kquant-job:0.1.0``)
KQUANT_IMAGE_PULL_POLICY            Always | IfNotPresent | Never (``IfNotPresent``)
KQUANT_ALLOWED_IMAGES               comma list of image patterns a spec.image may match besides
                                    the worker image (none): ``host/path[:tag|@digest]``, each
                                    part an fnmatch glob (``*``, ``?``) that never crosses a
                                    ``/``; no tag: any tag (:mod:`kquant_operator.images`)
KQUANT_ALLOWED_SERVICE_ACCOUNTS     comma list of patterns of the ServiceAccounts a
                                    spec.serviceAccountName may name (none; ``*``: any)
KQUANT_ALLOWED_PRIORITY_CLASSES     comma list of patterns of the PriorityClasses a
                                    spec.priorityClassName may name besides the default
                                    below (none)
KQUANT_IMAGE_PULL_SECRETS           comma list of Secret names for the worker pods'
                                    imagePullSecrets, each in the QuantizationJob's namespace
KQUANT_WATCH_NAMESPACES             comma list of namespaces; empty: cluster-wide
KQUANT_DEFAULT_RESOURCES            JSON ResourceRequirements (``{"limits":
                                    {"nvidia.com/gpu": "1"}}``)
KQUANT_DEFAULT_NODE_SELECTOR        JSON object of strings (none)
KQUANT_DEFAULT_TOLERATIONS          JSON list of tolerations (none)
KQUANT_DEFAULT_QUEUE_NAME           Kueue LocalQueue (none)
KQUANT_DEFAULT_PRIORITY_CLASS_NAME  pod priorityClassName (none)
KQUANT_JOB_TTL_SECONDS              Job ttlSecondsAfterFinished (86400)
KQUANT_ACTIVE_DEADLINE_SECONDS      Job activeDeadlineSeconds when the spec has none (7200)
KQUANT_BACKOFF_LIMIT                Job backoffLimit when the spec has none (1)
KQUANT_WORK_VOLUME_SIZE             /work emptyDir sizeLimit, a quantity (``50Gi``)
KQUANT_TMP_VOLUME_SIZE              /tmp emptyDir sizeLimit, a quantity (``1Gi``)
KQUANT_LIVENESS_PORT                port of the operator's liveness endpoint (8080)
KQUANT_RESYNC_SECONDS               status derived again from the Job of a generation without a
                                    verdict, this often (60; read by handlers.py at import)
KQUANT_S3_*                         the worker's S3 transfer settings (S3_TRANSFER_VARIABLES),
                                    passed to every Job's container (the worker's defaults)
==================================  =======================================================
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from kubernetes.utils.quantity import parse_quantity

from kquant_operator.images import parse_image, parse_pattern

DEFAULT_WORKER_IMAGE = "ghcr.io/kquant/kquant-job:0.1.0"
PULL_POLICIES = ("Always", "IfNotPresent", "Never")

# Kubernetes resource.Quantity, from k8s.io/apimachinery/pkg/api/resource/quantity.go.
# Matched whole (fullmatch: ``$`` let "1\n" through); the exponent is an integer, as
# quantity.go reads it (ParseInt; "1e1.5" is no quantity).
_QUANTITY = re.compile(
    r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[KMGTPE]i|[numkMGTPE]|[eE][+-]?[0-9]+)?"
)
# RFC 1123 label (namespaces are labels), at most 63 characters.
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
DNS_SUBDOMAIN = re.compile(
    r"^(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)
_RESOURCE_KEYS = ("limits", "requests", "claims")
MAX_QUANTITY_CHARS = 64  # "9223372036854775807" is 19: what is longer is no real request
MAX_EXPONENT = 30  # 1e30 is past 2^63-1 already; a larger exponent is refused unread
MAX_QUANTITY = Decimal(2**63 - 1)
# The worker's transfer knobs (kquant_job.storage.s3_transfer), each a positive number. The
# operator checks them at start-up so a typo fails the Deployment, not every Job.
S3_TRANSFER_VARIABLES = (
    "KQUANT_S3_MAX_ATTEMPTS",
    "KQUANT_S3_RETRY_SECONDS",
    "KQUANT_S3_CONNECT_TIMEOUT",
    "KQUANT_S3_READ_TIMEOUT",
    "KQUANT_S3_MULTIPART_THRESHOLD_MIB",
    "KQUANT_S3_MULTIPART_CHUNKSIZE_MIB",
    "KQUANT_S3_MAX_CONCURRENCY",
)


def normalize_resources(value: Any, where: str) -> dict[str, Any]:
    """Check a Kubernetes ResourceRequirements object and return it with every quantity as a
    string (how the API server returns them), e.g. ``{"limits": {"nvidia.com/gpu": "1"}}``.

    ``where`` names the source in errors (a field path or an environment variable).
    Raises ValueError on unknown keys, non-mapping sections, malformed or negative
    quantities, or a request above its limit.
    """
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: expected an object with limits/requests")
    out: dict[str, Any] = {}
    for key in sorted(value):
        if key not in _RESOURCE_KEYS:
            raise ValueError(f"{where}.{key}: unknown field (expected limits, requests, claims)")
        section = value[key]
        if key == "claims":
            if not isinstance(section, list) or not all(
                isinstance(c, Mapping) and isinstance(c.get("name"), str) for c in section
            ):
                raise ValueError(f"{where}.claims: expected a list of {{name: ...}}")
            out[key] = [dict(c) for c in section]
            continue
        if not isinstance(section, Mapping):
            raise ValueError(f"{where}.{key}: expected an object of quantities")
        out[key] = {name: quantity(section[name], f"{where}.{key}.{name}") for name in section}
    limits, requests = out.get("limits", {}), out.get("requests", {})
    for name in sorted(set(limits) & set(requests)):
        if parse_quantity(requests[name]) > parse_quantity(limits[name]):
            raise ValueError(
                f"{where}.requests.{name}: {requests[name]} is more than its limit "
                f"{limits[name]} (the API server refuses such a pod)"
            )
    return out


def quantity(value: Any, where: str) -> str:
    """A Kubernetes quantity as a string ("16Gi", "1", "500m"); ints and floats accepted.

    Raises ValueError naming ``where`` when the value is not a quantity (e.g. "16GB"), is
    negative, or lies beyond what Kubernetes represents (2^63-1, resource.Quantity's
    bound): ``1e5000`` made the operator's integer conversion fail, and ``1e9999999`` would
    have held its event loop for hours (operator trial).
    """
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"{where}: expected a quantity such as 16Gi or 1, got {value!r}")
    text = str(value)
    if len(text) > MAX_QUANTITY_CHARS or not _QUANTITY.fullmatch(text):
        raise ValueError(f"{where}: {text!r} is not a Kubernetes quantity (e.g. 16Gi, 500m, 1)")
    exponent = re.search(r"[eE]([+-]?[0-9]+)\Z", text)
    if exponent and abs(int(exponent.group(1))) > MAX_EXPONENT:
        raise ValueError(f"{where}: {text!r} is beyond a Kubernetes quantity (at most 2^63-1)")
    amount = parse_quantity(text)
    if amount < 0:
        raise ValueError(f"{where}: {text!r} is negative")
    if amount > MAX_QUANTITY:
        raise ValueError(f"{where}: {text!r} is beyond a Kubernetes quantity (at most 2^63-1)")
    return text


def quantity_bytes(text: str, where: str) -> int:
    """A quantity of bytes (``50Gi``) as an int, checked by :func:`quantity`. Raises
    ValueError for a fraction of a byte (``500m``: the worker's download budget came out 0)
    or 0."""
    amount = parse_quantity(quantity(text, where))
    if amount != amount.to_integral_value() or amount < 1:
        raise ValueError(f"{where}: {text!r} is not a whole number of bytes")
    return int(amount)


@dataclass(frozen=True)
class OperatorSettings:
    """Defaults the operator applies to every Job (a QuantizationJob's own fields win).

    A spec field that is given replaces the default as a whole (so ``resources`` without a
    GPU makes a CPU-only Job, and ``nodeSelector: {}`` drops the default selector).
    """

    worker_image: str = DEFAULT_WORKER_IMAGE
    image_pull_policy: str = "IfNotPresent"
    image_pull_secrets: tuple[str, ...] = ()
    # Who may create a QuantizationJob may run a pod: these bound its image and identity.
    allowed_images: tuple[str, ...] = ()
    allowed_service_accounts: tuple[str, ...] = ()
    allowed_priority_classes: tuple[str, ...] = ()
    watch_namespaces: tuple[str, ...] = ()
    default_resources: dict[str, Any] = field(
        default_factory=lambda: {"limits": {"nvidia.com/gpu": "1"}}
    )
    default_node_selector: dict[str, str] = field(default_factory=dict)
    default_tolerations: list[dict[str, Any]] = field(default_factory=list)
    default_queue_name: str | None = None
    default_priority_class_name: str | None = None
    ttl_seconds_after_finished: int = 86400
    active_deadline_seconds: int = 7200
    backoff_limit: int = 1
    work_volume_size: str = "50Gi"
    tmp_volume_size: str = "1Gi"
    liveness_port: int = 8080
    worker_s3_transfer: dict[str, str] = field(default_factory=dict)

    @property
    def cluster_wide(self) -> bool:
        """True when no namespaces are listed: the operator watches every namespace."""
        return not self.watch_namespaces

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> OperatorSettings:
        """Settings from ``KQUANT_*`` variables (table in the module docstring).

        Raises ValueError naming the variable for a malformed value.
        """
        d = cls()
        env = {k: v.strip() for k, v in environ.items() if k.startswith("KQUANT_")}

        def text(name: str, default: str | None) -> str | None:
            return env.get(name) or default

        pull = text("KQUANT_IMAGE_PULL_POLICY", d.image_pull_policy)
        if pull not in PULL_POLICIES:
            raise ValueError(
                f"KQUANT_IMAGE_PULL_POLICY: {pull!r} is not one of {', '.join(PULL_POLICIES)}"
            )
        namespaces = _names(env, "KQUANT_WATCH_NAMESPACES", _DNS_LABEL, "namespace")
        secrets = _names(env, "KQUANT_IMAGE_PULL_SECRETS", DNS_SUBDOMAIN, "Secret")
        resources = _json(env, "KQUANT_DEFAULT_RESOURCES", d.default_resources)
        node_selector = _json(env, "KQUANT_DEFAULT_NODE_SELECTOR", {})
        if not isinstance(node_selector, dict) or not all(
            isinstance(v, str) for v in node_selector.values()
        ):
            raise ValueError("KQUANT_DEFAULT_NODE_SELECTOR: expected a JSON object of strings")
        tolerations = _json(env, "KQUANT_DEFAULT_TOLERATIONS", [])
        if not isinstance(tolerations, list) or not all(isinstance(t, dict) for t in tolerations):
            raise ValueError("KQUANT_DEFAULT_TOLERATIONS: expected a JSON list of objects")
        return cls(
            worker_image=_image(text("KQUANT_WORKER_IMAGE", d.worker_image) or d.worker_image),
            image_pull_policy=pull or d.image_pull_policy,
            image_pull_secrets=secrets,
            allowed_images=_image_patterns(env, "KQUANT_ALLOWED_IMAGES"),
            allowed_service_accounts=_patterns(env, "KQUANT_ALLOWED_SERVICE_ACCOUNTS"),
            allowed_priority_classes=_patterns(env, "KQUANT_ALLOWED_PRIORITY_CLASSES"),
            watch_namespaces=namespaces,
            default_resources=normalize_resources(resources, "KQUANT_DEFAULT_RESOURCES"),
            default_node_selector=node_selector,
            default_tolerations=tolerations,
            default_queue_name=text("KQUANT_DEFAULT_QUEUE_NAME", None),
            default_priority_class_name=text("KQUANT_DEFAULT_PRIORITY_CLASS_NAME", None),
            ttl_seconds_after_finished=_int(env, "KQUANT_JOB_TTL_SECONDS", 86400, 0),
            active_deadline_seconds=_int(env, "KQUANT_ACTIVE_DEADLINE_SECONDS", 7200, 1),
            backoff_limit=_int(env, "KQUANT_BACKOFF_LIMIT", 1, 0),
            work_volume_size=quantity(
                text("KQUANT_WORK_VOLUME_SIZE", d.work_volume_size), "KQUANT_WORK_VOLUME_SIZE"
            ),
            tmp_volume_size=quantity(
                text("KQUANT_TMP_VOLUME_SIZE", d.tmp_volume_size), "KQUANT_TMP_VOLUME_SIZE"
            ),
            liveness_port=_int(env, "KQUANT_LIVENESS_PORT", 8080, 1, 65535),
            worker_s3_transfer=_s3_transfer(env),
        )


def _patterns(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    """The comma list in ``name`` (blanks around items and empty items dropped): fnmatch
    patterns, matched case-sensitively; an item with blanks inside raises ValueError."""
    items = tuple(n.strip() for n in env.get(name, "").split(",") if n.strip())
    for item in items:
        if any(c.isspace() for c in item):
            raise ValueError(f"{name}: {item!r} holds a blank")
    return items


def _image_patterns(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    """:func:`_patterns`, each an image reference pattern
    (:func:`kquant_operator.images.parse_pattern`), else ValueError."""
    items = _patterns(env, name)
    for item in items:
        try:
            parse_pattern(item)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
    return items


def _image(text: str) -> str:
    """KQUANT_WORKER_IMAGE, checked to be an image reference (ValueError otherwise)."""
    try:
        parse_image(text)
    except ValueError as exc:
        raise ValueError(f"KQUANT_WORKER_IMAGE: {text!r}: {exc}") from None
    return text


def _names(
    env: Mapping[str, str], name: str, pattern: re.Pattern[str], kind: str
) -> tuple[str, ...]:
    """The comma list in ``name`` (blanks around items and empty items dropped), each item
    matching ``pattern`` (Kubernetes' name rules for a ``kind``), else ValueError."""
    items = tuple(n.strip() for n in env.get(name, "").split(",") if n.strip())
    for item in items:
        if not pattern.fullmatch(item):
            raise ValueError(f"{name}: {item!r} is not a {kind} name")
    return items


def _s3_transfer(env: Mapping[str, str]) -> dict[str, str]:
    """The ``KQUANT_S3_*`` variables that are set, checked: known names, positive numbers."""
    out: dict[str, str] = {}
    for name in sorted(k for k in env if k.startswith("KQUANT_S3_")):
        if name not in S3_TRANSFER_VARIABLES:
            known = ", ".join(S3_TRANSFER_VARIABLES)
            raise ValueError(f"{name}: not a worker transfer setting (known: {known})")
        raw = env[name]
        if not raw:
            continue
        try:
            value = float(raw)
        except ValueError:
            value = -1.0
        if not (value > 0 and value != float("inf")):
            raise ValueError(f"{name}: expected a positive number, got {raw!r}")
        out[name] = raw
    return out


def resync_seconds(env: Mapping[str, str]) -> float:
    """``KQUANT_RESYNC_SECONDS`` (seconds; default 60): a positive, finite number. Read apart
    from :class:`OperatorSettings`, when the handlers are registered (the timer's interval is
    fixed then). Raises ValueError naming the variable."""
    raw = env.get("KQUANT_RESYNC_SECONDS") or "60"
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not (0 < value < float("inf")):
        raise ValueError(
            f"KQUANT_RESYNC_SECONDS: expected a positive number of seconds, got {raw!r}"
        )
    return value


def _json(env: Mapping[str, str], name: str, default: Any) -> Any:
    raw = env.get(name)
    if not raw:
        return default
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{name}: not valid JSON ({exc.msg} at position {exc.pos})") from None


def _int(env: Mapping[str, str], name: str, default: int, low: int, high: int | None = None) -> int:
    raw = env.get(name)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}: expected an integer, got {raw!r}") from None
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise ValueError(f"{name}: {value} is out of range (expected {bound})")
    return value
