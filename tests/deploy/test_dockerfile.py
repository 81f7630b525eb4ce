"""The Dockerfile, checked statically (no container runtime here) against the chart's pod.

The chart runs the image as uid 0 with a read-only root filesystem and an emptyDir on /tmp,
`args: [proxy, ztunnel]` after the image's ENTRYPOINT. The build context is checked by
building a wheel from exactly the files .dockerignore lets through.
"""

from __future__ import annotations

import configparser
import fnmatch
import json
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from chartkit import ROOT

from ztunnel.core.config import ENV_VARS

pytestmark = pytest.mark.timeout(120)

DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
WRITABLE = "/tmp"  # the chart's only writable mount besides the ones it names


@dataclass(frozen=True, slots=True)
class Instruction:
    keyword: str
    args: str


def instructions(path: Path = DOCKERFILE) -> list[Instruction]:
    """Dockerfile instructions with comments dropped and continuation lines joined."""
    out: list[Instruction] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        out.append(Instruction(keyword.upper(), " ".join(args.split())))
        pending = ""
    assert not pending, "Dockerfile ends inside a continuation"
    return out


def final_stage(items: list[Instruction]) -> list[Instruction]:
    starts = [i for i, ins in enumerate(items) if ins.keyword == "FROM"]
    assert starts, "no FROM"
    return items[starts[-1] :]


def env_settings(items: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins in items:
        if ins.keyword != "ENV":
            continue
        for pair in ins.args.split():
            name, sep, value = pair.partition("=")
            assert sep, f"use ENV NAME=value: {ins.args}"
            env[name] = value.strip('"')
    return env


def test_base_image_is_python_311_slim() -> None:
    stage = final_stage(instructions())
    assert stage[0].args == "python:3.11-slim"


def test_entrypoint_is_ztunnel_in_exec_form() -> None:
    entrypoints = [ins for ins in final_stage(instructions()) if ins.keyword == "ENTRYPOINT"]
    assert len(entrypoints) == 1
    assert json.loads(entrypoints[0].args) == ["ztunnel"]


def test_default_command_matches_the_chart_args() -> None:
    cmds = [ins for ins in final_stage(instructions()) if ins.keyword == "CMD"]
    assert [json.loads(c.args) for c in cmds] in ([], [["proxy", "ztunnel"]])


def test_project_is_installed_from_the_source_tree() -> None:
    stage = final_stage(instructions())
    workdir = ""
    copied = False
    for ins in stage:
        if ins.keyword == "WORKDIR":
            workdir = ins.args
        elif ins.keyword == "COPY" and ins.args.split() == [".", "."]:
            copied = True
        elif ins.keyword == "RUN" and "pip install" in ins.args:
            assert copied, "pip install runs before the source tree is copied"
            assert workdir, "pip install . needs the WORKDIR the sources were copied to"
            assert "pip install --no-cache-dir ." in ins.args
            return
    pytest.fail("no `pip install --no-cache-dir .` after `COPY . .`")


def test_ztunnel_console_script_exists() -> None:
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg", encoding="utf-8")
    scripts = setup["options.entry_points"]["console_scripts"]
    names = [line.split("=")[0].strip() for line in scripts.strip().splitlines()]
    assert "ztunnel" in names


def test_runs_as_root_for_the_chart_security_context() -> None:
    users = [ins.args for ins in final_stage(instructions()) if ins.keyword == "USER"]
    assert all(user.split(":")[0] in {"0", "root"} for user in users), users


def test_no_bytecode_writes_at_run_time() -> None:
    assert env_settings(final_stage(instructions()))["PYTHONDONTWRITEBYTECODE"] == "1"


def test_working_directory_is_root_for_relative_upstream_paths() -> None:
    workdirs = [ins.args for ins in final_stage(instructions()) if ins.keyword == "WORKDIR"]
    assert workdirs[-1] == "/"


def test_paths_the_image_points_at_are_writable_under_read_only_root() -> None:
    env = env_settings(final_stage(instructions()))
    for name in ("FAKE_CA_DIR", "TMPDIR", "TMP", "TEMP", "HOME", "XDG_RUNTIME_DIR"):
        if name in env:
            assert env[name].startswith(WRITABLE), (name, env[name])
    fake_ca_dir = next(var.default for var in ENV_VARS if var.name == "FAKE_CA_DIR")
    assert fake_ca_dir.startswith(WRITABLE + "/")
    volumes = [ins.args for ins in final_stage(instructions()) if ins.keyword == "VOLUME"]
    assert volumes == [], "the chart mounts what the pod needs"


def test_no_network_tools_in_the_image() -> None:
    runs = " ".join(ins.args for ins in instructions() if ins.keyword == "RUN")
    assert "apt-get install" not in runs, "ztunnel never shells out: keep the image minimal"


# --- the build context -------------------------------------------------------------------


def ignore_patterns(path: Path = DOCKERIGNORE) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def ignored(relative: str, patterns: list[str]) -> bool:
    """Docker's matching for the patterns used here: globs per path, `**/` at any depth."""
    parts = relative.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        assert not pattern.startswith("!"), "exceptions are not modelled here"
        bare = pattern.removeprefix("**/")
        for prefix in prefixes:
            candidates = [prefix] if bare == pattern else prefix.split("/")
            if any(fnmatch.fnmatchcase(c, bare) for c in candidates):
                return True
    return False


def build_context(dest: Path) -> list[str]:
    """Copy what `docker build` would send (ignored directories are not even walked)."""
    patterns = ignore_patterns()
    copied: list[str] = []
    for top, dirs, files in os.walk(ROOT):
        base = Path(top).relative_to(ROOT)
        dirs[:] = [d for d in dirs if not ignored((base / d).as_posix(), patterns)]
        for name in files:
            relative = (base / name).as_posix()
            if ignored(relative, patterns):
                continue
            target = dest / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / relative, target)
            copied.append(relative)
    return copied


def test_dockerignore_keeps_the_context_small() -> None:
    patterns = ignore_patterns()
    for name in (".git/HEAD", "tests/unit/x.py", "helm/ztunnel/Chart.yaml", "docs/deploy.md"):
        assert ignored(name, patterns), name
    for name in ("setup.cfg", "pyproject.toml", "README.md", "ztunnel/__init__.py"):
        assert not ignored(name, patterns), name


def test_the_build_context_builds_a_wheel_with_the_ztunnel_command(tmp_path: Path) -> None:
    # setuptools >= 70.1 builds wheels without the `wheel` package.
    pytest.importorskip("setuptools", minversion="70.1", reason="needs setuptools >= 70.1")
    context = tmp_path / "context"
    copied = build_context(context)
    assert "setup.cfg" in copied
    assert not any(name.startswith(("tests/", ".git/")) for name in copied)
    out = tmp_path / "wheel"
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    proc = subprocess.run(
        [*pip_wheel, "-q", "--no-cache-dir", "-w", str(out), str(context)],
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = out.glob("ztunnel-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        assert "ztunnel = " in archive.read(entry_points).decode()
    assert "ztunnel/core/config.py" in names
    assert any(name.startswith("workers/") for name in names)
