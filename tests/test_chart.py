"""The Helm chart and the plain manifests made from it, checked as a cluster operator meets them:
`helm lint`, the rendered manifests against the real API server, and the operator run from the
rendered StatefulSet's command line under the chart's own ServiceAccount."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml
from waiting import wait_for

import vmthunder.cli
import vmthunder.node.cli
from vmthunder.csi.names import DRIVER_NAME
from vmthunder.lab.controlplane import BIN, ControlPlane, free_port
from vmthunder.lab.nodes import register_node

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "charts" / "vmthunder"
HELM = BIN / "helm"
KUBE_VERSION = "1.37.2"
NAMESPACE = "vmthunder"

Manifest = dict[str, Any]


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(HELM), *args], capture_output=True, text=True, check=False)


def render(*values: str, release: str = "vmthunder") -> list[Manifest]:
    """`helm template` of the chart; `values` are --set assignments."""
    sets = [arg for value in values for arg in ("--set", value)]
    result = helm("template", release, str(CHART), "--namespace", NAMESPACE,
                  "--kube-version", KUBE_VERSION, *sets)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def find(manifests: list[Manifest], kind: str, name: str | None = None) -> list[Manifest]:
    return [m for m in manifests
            if m["kind"] == kind and (name is None or m["metadata"]["name"] == name)]


def one(manifests: list[Manifest], kind: str, name: str | None = None) -> Manifest:
    found = find(manifests, kind, name)
    assert len(found) == 1, f"{kind} {name}: {len(found)} found"
    return found[0]


def pod_spec(workload: Manifest) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def container(workload: Manifest, name: str) -> dict[str, Any]:
    matches: list[dict[str, Any]] = [
        c for c in pod_spec(workload)["containers"] if c["name"] == name]
    assert len(matches) == 1, name
    return matches[0]


def expand(args: list[str], env: dict[str, str]) -> list[str]:
    """kubelet's $(VAR) expansion of a container's args."""
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], arg) for arg in args]




# --- the chart on its own ---------------------------------------------------------------------

@pytest.mark.parametrize("values", [(), ("metrics.serviceMonitor.enabled=true",),
                                    ("cache.device=/dev/nvme1n1",
                                     "node.chapSecrets[0].namespace=images",
                                     "node.chapSecrets[0].name=golden-chap")])
def test_helm_lint_strict_passes(values: tuple[str, ...]) -> None:
    sets = [arg for value in values for arg in ("--set", value)]
    result = helm("lint", "--strict", str(CHART), "--kube-version", KUBE_VERSION, *sets)
    assert result.returncode == 0, result.stdout + result.stderr


def test_chart_crds_are_the_deploy_crds_and_deploy_manifest_is_the_rendered_chart() -> None:
    result = subprocess.run([str(REPO / "deploy" / "render.sh"), "--check"],
                            capture_output=True, text=True,
                            env={"HELM": str(HELM), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr


def test_storage_class_binds_on_first_consumer_and_names_the_image_cache() -> None:
    manifests = render("storageClass.imageCache=ubuntu-golden")
    sc = one(manifests, "StorageClass", "vmthunder")
    assert sc["provisioner"] == DRIVER_NAME
    assert sc["volumeBindingMode"] == "WaitForFirstConsumer"
    assert sc["parameters"] == {"imageCache": "ubuntu-golden"}
    driver = one(manifests, "CSIDriver", DRIVER_NAME)["spec"]
    assert driver["attachRequired"] is False
    assert driver["podInfoOnMount"] is False
    assert driver["volumeLifecycleModes"] == ["Persistent"]


def test_only_the_node_pod_runs_privileged_the_rest_as_non_root() -> None:
    manifests = render()
    node = one(manifests, "DaemonSet")
    assert pod_spec(node)["hostNetwork"] is True
    for name in ("csi-node", "agent"):
        assert container(node, name)["securityContext"]["privileged"] is True
    mounts = {m["mountPath"]: m for m in container(node, "csi-node")["volumeMounts"]}
    assert mounts["/var/lib/kubelet"]["mountPropagation"] == "Bidirectional"
    agent_mounts = {m["mountPath"] for m in container(node, "agent")["volumeMounts"]}
    assert {"/dev", "/sys", "/lib/modules", "/etc/iscsi", "/run/lock/iscsi",
            "/sys/kernel/config"} <= agent_mounts
    for workload in (one(manifests, "StatefulSet"), one(manifests, "Deployment")):
        assert pod_spec(workload)["securityContext"]["runAsNonRoot"] is True
        for c in pod_spec(workload)["containers"]:
            ctx = c["securityContext"]
            assert ctx["runAsNonRoot"] is True and ctx["allowPrivilegeEscalation"] is False, c
            assert "privileged" not in ctx


def test_each_role_has_its_own_service_account_and_no_role_reads_all_secrets() -> None:
    manifests = render("node.chapSecrets[0].namespace=images",
                       "node.chapSecrets[0].name=golden-chap")
    accounts = {pod_spec(w)["serviceAccountName"]
                for kind in ("StatefulSet", "Deployment", "DaemonSet")
                for w in find(manifests, kind)}
    assert accounts == {"vmthunder-operator", "vmthunder-controller", "vmthunder-node"}
    for role in find(manifests, "ClusterRole") + find(manifests, "Role"):
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] and "*" not in rule["resources"], role
            if "secrets" in rule["resources"]:
                assert rule.get("resourceNames") == ["golden-chap"], role
                assert role["kind"] == "Role" and role["metadata"]["namespace"] == "images"


def test_every_metrics_port_is_behind_a_service_and_a_service_monitor_when_enabled() -> None:
    manifests = render("metrics.serviceMonitor.enabled=true")
    assert not find(render(), "ServiceMonitor")
    ports = {}  # component -> metrics port names its pods declare
    for kind in ("StatefulSet", "Deployment", "DaemonSet"):
        workload = one(manifests, kind)
        component = workload["metadata"]["labels"]["app.kubernetes.io/component"]
        ports[component] = {p["name"] for c in pod_spec(workload)["containers"]
                            for p in c.get("ports", []) if p["name"].endswith("metrics")}
    assert ports == {"operator": {"metrics"}, "controller": {"metrics"},
                     "node": {"csi-metrics", "agent-metrics"}}
    for component, names in ports.items():
        services = [s for s in find(manifests, "Service")
                    if s["spec"]["selector"].get("app.kubernetes.io/component") == component]
        assert {p["name"] for s in services for p in s["spec"]["ports"]} == names
        monitor = one(manifests, "ServiceMonitor", f"vmthunder-{component}")
        assert {e["port"] for e in monitor["spec"]["endpoints"]} == names
        selector = monitor["spec"]["selector"]["matchLabels"]
        assert selector["app.kubernetes.io/component"] == component


def test_operator_replicas_get_distinct_peering_priorities_from_their_pod_index() -> None:
    operator = one(render(), "StatefulSet", "vmthunder-operator")
    assert operator["spec"]["replicas"] >= 2
    c = container(operator, "operator")
    assert "--priority=$(POD_INDEX)" in c["args"]
    env = {e["name"]: e for e in c["env"]}
    assert env["POD_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.labels['apps.kubernetes.io/pod-index']")


def test_the_rendered_operator_csi_and_agent_command_lines_parse_with_the_cli(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Flags drift: every vmthunder command line the chart renders must be one the CLI takes."""
    manifests = render()
    seen: list[tuple[str, Any]] = []
    def recorder(role: str) -> Callable[[Any], int]:
        def record(args: Any) -> int:
            seen.append((role, args))
            return 0
        return record

    monkeypatch.setattr(vmthunder.cli, "_operator", recorder("operator"))
    monkeypatch.setattr(vmthunder.cli, "_csi", recorder("csi"))
    monkeypatch.setattr(vmthunder.node.cli, "run", recorder("agent"))
    env = {"POD_INDEX": "1", "NODE_NAME": "node-a", "NAMESPACE": NAMESPACE, "NODE_IP": "10.1.2.3"}
    lines = [
        container(one(manifests, "StatefulSet"), "operator"),
        container(one(manifests, "Deployment"), "csi-controller"),
        container(one(manifests, "DaemonSet"), "csi-node"),
        container(one(manifests, "DaemonSet"), "agent"),
    ]
    for c in lines:
        assert c["command"] == ["vmthunder"]
        assert vmthunder.cli.main(expand(c["args"], env)) == 0
    (_, op), (_, ctl), (_, node), (_, agent) = seen
    assert (op.priority, op.metrics_port, op.liveness_port) == (1, 9090, 8080)
    assert (ctl.mode, ctl.endpoint, ctl.metrics_port) == (
        "controller", "unix:///csi/csi.sock", 9091)
    assert (node.mode, node.node_id, node.metrics_port) == ("node", "node-a", 9818)
    assert (agent.node, agent.export_ip, agent.metrics_port) == ("node-a", "10.1.2.3", 9819)


