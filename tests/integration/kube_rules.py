"""API-server rules the emulator applies, as plain functions: merge and JSON patches, label
selectors, Status errors; and a kubeconfig for the emulator's URL."""

from __future__ import annotations

import copy
import datetime
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonpatch
import jsonpointer
import kmock
import yaml


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def error(status: int, reason: str, message: str) -> kmock.KubernetesError:
    return kmock.KubernetesError(status=status, reason=reason, message=message, details={})


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: objects merge recursively, null deletes, the rest replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def label_selector(text: str | None) -> Callable[[dict[str, str]], bool]:
    """A predicate over labels for an equality-based selector (``a=b,c!=d,e,!f``)."""
    checks: list[Callable[[dict[str, str]], bool]] = []
    for part in (p.strip() for p in (text or "").split(",")):
        if not part:
            continue
        if "(" in part or " in " in part or " notin " in part:
            raise error(400, "BadRequest", f"set-based selector not emulated: {part!r}")
        if "!=" in part:
            k, v = (s.strip() for s in part.split("!=", 1))
            checks.append(lambda labels, k=k, v=v: labels.get(k) != v)
        elif "=" in part:
            k, v = (s.strip() for s in part.replace("==", "=").split("=", 1))
            checks.append(lambda labels, k=k, v=v: labels.get(k) == v)
        elif part.startswith("!"):
            name = part[1:].strip()
            checks.append(lambda labels, k=name: k not in labels)
        else:
            checks.append(lambda labels, k=part: k in labels)
    return lambda labels: all(check(labels) for check in checks)


def apply_patch(request: kmock.Request, current: dict[str, Any]) -> dict[str, Any]:
    """``current`` after the request's PATCH: JSON patch or merge patch (strategic merge
    is treated as merge); 409 on a stale ``metadata.resourceVersion``, 422 on a failed
    JSON-patch ``test``, 415 for server-side apply."""
    ctype = request.headers.get("Content-Type", "").split(";")[0].strip()
    patch = request.data
    if ctype == "application/json-patch+json" or isinstance(patch, list):
        try:
            return jsonpatch.apply_patch(current, patch, in_place=False)
        except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as exc:
            raise error(422, "Invalid", f"JSON patch failed: {exc}") from None
    if ctype == "application/apply-patch+yaml":
        raise error(415, "UnsupportedMediaType", "server-side apply is not emulated")
    if not isinstance(patch, dict):
        raise error(400, "BadRequest", "a merge patch must be a JSON object")
    stale = (patch.get("metadata") or {}).get("resourceVersion")
    if stale and stale != current.get("metadata", {}).get("resourceVersion"):
        raise error(
            409,
            "Conflict",
            "the object has been modified; please apply your "
            "changes to the latest version and try again",
        )
    return merge_patch(current, patch)


def write_kubeconfig(path: Path, url: str) -> Path:
    """A kubeconfig whose current context points at ``url`` (token auth, ignored by kmock)."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "kmock", "cluster": {"server": url.rstrip("/")}}],
        "users": [{"name": "kmock", "user": {"token": "kmock-token"}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock"}}],
        "current-context": "kmock",
    }
    path.write_text(yaml.safe_dump(config))
    return path
