"""The import contracts of pyproject.toml [tool.importlinter] (one-way layers, no cycles between
siblings) hold over the whole installed package, and they do catch a violation: the same contracts
over the same staged layout with one upward import, and with one cycle, added (scripts/lint_imports.py
stages kvrelay/, backends/ and python_backend/ as the package is installed)."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lint():
    spec = importlib.util.spec_from_file_location("lint_imports", ROOT / "scripts" / "lint_imports.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if not (Path(mod.lint_imports_exe()).exists()):
        pytest.fail("import-linter is not installed (it is in the test extra)")
    return mod


def _modules(lint) -> int:
    return sum(
        1 for folder in lint.package_dirs().values() for p in folder.rglob("*.py") if "__pycache__" not in p.parts
    )


def _edit(top: Path, rel: str, add: str) -> None:
    """In a staged layout, replace the symlink of kvrelay/<rel> by a copy with `add` appended (the
    symlinked folders on the way become real folders of symlinks, so nothing in the checkout changes)."""
    here = top
    for part in Path(rel).parts[:-1]:
        here = here / part
        if here.is_symlink():
            real = here.resolve()
            here.unlink()
            here.mkdir()
            for entry in real.iterdir():
                if entry.name != "__pycache__":
                    (here / entry.name).symlink_to(entry)
    f = here / Path(rel).name
    text = f.read_text(encoding="utf-8")
    f.unlink()
    f.write_text(text + add, encoding="utf-8")


def test_the_import_contracts_hold_over_the_installed_package(lint, tmp_path):
    lint.stage(tmp_path)
    p = lint.run(tmp_path, [])
    assert p.returncode == 0, p.stdout + p.stderr
    assert "Contracts: 2 kept, 0 broken." in p.stdout, p.stdout
    # every module of the three folders was analyzed (kvrelay.backends and kvrelay.triton included)
    assert f"Analyzed {_modules(lint)} files" in p.stdout, p.stdout


def test_an_upward_import_breaks_the_layers_contract(lint, tmp_path):
    top = lint.stage(tmp_path)
    _edit(top, "model/plan.py", "\n\ndef _upward():\n    import kvrelay.cli  # the model layer reaching up, lazily\n")
    p = lint.run(tmp_path, [])
    assert p.returncode == 1, p.stdout + p.stderr
    assert "kvrelay.model is not allowed to import kvrelay.cli" in p.stdout, p.stdout
    assert "- kvrelay.model.plan -> kvrelay.cli" in p.stdout, p.stdout


def test_an_import_cycle_breaks_the_acyclic_contract(lint, tmp_path):
    top = lint.stage(tmp_path)  # families.user imports registry; registry importing user closes a cycle
    _edit(top, "families/registry.py", "\n\ndef _cycle():\n    from kvrelay.families import user\n    return user\n")
    p = lint.run(tmp_path, [])
    assert p.returncode == 1, p.stdout + p.stderr
    assert "no import cycles between sibling modules or packages, at any depth BROKEN" in p.stdout, p.stdout
    assert "kvrelay layers (each imports only the layers below it) KEPT" in p.stdout, p.stdout


def test_the_staged_layout_leaves_the_checkout_alone(lint, tmp_path):
    top = lint.stage(tmp_path)
    _edit(top, "model/plan.py", "\nimport kvrelay.cli\n")
    assert "import kvrelay.cli" not in (ROOT / "kvrelay" / "model" / "plan.py").read_text(encoding="utf-8")
    assert (top / "backends").resolve() == (ROOT / "backends").resolve()
    shutil.rmtree(tmp_path / "kvrelay")
    assert (ROOT / "kvrelay" / "model" / "plan.py").is_file()