def test_driver_name_of_the_chart_is_the_drivers_own() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["driverName"] == DRIVER_NAME


# --- the chart against the real API server ----------------------------------------------------

@pytest.fixture(scope="module")
def installed(control_plane: ControlPlane) -> list[Manifest]:
    """The rendered chart applied as a user would: server-side dry run first, then for real."""
    cp = control_plane
    cp.kubectl("apply", "-f", str(CHART / "crds"))
    cp.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
    cp.kubectl("create", "namespace", NAMESPACE, check=False)
    text = (REPO / "deploy" / "vmthunder.yaml").read_text()
    dry = cp.kubectl("apply", "--dry-run=server", "--validate=strict", "-f", "-", input=text,
                     check=False)
    assert dry.returncode == 0, dry.stderr
    real = cp.kubectl("apply", "--validate=strict", "-f", "-", input=text, check=False)
    assert real.returncode == 0, real.stderr
    return [doc for doc in yaml.safe_load_all(text) if doc]


@pytest.mark.apiserver
def test_rendered_manifests_are_accepted_and_stored_by_the_api_server(
        control_plane: ControlPlane, installed: list[Manifest]) -> None:
    for m in installed:
        kind, meta = m["kind"], m["metadata"]
        args = ["get", kind, meta["name"], "-o", "name"]
        if "namespace" in meta:
            args += ["-n", meta["namespace"]]
        assert control_plane.kubectl(*args, check=False).returncode == 0, (kind, meta["name"])


