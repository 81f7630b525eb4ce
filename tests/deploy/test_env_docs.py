"""docs/env.md is generated from ztunnel.core.config.ENV_VARS and must not drift from it."""

from __future__ import annotations

import subprocess
import sys
from importlib.machinery import SourceFileLoader
from importlib.util import module_from_spec, spec_from_loader
from types import ModuleType

import pytest
from chartkit import ROOT

from ztunnel.core.config import ENV_VARS, EnvVar

pytestmark = pytest.mark.timeout(60)

SCRIPT = ROOT / "scripts" / "gen-env-docs"
DOC = ROOT / "docs" / "env.md"


def generator() -> ModuleType:
    """scripts/gen-env-docs has no .py suffix: load it by path."""
    loader = SourceFileLoader("gen_env_docs", str(SCRIPT))
    spec = spec_from_loader("gen_env_docs", loader)
    assert spec is not None
    module = module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_env_docs_are_up_to_date() -> None:
    assert DOC.read_text(encoding="utf-8") == generator().render(), (
        "docs/env.md is stale: run scripts/gen-env-docs"
    )


def test_check_mode_agrees() -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


def test_every_variable_has_one_row() -> None:
    text = DOC.read_text(encoding="utf-8")
    for var in ENV_VARS:
        assert text.count(f"| `{var.name}` |") == 1, var.name


def test_pipes_in_cells_are_escaped() -> None:
    row = generator().row(EnvVar("X", "a|b", "", "one | two"))
    assert row == "| `X` | `a\\|b` |  | one \\| two |"
    assert row.count("|") - row.count("\\|") == 5  # four cells
