"""Deployment-test helpers: run the real `helm` on helm/ztunnel and parse its output."""

from __future__ import annotations

import functools
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "ztunnel"
NAMESPACE = "istio-system"
HELM_TIMEOUT = 60  # seconds, per helm invocation

Doc = dict[str, Any]


@dataclass(frozen=True, slots=True)
class HelmResult:
    returncode: int
    stdout: str
    stderr: str


def helm_path() -> str | None:
    return shutil.which("helm")


@functools.cache
def run_helm(*args: str) -> HelmResult:
    path = helm_path()
    assert path is not None
    proc = subprocess.run(
        [path, *args], capture_output=True, text=True, timeout=HELM_TIMEOUT, check=False
    )
    return HelmResult(proc.returncode, proc.stdout, proc.stderr)


def set_args(sets: tuple[str, ...]) -> list[str]:
    out: list[str] = []
    for item in sets:
        out += ["--set", item]
    return out


def template(*sets: str, namespace: str = NAMESPACE) -> list[Doc]:
    """`helm template ztunnel helm/ztunnel --set ...`, parsed; fails the test on error."""
    result = run_helm("template", "ztunnel", str(CHART), "-n", namespace, *set_args(sets))
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def by_kind(docs: list[Doc]) -> dict[str, Doc]:
    out: dict[str, Doc] = {}
    for doc in docs:
        assert doc["kind"] not in out, f"two {doc['kind']} objects"
        out[doc["kind"]] = doc
    return out


def daemonset(*sets: str) -> Doc:
    return by_kind(template(*sets))["DaemonSet"]


def container(*sets: str) -> Doc:
    containers = daemonset(*sets)["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def env_of(ctr: Doc) -> dict[str, Doc]:
    """Container env by name; a later duplicate wins, as in Kubernetes."""
    return {entry["name"]: entry for entry in ctr.get("env", [])}


def env_values(*sets: str) -> dict[str, str]:
    """The literal (non-downward-API) env values."""
    return {name: e["value"] for name, e in env_of(container(*sets)).items() if "value" in e}


def walk(value: Any) -> Iterator[Any]:
    yield value
    if isinstance(value, dict):
        for item in value.values():
            yield from walk(item)
    elif isinstance(value, list):
        for item in value:
            yield from walk(item)
