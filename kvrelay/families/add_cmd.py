"""`kvrelay models add NAME --base DIR [--variant VNAME=DIR ...]`: register a family from your own
directories (full HF checkpoints or PEFT LoRA adapters over the base); nothing is copied."""

from __future__ import annotations

from kvrelay.errors import KvRelayError
from kvrelay.families import user
from kvrelay.families.report import model_lines


def add_arguments(p) -> None:
    p.add_argument("name", help="the family's name, then used as --family NAME in every command")
    p.add_argument(
        "--base",
        required=True,
        metavar="DIR",
        help="the base model: a Hugging Face model directory "
        "(config.json, model.safetensors or shards with an index, or pytorch_model.bin; tokenizer.json)",
    )
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="VNAME=DIR",
        help="a variant: a full checkpoint of the base's architecture, or a PEFT LoRA adapter directory "
        "(adapter_config.json + adapter_model.safetensors/.bin) over the base; repeat for each",
    )
    p.add_argument("--replace", action="store_true", help="replace a family already registered under NAME")


def parse_variants(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        name, sep, d = item.partition("=")
        if not sep or not name or not d:
            raise KvRelayError(f"--variant {item!r}: expected VNAME=DIR")
        if name in out:
            raise KvRelayError(f"--variant {name!r} given twice")
        out[name] = d
    return out


def run(args) -> int:
    fam = user.register(args.name, args.base, parse_variants(args.variant), replace=args.replace)
    print(f"family {fam.name} registered: {fam.root}  (fingerprint {fam.fingerprint}; nothing copied)")
    for line in model_lines(fam):
        print(line)
    print(f"serve it: kvrelay serve --family {fam.name}")
    return 0
