"""`kvrelay models list`: each model family, built, registered or not, and where it lives; for a
registered family each model's kind (base, full, LoRA r/alpha/targets), size, weights digest and the
profiles that match it, or which file changed since it was registered."""

from __future__ import annotations

from kvrelay.errors import FamilyChanged, FamilyNotBuilt, KvRelayError, StaleFamily
from kvrelay.families.registry import FAMILY_NAMES, load_family, registered_names
from kvrelay.families.report import model_lines, profiles_match, summary_lines
from kvrelay.model import synthetic
from kvrelay.paths import family_dir


def add_arguments(parser) -> None:
    parser.add_argument("--verbose", "-v", action="store_true", help="also list each built family's models")


def run(args) -> int:
    mine = registered_names()
    w = max(map(len, FAMILY_NAMES + tuple(synthetic.SYNTHETIC) + tuple(mine)))
    for name in FAMILY_NAMES:
        try:
            family = load_family(name)
        except StaleFamily:
            print(f"{name:<{w}} {'stale':<10} {family_dir(name)}  (an older recipe: the next use rebuilds it)")
            continue
        except FamilyNotBuilt:
            print(f"{name:<{w}} {'not built':<10} {family_dir(name)}")
            continue
        except KvRelayError as e:
            print(f"{name:<{w}} {'broken: ' + str(e):<10} {family_dir(name)}")
            continue
        print(
            f"{name:<{w}} {'built':<10} {family.root}  (models: {', '.join(family.models)}; "
            f"fingerprint {family.fingerprint})"
        )
        print(f"{'':<{w}} profiles: {profiles_match(family)}")
        if args.verbose:
            for line in summary_lines(family):
                print(line)
    for name in mine:
        try:
            family = load_family(name)
        except FamilyChanged as e:
            print(f"{name:<{w}} {'changed':<10} {family_dir(name)}  ({e})")
            continue
        except KvRelayError as e:
            print(f"{name:<{w}} {'broken: ' + str(e):<10} {family_dir(name)}")
            continue
        print(
            f"{name:<{w}} {'registered':<10} {family.root}  (models: {', '.join(family.models)}; "
            f"fingerprint {family.fingerprint})"
        )
        print(f"{'':<{w}} profiles: {profiles_match(family)}")
        for line in model_lines(family):
            print(line)
    for name, spec in synthetic.SYNTHETIC.items():
        print(
            f"{name:<{w}} {'synthetic':<10} nothing on disk: random weights drawn at load time, for GPU "
            f"throughput runs (models: {', '.join(spec['models'])})"
        )
    return 0
