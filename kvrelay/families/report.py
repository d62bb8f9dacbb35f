"""Text about a family for `kvrelay models`: a built family's per-model summary, a rebuild compared
with the build it replaced, how many of the checkout's profiles match its weights, and one line per
model of a registered family."""

from __future__ import annotations

from kvrelay.families import user
from kvrelay.model import fingerprint as fp
from kvrelay.model import profile_file
from kvrelay.paths import profiles_dir


def summary_lines(family) -> list[str]:
    """A short per-model summary from family.json (used by build and list)."""
    manifest = family.manifest()
    build = manifest.get("build", {})
    weights = manifest.get("weights", {})
    base_loss = build.get(family.base, {}).get("heldout_loss", {})
    lines = []
    for m, d in family.dirs.items():
        b = build.get(m, {})
        parts = [f"  {m:<6} {d}"]
        if m == family.base and b.get("steps"):
            parts.append(
                f"({b.get('steps')} steps from random init on {b.get('corpus', '?')}, {b.get('seconds', '?')} s)"
            )
        elif m == family.base:
            parts.append(f"(pretrained, converted in {b.get('seconds', '?')} s)")
        else:
            layers = (
                f", layers {b['trained_layers'][0]}-{b['trained_layers'][1] - 1} trained"
                if b.get("trained_layers")
                else ""
            )
            if b.get("lora"):
                lora = b["lora"]
                layers = (
                    f", LoRA r={lora['r']} alpha={lora['lora_alpha']} on {'/'.join(lora['target_modules'])} "
                    f"of every layer, merged"
                )
            parts.append(f"({b.get('steps', '?')} steps on {b.get('corpus', '?')}{layers}, {b.get('seconds', '?')} s)")
        if weights.get(m):
            parts.append(f"weights {weights[m]}")
        lines.append(" ".join(parts))
        loss = b.get("heldout_loss")
        if loss and m != family.base:
            cells = ", ".join(f"{dom} {base_loss.get(dom, float('nan')):.3f} -> {v:.3f}" for dom, v in loss.items())
            lines.append(f"         held-out loss base -> {m}: {cells}")
        elif loss:
            lines.append("         held-out loss: " + ", ".join(f"{dom} {v:.3f}" for dom, v in loss.items()))
    return lines


def rebuild_report(before: dict, after: dict) -> str:
    """A rebuild compared with the build it replaced: a build is defined by steps, seed and data, so
    the same command gives the same weights digests (on one machine; across machines fp noise may
    change the low bits of some weights, and `kvrelay profile check` re-scores profiles there)."""
    same = [m for m in after if before.get(m) == after[m]]
    other = [f"{m} {before.get(m, '-')} -> {after[m]}" for m in after if m not in same]
    if not other:
        return f"  rebuild reproduced the previous build: all {len(same)} weights digests equal"
    return (
        f"  rebuild differs from the previous build for {len(other)} of {len(after)} models: {'; '.join(other)} "
        "(profiles scored on the old weights are reported by `kvrelay models list` and the selector)"
    )


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
