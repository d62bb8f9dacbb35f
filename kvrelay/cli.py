"""kvrelay: serve a family of fine-tuned LLM variants from one Triton server, reusing each other's KV
cache across models (DroidSpeak layer-selective re-prefill).

Each subcommand lives in its own module and is imported only when used, so `kvrelay --help` stays
fast (torch takes seconds to import)."""

from __future__ import annotations

import argparse
import importlib
import sys
from importlib.metadata import PackageNotFoundError, version

from kvrelay.errors import KvRelayError

# (command path, module, help). Each module has `add_arguments(parser)` and `run(args) -> int` and is named
# <word>_cmd.py in its package: a command module is thin, and nothing but this dispatcher imports one
# (tests/test_command_modules.py).
GROUPS = {
    ("models",): "build, register and list model families",
    ("bench",): "benchmarks that print figures",
    ("store",): "inspect a page store",
}
COMMANDS = [
    (("models", "build"), "kvrelay.families.build_cmd", "build a model family's weights (cached outside git)"),
    (("models", "list"), "kvrelay.families.list_cmd", "list model families and whether they are built"),
    (
        ("models", "add"),
        "kvrelay.families.add_cmd",
        "register a family from your own model directories (checkpoints, PEFT LoRA adapters)",
    ),
    (("models", "remove"), "kvrelay.families.remove_cmd", "forget a family registered with `models add`"),
    (("bench", "prefill"), "kvrelay.bench.prefill_cmd", "full prefill vs. layer-selective re-prefill timings"),
    (
        ("bench", "decode"),
        "kvrelay.bench.decode_cmd",
        "batched decode vs. HF generate; LoRA adapters unmerged, one vs. mixed",
    ),
    (
        ("demo",),
        "kvrelay.server.demo_cmd",
        "the main job: a real server, a donor answers, other variants reuse its KV (--in-process: no server)",
    ),
    (("serve",), "kvrelay.server.serve_cmd", "run tritonserver with the family's models, orchestrator and page store"),
    (("query",), "kvrelay.server.query_cmd", "send one request to a running server; print text and KV reuse"),
    (("repo",), "kvrelay.server.repo_cmd", "write the Triton model repository for a deployment"),
    (
        ("profile",),
        "kvrelay.profiler.profile_cmd",
        "offline profile of a (sender, receiver) pair; `profile plot`, `profile check`",
    ),
    (("eval",), "kvrelay.quality.eval_cmd", "quality and prefill time: full prefill vs. full reuse vs. selected plan"),
    (
        ("loadtest",),
        "kvrelay.loadtest.loadtest_cmd",
        "Locust load test: the same workload with sharing off and on; throughput ratio",
    ),
    (("store", "stats"), "kvrelay.store.stats_cmd", "keys, bytes, tenants and orphans of a Redis page store"),
    (
        ("stress",),
        "kvrelay.loadtest.stress_cmd",
        "many concurrent mixed clients (HTTP, gRPC, streaming, hang-ups); errors, server RSS",
    ),
]


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse already exits 2; keep the program name in the message
        self.print_usage(sys.stderr)
        self.exit(2, f"kvrelay: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    root = _Parser(prog="kvrelay", description=__doc__.split("\n\n")[0].replace("\n", " "))
    root.add_argument("--version", action="version", version=f"kvrelay {_version()}")
    groups: dict[tuple, argparse._SubParsersAction] = {
        (): root.add_subparsers(dest="cmd", required=True, parser_class=_Parser, metavar="COMMAND")
    }
    parents: dict[tuple, argparse.ArgumentParser] = {}
    for path, module, help_ in COMMANDS:
        for i in range(1, len(path)):
            prefix = path[:i]
            if prefix not in groups:
                p = groups[prefix[:-1]].add_parser(prefix[-1], help=GROUPS[prefix], description=GROUPS[prefix])
                parents[prefix] = p
                groups[prefix] = p.add_subparsers(dest=f"cmd_{i}", required=True, parser_class=_Parser)
        p = groups[path[:-1]].add_parser(path[-1], help=help_, description=help_)
        p.set_defaults(_module=module)
        _lazy_arguments(p, module)
    return root


def _version() -> str:
    try:
        return version("kvrelay")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _lazy_arguments(parser: argparse.ArgumentParser, module: str) -> None:
    # Arguments are declared by the command module; importing it here keeps one place per command.
    # Command modules must keep heavy imports (torch) inside run().
    importlib.import_module(module).add_arguments(parser)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    if not (sys.argv[1:] if argv is None else argv):
        parser.print_help(sys.stderr)
        parser.exit(2, "\nkvrelay: error: a command is required (see above)\n")
    args = parser.parse_args(argv)
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except KvRelayError as e:
        print(f"kvrelay: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kvrelay: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
