"""`kvrelay models list`: each model family, built, registered or not, and where it lives; for a
registered family each model's kind (base, full, LoRA r/alpha/targets), size, weights digest and the
profiles that match it, or which file changed since it was registered."""

from __future__ import annotations

from kvrelay.errors import FamilyChanged, FamilyNotBuilt, KvRelayError, StaleFamily
from kvrelay.families import user
from kvrelay.families.cli import summary_lines
from kvrelay.families.registry import FAMILY_NAMES, load_family, registered_names
from kvrelay.model import fingerprint as fp
from kvrelay.model import profile_file, synthetic
from kvrelay.paths import family_dir, profiles_dir


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


def profiles_match(family) -> str:
    """How many of the checkout's profiles for this family were scored on the weights built here."""
    files = [f for _, _, f in profile_file.pairs_in(profiles_dir(), family.name)]
    if not files:
        return "none (kvrelay profile)"
    digests = {m: fp.weights_digest(family.model_dir(m)) for m in family.models}
    same = verified = unknown = broken = 0
    for f in files:
        try:
            d = profile_file.load(f).data
        except profile_file.ProfileError:
            broken += 1
            continue
        status = profile_file.weights_status(d, (digests.get(d["sender"]), digests.get(d["receiver"])))
        if status == "scored":
            same += 1
        elif status == "verified":
            verified += 1
        elif status == "unknown":
            unknown += 1
    other = len(files) - same - verified - unknown - broken
    same += verified
    return (
        f"{len(files)} pairs: {same} match these weights"
        + (f" ({verified} verified by `profile check --record`)" if verified else "")
        + f", {other} scored on other weights, {unknown} without weights digests"
        + (f", {broken} unreadable (`kvrelay profile plot FILE` names the problem)" if broken else "")
        + (
            " (`kvrelay profile check PROFILE --record` re-scores one on these weights and records it)"
            if same < len(files)
            else ""
        )
    )


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def model_lines(family) -> list[str]:
    """One line per model of a registered family: kind, size, weights digest, profiles, source dir."""
    manifest = family.manifest()
    weights = manifest.get("weights", {})
    pairs = profile_file.pairs_in(profiles_dir(), family.name)
    w = max(map(len, family.models))
    lines = []
    for m in family.models:
        src = manifest.get("sources", {}).get(m, {})
        mine = [(s, r, f) for s, r, f in pairs if m in (s, r)]
        match = 0
        for s, r, f in mine:
            try:
                d = profile_file.load(f).data
            except profile_file.ProfileError:
                continue
            match += profile_file.weights_status(d, (weights.get(s), weights.get(r))) in ("scored", "verified")
        prof = f"{match} of {len(mine)} profiles match" if mine else "no profiles"
        size = _size(src.get("bytes", 0)) + (" adapter" if src.get("kind") == "lora" else "")
        lines.append(
            f"  {m:<{w}} {user.describe(manifest, m)}; {size}; weights {weights.get(m, '?')}; {prof}; "
            f"{src.get('dir', '?')}"
        )
    return lines
