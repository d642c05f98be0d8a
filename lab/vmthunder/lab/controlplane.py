"""A real, local Kubernetes control plane: etcd, kube-apiserver and kube-controller-manager.

The binaries come from ``scripts/build-tools.sh`` (built from the Go module proxy, cached in
``~/.cache/vmthunder/bin``). There are no kubelets: Node objects are created by whoever needs
them. The garbage collector of kube-controller-manager is what deletes owned objects, so it
runs too.

    with start_control_plane(Path("/tmp/cp")) as cp:
        cp.kubectl("apply", "-f", "deploy/crds/")
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vmthunder.kube import Credentials, Rest

CACHE = Path(os.environ.get("VMT_CACHE", Path.home() / ".cache" / "vmthunder"))
BIN = CACHE / "bin"
REPO = Path(__file__).resolve().parents[3]
SERVICE_CIDR = "10.96.0.0/16"


class ControlPlaneError(RuntimeError):
    """The control plane could not start; carries the tail of the failing component's log."""


def binary(name: str) -> Path:
    path = BIN / name
    if not path.exists():
        raise ControlPlaneError(f"{path} is missing: run scripts/build-tools.sh")
    return path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class ControlPlane:
    workdir: Path
    url: str
    kubeconfig: Path
    admin_token: str
    ca_file: Path
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Runs the project's own kubectl (matching the server) against this control plane."""
        result = subprocess.run(
            [str(binary("kubectl")), "--kubeconfig", str(self.kubeconfig), *args],
            input=input,
            capture_output=True,
            text=True,
        )
        if check and result.returncode != 0:
            raise ControlPlaneError(f"kubectl {' '.join(args)}: {result.stderr.strip()}")
        return result

    def install_vmthunder_crds(self) -> None:
        """Applies the project's CRDs as a user would, and the operator's peering object."""
        self.kubectl("apply", "-f", str(REPO / "deploy" / "crds"))
        self.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
        self.kubectl("apply", "-f", str(REPO / "deploy" / "peering.yaml"))

    def spawn_operator(
        self, log: Path, priority: int = 0, metrics_port: int | None = None
    ) -> subprocess.Popen[bytes]:
        """The operator as a real process (`vmthunder operator`) against this API server; a
        restarted one appends to the same log."""
        with open(log, "ab") as out:
            return subprocess.Popen(
                [sys.executable, "-m", "vmthunder.cli", "operator", "--priority", str(priority),
                 "--metrics-port", str(metrics_port or free_port())],
                env={**self.env(), "PYTHONUNBUFFERED": "1"}, stdout=out, stderr=subprocess.STDOUT,
            )

    def env(self) -> dict[str, str]:
        """Environment for a child process (operator, CSI driver) to reach this API server."""
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig)}

    def rest(self) -> Rest:
        """The project's JSON client (the node side's) as this control plane's admin."""
        return Rest(Credentials.from_kubeconfig(str(self.kubeconfig)))

    def token_kubeconfig(self, name: str, token: str) -> Path:
        """A kubeconfig that authenticates with a bearer token (e.g. a ServiceAccount's)."""
        path = self.workdir / f"{name}.kubeconfig"
        path.write_text(_kubeconfig(self.url, self.ca_file, token))
        return path

    def stop(self) -> None:
        # The API server ignores SIGTERM once etcd is gone: stop it (and its clients) first.
        for name in ("kube-controller-manager", "kube-apiserver", "etcd"):
            proc = self.processes.pop(name, None)
            if proc is None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _make_pki(pki: Path, sans: Sequence[str]) -> None:
    pki.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3650",
             "-keyout", str(pki / "ca.key"), "-out", str(pki / "ca.crt"),
             "-subj", "/CN=vmthunder-ca")
    alt = ",".join(
        [f"IP:{san}" if san.replace(".", "").isdigit() else f"DNS:{san}" for san in sans]
        + ["DNS:kubernetes", "DNS:kubernetes.default", "DNS:kubernetes.default.svc",
           "DNS:kubernetes.default.svc.cluster.local", "DNS:localhost", "IP:10.96.0.1"]
    )
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(pki / "apiserver.key"),
             "-out", str(pki / "apiserver.csr"), "-subj", "/CN=kube-apiserver")
    (pki / "ext.cnf").write_text(f"subjectAltName={alt}\n")
    _openssl("x509", "-req", "-in", str(pki / "apiserver.csr"), "-CA", str(pki / "ca.crt"),
             "-CAkey", str(pki / "ca.key"), "-CAcreateserial", "-days", "3650",
             "-out", str(pki / "apiserver.crt"), "-extfile", str(pki / "ext.cnf"))
    _openssl("genrsa", "-out", str(pki / "sa.key"), "2048")
    _openssl("rsa", "-in", str(pki / "sa.key"), "-pubout", "-out", str(pki / "sa.pub"))


def _kubeconfig(url: str, ca: Path, token: str) -> str:
    return f"""apiVersion: v1
kind: Config
clusters:
- name: vmthunder
  cluster: {{server: "{url}", certificate-authority: "{ca}"}}
users:
- name: user
  user: {{token: "{token}"}}
contexts:
- name: vmthunder
  context: {{cluster: vmthunder, user: user}}
current-context: vmthunder
"""