@pytest.mark.apiserver
def test_chart_with_every_option_passes_server_side_dry_run(
        control_plane: ControlPlane, installed: list[Manifest]) -> None:
    """Options off by default (CHAP roles, a cache device, ImageCaches from values) are valid."""
    manifests = render("cache.device=/dev/nvme1n1", "node.chapSecrets[0].namespace=default",
                       "node.chapSecrets[0].name=golden-chap", "imageCaches[0].name=from-values",
                       "imageCaches[0].spec.source.http.url=http://images.example/golden.raw",
                       "imageCacheDefaults.fanout=6")
    cache = one(manifests, "ImageCache", "from-values")
    assert cache["spec"]["fanout"] == 6
    assert cache["spec"]["hydration"]["throttleBytesPerSecond"] == 62500000
    text = yaml.safe_dump_all(manifests)
    dry = control_plane.kubectl("apply", "--dry-run=server", "--validate=strict", "-f", "-",
                                input=text, check=False)
    assert dry.returncode == 0, dry.stderr


@pytest.fixture
def operator_from_the_chart(
    control_plane: ControlPlane, installed: list[Manifest], tmp_path: Path
) -> Iterator[tuple[subprocess.Popen[bytes], int, Path]]:
    """The operator's rendered command line, run as a process under the chart's ServiceAccount
    token (not as admin): what the kubelet would run, less the container."""
    cp = control_plane
    statefulset = one(installed, "StatefulSet", "vmthunder-operator")
    spec = pod_spec(statefulset)
    c = container(statefulset, "operator")
    token = cp.kubectl("create", "token", spec["serviceAccountName"], "-n", NAMESPACE,
                       "--duration=1h").stdout.strip()
    kubeconfig = cp.token_kubeconfig("chart-operator", token)
    metrics, liveness = free_port(), free_port()
    args = [a.replace("=9090", f"={metrics}").replace("=8080", f"={liveness}")
            for a in expand(c["args"], {"POD_INDEX": "0"})]
    # The venv's console script: the image's `vmthunder` entry point, outside the image.
    executable = Path(sys.executable).parent / c["command"][0]
    log = tmp_path / "operator.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(executable), *args],
                                env={"KUBECONFIG": str(kubeconfig), "PATH": "/usr/bin:/bin",
                                     "PYTHONUNBUFFERED": "1",
                                     "PYTHONPATH": os.environ.get("PYTHONPATH", "")},
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc, metrics, log
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.apiserver
def test_operator_under_the_charts_service_account_plans_replicas_and_exports_metrics(
    control_plane: ControlPlane,
    operator_from_the_chart: tuple[subprocess.Popen[bytes], int, Path],
) -> None:
    cp = control_plane
    proc, metrics_port, log = operator_from_the_chart
    client = kubernetes.config.new_client_from_config(str(cp.kubeconfig))  # type: ignore[no-untyped-call]
    core = kubernetes.client.CoreV1Api(client)
    for i in range(5):  # ready nodes, as their kubelets would register them
        register_node(core, f"chart-node-{i}", {"vmthunder.io/chart-test": "true"})
    cp.kubectl("apply", "-f", "-", input=yaml.safe_dump({
        "apiVersion": "vmthunder.io/v1alpha1", "kind": "ImageCache",
        "metadata": {"name": "chart-golden"},
        "spec": {"source": {"http": {"url": "http://images.example/golden.raw"}}, "fanout": 2,
                 "nodeSelector": {"vmthunder.io/chart-test": "true"}},
    }))

    def replicas() -> dict[str, str]:
        out = cp.kubectl("get", "imagereplicas", "-l", "vmthunder.io/image-cache=chart-golden",
                         "-o", "yaml").stdout
        return {r["spec"]["node"]: r["spec"]["parent"] for r in yaml.safe_load(out)["items"]}

    try:
        parents = wait_for("5 replicas planned by the chart's operator",
                           lambda: r if len(r := replicas()) == 5 else None, timeout=90)
    except AssertionError:
        raise AssertionError(log.read_text()[-4000:]) from None
    assert set(parents) == {f"chart-node-{i}" for i in range(5)}
    def node_count() -> Any:
        cache = yaml.safe_load(cp.kubectl("get", "imagecache", "chart-golden", "-o", "yaml").stdout)
        return cache.get("status", {}).get("nodeCount")

    status = wait_for("status written", node_count)
    assert status == 5

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        scraped = r.read().decode()
    creates = re.search(r'^vmthunder_operator_api_writes_total\{verb="create"\} (\S+)$', scraped,
                        re.MULTILINE)
    assert creates and float(creates.group(1)) >= 5, scraped[-2000:]

    def planned_event() -> bool:
        events = yaml.safe_load(cp.kubectl("get", "events", "-A", "-o", "yaml").stdout)["items"]
        return any(e["involvedObject"].get("name") == "chart-golden"
                   and e["metadata"]["namespace"] == "default" and e["reason"] == "Planned"
                   for e in events)

    try:
        wait_for("the Planned Event (kopf's namespace for cluster objects: default)",
                 planned_event, timeout=30)
    except AssertionError:
        raise AssertionError(cp.kubectl("get", "events", "-A").stdout + log.read_text()[-3000:]
                             ) from None
    text = log.read_text()
    assert "Forbidden" not in text and " 403" not in text, text[-4000:]
    assert proc.poll() is None, text[-4000:]


