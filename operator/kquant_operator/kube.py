"""A small async Kubernetes API client for the handlers: plain dicts in and out.

It rides on the official ``kubernetes`` client for configuration and authentication
(in-cluster service account, else the kubeconfig named by ``$KUBECONFIG`` at call time, else
``~/.kube/config``) and its connection pool, but sends raw JSON to explicit REST paths: no
model classes, so a Job manifest goes out exactly as :func:`kquant_operator.jobs.build_job`
built it. The client is blocking; every call runs in one of this client's worker threads, so
kopf's event loop never waits on the network.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
from typing import Any
from urllib.parse import quote, urlencode

import kubernetes
import urllib3

MERGE_PATCH = "application/merge-patch+json"
TRANSIENT_STATUSES = (408, 429, 500, 502, 503, 504)
POOL_SIZE = 16  # concurrent API calls (threads and HTTP connections)
USER_AGENT = "kquant-operator"


class ApiError(Exception):
    """An API call failed: ``status`` is the HTTP status (0 when no response came back),
    ``reason`` the Kubernetes Status reason (NotFound, AlreadyExists, Conflict...)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status, self.reason, self.message = status, reason, message

    @property
    def transient(self) -> bool:
        """True when a retry may succeed (no answer, throttling, server-side errors)."""
        return self.status == 0 or self.status in TRANSIENT_STATUSES


def path(
    group: str, version: str, plural: str, namespace: str, name: str = "", sub: str = ""
) -> str:
    """The REST path of a namespaced collection or object (``group`` "" is the core API)."""
    root = f"/apis/{group}/{version}" if group else f"/api/{version}"
    out = f"{root}/namespaces/{quote(namespace, safe='')}/{plural}"
    if name:
        out += f"/{quote(name, safe='')}"
    return out + (f"/{sub}" if sub else "")


class Kube:
    """Async JSON calls to the API server. ``timeout`` (seconds) bounds each request."""

    def __init__(self, api: kubernetes.client.ApiClient, timeout: float = 30.0) -> None:
        """``api`` brings configuration, credentials and connections; ``timeout`` in s."""
        self._api = api
        self._timeout = timeout
        # Own threads, as many as pooled connections: the handlers' blocking calls neither
        # wait on the loop's small default executor (cores + 4) nor on a free connection.
        self._pool = concurrent.futures.ThreadPoolExecutor(POOL_SIZE, thread_name_prefix="kube")

    @classmethod
    def from_environment(cls) -> Kube:
        """Configure from the pod's service account, else from the kubeconfig."""
        config = kubernetes.client.Configuration()
        config.connection_pool_maxsize = POOL_SIZE
        try:
            kubernetes.config.load_incluster_config(client_configuration=config)
        except kubernetes.config.ConfigException:
            kubernetes.config.load_kube_config(
                config_file=os.environ.get("KUBECONFIG") or None, client_configuration=config
            )
        return cls(kubernetes.client.ApiClient(config))

    def close(self) -> None:
        """Release the threads and the connection pool."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._api.close()

    def _call(
        self, method: str, url_path: str, body: Any, query: dict[str, str] | None, ctype: str
    ) -> Any:
        config = self._api.configuration
        url = config.host.rstrip("/") + url_path
        if query:
            url += "?" + urlencode(query)
        # Named in the API server's audit log and metrics (urllib3's default says nothing).
        headers = {"Accept": "application/json", "Content-Type": ctype, "User-Agent": USER_AGENT}
        # Bearer tokens (refreshed by the client's hook); client certificates live in the pool.
        for auth in config.auth_settings().values():
            if auth.get("in") == "header" and auth.get("value"):
                headers[auth["key"]] = auth["value"]
        try:
            response = self._api.rest_client.request(
                method, url, headers=headers, body=body, _request_timeout=self._timeout
            )
            data = response.data if response.data is not None else response.read()
        except kubernetes.client.ApiException as exc:  # older clients raise on 4xx/5xx
            raise _api_error(exc.status or 0, exc.reason or "", exc.body) from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise ApiError(0, "Unavailable", f"{type(exc).__name__}: {exc}") from None
        if not 200 <= response.status < 300:
            raise _api_error(response.status, response.reason or "", data)
        return json.loads(data) if data else {}

    async def request(
        self,
        method: str,
        url_path: str,
        *,
        body: Any = None,
        query: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> Any:
        """One API call; returns the decoded JSON answer. Raises :class:`ApiError`."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._pool, self._call, method, url_path, body, query, content_type
        )

    async def get(self, url_path: str) -> dict[str, Any]:
        """GET one object."""
        return await self.request("GET", url_path)

    async def list(self, url_path: str, label_selector: str = "") -> list[dict[str, Any]]:
        """GET a collection; its items, filtered server-side by ``label_selector``."""
        query = {"labelSelector": label_selector} if label_selector else None
        return (await self.request("GET", url_path, query=query)).get("items") or []

    async def create(self, url_path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST a new object into a collection."""
        return await self.request("POST", url_path, body=body)

    async def merge_patch(self, url_path: str, patch: dict[str, Any]) -> dict[str, Any]:
        """PATCH with a JSON merge patch (RFC 7386): what custom resources accept."""
        return await self.request("PATCH", url_path, body=patch, content_type=MERGE_PATCH)

    async def delete(self, url_path: str, propagation: str = "Background") -> dict[str, Any]:
        """DELETE one object; dependents are removed by the garbage collector."""
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": propagation}
        return await self.request("DELETE", url_path, body=body)


def _api_error(status: int, reason: str, data: bytes | str | None) -> ApiError:
    """An ApiError from a failed answer, preferring the Status object's reason and message."""
    text = data.decode(errors="replace") if isinstance(data, bytes) else (data or "")
    try:
        doc = json.loads(text)
    except ValueError:
        doc = {}
    if isinstance(doc, dict) and doc.get("kind") == "Status":
        return ApiError(status, doc.get("reason") or reason, doc.get("message") or text)
    return ApiError(status, reason, text[:500])
