"""Model families on disk: load, build (atomically, under a lock), ensure built.

Layout under family_dir(name) ($KVRELAY_HOME/families/<name>):
    family.json        name, base, models, fingerprint, per-model build info, created, kvrelay version
    <model>/           a Hugging Face model dir per model (config.json, model.safetensors, tokenizer.json, ...)

A family is built in a temporary sibling directory and renamed into place only once complete, so
an interrupted build never leaves a directory that load_family accepts. No torch import here.

A *registered* family (kvrelay models add, or a deployment's [family] table; kvrelay.families.user)
has the same layout, but each <model>/ holds only symlinks to the user's files (nothing copied), and
family.json records every file's size, mtime and sha256: load_family refuses the family, naming the
file, when one changed after registration (verify_files). Built and registered families install alike
(_swap_in).

family_spec(name) is any family by name as the rest of kvrelay reads it: a built or registered one
from its family.json, or a synthetic one (kvrelay.model.synthetic), as a kvrelay.model.spec.FamilySpec.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import importlib
import json
import os
import shutil
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

from kvrelay.errors import FamilyChanged, FamilyNotBuilt, KvRelayError, StaleFamily
from kvrelay.model import fingerprint as fp
from kvrelay.model import synthetic
from kvrelay.model.spec import MANIFEST, FamilySpec, ModelSpec
from kvrelay.paths import family_dir

FAMILY_NAMES: tuple[str, ...] = ("tiny", "smol", "smol-quick", "smol-lora", "gemma-lora")
_BUILDERS = {
    "tiny": "kvrelay.families.tiny",
    "smol": "kvrelay.families.smol",
    "smol-quick": "kvrelay.families.smol_quick",
    "smol-lora": "kvrelay.families.smol_lora",
    "gemma-lora": "kvrelay.families.gemma_lora",
}
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json")
FORMAT = 1


def is_registered(name: str) -> bool:
    """A family registered from the user's own directories (not one kvrelay builds)."""
    if name in FAMILY_NAMES or not name or "/" in name or name.startswith("."):
        return False
    try:
        return json.loads((family_dir(name) / MANIFEST).read_text()).get("kind") == "registered"
    except (OSError, ValueError, AttributeError):
        return False


def registered_names() -> list[str]:
    root = family_dir("x").parent
    return sorted(d.name for d in root.iterdir() if d.is_dir() and is_registered(d.name)) if root.is_dir() else []


def _check_name(name: str) -> None:
    if name not in FAMILY_NAMES and not is_registered(name):
        if synthetic.is_synthetic(name):
            raise KvRelayError(
                f"{name!r} is a synthetic family (random weights drawn at load time): there is "
                "nothing to build or load from disk"
            )
        mine = registered_names()
        raise KvRelayError(
            f"unknown model family {name!r}; known families: {', '.join(FAMILY_NAMES)}, "
            f"synthetic {', '.join(synthetic.SYNTHETIC)}"
            + (f", registered {', '.join(mine)}" if mine else "")
            + "; register your own with: kvrelay models add NAME --base DIR --variant VNAME=DIR"
        )


def _builder(name: str):
    _check_name(name)
    if name not in _BUILDERS:
        raise KvRelayError(
            f"family {name!r} is registered from your directories, not built by kvrelay: "
            f"re-register it with `kvrelay models add {name} ... --replace`"
        )
    return importlib.import_module(_BUILDERS[name])


def recipe(name: str) -> int:
    """The builder's recipe version: bumped when a change makes earlier builds of the family stale."""
    if is_registered(name):
        return 1
    return getattr(_builder(name), "RECIPE", 1)


def _not_built(name: str, why: str, cls: type[FamilyNotBuilt] = FamilyNotBuilt) -> FamilyNotBuilt:
    return cls(f"model family {name!r} is not built ({why}); run: kvrelay models build --family {name}")


