"""Connecting to the API server, the same way for every role.

Two clients. `load_api_client` builds the official `kubernetes` client, for the operator's
writes. `Rest` speaks the API's JSON over urllib3 and is what the node side (agent, CSI
driver) and every watch (`Informer`) use: `import kubernetes` loads the client's ~700
generated models, measured 5 s of CPU per process in a lab guest under TCG (0.26 s on the
host), and an agent and a node plugin on each of N nodes paid it at start, beside the VMs'
boots. The node side only ever reads and writes plain JSON objects.
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import tempfile
import time
from collections.abc import Generator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

import urllib3
import yaml

if TYPE_CHECKING:
    import kubernetes

Obj = dict[str, Any]

IN_CLUSTER = Path("/var/run/secrets/kubernetes.io/serviceaccount")
TOKEN_TTL_SECONDS = 60.0  # a projected ServiceAccount token is rotated in place; reread it


def load_api_client(pool_size: int = 4) -> kubernetes.client.ApiClient:
    """In-cluster credentials in a pod, else $KUBECONFIG / ~/.kube/config.

    `pool_size` bounds the connections kept open: the operator writes in parallel.
    """
    import kubernetes

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


class ApiError(Exception):
    """The API server answered with an error status (or, status 0, could not be reached)."""

    def __init__(self, status: int, reason: str, body: str = "") -> None:
        self.status = status
        self.reason = reason
        self.body = body
        super().__init__(f"({status}) {reason}" + (f": {body[:300]}" if body else ""))

    @property
    def transient(self) -> bool:
        """Worth retrying as it is: unreachable, throttled or a server-side failure."""
        return self.status in (0, 429) or self.status >= 500


@dataclass(frozen=True)
class Credentials:
    """Where the API server is and how to prove who we are (one kubeconfig context's worth)."""

    server: str
    ca_file: str | None = None
    token: str | None = None
    token_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure: bool = False

    @staticmethod
    def in_cluster(account: Path = IN_CLUSTER) -> Credentials | None:
        """A pod's: the service's address from the environment, the ServiceAccount's token
        and CA from `account`; None outside a pod."""
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get(
            "KUBERNETES_SERVICE_PORT")
        if not host or not port or not (account / "token").exists():
            return None
        host = f"[{host}]" if ":" in host else host
        return Credentials(f"https://{host}:{port}", ca_file=str(account / "ca.crt"),
                           token_file=str(account / "token"))

    @staticmethod
    def from_kubeconfig(path: str | None = None) -> Credentials:
        """The current context of a kubeconfig ($KUBECONFIG's first file, else ~/.kube/config).
        Bearer tokens and client certificates; no exec or auth-provider plugins."""
        path = path or (os.environ.get("KUBECONFIG") or "").split(os.pathsep)[0] or str(
            Path.home() / ".kube" / "config")
        config = yaml.safe_load(Path(path).read_text()) or {}
        base = Path(path).parent

        def named(kind: str, name: str) -> Obj:
            for entry in config.get(f"{kind}s") or []:
                if entry.get("name") == name:
                    return dict(entry.get(kind) or {})
            raise ValueError(f"{path}: no {kind} named {name!r}")

        context = named("context", str(config.get("current-context", "")))
        cluster, user = named("cluster", context["cluster"]), named("user", context["user"])
        if "exec" in user or "auth-provider" in user:
            raise ValueError(f"{path}: user {context['user']!r} needs a credential plugin; "
                             "give it a token or a client certificate")

        def file_of(key: str, owner: Obj) -> str | None:
            if owner.get(f"{key}-data"):  # inline, base64: urllib3 and ssl want a file
                return _temp_file(base64.b64decode(owner[f"{key}-data"]))
            if owner.get(key):
                return str(base / owner[key])  # relative to the kubeconfig, as kubectl reads it
            return None

        return Credentials(
            server=str(cluster["server"]).rstrip("/"),
            ca_file=file_of("certificate-authority", cluster),
            token=user.get("token"),
            token_file=str(base / user["tokenFile"]) if user.get("tokenFile") else None,
            cert_file=file_of("client-certificate", user), key_file=file_of("client-key", user),
            insecure=bool(cluster.get("insecure-skip-tls-verify")))

    @staticmethod
    def from_environment() -> Credentials:
        """In-cluster credentials in a pod, else $KUBECONFIG / ~/.kube/config."""
        return Credentials.in_cluster() or Credentials.from_kubeconfig()


def _temp_file(data: bytes) -> str:
    with tempfile.NamedTemporaryFile(prefix="vmthunder-kube-", delete=False) as f:
        f.write(data)
    return f.name


class Rest:
    """The API server's REST API as JSON: `get`, `list`, `create`, `patch`, `delete` and
    `watch` of a path such as `custom_path("imagereplicas", name)`. Errors raise ApiError."""

    def __init__(self, credentials: Credentials, pool_size: int = 4) -> None:
        self.credentials = credentials
        context = ssl.create_default_context(cafile=credentials.ca_file)
        if credentials.insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if credentials.cert_file:
            context.load_cert_chain(credentials.cert_file, credentials.key_file)
        self.pool = urllib3.PoolManager(maxsize=pool_size, ssl_context=context,
                                        retries=False)
        self._token: tuple[float, str | None] = (-TOKEN_TTL_SECONDS, None)

    @classmethod
    def from_environment(cls, pool_size: int = 4) -> Rest:
        return cls(Credentials.from_environment(), pool_size)

    # --- verbs ---

    def get(self, path: str, params: Mapping[str, Any] | None = None, *,
            timeout: float = 30) -> Obj:
        """An object or a list; `params` is the query (labelSelector, limit, ...)."""
        return self._json("GET", path, params, timeout=timeout)

    def create(self, path: str, body: Mapping[str, Any]) -> Obj:
        return self._json("POST", path, body=body)

    def patch(self, path: str, body: Mapping[str, Any]) -> Obj:
        """A JSON merge patch (RFC 7386): maps merge, lists and scalars replace."""
        return self._json("PATCH", path, body=body, content_type="application/merge-patch+json")

    def delete(self, path: str) -> Obj:
        return self._json("DELETE", path)

    def watch(self, path: str, timeout_seconds: int, params: Mapping[str, Any] | None = None
              ) -> Generator[Obj, None, None]:
        """The watch events ({"type", "object"}) of a collection until the server ends the
        watch, after at most `timeout_seconds`."""
        query = {**(params or {}), "watch": True, "timeoutSeconds": timeout_seconds}
        response = self._request("GET", path, query, stream=True,
                                 timeout=urllib3.Timeout(connect=10, read=timeout_seconds + 30))
        try:
            pending = b""
            for chunk in response.stream(64 << 10):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if line.strip():
                        yield json.loads(line)
        except urllib3.exceptions.HTTPError as e:  # the connection broke mid-watch
            raise ApiError(0, f"watch of {path}: {e}") from e
        finally:
            response.release_conn()

    # --- the wire ---

    def _json(self, method: str, path: str, params: Mapping[str, Any] | None = None,
              body: Mapping[str, Any] | None = None, content_type: str = "application/json",
              timeout: float = 30) -> Obj:
        response = self._request(method, path, params, body, content_type,
                                 timeout=urllib3.Timeout(total=timeout))
        result: Obj = json.loads(response.data)
        return result

    def _request(self, method: str, path: str, params: Mapping[str, Any] | None = None,
                 body: Mapping[str, Any] | None = None, content_type: str = "application/json",
                 *, stream: bool = False, timeout: urllib3.Timeout) -> urllib3.BaseHTTPResponse:
        headers = {"Accept": "application/json"}
        token = self._bearer()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if body is not None:
            headers["Content-Type"] = content_type
        query = {k: _param(v) for k, v in (params or {}).items() if v not in (None, "")}
        url = self.credentials.server + path + (f"?{urlencode(query)}" if query else "")
        try:
            response = self.pool.request(
                method, url,
                body=None if body is None else json.dumps(body).encode(), headers=headers,
                preload_content=not stream, timeout=timeout)
        except urllib3.exceptions.HTTPError as e:
            raise ApiError(0, f"{method} {path}: {e}") from e
        if not 200 <= response.status <= 299:
            text = response.data.decode(errors="replace")
            try:
                reason = str(json.loads(text).get("message") or response.reason)
            except (ValueError, AttributeError):
                reason = str(response.reason)
            raise ApiError(response.status, reason, text)
        return response

    def _bearer(self) -> str | None:
        c = self.credentials
        if not c.token_file:
            return c.token
        read_at, token = self._token
        if time.monotonic() - read_at > TOKEN_TTL_SECONDS:
            token = Path(c.token_file).read_text().strip()
            self._token = (time.monotonic(), token)
        return token


def _param(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


# --- paths ------------------------------------------------------------------------------------

def custom_path(group: str, version: str, plural: str, name: str | None = None,
                subresource: str | None = None) -> str:
    """A cluster-scoped custom resource collection, one object, or one object's subresource."""
    path = f"/apis/{group}/{version}/{plural}"
    if name is not None:
        path += f"/{quote(name, safe='')}"
    if subresource is not None:
        path += f"/{subresource}"
    return path


def core_path(plural: str, name: str | None = None, namespace: str | None = None) -> str:
    """A core-group (/api/v1) collection or object; namespaced when `namespace` is given."""
    path = "/api/v1" + (f"/namespaces/{quote(namespace, safe='')}" if namespace else "")
    path += f"/{plural}"
    return path if name is None else f"{path}/{quote(name, safe='')}"
