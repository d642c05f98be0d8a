"""deploy/examples/ against the real API server, KubeVirt's objects included.

The test server has no KubeVirt, and KubeVirt's Go modules (whose code makes its CRDs) are not on
the module proxy here. KubeVirt's API schema is, though, on npm: @kubevirt-ui/kubevirt-api holds
TypeScript models generated from KubeVirt's OpenAPI document (one interface per API type, `?`
marking optional fields, enums as TypeScript enums). This test makes CRDs for VirtualMachine and
VirtualMachinePool whose structural schemas come from those models, field by field, so the API
server itself rejects an unknown or misplaced field (strict field validation) or a wrong type.
What such a CRD cannot check: KubeVirt's webhooks (cross-field rules) and its int-or-string
quantities (the models say string; the examples quote their quantities, valid either way).
The models are of VirtualMachinePool v1alpha1; current KubeVirt stores v1beta1, which only adds
optional fields, so the stand-in serves both versions with that one schema.
"""

from __future__ import annotations

import os
import re
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml

from vmthunder.lab.controlplane import ControlPlane

pytestmark = pytest.mark.apiserver

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "deploy" / "examples"
CACHE = Path(os.environ.get("VMT_CACHE", Path.home() / ".cache" / "vmthunder"))
KUBEVIRT_API = "@kubevirt-ui/kubevirt-api"
KUBEVIRT_API_VERSION = "1.4.0"

Schema = dict[str, Any]


# --- KubeVirt's API types, from the npm package's generated models --------------------------

def kubevirt_models() -> Path:
    """kubevirt/models/ of the npm package, unpacked once into the cache (npm checks integrity)."""
    target = CACHE / f"kubevirt-api-{KUBEVIRT_API_VERSION}"
    models = target / "package" / "kubevirt" / "models"
    if models.is_dir():
        return models
    with tempfile.TemporaryDirectory() as scratch:
        subprocess.run(["npm", "pack", "--silent", f"{KUBEVIRT_API}@{KUBEVIRT_API_VERSION}",
                        "--pack-destination", scratch], check=True, capture_output=True,
                       timeout=300)
        (tarball,) = Path(scratch).glob("*.tgz")
        unpack = Path(scratch) / "unpacked"
        with tarfile.open(tarball) as tar:
            tar.extractall(unpack, filter="data")
        if not target.exists():
            unpack.rename(target)
    return models


FIELD = re.compile(r"^  ([A-Za-z_][A-Za-z0-9_]*)(\??): (.+);$")


def parse_models(models: Path) -> tuple[dict[str, dict[str, tuple[str, bool]]],
                                        dict[str, list[str]]]:
    """{interface: {field: (type, required)}} and {enum: [values]} of every model file."""
    interfaces: dict[str, dict[str, tuple[str, bool]]] = {}
    enums: dict[str, list[str]] = {}
    for path in models.glob("*.ts"):
        current: dict[str, tuple[str, bool]] | None = None
        enum: list[str] | None = None
        for line in path.read_text().splitlines():
            if m := re.match(r"^export interface (\w+) \{$", line):
                current = interfaces.setdefault(m.group(1), {})
            elif m := re.match(r"^export enum (\w+) \{$", line):
                enum = enums.setdefault(m.group(1), [])
            elif line == "}":
                current, enum = None, None
            elif current is not None and (f := FIELD.match(line)):
                current[f.group(1)] = (f.group(3), f.group(2) != "?")
            elif enum is not None and (e := re.match(r"^  \w+ = '([^']*)',$", line)):
                enum.append(e.group(1))
    return interfaces, enums


class SchemaBuilder:
    """Structural OpenAPI v3 schemas for a CRD from the parsed models."""

    OPEN: ClassVar[Schema] = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}

    def __init__(self, interfaces: dict[str, dict[str, tuple[str, bool]]],
                 enums: dict[str, list[str]]) -> None:
        self.interfaces, self.enums = interfaces, enums

    def of(self, ts_type: str, stack: tuple[str, ...] = ()) -> Schema:
        ts_type = ts_type.strip()
        if ts_type in ("string", "Date"):
            return {"type": "string"}
        if ts_type == "number":
            return {"type": "number"}
        if ts_type == "boolean":
            return {"type": "boolean"}
        if ts_type in ("object", "any"):
            return dict(self.OPEN)
        if m := re.fullmatch(r"Array<(.+)>", ts_type):
            return {"type": "array", "items": self.of(m.group(1), stack)}
        if m := re.fullmatch(r"\{ \[key: string\]: (.+) \}", ts_type):
            return {"type": "object", "additionalProperties": self.of(m.group(1), stack)}
        if ts_type in self.enums:
            return {"type": "string", "enum": list(self.enums[ts_type])}
        if ts_type == "K8sIoApimachineryPkgApisMetaV1ObjectMeta" or ts_type in stack:
            # Embedded object metadata is free-form in KubeVirt's own CRDs too; recursion ends.
            return dict(self.OPEN)
        fields = self.interfaces.get(ts_type)
        assert fields is not None, f"unknown type {ts_type!r} in the models"
        schema: Schema = {"type": "object", "properties": {
            name: self.of(t, (*stack, ts_type)) for name, (t, _) in sorted(fields.items())}}
        required = sorted(name for name, (_, req) in fields.items() if req)
        if required:
            schema["required"] = required
        return schema

    def root(self, spec_type: str) -> Schema:
        return {"type": "object", "required": ["spec"], "properties": {
            "spec": self.of(spec_type), "status": dict(self.OPEN)}}


