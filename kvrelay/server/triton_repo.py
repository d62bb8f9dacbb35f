"""Generate a Triton model repository from model_repository/ templates and a deployment."""

from __future__ import annotations

import shutil
from pathlib import Path
from string import Template

from kvrelay.serving.deployment import Deployment, validate
from kvrelay.errors import KvRelayError
from kvrelay.paths import repo_root
from kvrelay.serving.unary_channel import make_endpoint


def _render(template: str, **values) -> str:
    path = repo_root() / "model_repository" / "templates" / f"{template}.pbtxt"
    try:
        return Template(path.read_text(encoding="utf-8")).substitute(**values)
    except FileNotFoundError:
        raise KvRelayError(f"template missing: {path} (kvrelay must run from its source checkout)") from None


def _model(out: Path, name: str, config: str, entrypoint: str | None) -> None:
    d = out / name
    (d / "1").mkdir(parents=True, exist_ok=True)
    (d / "config.pbtxt").write_text(config, encoding="utf-8")
    if entrypoint:
        shutil.copy(repo_root() / "model_repository" / "entrypoints" / f"{entrypoint}.py", d / "1" / "model.py")


def generate(dep: Deployment, out: Path) -> Path:
    """Write the repository into `out` (replaced if it exists); returns the deployment JSON path."""
    validate(dep)
    out = Path(out).resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    deployment = out / "deployment.json"
    deployment.write_text(dep.to_json())
    common = {"deployment": str(deployment)}
    address, key = make_endpoint(out)
    for stream in (False, True):
        suffix = "_stream" if stream else ""
        # one core process (it owns the engines and the in-memory store); unary forwarders may be more
        _model(
            out,
            f"orchestrator{suffix}",
            _render(
                "orchestrator",
                name=f"orchestrator{suffix}",
                decoupled=str(stream).lower(),
                instances=1 if stream else dep.orchestrator_instances,
                core_address=address,
                core_key=str(key),
                **common,
            ),
            "orchestrator",
        )
        _model(
            out,
            f"ensemble{suffix}",
            _render(
                "ensemble",
                name=f"ensemble{suffix}",
                preprocessing="preprocessing",
                orchestrator=f"orchestrator{suffix}",
                **VARIANT_INPUT,
            ),
            None,
        )
    _model(
        out,
        "preprocessing",
        _render("preprocessing", name="preprocessing", variant="", instances=1, **common),
        "preprocessing",
    )
    _model(out, "postprocessing", _render("postprocessing", instances=1, **common), "postprocessing")
    if dep.variant_entry_points:
        # each variant under its own Triton name (genai-perf -m code, /v2/models/code/generate): the
        # streaming path with a preprocessing of its own that fixes the variant
        for m in dep.model_names:
            if m in INTERNAL_NAMES or m.startswith("preprocessing_"):
                raise KvRelayError(
                    f"model {m!r}: the name is taken by one of kvrelay's Triton models "
                    f"{sorted(INTERNAL_NAMES)}; rename it or set variant_entry_points = false"
                )
            _model(
                out,
                f"preprocessing_{m}",
                _render("preprocessing", name=f"preprocessing_{m}", variant=m, instances=1, **common),
                "preprocessing",
            )
            # no `variant_name` input: the name is the variant
            _model(
                out,
                m,
                _render(
                    "ensemble",
                    name=m,
                    preprocessing=f"preprocessing_{m}",
                    orchestrator="orchestrator_stream",
                    variant_input="",
                    variant_map="",
                ),
                None,
            )
    return deployment


# `ensemble` picks the variant with an input named `variant_name`, not `model`: genai-perf writes the Triton
# model name into every request's "model" field as a bare string, which perf_analyzer would send as
# an input of that name (and refuses as malformed when the model has one)
VARIANT_INPUT = {
    "variant_input": '  { name: "variant_name" data_type: TYPE_STRING dims: [ 1 ] optional: true },\n',
    "variant_map": '      input_map { key: "variant_name" value: "variant_name" }\n',
}
INTERNAL_NAMES = {
    "ensemble",
    "ensemble_stream",
    "orchestrator",
    "orchestrator_stream",
    "preprocessing",
    "postprocessing",
}
