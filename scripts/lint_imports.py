"""Check kvrelay's import contracts (pyproject.toml [tool.importlinter]) over the whole package as
installed: kvrelay/ plus backends/ as kvrelay.backends and python_backend/ as kvrelay.triton.

    .venv/bin/python scripts/lint_imports.py [lint-imports options, e.g. --verbose]

import-linter (grimp) finds a package's modules by walking its folder, and those two subpackages
live outside kvrelay/ (setup.py maps them): a plain `lint-imports` sees neither. This script stages
the installed layout as symlinks in a temporary directory (kvrelay/* -> the checkout's kvrelay/*,
kvrelay/backends -> backends/, kvrelay/triton -> python_backend/), puts it first on PYTHONPATH and
runs lint-imports from the same environment on the checkout's pyproject.toml. Exit status: 0 when
every contract is kept, 1 when one is broken, 2 when the layout could not be staged.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "kvrelay"


def package_dirs(root: Path = ROOT) -> dict[str, Path]:
    """{package: folder} from pyproject.toml's [tool.setuptools] package-dir."""
    cfg = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))
    return {pkg: root / d for pkg, d in cfg["tool"]["setuptools"]["package-dir"].items()}


def stage(dest: Path, root: Path = ROOT) -> Path:
    """Build the installed layout under dest (symlinks); returns dest/kvrelay."""
    dirs = package_dirs(root)
    top = dest / PACKAGE
    top.mkdir(parents=True)
    for entry in dirs.pop(PACKAGE).iterdir():
        if entry.name != "__pycache__":
            (top / entry.name).symlink_to(entry)
    for pkg, folder in sorted(dirs.items()):
        parts = pkg.split(".")
        if parts[0] != PACKAGE or len(parts) != 2 or (top / parts[1]).exists():
            raise SystemExit(f"lint_imports: cannot stage {pkg} from {folder}")
        if not (folder / "__init__.py").is_file():
            raise SystemExit(f"lint_imports: {folder} is not a package (no __init__.py)")
        (top / parts[1]).symlink_to(folder, target_is_directory=True)
    return top


def lint_imports_exe() -> str:
    exe = Path(sys.executable).parent / "lint-imports"
    if not exe.exists():
        raise SystemExit("lint_imports: no lint-imports beside this Python; pip install 'kvrelay[test]'")
    return str(exe)


def run(dest: Path, args: list[str], root: Path = ROOT) -> subprocess.CompletedProcess:
    """lint-imports over the layout staged at dest, with the checkout's contracts."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(dest), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }
    return subprocess.run(
        [lint_imports_exe(), "--no-cache", "--no-logo", *args, str(root / "pyproject.toml")],
        cwd=dest,
        env=env,
        capture_output=True,
        text=True,
    )


def main(argv: list[str]) -> int:
    with tempfile.TemporaryDirectory(prefix="kvrelay-lint-imports-") as tmp:
        try:
            stage(Path(tmp))
        except SystemExit as e:
            print(e, file=sys.stderr)
            return 2
        p = run(Path(tmp), argv)
    sys.stdout.write(p.stdout)
    sys.stderr.write(p.stderr)
    return p.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