def kubevirt_crds(builder: SchemaBuilder) -> list[dict[str, Any]]:
    def crd(group: str, kind: str, plural: str, versions: list[str], spec: str
            ) -> dict[str, Any]:
        schema = builder.root(spec)
        return {
            "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": f"{plural}.{group}",
                         "annotations": {"vmthunder.io/stand-in": "schema from "
                                         f"{KUBEVIRT_API}@{KUBEVIRT_API_VERSION} models"}},
            "spec": {"group": group, "scope": "Namespaced",
                     "names": {"kind": kind, "plural": plural, "singular": kind.lower(),
                               "listKind": f"{kind}List"},
                     "versions": [{"name": v, "served": True, "storage": i == len(versions) - 1,
                                   "schema": {"openAPIV3Schema": schema},
                                   "subresources": {"status": {}}}
                                  for i, v in enumerate(versions)]},
        }

    return [
        crd("kubevirt.io", "VirtualMachine", "virtualmachines", ["v1"], "V1VirtualMachineSpec"),
        crd("pool.kubevirt.io", "VirtualMachinePool", "virtualmachinepools",
            ["v1alpha1", "v1beta1"], "V1alpha1VirtualMachinePoolSpec"),
    ]


@pytest.fixture(scope="module")
def kubevirt(control_plane: ControlPlane) -> Iterator[ControlPlane]:
    """The test server with KubeVirt's VirtualMachine and VirtualMachinePool kinds."""
    cp = control_plane
    crds = kubevirt_crds(SchemaBuilder(*parse_models(kubevirt_models())))
    # Server-side apply: the schemas are too big for client-side apply's annotation.
    cp.kubectl("apply", "--server-side", "-f", "-", input=yaml.safe_dump_all(crds))
    for c in crds:
        cp.kubectl("wait", "--for=condition=Established", f"crd/{c['metadata']['name']}",
                   "--timeout=60s")
    cp.kubectl("create", "namespace", "vms", check=False)
    yield cp


def apply(cp: ControlPlane, path: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return cp.kubectl("apply", "--validate=strict", *flags, "-f", str(path), check=False)


EXAMPLE_FILES = sorted(p.name for p in EXAMPLES.glob("*.yaml"))


def test_the_examples_cover_a_pvc_vms_and_a_pool_on_the_vmthunder_class() -> None:
    kinds: dict[str, list[dict[str, Any]]] = {}
    for name in EXAMPLE_FILES:
        for doc in yaml.safe_load_all((EXAMPLES / name).read_text()):
            kinds.setdefault(doc["kind"], []).append(doc)
    assert {"ImageCache", "PersistentVolumeClaim", "VirtualMachine",
            "VirtualMachinePool"} <= set(kinds)
    claims = [c["spec"] for c in kinds["PersistentVolumeClaim"]]
    for vm in kinds["VirtualMachine"]:
        claims += [t["spec"]["storage"] for t in vm["spec"].get("dataVolumeTemplates", [])]
    for pool in kinds["VirtualMachinePool"]:
        templates = pool["spec"]["virtualMachineTemplate"]["spec"]["dataVolumeTemplates"]
        claims += [t["spec"]["storage"] for t in templates]
    assert claims
    for claim in claims:
        assert (claim["storageClassName"], claim["volumeMode"]) == ("vmthunder", "Block"), claim


@pytest.mark.parametrize("name", EXAMPLE_FILES)
def test_example_is_accepted_by_the_api_server_with_strict_field_validation(
        kubevirt: ControlPlane, name: str) -> None:
    dry = apply(kubevirt, EXAMPLES / name, "--dry-run=server")
    assert dry.returncode == 0, dry.stderr
    real = apply(kubevirt, EXAMPLES / name)
    assert real.returncode == 0, real.stderr


def test_a_misplaced_vm_field_is_rejected_so_the_stand_in_schema_has_teeth(
        kubevirt: ControlPlane, tmp_path: Path) -> None:
    vm = yaml.safe_load((EXAMPLES / "vm.yaml").read_text())
    volume = vm["spec"]["template"]["spec"]["volumes"][0]
    volume["persistentVolumeClaim"]["claimname"] = volume["persistentVolumeClaim"].pop("claimName")
    bad = tmp_path / "vm.yaml"
    bad.write_text(yaml.safe_dump(vm))
    result = apply(kubevirt, bad, "--dry-run=server")
    assert result.returncode != 0
    assert "claimname" in result.stderr or "claimName" in result.stderr, result.stderr


def test_a_pool_without_its_selector_is_rejected(kubevirt: ControlPlane, tmp_path: Path) -> None:
    pool = yaml.safe_load((EXAMPLES / "vmpool.yaml").read_text())
    del pool["spec"]["selector"]
    bad = tmp_path / "pool.yaml"
    bad.write_text(yaml.safe_dump(pool))
    result = apply(kubevirt, bad, "--dry-run=server")
    assert result.returncode != 0 and "selector" in result.stderr, result.stderr