def load_family(name: str) -> FamilySpec:
    """The built family `name`; FamilyNotBuilt (naming the build command) if it is not on disk."""
    _check_name(name)
    root = family_dir(name)
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise _not_built(name, f"no {manifest_path}")
    try:
        manifest = json.loads(manifest_path.read_text())
        base, names, fingerprint = manifest["base"], list(manifest["models"]), manifest["fingerprint"]
    except (ValueError, KeyError, TypeError) as e:
        raise KvRelayError(
            f"{manifest_path} is unreadable ({e}); rebuild: kvrelay models build --family {name} --force"
        )
    if manifest.get("name") != name or not names or names[0] != base:
        raise KvRelayError(
            f"{manifest_path} does not describe family {name!r} with its base first; "
            f"rebuild: kvrelay models build --family {name} --force"
        )
    if manifest.get("kind") == "registered":
        verify_files(name, manifest)  # FamilyChanged naming the file
        return _family(name, root, names, fingerprint)
    built, current = manifest.get("recipe", 1), recipe(name)
    if built != current:
        raise _not_built(
            name, f"{root} was built with recipe {built}, this kvrelay builds recipe {current}", StaleFamily
        )
    models = {m: root / m for m in names}
    for m, d in models.items():
        missing = [f for f in MODEL_FILES if not (d / f).is_file()]
        if missing:
            raise FamilyNotBuilt(
                f"model family {name!r} is incomplete: {d} lacks {', '.join(missing)}; "
                f"run: kvrelay models build --family {name} --force"
            )
    return _family(name, root, names, fingerprint)


def _family(name: str, root: Path, names: list[str], fingerprint: str) -> FamilySpec:
    return FamilySpec(name, tuple(names), root, fingerprint, {m: root / m for m in names})


def is_built(name: str) -> bool:
    try:
        load_family(name)
        return True
    except FamilyNotBuilt:
        return False


@contextlib.contextmanager
def _lock(path: Path):
    """An exclusive inter-process lock (two test sessions building the same family wait, not clash)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"kvrelay: waiting for another build of {path.stem.strip('.')} to finish ...", file=sys.stderr)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _version() -> str:
    try:
        return version("kvrelay")
    except Exception:  # not installed (running from a bare checkout)
        return "unknown"


def build_family(name: str, force: bool = False, progress: bool = True) -> FamilySpec:
    """Build family `name` into family_dir(name). Returns at once if it is already built (unless force)."""
    if is_registered(name) and not force:
        return load_family(name)
    builder = _builder(name)
    if not force:
        with contextlib.suppress(FamilyNotBuilt):
            return load_family(name)
    root = family_dir(name)
    parent = root.parent
    parent.mkdir(parents=True, exist_ok=True)
    with _lock(parent / f".{name}.lock"):
        if not force:  # another process may have built it while we waited for the lock
            with contextlib.suppress(FamilyNotBuilt):
                return load_family(name)
        builder.check_sources()  # fail before any slow work when a source is not installed

        def fill(tmp: Path) -> dict:
            t0 = time.monotonic()
            info = builder.build(tmp, progress=progress)
            return _manifest(name, builder, tmp, info, round(time.monotonic() - t0, 1))

        _swap_in(name, fill)
    return load_family(name)


def family_lock(name: str):
    """The family's build lock: builds, registrations, removals and manifest updates hold it."""
    return _lock(family_dir(name).parent / f".{name}.lock")