def service_account_kubeconfig(cp: ControlPlane, account: str) -> Path:
    token = cp.kubectl("create", "token", account, "-n", NAMESPACE, "--duration=1h").stdout
    return cp.token_kubeconfig(account, token.strip())


@pytest.mark.apiserver
def test_csi_controller_under_the_charts_service_account_lists_and_deletes_volumes(
    control_plane: ControlPlane, installed: list[Manifest], tmp_path: Path
) -> None:
    """The rendered CSI controller command line, under the controller's own account: its RBAC
    covers ImageVolumes and the API reads of Probe; its metrics endpoint shows the calls."""
    from vmthunder.csi.client import connect
    from vmthunder.csi.proto import csi_pb2

    cp = control_plane
    deployment = one(installed, "Deployment", "vmthunder-controller")
    c = container(deployment, "csi-controller")
    kubeconfig = service_account_kubeconfig(cp, pod_spec(deployment)["serviceAccountName"])
    socket_path, metrics = tmp_path / "csi.sock", free_port()
    args = [f"--endpoint=unix://{socket_path}" if a.startswith("--endpoint=") else
            f"--metrics-port={metrics}" if a.startswith("--metrics-port=") else a
            for a in c["args"]]
    volume_id = "c0ffee" + "0" * 26
    cp.kubectl("apply", "-f", "-", input=yaml.safe_dump({
        "apiVersion": "vmthunder.io/v1alpha1", "kind": "ImageVolume",
        "metadata": {"name": volume_id, "labels": {"vmthunder.io/image-cache": "chart-golden",
                                                   "vmthunder.io/node": "chart-node-0"}},
        "spec": {"imageCache": "chart-golden", "node": "chart-node-0", "capacityBytes": 1 << 30,
                 "csiName": "pvc-chart", "accessType": "Block", "parameters": {}},
    }))
    log = tmp_path / "csi-controller.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / c["command"][0]), *args],
            env={"KUBECONFIG": str(kubeconfig), "PATH": "/usr/bin:/bin", "PYTHONUNBUFFERED": "1",
                 "PYTHONPATH": os.environ.get("PYTHONPATH", "")},
            stdout=out, stderr=subprocess.STDOUT)
    client = None
    try:
        wait_for("the controller's socket", socket_path.exists, timeout=60)
        client = connect(f"unix://{socket_path}")
        assert client.identity.Probe(csi_pb2.ProbeRequest(), timeout=10).ready.value
        listed = client.controller.ListVolumes(csi_pb2.ListVolumesRequest(), timeout=10)
        assert volume_id in {e.volume.volume_id for e in listed.entries}
        client.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id),
                                       timeout=30)
        gone = cp.kubectl("get", "imagevolume", volume_id, check=False)
        assert gone.returncode != 0 and "NotFound" in gone.stderr
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5) as r:
            scraped = r.read().decode()
        for method in ("ListVolumes", "DeleteVolume"):
            assert (f'vmthunder_csi_call_seconds_count{{code="OK",method="{method}"}} 1.0'
                    in scraped), scraped[-2000:]
        text = log.read_text()
        assert "Forbidden" not in text and "403" not in text, text[-3000:]
    finally:
        if client is not None:
            client.close()
        proc.terminate()
        proc.wait(timeout=30)


