"""The Dockerfile, checked without a container engine: BuildKit's own linter (the checks of
`docker build --check`, every experimental one too) and the project's rules for its image."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
LINT_SOURCE = Path(__file__).resolve().parent / "test_dockerfile_lint"
CACHE = Path(os.environ.get("VMT_CACHE", Path.home() / ".cache" / "vmthunder"))


@pytest.fixture(scope="module")
def dockerfile_lint() -> Path:
    """tests/test_dockerfile_lint built from the Go module proxy, cached by its sources' hash."""
    digest = hashlib.sha256()
    for name in ("go.mod", "go.sum", "main.go"):
        digest.update((LINT_SOURCE / name).read_bytes())
    binary = CACHE / f"dockerfile-lint-{digest.hexdigest()[:12]}" / "dockerfile-lint"
    if not binary.exists():
        with tempfile.TemporaryDirectory() as scratch:
            for name in ("go.mod", "go.sum", "main.go"):
                shutil.copy(LINT_SOURCE / name, scratch)
            env = {**os.environ, "CGO_ENABLED": "0", "GOFLAGS": "-mod=readonly",
                   "GOTOOLCHAIN": "local"}
            build = subprocess.run(
                ["go", "build", "-trimpath", "-ldflags=-s -w", "-o", str(binary) + ".tmp", "."],
                cwd=scratch, env=env, capture_output=True, text=True, timeout=900)
            assert build.returncode == 0, build.stderr
        Path(str(binary) + ".tmp").rename(binary)
    return binary


def lint(tool: Path, dockerfile: Path) -> dict[str, Any]:
    result = subprocess.run([str(tool), str(dockerfile)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    findings: dict[str, Any] = json.loads(result.stdout)
    return findings


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    result, pending = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") and not pending:
            continue
        if line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        if pending.strip():
            word, _, args = pending.strip().partition(" ")
            result.append((word.upper(), " ".join(args.split())))
        pending = ""
    return result


def stages(text: str) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for instruction in instructions(text):
        if instruction[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(instruction)
    return result


def test_buildkit_linter_finds_nothing_in_the_dockerfile(dockerfile_lint: Path) -> None:
    findings = lint(dockerfile_lint, DOCKERFILE)
    assert findings.get("buildError") is None, findings["buildError"]
    assert not findings["warnings"], [(w["ruleName"], w["detail"]) for w in findings["warnings"]]


def test_buildkit_linter_reports_a_flawed_dockerfile(dockerfile_lint: Path, tmp_path: Path) -> None:
    """The check above can fail: the same tool, on a Dockerfile with known flaws."""
    flawed = tmp_path / "Dockerfile"
    flawed.write_text("FROM debian AS Build\nENV A 1\nENV PASSWORD=x\nCMD echo hi\n")
    rules = {w["ruleName"] for w in lint(dockerfile_lint, flawed)["warnings"]}
    assert {"StageNameCasing", "LegacyKeyValueFormat", "SecretsUsedInArgOrEnv",
            "JSONArgsRecommended"} <= rules


def test_the_dockerfile_asks_buildkit_to_fail_on_every_check() -> None:
    head = DOCKERFILE.read_text().splitlines()[:2]
    assert "# check=error=true;experimental=all" in head


def test_one_multi_stage_image_whose_final_user_is_the_charts_non_root_user() -> None:
    built = stages(DOCKERFILE.read_text())
    assert len(built) >= 3
    final = built[-1]
    users = [args for word, args in final if word == "USER"]
    assert users, "the final stage sets no USER: it would run as root"
    uid = int(users[-1].split(":")[0])
    assert uid != 0
    helpers = (REPO / "charts" / "vmthunder" / "templates" / "_helpers.tpl").read_text()
    assert f"runAsUser: {uid}" in helpers, "the chart runs its non-root pods as another user"
    entrypoint = [json.loads(args) for word, args in final if word == "ENTRYPOINT"]
    assert entrypoint == [["vmthunder"]]


def test_csi_stubs_are_generated_in_the_build_from_the_specs_proto() -> None:
    text = DOCKERFILE.read_text()
    build_runs = [args for stage in stages(text)[:-1] for word, args in stage if word == "RUN"]
    assert any("scripts/gen-csi-stubs.sh" in run for run in build_runs)
    assert re.search(r"github\.com/container-storage-interface/spec@v\$\{CSI_SPEC_VERSION\}",
                     text)
    assert "ARG CSI_SPEC_VERSION=" in text
    # Stubs of the developer's tree never leak into the image: only the build makes them.
    ignore = (REPO / ".dockerignore").read_text().split()
    assert "csi/vmthunder/csi/proto/" in ignore


def test_build_context_holds_every_package_root_of_the_wheel() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]
    ignore = (REPO / ".dockerignore").read_text().split()
    copied = [args for stage in stages(DOCKERFILE.read_text()) for word, args in stage
              if word == "COPY" and "--from" not in args]
    for package in packages:
        root = package.split("/")[0]
        assert f"!{root}/" in ignore, root
        assert any(c.startswith(f"{root}/") for c in copied), root


def test_chart_image_is_the_one_the_dockerfile_describes() -> None:
    chart = yaml.safe_load((REPO / "charts" / "vmthunder" / "Chart.yaml").read_text())
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert chart["appVersion"] == pyproject["project"]["version"]
    assert f"ARG VERSION={chart['appVersion']}" in DOCKERFILE.read_text()
