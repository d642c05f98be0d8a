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
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

import urllib3
import yaml

if TYPE_CHECKING:
    import kubernetes

Obj = dict[str, Any]

TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"  # the API's RFC 3339 timestamps, to the second, in UTC


def parse_time(value: Any) -> datetime | None:
    """An API date-time as an aware datetime: RFC 3339, with "Z" or an offset, with or
    without fractional seconds; a time without a zone is UTC (comparing a naive time with an
    aware clock raises). None where there is none, or it is not one: a status is written by
    agents of any version, and the CRD's format check is not everywhere."""
    if not value:
        return None
    try:
        t = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


IN_CLUSTER = Path("/var/run/secrets/kubernetes.io/serviceaccount")
TOKEN_TTL_SECONDS = 60.0  # a projected ServiceAccount token is rotated in place; reread it
# Requests sent again when their connection broke: a read, and a merge patch (applying one
# twice gives what applying it once does). Never a create or a delete.
RESENDABLE = frozenset({"GET", "PATCH"})


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
    """Where the API server is and how to prove who we are (one kubeconfig context's worth).
    Certificates come as PEM bytes or as files."""

    server: str
    ca: bytes | str | None = None
    token: str | None = None
    token_file: str | None = None
    cert: bytes | str | None = None
    key: bytes | str | None = None
    insecure: bool = False
    # Asked for the token at every request instead of `token`, e.g. the official client's
    # exec plugin, which renews it before it expires.
    token_source: Callable[[], str | None] | None = None

    @staticmethod
    def in_cluster(account: Path = IN_CLUSTER) -> Credentials | None:
        """A pod's: the service's address from the environment, the ServiceAccount's token
        and CA from `account`; None outside a pod."""
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get(
            "KUBERNETES_SERVICE_PORT")
        if not host or not port or not (account / "token").exists():
            return None
        host = f"[{host}]" if ":" in host else host
        return Credentials(f"https://{host}:{port}", ca=str(account / "ca.crt"),
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

        def pem(key: str, owner: Obj) -> bytes | str | None:
            if owner.get(f"{key}-data"):  # inline, base64
                return base64.b64decode(owner[f"{key}-data"])
            if owner.get(key):
                return str(base / owner[key])  # relative to the kubeconfig, as kubectl reads it
            return None

        return Credentials(
            server=str(cluster["server"]).rstrip("/"),
            ca=pem("certificate-authority", cluster),
            token=user.get("token"),
            token_file=str(base / user["tokenFile"]) if user.get("tokenFile") else None,
            cert=pem("client-certificate", user), key=pem("client-key", user),
            insecure=bool(cluster.get("insecure-skip-tls-verify")))

    @staticmethod
    def from_configuration(c: kubernetes.client.Configuration) -> Credentials:
        """What the official client was configured with, whatever the kubeconfig needed to
        get it (an exec or auth-provider plugin's token included): the operator's."""

        def token() -> str | None:
            # Renews an expiring token; the value is the header's: "Bearer <token>".
            header = c.get_api_key_with_prefix("BearerToken", alias="authorization")
            return header.split(" ", 1)[-1] if header else None

        return Credentials(server=c.host.rstrip("/"), ca=c.ssl_ca_cert, cert=c.cert_file,
                           key=c.key_file, insecure=not c.verify_ssl, token_source=token)

    @staticmethod
    def from_environment() -> Credentials:
        """In-cluster credentials in a pod, else $KUBECONFIG / ~/.kube/config."""
        return Credentials.in_cluster() or Credentials.from_kubeconfig()


def _tls_context(c: Credentials) -> ssl.SSLContext:
    if isinstance(c.ca, bytes):
        context = ssl.create_default_context(cadata=c.ca.decode())
    else:
        context = ssl.create_default_context(cafile=c.ca)
    if c.insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if c.cert is not None:
        with tempfile.TemporaryDirectory(prefix="vmthunder-kube-") as tmp:
            # ssl reads a certificate and its key only from files: these live until loaded
            cert = _as_file(c.cert, Path(tmp) / "crt")
            key = None if c.key is None else _as_file(c.key, Path(tmp) / "key")
            context.load_cert_chain(cert, key)
    return context


def _as_file(pem: bytes | str, path: Path) -> str:
    if isinstance(pem, bytes):
        path.write_bytes(pem)
        return str(path)
    return pem


class Rest:
    """The API server's REST API as JSON: `get`, `list`, `create`, `patch`, `delete` and
    `watch` of a path such as `core_path("nodes", name)`. Errors raise ApiError."""

    def __init__(self, credentials: Credentials, pool_size: int = 4) -> None:
        self.credentials = credentials
        # urllib3 retries only a connection that could not be made; `_request` sends again
        # what is RESENDABLE when its connection broke; the callers retry the rest.
        self.pool = urllib3.PoolManager(
            maxsize=pool_size, ssl_context=_tls_context(credentials),
            retries=urllib3.Retry(total=2, connect=2, read=0, status=0, other=0,
                                  redirect=False))
        self._token: tuple[float, str] | None = None

    @classmethod
    def from_environment(cls, pool_size: int = 4) -> Rest:
        return cls(Credentials.from_environment(), pool_size)

    @classmethod
    def from_api_client(cls, api_client: kubernetes.client.ApiClient) -> Rest:
        """Logged in as the official client is (see Credentials.from_configuration)."""
        return cls(Credentials.from_configuration(api_client.configuration))

    # --- verbs ---

    def get(self, path: str, params: Mapping[str, Any] | None = None, *,
            timeout: float = 30) -> Obj:
        """An object or a list; `params` is the query (labelSelector, limit, ...)."""
        return self._json("GET", path, params, timeout=timeout)

    def find(self, path: str) -> Obj | None:
        """The object, or None if there is none (404)."""
        try:
            return self.get(path)
        except ApiError as e:
            if e.status == 404:
                return None
            raise

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
        watch, after at most `timeout_seconds`. An ERROR event raises ApiError with its code
        (410: the resource version is too old to watch from)."""
        query = {**(params or {}), "watch": True, "timeoutSeconds": timeout_seconds}
        response = self._request("GET", path, query, stream=True,
                                 timeout=urllib3.Timeout(connect=10, read=timeout_seconds + 30))
        ended = False
        try:
            pending = b""
            for chunk in response.stream(64 << 10):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    if event.get("type") == "ERROR":
                        status = event.get("object") or {}
                        raise ApiError(int(status.get("code") or 0),
                                       str(status.get("message") or "watch error"))
                    yield event
            ended = True
        except urllib3.exceptions.HTTPError as e:  # the connection broke mid-watch
            raise ApiError(0, f"watch of {path}: {e}") from e
        finally:
            if not ended:  # left early: the rest of the stream must not reach the next request
                response.close()
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
        data = None if body is None else json.dumps(body).encode()
        for attempt in range(2):
            try:
                response = self.pool.request(method, url, body=data, headers=headers,
                                             preload_content=not stream, timeout=timeout)
                break
            except urllib3.exceptions.HTTPError as e:
                # A kept-alive connection the server closed as it was reused fails the request
                # (seen under load as an SSL EOF); what may safely run twice is sent again on
                # a new one. A timeout is not: the server is slow, not gone.
                if (attempt or method not in RESENDABLE
                        or isinstance(e, urllib3.exceptions.TimeoutError)):
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
        if c.token_source is not None:
            return c.token_source()
        if not c.token_file:
            return c.token
        if self._token is None or time.monotonic() - self._token[0] > TOKEN_TTL_SECONDS:
            self._token = (time.monotonic(), Path(c.token_file).read_text().strip())
        return self._token[1]


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
