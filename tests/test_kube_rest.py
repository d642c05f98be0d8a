"""The node side's JSON client (vmthunder.kube.Rest) against the real API server: the
credentials a kubeconfig or a pod gives, the verbs, the errors, a watch."""

from __future__ import annotations

import base64
import http.server
import subprocess
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from waiting import wait_for

from vmthunder.kube import ApiError, Credentials, Rest, core_path, load_api_client
from vmthunder.lab.controlplane import ControlPlane

pytestmark = pytest.mark.apiserver


@pytest.fixture
def namespace(control_plane: ControlPlane) -> str:
    ns = f"rest-{uuid.uuid4().hex[:8]}"
    control_plane.rest().create(core_path("namespaces"), {"metadata": {"name": ns}})
    return ns


def test_objects_are_created_read_merge_patched_and_deleted(
        control_plane: ControlPlane, namespace: str) -> None:
    rest = control_plane.rest()
    maps = core_path("configmaps", namespace=namespace)
    rest.create(maps, {"metadata": {"name": "m"}, "data": {"a": "1", "b": "2"}})
    rest.patch(f"{maps}/m", {"data": {"b": None, "c": "3"}})  # merge patch: null removes
    assert rest.get(f"{maps}/m")["data"] == {"a": "1", "c": "3"}
    assert [m["metadata"]["name"] for m in rest.get(maps, {"fieldSelector": "metadata.name=m"})[
        "items"]] == ["m"]
    rest.delete(f"{maps}/m")
    with pytest.raises(ApiError) as gone:
        rest.get(f"{maps}/m")
    assert gone.value.status == 404 and not gone.value.transient
    assert '"m" not found' in gone.value.reason


def test_a_second_create_is_a_conflict(control_plane: ControlPlane, namespace: str) -> None:
    rest = control_plane.rest()
    maps = core_path("configmaps", namespace=namespace)
    rest.create(maps, {"metadata": {"name": "twice"}})
    with pytest.raises(ApiError) as e:
        rest.create(maps, {"metadata": {"name": "twice"}})
    assert e.value.status == 409


def test_a_watch_streams_the_changes_and_ends_when_the_server_ends_it(
        control_plane: ControlPlane, namespace: str) -> None:
    rest = control_plane.rest()
    maps = core_path("configmaps", namespace=namespace)
    version = rest.get(maps)["metadata"]["resourceVersion"]
    seen: list[tuple[str, str]] = []

    def watch() -> None:
        for event in rest.watch(maps, 6, {"resourceVersion": version}):
            seen.append((event["type"], event["object"]["metadata"]["name"]))

    watcher = threading.Thread(target=watch)
    watcher.start()
    rest.create(maps, {"metadata": {"name": "w"}})
    wait_for("the event as it happens, not when the watch ends",
             lambda: seen == [("ADDED", "w")], timeout=3)
    rest.patch(f"{maps}/w", {"data": {"k": "v"}})
    rest.delete(f"{maps}/w")
    watcher.join(20)
    assert not watcher.is_alive(), "the watch did not end after its timeoutSeconds"
    assert seen == [("ADDED", "w"), ("MODIFIED", "w"), ("DELETED", "w")]


def _kubeconfig(path: Path, cluster: dict[str, Any], user: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "k", "cluster": cluster}], "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}]}))
    return path


def test_a_kubeconfig_with_inline_ca_and_a_token_file_reaches_the_server(
        control_plane: ControlPlane, tmp_path: Path) -> None:
    (tmp_path / "token").write_text(control_plane.admin_token + "\n")
    config = _kubeconfig(tmp_path / "config", {
        "server": control_plane.url,
        "certificate-authority-data": base64.b64encode(control_plane.ca_file.read_bytes()).decode(),
    }, {"tokenFile": "token"})  # relative to the kubeconfig, as kubectl reads it
    assert "gitVersion" in Rest(Credentials.from_kubeconfig(str(config))).get("/version")


def test_a_wrong_token_is_refused_and_an_untrusted_server_is_unreachable(
        control_plane: ControlPlane, tmp_path: Path) -> None:
    config = _kubeconfig(tmp_path / "bad-token", {
        "server": control_plane.url, "certificate-authority": str(control_plane.ca_file),
    }, {"token": "not-a-token"})
    with pytest.raises(ApiError) as refused:
        Rest(Credentials.from_kubeconfig(str(config))).get(core_path("nodes"))
    assert refused.value.status == 401

    # No CA given: the system's roots do not sign the lab's server, so TLS fails (status 0).
    config = _kubeconfig(tmp_path / "no-ca", {"server": control_plane.url},
                         {"token": control_plane.admin_token})
    with pytest.raises(ApiError) as untrusted:
        Rest(Credentials.from_kubeconfig(str(config))).get("/version", timeout=5)
    assert untrusted.value.status == 0 and untrusted.value.transient
    assert "CERTIFICATE_VERIFY_FAILED" in str(untrusted.value)


