"""ruff (pyproject.toml [tool.ruff]): the checkout is formatted and lint-clean, and the same settings
catch what they are there for (a line over the limit, an unused import, unformatted code)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUFF = Path(sys.executable).parent / "ruff"


def _ruff(*args, cwd=ROOT):
    return subprocess.run([str(RUFF), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_the_checkout_passes_ruff_check_and_format():
    check = _ruff("check", ".")
    assert check.returncode == 0, check.stdout + check.stderr
    fmt = _ruff("format", "--check", ".")
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


def test_the_settings_catch_long_lines_unused_imports_and_bad_format(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os\n\nx = '" + "a" * 130 + "'\ny=[1,2 ,3]\n")
    cfg = ("--config", str(ROOT / "pyproject.toml"))
    check = _ruff("check", *cfg, "--output-format", "concise", str(bad), cwd=tmp_path)
    assert check.returncode == 1
    assert "F401" in check.stdout and "E501" in check.stdout, check.stdout
    fmt = _ruff("format", *cfg, "--check", str(bad), cwd=tmp_path)
    assert fmt.returncode == 1, fmt.stdout
