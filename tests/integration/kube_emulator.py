"""kmock's Kubernetes emulator, closer to a real API server where the operator relies on it.

kmock 0.8 stores objects as given (see /work/shared/notes/kmock.md). :class:`KubeEmulator`
adds what a real API server does and kopf or our handlers depend on:

- metadata on create: ``uid``, ``creationTimestamp``, a counter ``resourceVersion``,
  ``generation: 1``, the namespace from the URL, names from ``generateName``; ``stringData``
  of Secrets turned into ``data``; ``status`` dropped where a status subresource exists;
- PATCH: merge patch (RFC 7386; strategic merge treated as merge), JSON patch (RFC 6902,
  ``test`` failures answer 422), 409 on a stale ``metadata.resourceVersion``; ``/status``
  writes change ``status`` only and the main URL ignores ``status``; ``generation`` bumped
  when ``spec`` changes; immutable metadata kept;
- LIST/WATCH: equality-based ``labelSelector`` (set-based ones answer 400); a watch marks
  the event bus before its snapshot, so no event between the two is lost;
- DELETE: background garbage collection of dependents through ``ownerReferences`` (uid);
  finalizers hold an object until the last one is removed; creates answer 201, a name
  conflict 409 AlreadyExists.

Resource requests are served by this class directly, not through kmock's reaction matching
(which scans every past request for each new one: 60 ms a request after 1000 requests), so
reactions set with ``emulator[...] << ...`` apply to discovery and other URLs only.

Not emulated: namespaces (listing them answers 403, as under namespace-scoped RBAC),
admission/validation (CRD schema, CEL), PUT, server-side apply, field
selectors other than metadata.name/namespace, ``resourceVersion`` on watch (no 410 Gone),
DELETED events for objects leaving a selector.
"""

from __future__ import annotations

import base64
import collections
import copy
import itertools
import secrets
import uuid
from collections.abc import AsyncIterator
from typing import Any

import attrs
import kmock
from aiohttp import web
from kube_rules import apply_patch, error, label_selector, now_rfc3339

QJOBS = kmock.resource("kquant.io/v1alpha1/quantizationjobs")
JOBS = kmock.resource("batch/v1/jobs")
PODS = kmock.resource("v1/pods")
SECRETS = kmock.resource("v1/secrets")
EVENTS = kmock.resource("v1/events")

_IMMUTABLE_META = ("uid", "creationTimestamp", "name", "namespace", "generation")