def _swap_in(name: str, fill) -> None:
    """Under family_lock(name): fill(tmp) writes a complete family into a temporary sibling directory
    and returns its manifest; family.json is written last and the directory renamed into place, so an
    interrupted build or registration leaves either the old family or the new one, never a mix."""
    root = family_dir(name)
    parent = root.parent
    # Leftovers of interrupted builds: nobody else holds the lock, so they are stale.
    for stale in list(parent.glob(f".{name}.building-*")) + list(parent.glob(f".{name}.old-*")):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.building-", dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; a family is as readable as any dir
    old = None
    try:
        manifest = fill(tmp)
        write_json_atomic(tmp / MANIFEST, manifest)
        if root.exists():
            old = parent / f".{name}.old-{os.getpid()}"
            root.rename(old)
        tmp.rename(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists() and not root.exists():
            old.rename(root)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_family(name: str) -> Path:
    """Remove a registered family's directory (symlinks and family.json; the user's files stay)."""
    if not is_registered(name):
        if name in FAMILY_NAMES:
            raise KvRelayError(
                f"{name!r} is a family kvrelay builds, not one you registered; its weights are in "
                f"{family_dir(name)} (delete that directory to free the space)"
            )
        _check_name(name)
    root = family_dir(name)
    with family_lock(name):
        gone = root.parent / f".{name}.old-{os.getpid()}"
        root.rename(gone)  # atomic: the family is gone for every reader at once
        shutil.rmtree(gone, ignore_errors=True)
    return root


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON to a temporary file beside `path`, then os.replace it: readers see old or new."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(obj, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _manifest(name: str, builder, tmp: Path, info: dict, seconds: float) -> dict:
    models = list(builder.MODELS)
    specs = {m: ModelSpec.from_dir(m, tmp / m, name) for m in models}
    fps = {m: s.fingerprint for m, s in specs.items()}
    # content digests of the weights as built: compare two builds, and what profiles were scored on
    weights = {m: s.weights for m, s in specs.items()}
    if len(set(fps.values())) != 1:
        raise KvRelayError(f"family {name!r}: models do not share one fingerprint: {fps}")
    return {
        "format": FORMAT,
        "name": name,
        "base": builder.BASE,
        "recipe": recipe(name),
        "models": models,
        "fingerprint": fps[models[0]],
        "build": {m: info.get(m, {}) for m in models},
        "weights": weights,
        "build_seconds": seconds,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "kvrelay_version": _version(),
        "python": sys.version.split()[0],
    }


def ensure_built(name: str) -> FamilySpec:
    """Load family `name`, building it first if it is not on disk."""
    try:
        return load_family(name)
    except FamilyNotBuilt:
        return build_family(name)


def family_spec(name: str) -> FamilySpec:
    """A family by name, synthetic or built (FamilyNotBuilt naming the build command if not on disk)."""
    if synthetic.is_synthetic(name):
        return FamilySpec(name, tuple(synthetic.spec(name)[1]))
    return load_family(name)


def family_models(family: str) -> list[str]:
    """Model names of a family, base first."""
    return list(family_spec(family).models)


# --- a registered family's files ----------------------------------------------------------------


def changed_files(manifest: dict) -> list[tuple[str, str, str]]:
    """[(model, path, why)] for every recorded file that is missing or whose content changed; files
    whose size and mtime are as recorded are not read."""
    out, shas = [], {}
    for m, files in manifest.get("files", {}).items():
        for link, rec in files.items():
            p = Path(rec["path"])
            try:
                st = p.stat()
            except OSError:
                out.append((m, rec["path"], "missing"))
                continue
            if (st.st_size, st.st_mtime_ns) == (rec["size"], rec["mtime_ns"]):
                continue
            if p not in shas:
                shas[p] = fp.sha256_file(p)
            if shas[p] != rec["sha256"]:
                out.append(
                    (
                        m,
                        rec["path"],
                        f"changed (sha256 {rec['sha256'][:12]} -> {shas[p][:12]}, {rec['size']} -> {st.st_size} bytes)",
                    )
                )
    return out


def verify_files(name: str, manifest: dict) -> None:
    """FamilyChanged, naming the first changed file, if any registered file changed. A file only
    touched (same content, new mtime) has its stamp refreshed so it is not hashed again."""
    bad = changed_files(manifest)
    if bad:
        m, path, why = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise FamilyChanged(
            f"family {name!r}: {path} (model {m!r}) is {why} since it was registered on "
            f"{manifest.get('created', '?')}{more}; its weights digests and profiles describe the "
            f"old files. Register it again: kvrelay models add {name} --base ... --replace "
            f"(or kvrelay models remove {name})"
        )
    _refresh_stamps(name, manifest)


def _refresh_stamps(name: str, manifest: dict) -> None:
    stale = False
    for files in manifest.get("files", {}).values():
        for rec in files.values():
            st = Path(rec["path"]).stat()
            if (st.st_size, st.st_mtime_ns) != (rec["size"], rec["mtime_ns"]):
                rec["size"], rec["mtime_ns"], stale = st.st_size, st.st_mtime_ns, True
    if stale:
        try:
            with family_lock(name):
                write_json_atomic(family_dir(name) / MANIFEST, manifest)
        except OSError:
            pass  # a read-only registry: hash again next time