PROMETHEUS_OPERATOR = "github.com/prometheus-operator/prometheus-operator@v0.85.0"


@pytest.mark.apiserver
def test_service_monitors_are_valid_against_prometheus_operators_own_crd(
        control_plane: ControlPlane, installed: list[Manifest]) -> None:
    """The ServiceMonitor CRD as prometheus-operator publishes it, from its Go module."""
    download = subprocess.run(["go", "mod", "download", "-json", PROMETHEUS_OPERATOR],
                              capture_output=True, text=True, timeout=600,
                              env={**os.environ, "GOFLAGS": "-mod=mod"})
    assert download.returncode == 0, download.stderr
    module = Path(json.loads(download.stdout)["Dir"])
    crd = (module / "example" / "prometheus-operator-crd"
           / "monitoring.coreos.com_servicemonitors.yaml")
    cp = control_plane
    cp.kubectl("apply", "--server-side", "-f", str(crd))
    cp.kubectl("wait", "--for=condition=Established",
               "crd/servicemonitors.monitoring.coreos.com", "--timeout=60s")
    monitors = find(render("metrics.serviceMonitor.enabled=true",
                           "metrics.serviceMonitor.labels.release=prometheus"), "ServiceMonitor")
    assert len(monitors) == 3
    text = yaml.safe_dump_all(monitors)
    for flags in (["--dry-run=server"], []):
        result = cp.kubectl("apply", "--validate=strict", *flags, "-f", "-", input=text,
                            check=False)
        assert result.returncode == 0, result.stderr
