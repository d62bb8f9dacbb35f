"""Deployment files: parsing, validation, and how CPU engines share the cores."""

import pytest

from kvrelay.serving import deployment as dp
from kvrelay.errors import KvRelayError


def write(tmp_path, text):
    p = tmp_path / "d.toml"
    p.write_text(text)
    return p


def test_cpu_engines_split_the_cores_unless_told_otherwise(tmp_path):
    dep = dp.load(
        write(tmp_path, 'family = "tiny"\n[models.code]\nthreads = 3\n[models.base]\n[models.legal]\ninstances = 2\n')
    )
    assert dep.cpu_threads("code") == 3  # its own setting
    assert dep.cpu_threads("base", cpus=2) == 1  # 2 cores over 4 CPU engine instances, at least 1
    assert dep.cpu_threads("base", cpus=16) == 4
    gpu = dp.load(write(tmp_path, 'family = "tiny"\n[models.base]\n[models.code]\ndevice = "cuda"\n'))
    assert gpu.cpu_threads("base", cpus=16) == 16  # GPU engines take no CPU share


@pytest.mark.parametrize(
    "text, msg",
    [
        ('family = "tiny"\n[models.base]\nthreads = -1\n', "threads must be >= 0"),
        ('family = "tiny"\n[models.base]\ndtype = "int8"\n', "dtype must be"),
        ('family = "tiny"\n[models.nope]\n', "has no model 'nope'"),
        ("[models.base]\n", "'family' is required"),
    ],
)
def test_bad_deployment_files_are_clear_errors(tmp_path, text, msg):
    with pytest.raises(KvRelayError, match=msg):
        dp.load(write(tmp_path, text))
