"""The package is clean under ``mypy --strict`` (configuration in pyproject.toml), and the modules left out of
the check (``[[tool.mypy.overrides]] ignore_errors``) are exactly those that still fail it.

mypy keeps its cache in the project's .mypy_cache (it ignores itself in git): the first run takes some
seconds, the next ones about one."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _mypy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mypy", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=240)


def _config() -> dict[str, Any]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        config: dict[str, Any] = tomllib.load(f)["tool"]["mypy"]
    return config


def _excluded() -> set[str]:
    """The modules whose errors the configuration ignores."""
    return {module for override in _config().get("overrides", []) if override.get("ignore_errors")
            for module in ([override["module"]] if isinstance(override["module"], str) else override["module"])}


def test_package_is_mypy_strict_clean() -> None:
    config = _config()
    assert config.get("strict") is True and config.get("files") == ["vspemu"]
    result = _mypy()
    assert result.returncode == 0, f"mypy --strict found errors:\n{result.stdout}{result.stderr}"
    assert "unused section" not in result.stdout + result.stderr, \
        f"an override names a module that no longer exists:\n{result.stdout}{result.stderr}"


def test_only_failing_modules_are_excluded(tmp_path: Path) -> None:
    """Run mypy without the overrides: every excluded module must still fail (else take it off the list)."""
    config = _config()
    plain = tmp_path / "mypy.ini"
    plain.write_text(f"[mypy]\nstrict = True\npython_version = {config['python_version']}\n")
    result = _mypy("--config-file", str(plain), "--cache-dir", str(ROOT / ".mypy_cache" / "all-modules"), "vspemu")
    failing = set()
    for line in result.stdout.splitlines():
        m = re.match(r"(vspemu/[\w/]+)\.py:\d+: error:", line)
        if m:
            failing.add(m.group(1).removesuffix("/__init__").replace("/", "."))
    assert failing <= _excluded(), f"modules fail outside the excluded list:\n{result.stdout}"
    clean = _excluded() - failing
    assert not clean, f"these modules are mypy --strict clean now (or gone): remove them from " \
                      f"[[tool.mypy.overrides]] in pyproject.toml: {sorted(clean)}"
