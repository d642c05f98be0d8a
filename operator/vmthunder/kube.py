"""Connecting to the API server, the same way for every role."""

from __future__ import annotations

import json
import os
from typing import Any
from urllib.parse import quote

import kubernetes


def load_api_client(pool_size: int = 4) -> kubernetes.client.ApiClient:
    """In-cluster credentials in a pod, else $KUBECONFIG / ~/.kube/config.

    `pool_size` bounds the connections kept open: the operator writes in parallel.
    """
    configuration = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(  # type: ignore[no-untyped-call]
            client_configuration=configuration)
    except kubernetes.config.ConfigException:
        # $KUBECONFIG read now: the library reads it once, when it is first imported.
        kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=os.environ.get("KUBECONFIG"), client_configuration=configuration)
    configuration.connection_pool_maxsize = pool_size
    return kubernetes.client.ApiClient(configuration)


class CoreJson:
    """Core-group calls (/api/v1/...) answered as plain JSON, for the node side's few reads.

    kubernetes.client.CoreV1Api imports the core group's ~200 generated pydantic models when
    first built: measured 9 s of CPU in a lab guest under TCG (0.5 s on the host), paid at
    start-up by every process that builds one, for a secret, a ConfigMap and an event.
    Errors raise kubernetes.client.ApiException, as the generated calls do."""

    def __init__(self, api: kubernetes.client.ApiClient) -> None:
        self.api = api

    def get(self, plural: str, namespace: str, name: str) -> dict[str, Any]:
        """One namespaced object, e.g. get("secrets", ns, name)."""
        return self._call("GET", f"{self._namespaced(plural, namespace)}/{quote(name, safe='')}")

    def create(self, plural: str, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", self._namespaced(plural, namespace), body)

    @staticmethod
    def _namespaced(plural: str, namespace: str) -> str:
        return f"/api/v1/namespaces/{quote(namespace, safe='')}/{plural}"

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None
              ) -> dict[str, Any]:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        method, url, headers, payload, _ = self.api.param_serialize(
            method=method, resource_path=path, header_params=headers, body=body,
            auth_settings=["BearerToken"])
        response = self.api.call_api(method, url, header_params=headers, body=payload,
                                     _request_timeout=30)
        data = response.read()  # type: ignore[no-untyped-call]
        if not 200 <= response.status <= 299:
            raise kubernetes.client.ApiException(http_resp=response)
        result: dict[str, Any] = json.loads(data)
        return result
