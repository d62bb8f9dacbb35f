"""The top-level command line: a command is required (with the list shown), --version, group help."""

import subprocess
import sys


def kvrelay(*args):
    return subprocess.run([sys.executable, "-m", "kvrelay.cli", *args], capture_output=True, text=True, timeout=60)


def test_no_command_shows_the_commands_and_exits_2():
    r = kvrelay()
    assert r.returncode == 2 and "a command is required" in r.stderr
    assert "serve" in r.stderr and "stress" in r.stderr and "DroidSpeak" in r.stderr


def test_version():
    r = kvrelay("--version")
    assert r.returncode == 0 and r.stdout.startswith("kvrelay 0.")


def test_groups_say_what_they_hold():
    models = kvrelay("models", "--help").stdout
    assert "build, register and list model families" in models and "{build,list,add,remove}" in models
    assert "benchmarks that print figures" in kvrelay("bench", "--help").stdout
