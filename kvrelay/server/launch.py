"""A deployment from a command's choices, and a tritonserver started on it: the library code that
`kvrelay serve`, `repo`, `demo`, `loadtest`, `stress` and the supervisor share.

    dep, workdir = resolve(family="tiny", store="memory:1GiB", http_port=8000)
    server = start(dep, workdir, http_port=8000)      # a started kvrelay.server.tritonserver.TritonServer

Importing this module imports the deployment (kvrelay.serving.deployment, torch): command modules
import it inside run().
"""

from __future__ import annotations

from pathlib import Path

from kvrelay.families import ensure_built
from kvrelay.model.synthetic import is_synthetic
from kvrelay.paths import home
from kvrelay.server.triton_repo import generate
from kvrelay.server.tritonserver import TritonServer
from kvrelay.serving import deployment as dp


def resolve(
    family: str | None = None,
    deployment: str | Path | None = None,
    store: str | None = None,
    no_sharing: bool = False,
    http_port: int | None = None,
    workdir: str | Path | None = None,
) -> tuple[dp.Deployment, Path]:
    """(validated Deployment, workdir): the deployment file, else every model of `family` (default
    tiny) with defaults, built first if needed; `store` overrides its page store, `no_sharing` turns
    cross-model reuse off. The workdir defaults to $KVRELAY_HOME/serve/<family>-<http_port>."""
    if deployment:
        dep = dp.load(deployment)
    else:
        family = family or "tiny"
        _ensure_family(family)
        dep = dp.for_family(family)
    if store:
        dep.store = store
    if no_sharing:
        dep.sharing = False
    _ensure_family(dep.family)
    workdir = (
        Path(workdir) if workdir else home() / "serve" / (f"{dep.family}-{http_port}" if http_port else dep.family)
    )
    return dp.validate(dep), workdir


def _ensure_family(family: str) -> None:
    if not is_synthetic(family):
        ensure_built(family)


def start(dep: dp.Deployment, workdir: Path, **ports) -> TritonServer:
    """tritonserver on the deployment's model repository (generated under workdir), started."""
    server = TritonServer(workdir / "repository", workdir, **ports)
    server.check_ports()  # before generate(), which replaces the repository another server may be using
    generate(dep, workdir / "repository")
    return server.start()