@attrs.define(kw_only=True)
class KubeEmulator(kmock.KubernetesEmulator):
    """The emulator with the API-server behaviour listed in the module docstring, the
    built-in resources and the QuantizationJob CRD (status subresource) registered."""

    _counter: itertools.count = attrs.field(factory=lambda: itertools.count(1), init=False)
    # Watch requests served so far per resource (never decremented: a test waits for its
    # operator's watches while an earlier operator's streams may still be closing).
    watches_started: collections.Counter = attrs.field(factory=collections.Counter, init=False)
    # (resource, action) -> (HTTP status, reason, message) answered instead of serving.
    refusals: dict = attrs.field(factory=dict, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.resources.load_bundled()
        self.resources[QJOBS] = kmock.ResourceInfo(
            kind="QuantizationJob",
            singular="quantizationjob",
            namespaced=True,
            verbs={"create", "delete", "get", "list", "patch", "watch"},
            shortnames={"qjob", "qj"},
            subresources={"status"},
        )

    async def __call__(self, raw_request: web.BaseRequest) -> web.StreamResponse:
        # kmock cannot parse /api/v1/namespaces (it takes "namespaces" for the namespace
        # marker). Namespaces are not emulated: answer as RBAC without cluster-scoped
        # namespace rights does; kopf then serves the namespaces it was given.
        if raw_request.path.rstrip("/") == "/api/v1/namespaces":
            status = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 403}
            status.update(reason="Forbidden", message="namespaces are not emulated")
            return web.json_response(status, status=403)
        return await super().__call__(raw_request)

    def _next_rv(self) -> str:
        return str(next(self._counter))

    def _has_status(self, resource: kmock.resource) -> bool:
        return resource in self.resources and "status" in self.resources[resource].subresources

    def _serves(self, request: kmock.Request) -> bool:
        res = request.resource
        return bool(
            res is not None
            and res.plural
            and res in self.resources
            and request.action is not None
            and request.subresource in (None, "status")
        )

    async def _handle(self, request: kmock.Request) -> Any:
        # Resource requests are served here directly: kmock's reaction matching scans every
        # past request for each new one (60 ms a request after 1000), and the fallback
        # reactions would not see the amended objects. Discovery stays with kmock.
        if not self._serves(request):
            return await super()._handle(request)
        action = request.action
        refusal = self.refusals.get((request.resource, action))
        if refusal is not None:  # a quota, an admission plugin: what a test sets
            raise error(*refusal)
        if action == kmock.action.WATCH:
            return await kmock.Response(payload=self._serve_watch)(request)
        if action == kmock.action.LIST:
            return web.json_response(await self._serve_list(request))
        if action == kmock.action.CREATE:
            return web.json_response(await self._create(request), status=201)
        key = (request.resource, request.namespace, request.name)
        if action == kmock.action.FETCH:
            if key not in self.objects or self.objects[key].deleted:
                raise error(
                    404, "NotFound", f"{request.resource.plural} {request.name!r} not found"
                )
            return web.json_response(self.objects[key].raw)
        if action == kmock.action.UPDATE:
            new = await self._update(request)
            if new["metadata"].get("deletionTimestamp") and not new["metadata"].get("finalizers"):
                await self._remove(request.resource, request.namespace, request.name)
            return web.json_response(new)
        if action == kmock.action.DELETE:
            return web.json_response(await self._delete(request))
        raise error(405, "MethodNotAllowed", f"{request.method} is not emulated")

    async def _create(self, request: kmock.Request) -> dict[str, Any]:
        obj = self._admit(request)
        meta = obj["metadata"]
        key = (request.resource, meta.get("namespace"), meta["name"])
        async with self._lock:
            if key in self.objects and not self.objects[key].deleted:
                raise error(
                    409,
                    "AlreadyExists",
                    f"{request.resource.plural} {meta['name']!r} already exists",
                )
            if key in self.objects:
                self.objects[key].create(obj)
            else:
                self.objects[key] = obj
            await self._buses[request.resource].put({"type": "ADDED", "object": obj})
        return obj

    async def _delete(self, request: kmock.Request) -> dict[str, Any]:
        key = (request.resource, request.namespace, request.name)
        async with self._lock:
            if key not in self.objects or self.objects[key].deleted:
                raise error(
                    404, "NotFound", f"{request.resource.plural} {request.name!r} not found"
                )
            raw = copy.deepcopy(self.objects[key].raw)
            meta = raw.setdefault("metadata", {})
            if meta.get("finalizers"):  # marked only; removed when the last finalizer goes
                if not meta.get("deletionTimestamp"):
                    meta.update(deletionTimestamp=now_rfc3339(), resourceVersion=self._next_rv())
                    self.objects[key].history.append(raw)
                    await self._buses[request.resource].put({"type": "MODIFIED", "object": raw})
                return raw
        options = request.data if isinstance(request.data, dict) else {}
        policy = request.params.get("propagationPolicy") or options.get("propagationPolicy")
        await self._remove(request.resource, request.namespace, request.name, policy != "Orphan")
        return raw

    def _admit(self, request: kmock.Request) -> dict[str, Any]:
        if not isinstance(request.data, dict):
            raise error(400, "BadRequest", "the body must be a JSON object")
        obj = copy.deepcopy(request.data)
        meta = obj.setdefault("metadata", {})
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise error(422, "Invalid", "metadata.name: Required value")
            meta["name"] = meta["generateName"] + secrets.token_hex(3)[:5]
        if request.namespace:
            meta["namespace"] = request.namespace
        meta.update(
            uid=str(uuid.uuid4()),
            creationTimestamp=now_rfc3339(),
            resourceVersion=self._next_rv(),
            generation=1,
        )
        if request.resource == SECRETS and "stringData" in obj:
            data = obj.setdefault("data", {})
            for k, v in obj.pop("stringData").items():
                data[k] = base64.b64encode(v.encode()).decode()
        if self._has_status(request.resource):
            obj.pop("status", None)
        return obj

    async def _update(self, request: kmock.Request) -> dict[str, Any]:
        """Apply a PATCH; returns the object as stored."""
        key = (request.resource, request.namespace, request.name)
        async with self._lock:
            if key not in self.objects or self.objects[key].deleted:
                raise error(
                    404, "NotFound", f"{request.resource.plural} {request.name!r} not found"
                )
            current = copy.deepcopy(self.objects[key].raw)
            new = apply_patch(request, current)
            if request.subresource == "status":
                new = {k: v for k, v in current.items() if k != "status"} | (
                    {"status": new["status"]} if "status" in new else {}
                )
            elif self._has_status(request.resource):
                new.pop("status", None)
                if "status" in current:
                    new["status"] = current["status"]
            meta = new.setdefault("metadata", {})
            for field in _IMMUTABLE_META:
                if field in current.get("metadata", {}):
                    meta[field] = current["metadata"][field]
            if new == current:
                return current  # a no-op patch: no new resourceVersion, no event
            if new.get("spec") != current.get("spec"):
                meta["generation"] = int(meta.get("generation", 1)) + 1
            meta["resourceVersion"] = self._next_rv()
            self.objects[key].history.append(new)
            await self._buses[request.resource].put({"type": "MODIFIED", "object": new})
            return new

    async def _remove(
        self, resource: kmock.resource, namespace: str | None, name: str, cascade: bool = True
    ) -> None:
        key = (resource, namespace, name)
        async with self._lock:
            if key not in self.objects or self.objects[key].deleted:
                return
            raw = self.objects[key].raw
            self.objects[key].delete()
            await self._buses[resource].put({"type": "DELETED", "object": raw})
        uid = raw.get("metadata", {}).get("uid")
        if uid and cascade:
            await self._collect(uid)

    async def _collect(self, owner_uid: str) -> None:
        """Garbage-collect the dependents of a deleted owner (background propagation)."""
        dependents = [
            key
            for key, obj in list(self.objects.items())
            if not obj.deleted
            and any(
                ref.get("uid") == owner_uid
                for ref in obj.raw.get("metadata", {}).get("ownerReferences", [])
            )
        ]
        for resource, namespace, name in dependents:
            await self._remove(resource, namespace, name)

    def _select(self, request: kmock.Request) -> list[dict[str, Any]]:
        labels_ok = label_selector(request.params.get("labelSelector"))
        fields = dict(
            p.split("=", 1) for p in request.params.get("fieldSelector", "").split(",") if p
        )
        if set(fields) - {"metadata.name", "metadata.namespace"}:
            raise error(400, "BadRequest", f"field selector not emulated: {fields}")
        out = []
        for (resource, namespace, name), obj in self.objects.items():
            if resource != request.resource or obj.deleted:
                continue
            if request.namespace is not None and namespace != request.namespace:
                continue
            if (request.name or fields.get("metadata.name", name)) != name:
                continue
            if fields.get("metadata.namespace", namespace) != namespace:
                continue
            raw = obj.raw
            if labels_ok(raw.get("metadata", {}).get("labels") or {}):
                out.append(raw)
        return out

    async def _serve_list(self, request: kmock.Request) -> dict[str, Any]:
        if request.resource not in self._get_resources():
            raise kmock.KubernetesResourceNotFoundError()
        async with self._lock:
            items = self._select(request)
            rv = str(next(self._counter))
        return {"metadata": {"resourceVersion": rv}, "items": items}

    async def _serve_watch(self, request: kmock.Request) -> AsyncIterator[Any]:
        yield b""  # send the headers now
        bus = self._buses[request.resource]
        labels_ok = label_selector(request.params.get("labelSelector"))
        async with self._lock:
            marker = await bus.mark()  # before the snapshot: nothing falls between the two
            snapshot = self._select(request)
        self.watches_started[request.resource] += 1
        try:
            for raw in snapshot:
                yield {"type": "ADDED", "object": raw}
            async for event in bus.stream(since=marker):
                meta = event.get("object", {}).get("metadata", {})
                if request.namespace is not None and meta.get("namespace") != request.namespace:
                    continue
                if request.name is not None and meta.get("name") != request.name:
                    continue
                if labels_ok(meta.get("labels") or {}):
                    yield event
        finally:
            await bus.unmark(marker)
