"""`kvrelay models list`: each model family, built or not, and where it lives."""
from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("--verbose", "-v", action="store_true", help="also list each built family's models")


def run(args) -> int:
    from kvrelay.errors import FamilyNotBuilt, KvRelayError, StaleFamily
    from kvrelay.families.cli import summary_lines
    from kvrelay.families.registry import FAMILY_NAMES, load_family
    from kvrelay.paths import family_dir

    for name in FAMILY_NAMES:
        try:
            family = load_family(name)
        except StaleFamily:
            print(f"{name:<6} {'stale':<10} {family_dir(name)}  (an older recipe: the next use rebuilds it)")
            continue
        except FamilyNotBuilt:
            print(f"{name:<6} {'not built':<10} {family_dir(name)}")
            continue
        except KvRelayError as e:
            print(f"{name:<6} {'broken: ' + str(e):<10} {family_dir(name)}")
            continue
        print(f"{name:<6} {'built':<10} {family.root}  (models: {', '.join(family.models)}; "
              f"fingerprint {family.fingerprint})")
        if args.verbose:
            for line in summary_lines(family):
                print(line)
    return 0