def test_a_pods_service_account_reaches_the_server(
        control_plane: ControlPlane, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    host_port = control_plane.url.removeprefix("https://")
    host, port = host_port.rsplit(":", 1)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", host)
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", port)
    assert Credentials.in_cluster(tmp_path) is None  # no token there: not in a pod
    (tmp_path / "token").write_text(control_plane.admin_token)
    (tmp_path / "ca.crt").write_bytes(control_plane.ca_file.read_bytes())
    credentials = Credentials.in_cluster(tmp_path)
    assert credentials is not None
    assert "gitVersion" in Rest(credentials).get("/version")


def test_a_kubeconfig_that_needs_a_credential_plugin_is_refused_with_why(
        tmp_path: Path) -> None:
    config = _kubeconfig(tmp_path / "exec", {"server": "https://127.0.0.1:1"},
                         {"exec": {"command": "aws", "apiVersion": "v1"}})
    with pytest.raises(ValueError, match="credential plugin"):
        Credentials.from_kubeconfig(str(config))


def test_the_operators_login_through_an_exec_plugin_serves_its_watches_too(
        control_plane: ControlPlane, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An operator run outside the cluster with a kubeconfig needing a credential plugin: its
    informers take the official client's login, renewed when the token expires."""
    runs = tmp_path / "runs"
    plugin = tmp_path / "plugin"
    plugin.write_text(  # a token that has already expired: asked for again at every request
        f"#!/bin/sh\necho run >> {runs}\n"
        'echo \'{"apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential", '
        f'"status": {{"token": "{control_plane.admin_token}", '
        '"expirationTimestamp": "2000-01-01T00:00:00Z"}}\'\n')
    plugin.chmod(0o755)
    config = _kubeconfig(tmp_path / "exec", {
        "server": control_plane.url, "certificate-authority": str(control_plane.ca_file),
    }, {"exec": {"command": str(plugin), "apiVersion": "client.authentication.k8s.io/v1",
                 "interactiveMode": "Never"}})
    monkeypatch.setenv("KUBECONFIG", str(config))
    rest = Rest.from_api_client(load_api_client())
    assert rest.get(core_path("nodes"))["kind"] == "NodeList"
    before = len(runs.read_text().splitlines())
    assert rest.get("/version")["gitVersion"]
    assert len(runs.read_text().splitlines()) > before, "the expired token was not renewed"


def test_a_watch_left_early_leaves_its_connection_clean_for_the_next_request(
        control_plane: ControlPlane, namespace: str) -> None:
    rest = Rest(Credentials.from_kubeconfig(str(control_plane.kubeconfig)), pool_size=1)
    maps = core_path("configmaps", namespace=namespace)
    rest.create(maps, {"metadata": {"name": "a"}})
    events = rest.watch(maps, 60)  # no resourceVersion: first the objects as they are
    assert next(events)["object"]["metadata"]["name"] == "a"
    events.close()  # as wait_replica does once its condition holds
    assert rest.get(f"{maps}/a", timeout=5)["metadata"]["name"] == "a"
    rest.create(maps, {"metadata": {"name": "b"}})
    assert len(rest.get(maps)["items"]) == 2


def test_a_client_certificate_inline_in_the_kubeconfig_authenticates(
        control_plane: ControlPlane, tmp_path: Path) -> None:
    pki = control_plane.ca_file.parent
    key, csr, crt = tmp_path / "u.key", tmp_path / "u.csr", tmp_path / "u.crt"
    subprocess.run(["openssl", "req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    str(key), "-out", str(csr), "-subj", "/O=system:masters/CN=rest-test"],
                   check=True, capture_output=True)
    subprocess.run(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(pki / "ca.crt"),
                    "-CAkey", str(pki / "ca.key"), "-CAcreateserial", "-days", "1",
                    "-out", str(crt)], check=True, capture_output=True)
    b64 = lambda p: base64.b64encode(p.read_bytes()).decode()  # noqa: E731
    config = _kubeconfig(tmp_path / "cert", {
        "server": control_plane.url, "certificate-authority": str(control_plane.ca_file),
    }, {"client-certificate-data": b64(crt), "client-key-data": b64(key)})
    before = set(Path(tempfile.gettempdir()).glob("vmthunder-kube-*"))
    nodes = Rest(Credentials.from_kubeconfig(str(config))).get(core_path("nodes"))
    assert nodes["kind"] == "NodeList"
    assert set(Path(tempfile.gettempdir()).glob("vmthunder-kube-*")) == before, \
        "the key was left on disk"


def test_a_read_or_patch_whose_connection_breaks_is_sent_again_a_create_is_not() -> None:
    """A kept-alive connection the server closes as it is reused (an SSL EOF under load, which
    failed an agent's round at N = 16): a server that hangs up on every other request."""
    requests: list[str] = []

    class HangsUpEveryOther(http.server.BaseHTTPRequestHandler):
        def _answer(self) -> None:
            requests.append(self.command)
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if len(requests) % 2:
                self.close_connection = True  # no answer at all
                return
            body = b'{"kind": "Status"}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_PATCH = do_POST = _answer

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), HangsUpEveryOther)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        rest = Rest(Credentials(f"http://127.0.0.1:{server.server_port}"))
        assert rest.get("/version") == {"kind": "Status"}
        assert rest.patch("/x", {"a": 1}) == {"kind": "Status"}
        assert requests == ["GET", "GET", "PATCH", "PATCH"]
        with pytest.raises(ApiError) as e:
            rest.create("/x", {"a": 1})
        assert e.value.status == 0 and e.value.transient
        assert requests[4:] == ["POST"]  # sent once: a second might create twice
    finally:
        server.shutdown()