def _wait_ready(cp: ControlPlane, timeout: float) -> None:
    ctx = ssl.create_default_context(cafile=str(cp.ca_file))
    request = urllib.request.Request(
        f"{cp.url}/readyz", headers={"Authorization": f"Bearer {cp.admin_token}"}
    )
    deadline = time.monotonic() + timeout
    while True:
        for name, proc in cp.processes.items():
            if proc.poll() is not None:
                log = (cp.workdir / f"{name}.log").read_text()[-3000:]
                raise ControlPlaneError(f"{name} exited with {proc.returncode}:\n{log}")
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(request, context=ctx, timeout=2) as response,
        ):
            if response.status == 200:
                return
        if time.monotonic() > deadline:
            raise ControlPlaneError(f"kube-apiserver not ready after {timeout:.0f} s")
        time.sleep(0.2)


def start_control_plane(
    workdir: Path,
    *,
    bind_address: str = "127.0.0.1",
    extra_sans: Sequence[str] = (),
    controller_manager: bool = True,
    timeout: float = 60.0,
) -> ControlPlane:
    """Starts etcd, kube-apiserver (and kube-controller-manager) and waits until ready."""
    if workdir.exists():
        shutil.rmtree(workdir)
    pki = workdir / "pki"
    _make_pki(pki, ["127.0.0.1", bind_address, *extra_sans])
    admin_token = secrets.token_hex(16)
    kcm_token = secrets.token_hex(16)
    # Static tokens: the admin for tests and tools, the controller manager as its own user
    # so the bootstrap RBAC policy (not system:masters) decides what it may do.
    (workdir / "tokens.csv").write_text(
        f'{admin_token},admin,admin,"system:masters"\n'
        f"{kcm_token},system:kube-controller-manager,kcm\n"
    )
    host = "127.0.0.1" if bind_address in ("127.0.0.1", "0.0.0.0") else bind_address
    api_port = free_port(host)
    etcd_client, etcd_peer = free_port(), free_port()
    url = f"https://{host}:{api_port}"
    cp = ControlPlane(workdir, url, workdir / "admin.kubeconfig", admin_token, pki / "ca.crt")
    cp.kubeconfig.write_text(_kubeconfig(url, cp.ca_file, admin_token))
    (workdir / "kcm.kubeconfig").write_text(_kubeconfig(url, cp.ca_file, kcm_token))

    def spawn(name: str, argv: list[str]) -> None:
        log = open(workdir / f"{name}.log", "wb")  # noqa: SIM115 - owned by the child
        cp.processes[name] = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    try:
        spawn("etcd", [
            str(binary("etcd")), "--data-dir", str(workdir / "etcd"), "--unsafe-no-fsync",
            "--listen-client-urls", f"http://127.0.0.1:{etcd_client}",
            "--advertise-client-urls", f"http://127.0.0.1:{etcd_client}",
            "--listen-peer-urls", f"http://127.0.0.1:{etcd_peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{etcd_peer}",
            "--initial-cluster", f"default=http://127.0.0.1:{etcd_peer}",
            "--log-level", "warn",
        ])
        spawn("kube-apiserver", [
            str(binary("kube-apiserver")),
            f"--etcd-servers=http://127.0.0.1:{etcd_client}",
            f"--bind-address={bind_address}", f"--secure-port={api_port}",
            f"--advertise-address={host}",
            "--endpoint-reconciler-type=none",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--token-auth-file={workdir / 'tokens.csv'}",
            "--authorization-mode=Node,RBAC",
            f"--service-account-issuer={url}",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--enable-priority-and-fairness=false",
            # As kubeadm and every distribution set it: CSI node plugins run privileged.
            "--allow-privileged=true",
            "--v=0",
        ])
        _wait_ready(cp, timeout)
        if controller_manager:
            kcm = str(workdir / "kcm.kubeconfig")
            spawn("kube-controller-manager", [
                str(binary("kube-controller-manager")),
                f"--kubeconfig={kcm}", f"--authentication-kubeconfig={kcm}",
                f"--authorization-kubeconfig={kcm}",
                "--leader-elect=false", "--use-service-account-credentials=true",
                "--authentication-skip-lookup=true",
                f"--service-account-private-key-file={pki / 'sa.key'}",
                f"--root-ca-file={pki / 'ca.crt'}",
                "--controllers=garbage-collector-controller,serviceaccount-controller,"
                "serviceaccount-token-controller,namespace-controller,"
                "clusterrole-aggregation-controller",
                "--bind-address=127.0.0.1", f"--secure-port={free_port()}",
            ])
    except BaseException:
        cp.stop()
        raise
    return cp


@contextlib.contextmanager
def control_plane(workdir: Path, **kwargs: object) -> Iterator[ControlPlane]:
    cp = start_control_plane(workdir, **kwargs)  # type: ignore[arg-type]
    try:
        yield cp
    finally:
        cp.stop()
