"""One naming rule for command modules: every module kvrelay.cli.COMMANDS dispatches to is
`<word>_cmd.py` in its package, and no module of the package other than kvrelay/cli.py imports one
(a command module is thin: what another module needs lives in a library module beside it)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from kvrelay.cli import COMMANDS

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("kvrelay", "backends", "python_backend")  # the installed package (pyproject.toml package-dir)


def _imported(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, dotted name) of every module or name an import statement names, at any depth."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = "." * node.level + (node.module or "")
            out.append((node.lineno, mod))
            out += [(node.lineno, f"{mod}.{a.name}" if node.module else mod + a.name) for a in node.names]
    return sorted(out)


def _cmd_imports(source: str) -> list[str]:
    return [f"{line}: {name}" for line, name in _imported(ast.parse(source)) if name.split(".")[-1].endswith("_cmd")]


def test_every_command_module_is_named_word_cmd_and_exists():
    for path, module, _ in COMMANDS:
        assert module.rsplit(".", 1)[-1].endswith("_cmd"), (path, module)
        assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), module


def test_nothing_but_the_dispatcher_imports_a_command_module():
    found = []
    for folder in FOLDERS:
        for f in sorted((ROOT / folder).rglob("*.py")):
            if f == ROOT / "kvrelay" / "cli.py" or "__pycache__" in f.parts:
                continue
            found += [f"{f.relative_to(ROOT)}:{hit}" for hit in _cmd_imports(f.read_text(encoding="utf-8"))]
    assert not found, "command modules imported outside kvrelay/cli.py:\n" + "\n".join(found)


def test_the_check_sees_every_form_of_import():
    src = (
        "import kvrelay.server.serve_cmd\n"
        "from kvrelay.families import list_cmd\n"
        "def f():\n    from kvrelay.bench.decode_cmd import run\n"
        "from . import query_cmd\n"
        "from kvrelay.families import report\n"
    )
    assert [h.split(":")[0] for h in _cmd_imports(src)] == ["1", "2", "4", "5"], _cmd_imports(src)


def test_the_command_line_is_built_without_torch_numpy_triton_or_locust():
    """`kvrelay --help` imports every command module: a command module imports what needs torch (or
    numpy, tritonclient, Locust) inside run(), so building the parser loads none of them; kvrelay.store
    loads its stores (tensors) only when one is asked for, so `store stats` builds without torch too."""
    code = (
        "import sys, kvrelay.cli as c; "
        "c.build_parser(); "
        "print(' '.join(m for m in ('torch', 'numpy', 'transformers', 'tritonclient', 'locust', 'gevent') "
        "if m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", f"building the parser imported: {r.stdout.strip()}"
